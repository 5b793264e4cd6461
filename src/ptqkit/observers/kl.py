"""`kl`: entropy calibration as in TensorRT (Migacz, 2017).

On the histogram of |x| (B bins), for each candidate threshold bin i (from the number of
quantized levels up to B): the reference P is the first i bins with every count beyond them
added to bin i-1; Q merges the first i bins (without the clipped mass) into `levels` equal
chunks and spreads each chunk's mass evenly over P's non-empty bins; both are smoothed so empty
bins cannot make KL infinite; the threshold minimizing KL(P || Q) wins, at (i + 0.5) bin widths.
Asymmetric specs use that threshold on each side, never beyond the observed min/max.
"""

from __future__ import annotations

import numpy as np
import torch

from ptqkit.core.observer_options import KLOptions
from ptqkit.core.qtypes import PerTensor
from ptqkit.observers.hist_observer import HistogramObserver

__all__ = ["KLObserver", "kl_threshold_bin"]


def _expand_quantized(sliced: np.ndarray, nonzero: np.ndarray, levels: int) -> np.ndarray:
    """Q: merge `sliced` into `levels` chunks, spread each chunk evenly over its `nonzero` bins."""
    n = len(sliced)
    bounds = (np.arange(levels + 1) * n) // levels  # chunk boundaries
    chunk_mass = np.add.reduceat(sliced, bounds[:-1])
    chunk_nonzero = np.add.reduceat(nonzero, bounds[:-1])
    per_bin = np.divide(
        chunk_mass, chunk_nonzero, out=np.zeros_like(chunk_mass), where=chunk_nonzero > 0
    )
    return np.repeat(per_bin, np.diff(bounds)) * nonzero


def _smooth(distribution: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins a tiny mass taken from the others, so KL stays finite (MXNet's trick)."""
    zero = distribution == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    taken = eps * n_zero / n_nonzero
    if taken >= 1.0:
        return None
    return distribution + eps * zero - taken * (~zero)


def _kl_at(abs_counts: np.ndarray, tail: np.ndarray, i: int, levels: int) -> float:
    """KL(P_i || Q_i) for keeping the first i bins (inf when undefined)."""
    sliced = abs_counts[:i].astype(np.float64)
    p = sliced.copy()
    p[-1] += tail[i]  # the clipped mass piles up in the last kept bin
    if p.sum() == 0:
        return np.inf
    q = _expand_quantized(sliced, (p > 0).astype(np.float64), levels)  # Q from the unclipped bins
    p_s, q_s = _smooth(p / p.sum()), _smooth(q / q.sum()) if q.sum() > 0 else None
    if p_s is None or q_s is None:
        return np.inf
    mask = p_s > 0
    if (q_s[mask] <= 0).any():  # smoothing could not cover an empty bin: KL is infinite
        return np.inf
    return float(np.sum(p_s[mask] * np.log(p_s[mask] / q_s[mask])))


def kl_threshold_bin(abs_counts: np.ndarray, levels: int, stride: int = 1) -> int:
    """Index i (number of bins kept) minimizing KL(P_i || Q_i); see the module docstring.

    With stride > 1, candidates are scanned every `stride` bins, then every bin within one
    stride of the best coarse candidate (KL is smooth in i at this scale)."""
    n = len(abs_counts)
    tail = np.concatenate([np.cumsum(abs_counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    coarse = list(range(levels, n + 1, stride)) + ([n] if (n - levels) % stride else [])
    best_i = min(coarse, key=lambda i: (_kl_at(abs_counts, tail, i, levels), i))
    if stride == 1:
        return best_i
    fine = range(max(levels, best_i - stride + 1), min(n, best_i + stride - 1) + 1)
    return min(fine, key=lambda i: (_kl_at(abs_counts, tail, i, levels), i))


class KLObserver(HistogramObserver):
    name = "kl"
    options_type = KLOptions
    granularities = (PerTensor,)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        qtype = self.spec.qtype
        levels = self.options.levels or (
            max(2, int(qtype.qmax - qtype.qmin + 1) // 2) if qtype.is_integer else 128
        )
        levels = min(levels, self._hist.bins_per_side)
        i = kl_threshold_bin(self._hist.abs_counts()[0].numpy(), levels, self.options.stride)
        t = (i + 0.5) * float(self._hist.bin_width[0])
        return self._clamp_to_seen(
            torch.tensor([-t], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)
        )
