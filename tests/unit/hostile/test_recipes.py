"""Hostile recipes: every bad field is a ConfigError naming the file and the key when the recipe
loads (inspect sees it, not first quantize), and a file cannot make the loader use memory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ptqkit.core.errors import ConfigError
from ptqkit.engine.recipe import MAX_RECIPE_BYTES, Recipe

from .conftest import assert_refused, run_cli


def _w8a8() -> dict:
    return Recipe.from_preset("w8a8").to_dict()


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return path


def test_a_huge_group_size_is_refused_when_the_recipe_loads(tmp_path: Path) -> None:
    data = _w8a8()
    data["scheme"]["weights"]["granularity"] = {"kind": "per_group", "size": 10**12, "axis": -1}
    with pytest.raises(ConfigError, match=r"scheme\.weights\.granularity: per-group size must be a positive integer, got 1000000000000; at most 1048576"):
        Recipe.from_dict(data)
    path = _write(tmp_path, data)
    assert_refused(run_cli("inspect", path), 2, str(path), "per-group size", "1000000000000")


def test_a_non_numeric_axis_is_refused_by_inspect(tmp_path: Path, digits) -> None:
    data = _w8a8()
    data["scheme"]["weights"]["granularity"]["axis"] = "x"
    with pytest.raises(ConfigError, match=r"scheme\.weights\.granularity: per-channel axis='x' must be an integer"):
        Recipe.from_dict(data)
    path = _write(tmp_path, data)
    assert_refused(run_cli("inspect", path), 2, str(path), "axis='x'")
    assert_refused(run_cli(*digits.quantize_args(tmp_path / "out", "--recipe", str(path))), 2, "axis='x'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["ignore", "targets", "overrides"])
def test_an_invalid_regular_expression_is_refused_when_the_recipe_loads(tmp_path: Path, field: str) -> None:
    data = _w8a8()
    if field == "overrides":
        data["overrides"] = [{"match": ["re:("], "scheme": data["scheme"]}]
        where = r"overrides\[0\]\.match\[0\]"
    else:
        data[field] = ["Linear", "re:("] if field == "targets" else ["re:("]
        where = rf"{field}\[{1 if field == 'targets' else 0}\]"
    with pytest.raises(ConfigError, match=rf"{where}: 're:\(' is not a valid regular expression: missing \)"):
        Recipe.from_dict(data)


def test_invalid_pattern_through_the_cli(tmp_path: Path, digits) -> None:
    data = _w8a8()
    data["ignore"] = ["re:("]
    path = _write(tmp_path, data)
    assert_refused(run_cli("inspect", path), 2, "ignore[0]", "'re:('", "not a valid regular expression")
    assert_refused(run_cli(*digits.quantize_args(tmp_path / "out", "--recipe", str(path))), 2, "'re:('")


def test_a_recipe_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml' is not UTF-8 text \(byte 9: invalid continuation byte\)"):
        Recipe.load(path)
    assert_refused(run_cli("inspect", path), 2, str(path), "not UTF-8")


BOMB = (
    "version: 1\n"
    "name: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    "targets: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "ignore: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "overrides: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, digits) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + yaml.safe_dump({"scheme": _w8a8()["scheme"]}))
    with pytest.raises(ConfigError, match=r"bomb\.yaml': line 3: YAML aliases \(\*a\) are not accepted"):
        Recipe.load(path)
    assert_refused(run_cli(*digits.quantize_args(tmp_path / "out", "--recipe", str(path))), 2, "YAML aliases")
    assert not (tmp_path / "out").exists()


def test_a_set_value_with_aliases_is_refused(tmp_path: Path, digits) -> None:
    result = run_cli(*digits.quantize_args(tmp_path / "out", "--preset", "w8a8", "--set", "ignore=[&a stem, *a]"))
    assert_refused(result, 2, "--set 'ignore=[&a stem, *a]'", "YAML aliases (*a)")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (["a", "list"], r"name: must be a non-empty string of at most 200 characters, got a list"),
        (5, r"name: must be a non-empty string of at most 200 characters, got a int"),
        ("x" * 201, r"name: must be a non-empty string of at most 200 characters, got 201 characters"),
        ("", r"name: must be a non-empty string"),
    ],
)
def test_the_name_is_type_checked(name: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({**_w8a8(), "name": name})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("version", True, r"version: True is not supported"),
        ("version", "1", r"version: '1' is not supported"),
        ("overrides", 5, r"recipe\.overrides: expected a list, got int 5"),
        ("algorithms", {"name": "rtn"}, r"recipe\.algorithms: expected a list, got dict"),
        ("calibration", {"seed": 2**70}, r"calibration\.seed: 1180591620717411303424 must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
        ("algorithms", [{"name": ["rtn"]}], r"algorithms\[0\]\.name: \['rtn'\] is not a known algorithm"),
        ("algorithms", [{"name": "smoothquant", "alpha": math.nan}], r"algorithms\[0\]\.alpha: nan is not a finite number"),
        ("algorithms", [{"name": "smoothquant", "alpha_overrides": [["re:.*", math.inf]]}], r"algorithms\[0\]\.alpha_overrides\[0\]\[1\]: inf is not a finite number"),
    ],
)
def test_top_level_fields_are_type_checked(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({**_w8a8(), key: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"observer": "percentile", "observer_options": {"percentile": math.nan}}, r"observer_options\['percentile'\] = nan: must be a finite number"),
        ({"observer": "mse", "observer_options": {"min_ratio": math.inf}}, r"observer_options\['min_ratio'\] = inf: must be a finite number"),
        ({"observer": "kl", "observer_options": {"bins": 2**40}}, r"bins=1099511627776 must be a power of two >= 8 \(bins per sign\), at most 1048576"),
        ({"observer": "mse", "observer_options": {"grid": 10**9}}, r"grid=1000000000 must be an integer >= 2, at most 10000"),
        ({"observer_options": ["bins", 8]}, r"observer_options must be a mapping of option -> value"),
        ({"rounding": ["half_even"]}, r"scheme\.inputs\.rounding: \['half_even'\] is unknown; valid: half_even, half_away, stochastic"),
        ({"granularity": {"kind": "per_group"}}, r"scheme\.inputs\.granularity: per_group needs \['size'\] \(its keys: \['axis', 'size'\]\)"),
        ({"granularity": {"kind": ["per_tensor"]}}, r"scheme\.inputs\.granularity\.kind: \['per_tensor'\] is unknown"),
    ],
)
def test_spec_fields_are_checked(change: dict, message: str) -> None:
    data = _w8a8()
    data["scheme"]["inputs"].update(change)
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_yaml_keys_of_mixed_types_are_reported_not_sorted_into_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"scheme": _w8a8()["scheme"]}) + "1: x\nnmae: y\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[1, 'nmae'\] \(did you mean 'name'\?\)"):
        Recipe.load(path)


def test_oversized_deep_and_huge_number_files(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml' is larger than 1000000 bytes"):
        Recipe.load(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"deep\.json': json nested too deeply"):
        Recipe.load(deep)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ConfigError, match=r"deep\.yaml'"):
        Recipe.load(deep_yaml)
    huge = tmp_path / "huge.json"
    huge.write_text('{"version": ' + "9" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"huge\.json' is not valid json: Exceeds the limit"):
        Recipe.load(huge)


def test_a_directory_or_a_misspelled_preset(tmp_path: Path, digits) -> None:
    with pytest.raises(ConfigError, match=r"recipe '.*' is a directory; pass a recipe file"):
        Recipe.load(tmp_path)
    assert_refused(run_cli(*digits.quantize_args(tmp_path / "out", "--recipe", str(tmp_path))), 2, "is a directory")
    with pytest.raises(ConfigError, match=r"recipe 'w3a3' is neither a preset \(w8a8, w8a8_dynamic, w8a16, w4a16, fp8\) nor an existing recipe file"):
        Recipe.load("w3a3")
    assert_refused(run_cli("inspect", "w3a3"), 2, "'w3a3' is neither a preset", "w4a16")


def test_a_device_file_as_recipe() -> None:
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(ConfigError, match=r"recipe '/dev/zero' is not a regular file"):
        Recipe.load("/dev/zero")


def test_recipe_objects_built_in_python_are_type_checked_too() -> None:
    from ptqkit.engine.recipe import CalibrationSettings, Override, Scheme

    scheme = Recipe.from_preset("w8a8").scheme
    with pytest.raises(ConfigError, match=r"overrides\[\]\.scheme: \{'weights': None\} must be a Scheme"):
        Override(match=("stem.*",), scheme={"weights": None})
    with pytest.raises(ConfigError, match=r"overrides\[0\]: 'stem' must be an Override"):
        Recipe(scheme=scheme, overrides=["stem"])
    with pytest.raises(ConfigError, match=r"overrides: expected a list, got str"):
        Recipe(scheme=scheme, overrides="stem")
    with pytest.raises(ConfigError, match=r"calibration: \{'samples': 8\} must be a CalibrationSettings"):
        Recipe(scheme=scheme, calibration={"samples": 8})
    assert Recipe(scheme=scheme, calibration=CalibrationSettings(seed=2**64 - 1)).calibration.seed == 2**64 - 1
    with pytest.raises(ConfigError, match=r"targets\[0\]: 're:\[' is not a valid regular expression"):
        Recipe(scheme=Scheme(weights=scheme.weights), targets=("re:[",))


def test_a_saved_recipe_never_holds_the_aliases_load_refuses(tmp_path: Path) -> None:
    import dataclasses

    from ptqkit.algorithms import ALGORITHMS

    layers = ("re:.*intermediate.*",)  # one tuple object in two algorithms: PyYAML would anchor it
    recipe = dataclasses.replace(
        Recipe.from_preset("w8a8"), algorithms=(ALGORITHMS["input_smoothing"](layers=layers), ALGORITHMS["outlier_channels"](layers=layers))
    )
    path = recipe.save(tmp_path / "shared.yaml")
    assert "&id" not in path.read_text() and Recipe.load(path) == recipe
    assert yaml.safe_dump(Recipe.from_preset("w4a16").to_dict(), sort_keys=False) == Recipe.from_preset("w4a16").to_yaml()  # unchanged otherwise
