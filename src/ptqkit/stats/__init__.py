"""Tier 5: running a model on calibration data and collecting what algorithms and evaluation
read, through one collector (`collect`) over hooks on named modules (`hooks`): observers,
per-column ranges and Hessians on layer inputs (`input_stats`, `hessian`), layer-by-layer and
block-by-block replay (`sequential`, `graph_pass`), two models on the same data (`paired`), and
the data-parallel reduction of all of them (`distributed`)."""
