"""A streaming histogram whose result does not depend on how the data was batched.

Each row (one per channel, or a single row per tensor) covers [-R, R) with 2·B equal bins,
where R = 2^e is the smallest power of two strictly above every |x| seen. When data outgrows
R, the range doubles (as often as needed) and adjacent bins merge pairwise; because bin edges
at range 2R are a subset of the edges at range R (all are multiples of a power of two), this
re-binning is exact: the final counts equal those of one pass over all the data at the final R,
for any batch split or order. Memory is rows × 2B float64 counts, whatever the number of batches.
"""

from __future__ import annotations

import torch

__all__ = ["PowerOfTwoHistogram"]

_CHUNK = 1 << 20  # values binned per step (bounds the float64/int64 temporaries to ~8 MB each)
_ONE = torch.ones(1, dtype=torch.float64)
_MIN_EXPONENT = -40  # R never goes below 2^-40 (an all-zero input still gets a valid range)


def _exponent_for(absmax: torch.Tensor) -> torch.Tensor:
    """Smallest integer e with 2^e > absmax (element-wise), at least _MIN_EXPONENT."""
    safe = absmax.to(torch.float64).clamp_min(2.0**_MIN_EXPONENT)
    e = torch.floor(torch.log2(safe)).to(torch.int64) + 1
    # guard against log2 rounding: ensure 2^(e-1) <= absmax < 2^e
    e = torch.where(torch.ldexp(torch.ones_like(safe), e) <= safe, e + 1, e)
    return e.clamp_min(_MIN_EXPONENT)


class PowerOfTwoHistogram:
    """Counts of `rows` streams of values in 2·`bins_per_side` bins over [-2^e, 2^e) per row."""

    def __init__(self, rows: int, bins_per_side: int) -> None:
        if bins_per_side < 8 or bins_per_side & (bins_per_side - 1):
            raise ValueError(f"bins_per_side must be a power of two >= 8, got {bins_per_side}")
        self.bins_per_side = bins_per_side
        self.counts = torch.zeros(rows, 2 * bins_per_side, dtype=torch.float64)  # [rows, 2B]
        self.exponent = torch.full((rows,), _MIN_EXPONENT, dtype=torch.int64)  # [rows]

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    @property
    def range(self) -> torch.Tensor:
        """R per row (float64)."""
        return torch.ldexp(torch.ones(self.rows, dtype=torch.float64), self.exponent)

    @property
    def bin_width(self) -> torch.Tensor:
        return self.range / self.bins_per_side  # [rows]

    def edges(self) -> torch.Tensor:
        """Bin edges per row, [rows, 2B + 1]."""
        steps = torch.arange(-self.bins_per_side, self.bins_per_side + 1, dtype=torch.float64)
        return steps.unsqueeze(0) * self.bin_width.unsqueeze(1)

    def centers(self) -> torch.Tensor:
        """Bin centers per row, [rows, 2B]."""
        e = self.edges()
        return (e[:, 1:] + e[:, :-1]) / 2

    def grow_to(self, exponent: torch.Tensor) -> None:
        """Widen each row's range to 2^exponent (never shrinks), merging bins exactly."""
        target = torch.maximum(self.exponent, exponent)
        for shift in torch.unique(target - self.exponent).tolist():
            if shift == 0:
                continue
            rows = (target - self.exponent) == shift
            self.counts[rows] = self._merge_bins(self.counts[rows], int(shift))
        self.exponent = target

    def _merge_bins(self, counts: torch.Tensor, shift: int) -> torch.Tensor:
        """Counts at range R·2^shift from counts at range R: groups of 2^shift bins merge and
        the result sits in the middle 2B / 2^shift bins."""
        two_b = 2 * self.bins_per_side
        factor = 2**shift
        if factor >= two_b:  # everything falls into the two bins around zero
            merged = torch.zeros_like(counts)
            merged[:, self.bins_per_side - 1] = counts[:, : self.bins_per_side].sum(1)
            merged[:, self.bins_per_side] = counts[:, self.bins_per_side :].sum(1)
            return merged
        grouped = counts.reshape(counts.shape[0], two_b // factor, factor).sum(-1)  # [rows, 2B/f]
        out = torch.zeros_like(counts)
        start = self.bins_per_side - self.bins_per_side // factor
        out[:, start : start + two_b // factor] = grouped
        return out

    def add(self, values: torch.Tensor, absmax: torch.Tensor | None = None) -> None:
        """Add values laid out as [rows, n] (`absmax`: their per-row max |x|, if already known).

        Columns go in chunks of about _CHUNK elements, so temporaries stay bounded (a few MB)
        whatever the batch size; binning is exact, so chunking does not change the counts."""
        if absmax is None:
            absmax = torch.maximum(values.amax(dim=1), -values.amin(dim=1))  # [rows], no |x| copy
        self.grow_to(_exponent_for(absmax))
        width = self.bin_width.unsqueeze(1)  # [rows, 1], a power of two: x / width is exact
        offsets = torch.arange(self.rows).unsqueeze(1) * (2 * self.bins_per_side)  # [rows, 1]
        flat_counts = self.counts.view(-1)  # [rows * 2B]
        step = max(1, _CHUNK // max(1, self.rows))
        for chunk in values.split(step, dim=1):  # [rows, <= step]
            idx = torch.floor(chunk.to(torch.float64) / width).to(torch.int64) + self.bins_per_side
            idx = (
                idx.clamp_(0, 2 * self.bins_per_side - 1).add_(offsets).reshape(-1)
            )  # [rows * step]
            flat_counts.index_add_(0, idx, _ONE.expand(idx.numel()))

    def merge_(self, other: PowerOfTwoHistogram) -> None:
        if other.counts.shape != self.counts.shape:
            raise ValueError(
                f"histogram shapes differ: {tuple(other.counts.shape)} vs {tuple(self.counts.shape)}"
            )
        target = torch.maximum(self.exponent, other.exponent)
        theirs = PowerOfTwoHistogram(other.rows, other.bins_per_side)
        theirs.counts, theirs.exponent = other.counts.clone(), other.exponent.clone()
        theirs.grow_to(target)
        self.grow_to(target)
        self.counts += theirs.counts

    def abs_counts(self) -> torch.Tensor:
        """Histogram of |x| over [0, R) with B bins per row, folded exactly from the signed one."""
        b = self.bins_per_side
        return self.counts[:, b:] + self.counts[:, :b].flip(1)  # [rows, B]

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "exponent": self.exponent}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> PowerOfTwoHistogram:
        counts, exponent = tensors["counts"], tensors["exponent"]
        hist = cls(counts.shape[0], counts.shape[1] // 2)
        hist.counts, hist.exponent = counts.to(torch.float64), exponent.to(torch.int64)
        return hist


def quantile_edges(counts: torch.Tensor, edges: torch.Tensor, fraction: float) -> float:
    """Upper edge of the first bin at which the cumulative share reaches `fraction` (one row)."""
    total = counts.sum()
    cdf = torch.cumsum(counts, 0) / total
    index = int(
        torch.searchsorted(cdf, torch.tensor(min(max(fraction, 0.0), 1.0), dtype=cdf.dtype))
    )
    index = min(index, len(counts) - 1)
    return float(edges[index + 1])
