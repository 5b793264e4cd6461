"""Mixed precision: per-layer formats with a real kernel (`formats`), their latency measured on
this machine (`latency`), and the accuracy x latency x size search over them (`search`, also
`ptqkit.search`)."""
