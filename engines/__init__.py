"""Everything that turns a trained SKU (tdad) into an engine: ONNX export, precision, quantization, the runtimes
and tiled inference."""
