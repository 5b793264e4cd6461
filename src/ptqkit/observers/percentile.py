"""`percentile`: clip the range at a percentile of the observed values (from the histogram).

Symmetric specs clip |x| at the `percentile`-th percentile; asymmetric specs keep the central
p percent, cutting (100 - p) / 2 percent on each side (ONNX Runtime's convention). Thresholds are
bin edges (the outer edge of the bin where the cumulative share is reached), never beyond the
observed min/max.
"""

from __future__ import annotations

import torch

from ptqkit.core.observer_options import PercentileOptions
from ptqkit.core.qtypes import PerTensor
from ptqkit.observers.hist_observer import HistogramObserver

__all__ = ["PercentileObserver"]


def _cumulative_index(counts: torch.Tensor, share: float) -> int:
    """First bin index at which the cumulative count reaches `share` of the total."""
    cdf = torch.cumsum(counts, 0)
    target = torch.tensor(share, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, target)), len(counts) - 1)


class PercentileObserver(HistogramObserver):
    name = "percentile"
    options_type = PercentileOptions
    granularities = (PerTensor,)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.options.percentile / 100.0
        hist = self._hist
        width = float(hist.bin_width[0])
        if self.spec.symmetric:
            t = (_cumulative_index(hist.abs_counts()[0], p) + 1) * width
            lo, hi = torch.tensor([-t], dtype=torch.float64), torch.tensor([t], dtype=torch.float64)
        else:
            counts, edges = hist.counts[0], hist.edges()[0]
            cut = (1.0 - p) / 2
            lo = edges[_cumulative_index(counts, cut)].reshape(1)
            hi = edges[_cumulative_index(counts, 1.0 - cut) + 1].reshape(1)
        return self._clamp_to_seen(lo, hi)
