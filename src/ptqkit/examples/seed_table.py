"""The seed article's worked example, computed by the installed ptqkit.

Range [-2.4, 3.6] to uint8 (asymmetric) and to int8 (symmetric), x = 1.0 and a few neighbours,
quantized with each rounding mode: `python -m ptqkit.examples.seed_table`.
"""
from __future__ import annotations

import argparse
import sys

import torch

import ptqkit as pq

VALUES = (1.0, -2.4, 0.0, 0.5, 3.6)
MODES = ("half_even", "half_away", "stochastic")


def seed_table(values: tuple[float, ...] = VALUES, seed: int = 0) -> list[dict[str, object]]:
    """Rows of (format, rounding, x, q, dequantized, error) for the seed example."""
    rows: list[dict[str, object]] = []
    x = torch.tensor(values)
    for qtype, symmetric in ((pq.UINT8, False), (pq.INT8, True)):
        qp = pq.qparams_from_range(-2.4, 3.6, qtype, symmetric=symmetric)
        for mode in MODES:
            generator = torch.Generator().manual_seed(seed)
            q = pq.quantize_tensor(x, qp, rounding=mode, generator=generator)
            x_hat = pq.dequantize(q, qp)
            for xi, qi, di in zip(values, q.tolist(), x_hat.tolist()):
                rows.append(
                    {
                        "format": f"{qtype.name} ({'sym' if symmetric else 'asym'}, s={qp.scale.item():.5f}, z={qp.zero_point.item()})",
                        "rounding": mode,
                        "x": xi,
                        "q": qi,
                        "dequantized": di,
                        "error": di - xi,
                    }
                )
    return rows


def render(rows: list[dict[str, object]]) -> str:
    header = f"{'format':<34} {'rounding':<11} {'x':>6} {'q':>5} {'dequantized':>12} {'error':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['format']:<34} {r['rounding']:<11} {r['x']:>6.2f} {r['q']:>5} {r['dequantized']:>12.5f} {r['error']:>9.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="generator seed for stochastic rounding")
    args = parser.parse_args(argv)
    sys.stdout.write(render(seed_table(seed=args.seed)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
