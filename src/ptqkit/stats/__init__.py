"""Tier 5: running a model on calibration data and collecting what algorithms read: activation
observers on layer inputs (`hooks`), per-column ranges and Hessians (`input_stats`, `hessian`),
layer-by-layer and block-by-block replay (`sequential`, `graph_pass`), and the data-parallel
reduction of all of them (`distributed`)."""
