"""Mixed precision: per-layer formats with a real kernel, their latency measured on this machine,
and (to come) the accuracy x latency x size search over them."""
