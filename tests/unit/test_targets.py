"""Target resolution: types, globs, regexes, ancestors, overrides, output head, errors."""
from __future__ import annotations

import pytest
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError, UnsupportedModelError
from ptqkit.engine.recipe import Override, Recipe, Scheme
from ptqkit.engine.targets import pattern_matches, resolve_plan


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.up_proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lm_head = nn.Linear(8, 32, bias=False)


def _names(plan: pq.targets.Plan) -> list[str]:
    return [layer.name for layer in plan.layers]


def test_default_targets_pick_linear_and_conv_not_embedding_or_norm() -> None:
    plan = resolve_plan(TinyLM(), Recipe.from_preset("w8a8"))
    assert _names(plan) == ["layers.0.q_proj", "layers.0.up_proj", "layers.1.q_proj", "layers.1.up_proj", "conv", "lm_head"]
    assert "6 module(s) quantized, 0 left in float" in plan.render()


def test_keep_output_head_skips_lm_head() -> None:
    plan = resolve_plan(TinyLM(), Recipe.from_preset("w4a16"))
    assert "lm_head" not in _names(plan)
    assert ("lm_head", "Linear", "output head kept in float (keep_output_head)") in plan.skipped


def test_ignore_globs_regex_and_ancestors() -> None:
    recipe = Recipe.from_preset("w8a16", ignore=["layers.0", "re:.*up_proj", "*conv*"])
    plan = resolve_plan(TinyLM(), recipe)
    assert _names(plan) == ["layers.1.q_proj"]
    reasons = {name: why for name, _, why in plan.skipped}
    assert reasons["layers.0.q_proj"] == "ignore 'layers.0'"
    assert reasons["layers.1.up_proj"] == "ignore 're:.*up_proj'"


def test_targets_by_name_and_embedding_gets_no_input_spec() -> None:
    recipe = Recipe.from_preset("w8a8", targets=["Embedding", "layers.*.q_proj"])
    plan = resolve_plan(TinyLM(), recipe)
    assert _names(plan) == ["embed", "layers.0.q_proj", "layers.1.q_proj"]
    assert plan.layers[0].inputs is None and plan.layers[1].inputs is not None


def test_overrides_first_match_wins_and_empty_scheme_skips() -> None:
    base = Recipe.from_preset("w8a8")
    w4 = Scheme(weights=pq.QuantSpec(qtype="int4", granularity=pq.PerGroup(4)))
    recipe = Recipe(
        scheme=base.scheme,
        overrides=(Override(match=("*.up_proj",), scheme=w4), Override(match=("conv",), scheme=Scheme())),
    )
    plan = resolve_plan(TinyLM(), recipe)
    by_name = {layer.name: layer for layer in plan.layers}
    assert by_name["layers.0.up_proj"].weights.qtype == pq.INT4 and by_name["layers.0.up_proj"].inputs is None
    assert by_name["layers.0.up_proj"].reason == "override '*.up_proj'"
    assert "conv" not in by_name
    assert plan.needs_calibration


def test_patterns_that_match_nothing_list_closest_names() -> None:
    with pytest.raises(ConfigError, match=r"ignore: pattern 'layers\.0\.q_prj' matches no module; closest module names: \['layers\.0\.q_proj'"):
        resolve_plan(TinyLM(), Recipe.from_preset("w8a8", ignore=["layers.0.q_prj"]))
    with pytest.raises(ConfigError, match=r"targets: pattern 'layers\.\*\.norm' matches no quantizable module"):
        resolve_plan(TinyLM(), Recipe.from_preset("w8a8", targets=["Linear", "layers.*.norm"]))
    bad_override = Override(match=("head",), scheme=Scheme())
    with pytest.raises(ConfigError, match=r"overrides\[0\]\.match: pattern 'head' matches no quantizable module; closest module names: \['lm_head'"):
        resolve_plan(TinyLM(), Recipe(scheme=Recipe.from_preset("w8a8").scheme, overrides=(bad_override,)))


def test_type_filters_that_match_nothing_are_fine() -> None:
    # the default targets name Conv2d and Conv1D; a model without them is not an error
    assert resolve_plan(nn.Sequential(nn.Linear(2, 2)), Recipe.from_preset("w8a8")).layers


def test_model_with_nothing_to_quantize() -> None:
    with pytest.raises(UnsupportedModelError, match=r"nothing to quantize in Sequential: no module of the supported types"):
        resolve_plan(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), Recipe.from_preset("w8a8"))
    with pytest.raises(UnsupportedModelError, match="nothing to quantize"):
        resolve_plan(nn.Sequential(nn.Linear(2, 2)), Recipe.from_preset("w8a8", ignore=["0"]))


def test_hf_conv1d_is_a_target() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(12, 4))
    plan = resolve_plan(model, Recipe.from_preset("w8a16"))
    assert [(layer.name, layer.module_type) for layer in plan.layers] == [("0", "Conv1D")]


def test_pattern_matching_rules() -> None:
    assert pattern_matches("layers.*", "layers.0.q_proj")
    assert pattern_matches("layers.0", "layers.0.q_proj")  # an ancestor
    assert not pattern_matches("layers.0", "layers.10.q_proj")
    assert pattern_matches("re:layers\\.[0-9]+\\.q_proj", "layers.12.q_proj")
    assert not pattern_matches("re:q_proj", "layers.12.q_proj")  # full match only


def test_convs_with_other_padding_modes_stay_float_and_say_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1))
    plan = resolve_plan(model, Recipe.from_preset("w8a16"))
    assert [layer.name for layer in plan.layers] == ["1"]
    assert plan.skipped == (("0", "Conv2d", "padding_mode='reflect' is not supported (zeros only); left in float"),)
