"""Property test of the hostile-input contract: mutated recipes, quantization.json files and
calibration files fed to `inspect`, `quantize` and `eval` either work or fail with a PTQError
subclass, one line on stderr and that class's exit code; nothing else ever escapes. Bounded
(derandomized, a few dozen examples each) to run in well under a minute."""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptqkit.cli import EXIT_CODES, main
from ptqkit.core.errors import PTQError
from ptqkit.engine.recipe import Recipe

from .test_data import WordTokenizer

KEYS = [
    "version", "name", "scheme", "weights", "inputs", "qtype", "granularity", "kind", "axis", "size", "symmetric", "rounding",
    "dynamic", "observer", "observer_options", "targets", "ignore", "overrides", "match", "algorithms", "calibration",
    "samples", "seed", "batch_size", "keep_output_head", "layers", "skipped", "aliases", "model", "class", "recipe",
    "weight_shape", "input_qparams", "scale", "zero_point", "module", "plan_type", "format_version", "model_sha256",
]
STRINGS = [
    "", "re:(", "re:.*", "Linear", "Conv2d", "*", "stem.0", "classifier", "int4", "int8", "uint8", "nf4", "fp8_e4m3",
    "per_group", "per_channel", "per_token", "minmax", "kl", "percentile", "mse", "QuantLinear", "InputOnly", "x" * 300,
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(STRINGS), st.text(max_size=6),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
PLAUSIBLE = st.one_of(  # values a recipe field may well hold: many mutations stay valid and quantize runs
    st.sampled_from([0, 1, 2, 4, 8, 16, 64, -1, 10**12, 0.5, math.nan, True, False, None, [], ["Linear"], ["re:stem.*"], ["classifier"]]),
    st.sampled_from(STRINGS),
)
SETTINGS = dict(
    derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
_counter = itertools.count()


def _nodes(tree: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON-like tree (the root is ())."""
    found = [path]
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in children:
        found += _nodes(child, (*path, key))
    return found


@st.composite
def leaf_mutated(draw: Any, tree: Any) -> Any:
    """`tree` with one leaf (a scalar or an empty container) replaced by a plausible value."""
    tree = copy.deepcopy(tree)
    leaves = [p for p in _nodes(tree) if p and not (_at(tree, p) and isinstance(_at(tree, p), (dict, list)))]
    path = draw(st.sampled_from(leaves))
    _at(tree, path[:-1])[path[-1]] = draw(PLAUSIBLE)
    return tree


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def mutated(draw: Any, tree: Any, steps: int = 3) -> Any:
    """`tree` with 1..steps random edits: a node replaced, deleted, or given a new key."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, steps))):
        path = draw(st.sampled_from(_nodes(tree)))
        if not path:
            if draw(st.integers(0, 9)) == 0:
                tree = draw(VALUES)  # the whole document replaced
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return tree


def _cli(argv: list[str]) -> None:
    """Run the CLI in-process: 0, or one "ptqkit: error:" line with the exit code of a PTQError subclass."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)  # anything but a PTQError propagates and fails the test
    if code == 0:
        return
    lines = [line for line in err.getvalue().splitlines() if line.startswith("ptqkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(["--debug", *argv])
        except PTQError as exc:
            expected = next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)
            assert code == expected, (code, type(exc).__name__, str(exc))
            return
    raise AssertionError(f"exit {code} without a PTQError under --debug: {err.getvalue()}")


def _dump(tree: Any, path: Path, as_yaml: bool) -> Path:
    if as_yaml:
        import yaml

        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    else:
        path.write_text(json.dumps(tree, allow_nan=True))
    return path


RECIPE = Recipe.from_preset("w8a8").to_dict()


@settings(max_examples=60, **SETTINGS)
@given(tree=mutated(RECIPE), as_yaml=st.booleans())
def test_mutated_recipes_through_inspect(tmp_path: Path, tree: Any, as_yaml: bool) -> None:
    path = _dump(tree, tmp_path / f"r{next(_counter)}.{'yaml' if as_yaml else 'json'}", as_yaml)
    _cli(["inspect", str(path)])


@settings(max_examples=15, **SETTINGS)
@given(tree=st.one_of(leaf_mutated(RECIPE), mutated(RECIPE, steps=1)))
def test_mutated_recipes_through_quantize(tmp_path: Path, digits, tree: Any) -> None:
    if isinstance(tree, dict) and tree.get("algorithms"):
        tree["algorithms"] = []  # bounded work: no optimisation loops with drawn iteration counts
    path = _dump(tree, tmp_path / f"q{next(_counter)}.json", False)
    _cli(digits.quantize_args(tmp_path / f"out{next(_counter)}", "--recipe", str(path)))


@pytest.fixture(scope="module")
def manifest(digits) -> dict:
    return json.loads((digits.run / "quantization.json").read_text())


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_mutated_quantization_json_through_inspect_and_eval(tmp_path: Path, digits, manifest: dict, data: Any) -> None:
    run = Path(shutil.copytree(digits.run, tmp_path / f"run{next(_counter)}"))
    (run / "quantization.json").write_text(json.dumps(data.draw(mutated(manifest)), allow_nan=True))
    _cli(["inspect", str(run)])
    if data.draw(st.integers(0, 4)) == 0:  # eval loads the model: a fifth of the examples
        _cli(["eval", str(run), "--trust-factory", "--quiet"])


DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


@st.composite
def calibration_file(draw: Any, folder: Path) -> Path:
    """A .pt or .safetensors file of drawn tensors (shapes, dtypes, NaN/Inf, huge values), or drawn bytes."""
    name = folder / f"c{next(_counter)}{draw(st.sampled_from(['.pt', '.safetensors', '.pth']))}"
    if draw(st.integers(0, 5)) == 0:
        name.write_bytes(draw(st.binary(max_size=200)))
        return name
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([0.5, math.nan, math.inf, 3e38, -1.0, 1.0]))
    tensor = torch.rand(shape) if fill == 0.5 else torch.full(shape, fill)
    tensor = tensor.to(dtype) if dtype.is_floating_point or fill in (0.5, -1.0, 1.0) else torch.zeros(shape, dtype=dtype)
    if name.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {"input": tensor} if draw(st.booleans()) else {"a": tensor, "b": tensor.clone()}
        save_file(tensors, str(name))
    else:
        torch.save(tensor if draw(st.booleans()) else {"x": tensor}, name)
    return name


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_mutated_calibration_files_through_quantize_and_eval(tmp_path: Path, digits, data: Any) -> None:
    path = data.draw(calibration_file(tmp_path))
    if data.draw(st.booleans()):
        _cli(["eval", str(digits.run), "--data", str(path), "--trust-factory", "--quiet"])
    else:
        _cli(digits.quantize_args(tmp_path / f"out{next(_counter)}", "--preset", "w8a8", "--calib", str(path)))


@settings(max_examples=40, **SETTINGS)
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=30), st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
            VALUES.map(lambda v: json.dumps(v, allow_nan=True)), st.sampled_from(['{"text": "the word"}', '{"text": 5}', "[" * 3000]),
        ),
        max_size=5,
    ),
    suffix=st.sampled_from([".jsonl", ".txt"]),
    raw=st.booleans(),
)
def test_mutated_text_files(tmp_path: Path, lines: list[str], suffix: str, raw: bool) -> None:
    from ptqkit.calibration import CalibrationData

    path = tmp_path / f"t{next(_counter)}{suffix}"
    content = "\n".join(lines)
    path.write_bytes(content.encode("utf-8", "surrogatepass") if not raw else content.encode("latin-1", "replace"))
    try:
        CalibrationData.from_text(path, WordTokenizer(), max_length=8)
    except PTQError:
        pass


@settings(max_examples=6, **SETTINGS)
@given(
    lines=st.lists(
        st.one_of(st.text(max_size=40), VALUES.map(lambda v: json.dumps(v, allow_nan=True)), st.sampled_from(['{"text": "the word"}', "the " * 80])),
        max_size=4,
    ),
    suffix=st.sampled_from([".jsonl", ".txt"]),
    max_length=st.sampled_from(["1", "2", "16", "100"]),
)
def test_mutated_text_files_through_quantize(tmp_path: Path, tiny_hf: Path, lines: list[str], suffix: str, max_length: str) -> None:
    path = tmp_path / f"t{next(_counter)}{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    out = tmp_path / f"o{next(_counter)}"
    _cli(["quantize", "--model", str(tiny_hf), "--calib", str(path), "--preset", "w8a8_dynamic", "--out", str(out), "--quiet", "--max-length", max_length])
