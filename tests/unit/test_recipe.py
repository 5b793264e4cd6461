"""Recipe presets, validation with key paths, and exact JSON/YAML round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.engine.recipe import PRESETS, Override, Recipe, Scheme


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_presets_round_trip_exactly(preset: str, suffix: str, tmp_path: Path) -> None:
    recipe = Recipe.from_preset(preset)
    path = recipe.save(tmp_path / f"r{suffix}")
    back = Recipe.load(path)
    assert back == recipe
    assert back.to_dict() == recipe.to_dict()
    assert path.read_text() == back.save(tmp_path / f"again{suffix}").read_text()


def test_w8a8_preset_contents() -> None:
    r = Recipe.from_preset("w8a8", calibration="kl", ignore=["classifier"])
    assert r.scheme.weights.qtype == pq.INT8 and r.scheme.weights.granularity == pq.PerChannel(0)
    assert r.scheme.inputs.qtype == pq.UINT8 and not r.scheme.inputs.symmetric and not r.scheme.inputs.dynamic
    assert r.scheme.inputs.observer == "kl"
    assert r.ignore == ("classifier",)
    assert not r.keep_output_head


def test_llm_presets_keep_output_head_visibly() -> None:
    for name in ("w8a16", "w4a16"):
        r = Recipe.from_preset(name)
        assert r.keep_output_head is True
        assert r.to_dict()["keep_output_head"] is True
        assert r.scheme.inputs is None
        assert "Embedding" not in r.targets  # embeddings and norms are not targets
    assert Recipe.from_preset("w4a16").scheme.weights.granularity == pq.PerGroup(128)
    assert Recipe.from_preset("w4a16", group_size=64).scheme.weights.granularity == pq.PerGroup(64)
    assert Recipe.from_preset("w8a8_dynamic").scheme.inputs.dynamic


def test_every_default_is_written() -> None:
    d = Recipe.from_preset("w8a8").to_dict()
    assert set(d) == {"version", "name", "scheme", "targets", "ignore", "keep_output_head", "overrides", "algorithms", "calibration"}
    assert d["calibration"] == {"samples": 256, "seed": 0, "batch_size": 8}
    assert d["scheme"]["inputs"]["rounding"] == "half_even"


def test_overrides_round_trip(tmp_path: Path) -> None:
    base = Recipe.from_preset("w8a8")
    override = Override(match=("classifier", "re:features\\.0\\..*"), scheme=Scheme(weights=base.scheme.weights))
    recipe = Recipe(scheme=base.scheme, overrides=(override,), name="mixed")
    assert Recipe.load(recipe.save(tmp_path / "m.yaml")) == recipe


def _bad(data: dict, tmp_path: Path, suffix: str = ".json") -> Path:
    path = tmp_path / f"bad{suffix}"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["scheme"]["weights"].update(qtype="int9"), r"scheme\.weights: int qtype bits=9 is not supported; valid: 2\.\.8 or 16"),
        (lambda d: d["scheme"]["weights"].update(bits=4), r"scheme\.weights: unknown key\(s\) \['bits'\]"),
        (lambda d: d.update(colour="red"), r"recipe: unknown key\(s\) \['colour'\]"),
        (lambda d: d["calibration"].update(samples=0), r"calibration\.samples: 0 must be an integer >= 1"),
        (lambda d: d["calibration"].update(sample=3), r"calibration: unknown key\(s\) \['sample'\]"),
        (lambda d: d.update(version=7), r"version: 7 is not supported; this ptqkit reads version 1"),
        (lambda d: d.update(ignore="lm_head"), r"ignore: expected a list of non-empty strings, got 'lm_head'"),
        (lambda d: d["scheme"]["weights"].update(dynamic=True), r"scheme\.weights: weights are quantized ahead of time"),
        (lambda d: d["scheme"]["inputs"].update(granularity={"kind": "per_group", "size": 32}), r"scheme\.inputs\.granularity: per_group is for weights"),
        (lambda d: d.update(overrides=[{"match": ["x"]}]), r"overrides\[0\]: an override needs both 'match' and 'scheme'"),
        (lambda d: d.update(algorithms=[{"name": "magic"}]), r"algorithms\[0\]\.name: 'magic' is not a known algorithm"),
        (lambda d: d["scheme"]["inputs"].update(qtype="nf4"), r"scheme\.inputs: nf4 is a symmetric format"),
        # per-field checks (core.fields) name the full key path, the value and what is valid
        (lambda d: d["scheme"]["weights"].update(rounding="up"), r"scheme\.weights\.rounding: 'up' is unknown; valid: half_even, half_away, stochastic"),
        (lambda d: d["scheme"]["inputs"].update(observer="max"), r"scheme\.inputs\.observer: 'max' is unknown; valid: minmax, ema_minmax, percentile, mse, kl"),
        (lambda d: d["scheme"]["inputs"].update(dynamic="no"), r"scheme\.inputs\.dynamic: 'no' must be true or false"),
        (lambda d: d["calibration"].update(batch_size=2.5), r"calibration\.batch_size: 2\.5 must be an integer >= 1"),
        (lambda d: d["calibration"].update(seed=True), r"calibration\.seed: True must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        (lambda d: d.update(keep_output_head="yes"), r"keep_output_head: 'yes' must be true or false"),
        (lambda d: d.update(overrides=[{"match": ["x"], "scheme": {"weights": {"qtype": "int8", "symmetric": 1}}}]),
         r"overrides\[0\]\.scheme\.weights\.symmetric: 1 must be true or false"),
    ],
)
def test_bad_recipes_name_the_key_path(mutate, message: str, tmp_path: Path) -> None:
    data = Recipe.from_preset("w8a8").to_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        Recipe.load(_bad(data, tmp_path))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recipe file '.*nope\.yaml' does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json' is not valid json"):
        Recipe.load(broken)
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("scheme: [unclosed")
    with pytest.raises(ConfigError, match=r"broken\.yaml' is not valid YAML"):
        Recipe.load(broken_yaml)


def test_preset_errors() -> None:
    with pytest.raises(ConfigError, match="preset 'w3a3' is unknown; valid: w8a8, w8a8_dynamic, w8a16, w4a16, fp8"):
        Recipe.from_preset("w3a3")
    with pytest.raises(ConfigError, match="preset 'w8a16' has no calibrated activations; observer='kl' does not apply"):
        Recipe.from_preset("w8a16", observer="kl")
    with pytest.raises(ConfigError, match="targets: empty"):
        Recipe(scheme=Recipe.from_preset("w8a8").scheme, targets=())
