"""Per-layer sensitivity and suggested exclusions, checked against re-quantizing from scratch."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.core.qtypes import PerTensor
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.sensitivity import degradation, model_metrics, sensitivity, suggest, task_metric

W4 = QuantSpec(qtype="int4", granularity=PerTensor(), symmetric=True)


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # layer 2: one huge weight on a nearly silent input ruins its per-tensor int4 grid
        model[0].weight[0].zero_()
        model[0].bias[0] = 0.01
        model[2].weight[:, 0] = 40.0
    base = Recipe.from_preset("w8a8")
    recipe = replace(base, scheme=replace(base.scheme, weights=W4))
    x = torch.randn(192, 16, generator=torch.Generator().manual_seed(1))
    return model, recipe, pq.CalibrationData.from_tensors(x[:128], batch_size=32), [x[128:160], x[160:]]


def test_the_ruined_layer_ranks_first_and_matches_quantizing_it_alone() -> None:
    model, recipe, calib, data = _case()
    qmodel = pq.quantize(model, recipe, calib, progress=False)
    ranked = sensitivity(model, qmodel, data)
    assert [r.name for r in ranked][0] == "2" and ranked[0].metric == "top1_agreement"
    assert ranked[0].degradation == pytest.approx(1 - ranked[0].value)
    alone = pq.quantize(model, replace(recipe, targets=("2",)), calib, progress=False)  # only layer 2, from scratch
    with torch.no_grad():
        reference = torch.cat([model(x) for x in data])
        expected = float((reference.argmax(-1) == torch.cat([alone(x) for x in data]).argmax(-1)).float().mean())
    assert ranked[0].value == pytest.approx(expected)
    assert ranked[0].degradation > 3 * ranked[-1].degradation


def test_suggest_excludes_the_layer_and_measures_the_result() -> None:
    model, recipe, calib, data = _case()
    suggestion = suggest(model, recipe, calib, data, candidates=3, max_exclude=1)
    assert suggestion.excluded == ("2",) and "2" in suggestion.recipe.ignore
    assert suggestion.gains["2"] == max(suggestion.gains.values()) > 0
    assert suggestion.measured > suggestion.baseline  # measured after quantizing the suggested recipe again
    requantized = pq.quantize(model, suggestion.recipe, calib, progress=False)
    with torch.no_grad():
        agreement = float(torch.cat([(model(x).argmax(-1) == requantized(x).argmax(-1)) for x in data]).float().mean())
    assert suggestion.measured == pytest.approx(agreement)
    assert suggestion.to_dict()["excluded"] == ["2"]


def test_metric_choice_and_degradation() -> None:
    assert task_metric({"accuracy_quantized": 0.9, "accuracy_float": 0.95, "top1_agreement": 0.97}) == "accuracy_quantized"
    assert degradation({"accuracy_quantized": 0.9, "accuracy_float": 0.95}, "accuracy_quantized") == pytest.approx(0.05)
    assert degradation({"perplexity_quantized": 12.0, "perplexity_float": 10.0}, "perplexity_quantized") == pytest.approx(2.0)
    assert degradation({"output_sqnr_db": 20.0}, "output_sqnr_db") == -20.0
    with pytest.raises(ConfigError, match="no task metric"):
        task_metric({"softmax_kl": 0.1})
    model, recipe, calib, data = _case()
    with pytest.raises(ConfigError, match="candidates=0 must be an integer >= 1"):
        suggest(model, recipe, calib, data, candidates=0)
    assert model_metrics(model, model, data)["top1_agreement"] == 1.0
