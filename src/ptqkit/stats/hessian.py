"""Streaming layer Hessian H = 2/N · Σ_n x_n x_nᵀ of the squared layer-output error, as GPTQ
needs it, accumulated from calibration inputs of a Linear layer [..., in].

Memory is one [in, in] float64 sum whatever N is. Each batch's Gram product XᵀX is computed in
the accumulator's dtype (float32 by default: the fast path) and added to a float64 sum, and H is
2/N times that sum, rounded to the dtype when asked for. float64 keeps 29 more bits than the
float32 products it adds, so the sum barely depends on the order of the additions: two
accumulators over disjoint data merged (`merge_`, as data-parallel calibration does) give the
float32 Hessian of one pass over the union, bit for bit except where a value sits on a float32
rounding boundary. (A running mean in float32 would differ in its last bits with the split, and
GPTQ's column order, argsort of diag H, can flip on such a difference.)
"""

from __future__ import annotations

import torch

from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = ["HessianAccumulator"]

_DTYPES = (torch.float32, torch.float64)


class HessianAccumulator:
    """Accumulates H = 2/N Σ x xᵀ over rows x of calibration inputs [..., in_features].

    `dtype` (float32 or float64) is the precision of each batch's Gram product and of the
    Hessian returned; inputs of any floating dtype are cast to it, and the products are summed
    in float64. `name` (a layer name) appears in error messages.
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        name: str | None = None,
    ) -> None:
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ConfigError(
                f"HessianAccumulator: in_features must be a positive integer, got {in_features!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(
                f"HessianAccumulator: dtype {dtype} is not supported; valid: torch.float32, torch.float64"
            )
        self.in_features = in_features
        self.name = name
        self._dtype = dtype
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)  # Σ x xᵀ [in, in]
        self._n = 0

    @property
    def num_samples(self) -> int:
        """Number of input rows (tokens) accumulated so far."""
        return self._n

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _where(self) -> str:
        return f"layer {self.name!r}" if self.name else "Hessian accumulator"

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of `x` [..., in_features] (e.g. [batch, seq, in])."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CalibrationDataError(
                f"{self._where()}: calibration input must be a floating-point tensor, got "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
            )
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise CalibrationDataError(
                f"{self._where()}: calibration input of shape {tuple(x.shape)} does not end in "
                f"in_features={self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features).to(self._dtype, copy=False)  # [n, in]
        n = rows.shape[0]
        if n == 0:
            return
        gram = rows.T @ rows  # [in, in]
        # A NaN or ±Inf anywhere in x reaches diag(XᵀX) (Σ x_i² is Inf or NaN): checking that
        # [in] diagonal is exact and far cheaper than scanning the [n, in] rows.
        if not torch.isfinite(gram.diagonal()).all():
            raise CalibrationDataError(
                f"{self._where()}: calibration input holds NaN/Inf value(s) (or values whose squares "
                "overflow); inputs must be finite"
            )
        self._sum += gram  # float32 products added in float64 (exactly, but for extreme ranges)
        self._n += n

    def merge_(self, other: HessianAccumulator) -> HessianAccumulator:
        """Fold `other` (accumulated over disjoint data) into this accumulator, in place."""
        if not isinstance(other, HessianAccumulator) or other.in_features != self.in_features:
            got = (
                other.in_features if isinstance(other, HessianAccumulator) else type(other).__name__
            )
            raise ConfigError(
                f"{self._where()}: cannot merge an accumulator with in_features={got} into one with "
                f"in_features={self.in_features}"
            )
        self._sum += other._sum.to(self._sum.device)
        self._n += other._n
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Plain tensors (the float64 Gram sum and N) from which `from_state` rebuilds it."""
        return {"gram_sum": self._sum.clone(), "samples": torch.tensor(self._n, dtype=torch.int64)}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32, name: str | None = None
    ) -> HessianAccumulator:
        gram_sum = state["gram_sum"]
        if gram_sum.ndim != 2 or gram_sum.shape[0] != gram_sum.shape[1] or gram_sum.dtype != torch.float64:
            raise ConfigError(
                f"Hessian state of layer {name!r}: expected a square float64 matrix, got "
                f"{tuple(gram_sum.shape)} {gram_sum.dtype}"
            )
        accumulator = cls(gram_sum.shape[0], dtype=dtype, device=gram_sum.device, name=name)
        accumulator._sum = gram_sum.clone()
        accumulator._n = int(state["samples"])
        return accumulator

    def divide_inputs_(self, scales: torch.Tensor) -> HessianAccumulator:
        """Make H what it would be had every input row been divided by `scales` [in]
        (H_ij / (s_i s_j)), as when SmoothQuant or AWQ rescales the layer's input channels."""
        if scales.shape != (self.in_features,) or not torch.isfinite(scales).all() or (scales <= 0).any():
            raise ConfigError(
                f"{self._where()}: input scales must be {self.in_features} positive finite values, "
                f"got shape {tuple(scales.shape)}"
            )
        inverse = 1.0 / scales.to(torch.float64)  # [in]
        self._sum.mul_(inverse[:, None]).mul_(inverse[None, :])
        return self

    def hessian(self) -> torch.Tensor:
        """A copy of H [in, in]; raises CalibrationDataError when nothing was accumulated."""
        if self._n == 0:
            raise CalibrationDataError(
                f"{self._where()}: no calibration inputs were accumulated, so there is no Hessian; "
                "feed at least one batch through update()"
            )
        return (self._sum * (2.0 / self._n)).to(self._dtype)
