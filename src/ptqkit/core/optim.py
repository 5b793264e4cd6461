"""Adam, written out: `torch.optim` imports torch._dynamo, which costs seconds at start-up, and
the two users here (AdaRound, the digits CNN) need one update rule, not an optimizer framework."""
from __future__ import annotations

import torch

__all__ = ["ADAM_BETAS", "ADAM_EPS", "adam_step_"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@torch.no_grad()
def adam_step_(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, step: int, lr: float) -> None:
    """One Adam update of `param` in place (Kingma & Ba 2015): moments `m`, `v` updated in place,
    bias-corrected for `step` (1 for the first update)."""
    beta1, beta2 = ADAM_BETAS
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    param.sub_(lr * (m / (1.0 - beta1**step)) / ((v / (1.0 - beta2**step)).sqrt() + ADAM_EPS))
