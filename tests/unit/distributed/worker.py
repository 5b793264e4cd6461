"""Run under torchrun: quantize every case of `cases.py` data-parallel and save each quantized
model from rank 0 (`OUT/<case>/`), and write the float model's data-parallel perplexity on
`cases.eval_windows()` to OUT/perplexity.json. Usage:
    torchrun --standalone --nproc-per-node 2 -m tests.unit.distributed.worker OUT [CASE ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import ptqkit as pq
from ptqkit.eval.metrics import perplexity

from .cases import CASES, eval_windows, model_and_data


def main(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, _ = model_and_data()
    value = perplexity(model, eval_windows(), batch_size=2, distributed=True)
    if dist.get_rank() == 0:
        (out / "perplexity.json").write_text(json.dumps(value))
    for name in names or list(CASES):
        model, data = model_and_data()
        qmodel = pq.quantize(model, CASES[name](), data, progress=False, distributed=True)
        if dist.get_rank() == 0:
            pq.save(qmodel, out / name)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
