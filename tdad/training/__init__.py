"""Training a SKU: data sets, anomaly synthesis and its textures, validation defects, sample data, the loop."""
