"""Weight and model algorithms: maths as pure functions plus thin frozen configs.

`ALGORITHMS` maps the name used in recipes to the config class (one explicit dict, no
discovery). Every registered config is a frozen keyword-only dataclass of plain JSON values.
"""

from __future__ import annotations

from ptqkit.algorithms.gptq import GPTQConfig, gptq_quantize_weight
from ptqkit.algorithms.hessian import HessianAccumulator
from ptqkit.algorithms.rtn import RTNConfig, rtn_qparams, rtn_quantize_weight
from ptqkit.algorithms.weight_quant import SCALE_RULES, WeightQuantResult, weight_qparams

__all__ = [
    "ALGORITHMS",
    "SCALE_RULES",
    "GPTQConfig",
    "HessianAccumulator",
    "RTNConfig",
    "WeightQuantResult",
    "gptq_quantize_weight",
    "rtn_qparams",
    "rtn_quantize_weight",
    "weight_qparams",
]

ALGORITHMS: dict[str, type] = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    # CNN algorithms (bn_fold, cle, bias_correction, adaround) register here, one line each,
    # importing their config class above: "name": ConfigClass.
}
