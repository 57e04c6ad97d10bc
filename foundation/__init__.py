"""What every layer may import: operator errors, logging, image decoding, the GPU pre-flight. It imports nothing of
the project."""
