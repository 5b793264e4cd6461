"""`mse`: the clipping range that minimizes the expected quantization MSE for the target qtype.

Candidates shrink the observed range by ratios in [min_ratio, 1] (both ends by the same ratio
for asymmetric specs), on a coarse grid and then a fine grid around each row's best; each
candidate's error is evaluated on the histogram (bin centers
weighted by counts) with the spec's own qtype, symmetry and rounding grid. Per-channel specs
keep one histogram row per channel.
"""

from __future__ import annotations

import torch

from ptqkit.core.observer_options import MSEOptions
from ptqkit.core.primitives import fake_quantize, qparams_from_range
from ptqkit.core.qtypes import PerChannel, PerTensor
from ptqkit.observers.hist_observer import HistogramObserver

__all__ = ["MSEObserver"]

_MAX_ELEMENTS = 1 << 22  # histogram cells evaluated per call (~ 4M: tens of MB of temporaries)


class MSEObserver(HistogramObserver):
    name = "mse"
    options_type = MSEOptions
    granularities = (PerTensor, PerChannel)

    def _bins(self, rows: int) -> int:
        return self.options.bins or (2048 if rows == 1 else 256)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        centers = self._hist.centers().to(torch.float32)  # [rows, 2B]
        counts = self._hist.counts  # [rows, 2B]
        lo0 = self._row_min.clamp(max=0.0)
        hi0 = self._row_max.clamp(min=0.0)
        if self.spec.symmetric:
            absmax = torch.maximum(-lo0, hi0)
            lo0, hi0 = -absmax, absmax
        rows = counts.shape[0]
        best_err = torch.full((rows,), float("inf"), dtype=torch.float64)
        best_ratio = torch.ones(rows, dtype=torch.float64)

        def search(ratios: torch.Tensor) -> None:  # ratios: [K, rows]; all K candidates in one call
            nonlocal best_err, best_ratio
            k = ratios.shape[0]
            flat = PerChannel(0)  # one parameter per (candidate, row)
            qp = qparams_from_range(
                (lo0 * ratios).reshape(-1),
                (hi0 * ratios).reshape(-1),  # [K * rows]
                self.spec.qtype,
                symmetric=self.spec.symmetric,
                granularity=flat,
            )
            tiled = centers.repeat(k, 1)  # [K * rows, 2B]
            sq = (fake_quantize(tiled, qp).to(torch.float64) - tiled.to(torch.float64)) ** 2
            err = (sq.reshape(k, rows, -1) * counts).sum(2)  # [K, rows]
            err_k, arg_k = err.min(0)  # first (smallest ratio) minimum per row
            pick = ratios.gather(0, arg_k.unsqueeze(0)).squeeze(0)  # [rows]
            better = err_k < best_err
            best_err = torch.where(better, err_k, best_err)
            best_ratio = torch.where(better, pick, best_ratio)

        per_call = max(
            1, _MAX_ELEMENTS // counts.numel()
        )  # candidates per call: bounded temporaries

        def search_all(
            ratios: torch.Tensor,
        ) -> None:  # in order, so ties still go to the smallest ratio
            for chunk in ratios.split(per_call):
                search(chunk)

        grid, low = self.options.grid, self.options.min_ratio
        search_all(
            torch.linspace(low, 1.0, grid, dtype=torch.float64).unsqueeze(1).expand(grid, rows)
        )
        step = (1.0 - low) / (grid - 1)  # refine around each row's best coarse ratio
        fine = torch.linspace(-step, step, grid, dtype=torch.float64).unsqueeze(
            1
        ) + best_ratio.unsqueeze(0)
        search_all(fine.clamp(low, 1.0))
        best_lo, best_hi = lo0 * best_ratio, hi0 * best_ratio
        return self._clamp_to_seen(best_lo, best_hi)
