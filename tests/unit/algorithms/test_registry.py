"""The algorithm registry is the one place that maps config types to what runs them: every
recipe algorithm has a row, the drivers dispatch through it, and a new algorithm needs nothing
but its row."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.algorithms import ALGORITHMS, REGISTRY, BiasCorrectionConfig, GPTQConfig
from ptqkit.algorithms.pipeline import split_algorithms
from ptqkit.algorithms.registry import Algorithm, Engine, Stage, algorithm_of
from ptqkit.algorithms.rtn import rtn_qparams
from ptqkit.core.errors import ConfigError
from ptqkit.core.spec import QParams

SRC = Path(__file__).resolve().parents[3] / "src" / "ptqkit"


def test_every_recipe_name_has_one_row() -> None:
    assert [row.name for row in REGISTRY.values()] == list(ALGORITHMS)
    for name, config_type in ALGORITHMS.items():
        assert REGISTRY[config_type].name == name and REGISTRY[config_type].config is config_type


def test_rows_declare_where_each_algorithm_runs() -> None:
    assert algorithm_of(GPTQConfig()).engine is Engine.BLOCKS
    assert algorithm_of(GPTQConfig()).layer_stats(GPTQConfig()).hessian
    assert algorithm_of(GPTQConfig()).memory(GPTQConfig(), [4, 8], 3) == (16 + 64) * 8 + 5 * 64 * 4
    analytic, empirical = BiasCorrectionConfig(mode="analytic"), BiasCorrectionConfig(mode="empirical")
    assert algorithm_of(analytic).engine_of(analytic) is Engine.MODEL
    assert algorithm_of(empirical).engine_of(empirical) is Engine.LAYERS
    stages = split_algorithms([GPTQConfig()])
    assert stages.blockwise and not stages.layerwise
    with pytest.raises(ConfigError, match="is not a registered algorithm"):
        algorithm_of(object())


def _config_names() -> set[str]:
    return {config.__name__ for config in REGISTRY}


def test_no_isinstance_dispatch_on_config_types_outside_their_own_modules() -> None:
    """Drivers look rows up; only an algorithm's own module may check its config's type."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                foreign = (names & _config_names()) - defined
                if foreign:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} isinstance(..., {sorted(foreign)})")
    assert offenders == []


@dataclass(frozen=True, kw_only=True)
class HalfStepConfig:
    """A data-free weight quantizer that is not part of ptqkit: RTN's grid at half the step."""

    name: ClassVar[str] = "half_step"


def _half_step_grid(weight: torch.Tensor, spec, config: HalfStepConfig) -> QParams:
    grid = rtn_qparams(weight, spec)
    return QParams(grid.scale / 2, grid.zero_point, grid.qtype, grid.granularity)


def test_a_new_algorithm_is_one_row(monkeypatch) -> None:
    """A weight quantizer registered by one row runs through pq.quantize with no driver change."""
    row = Algorithm("half_step", HalfStepConfig, Stage.WEIGHT_QUANTIZER, Engine.CONVERSION, handler=_half_step_grid)
    monkeypatch.setitem(REGISTRY, HalfStepConfig, row)
    monkeypatch.setitem(ALGORITHMS, "half_step", HalfStepConfig)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    recipe = pq.Recipe.from_preset("w8a16", algorithms=(HalfStepConfig(),))
    plain = pq.quantize(model, pq.Recipe.from_preset("w8a16"), progress=False)
    halved = pq.quantize(model, recipe, progress=False)
    torch.testing.assert_close(halved[0].weight_qparams.scale, plain[0].weight_qparams.scale / 2, rtol=0, atol=0)
    assert pq.Recipe.from_dict(recipe.to_dict()).algorithms == (HalfStepConfig(),)
