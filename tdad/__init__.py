"""The method (TDAD): what a SKU is and how it is trained: networks, schedule, manifest, preprocessing, scoring,
tiling geometry, and the training in tdad.training. No runtime code: engines run what this trains."""
