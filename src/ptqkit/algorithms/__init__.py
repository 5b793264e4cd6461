"""Weight and model algorithms: maths as pure functions plus thin frozen configs.

`ALGORITHMS` maps the name used in recipes to the config class and `REGISTRY` each config class
to its row (stage, engine, statistics, memory estimate, handler): both come from the rows of
`algorithms.registry`, the one place an algorithm is registered. Every registered config is a
frozen keyword-only dataclass of plain JSON values.
"""

from __future__ import annotations

from ptqkit.algorithms.adaround import AdaRoundConfig
from ptqkit.algorithms.awq import AWQConfig
from ptqkit.algorithms.bias_correction import BiasCorrectionConfig
from ptqkit.algorithms.bn_fold import BNFoldConfig
from ptqkit.algorithms.cle import CLEConfig
from ptqkit.algorithms.gptq import GPTQConfig, gptq_quantize_weight
from ptqkit.algorithms.input_smoothing import InputSmoothingConfig
from ptqkit.algorithms.llm_int8 import LLMInt8Config
from ptqkit.algorithms.outlier_channels import OutlierChannelsConfig
from ptqkit.algorithms.registry import ALGORITHMS, REGISTRY, Algorithm, Engine, Stage
from ptqkit.algorithms.rtn import RTNConfig, rtn_qparams, rtn_quantize_weight
from ptqkit.algorithms.smoothquant import SmoothQuantConfig
from ptqkit.algorithms.weight_quant import SCALE_RULES, WeightQuantResult, clipped_weight_qparams
from ptqkit.stats.hessian import HessianAccumulator

__all__ = [
    "ALGORITHMS",
    "REGISTRY",
    "Algorithm",
    "Engine",
    "Stage",
    "AdaRoundConfig",
    "AWQConfig",
    "BNFoldConfig",
    "BiasCorrectionConfig",
    "CLEConfig",
    "SCALE_RULES",
    "GPTQConfig",
    "HessianAccumulator",
    "InputSmoothingConfig",
    "LLMInt8Config",
    "OutlierChannelsConfig",
    "RTNConfig",
    "SmoothQuantConfig",
    "WeightQuantResult",
    "gptq_quantize_weight",
    "rtn_qparams",
    "rtn_quantize_weight",
    "clipped_weight_qparams",
]
