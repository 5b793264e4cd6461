"""Hostile run directories and outputs (issue 28 items 1, 2, 4, 5, 7): the CLI runs in a
subprocess and must exit with the typed code, print one line naming the culprit, show no
traceback, and touch nothing outside --out; the Python API raises the typed error."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.cli import main
from ptqkit.core.atomic import file_sha256
from ptqkit.core.errors import ArtifactError, OutputPathError, UntrustedCodeError
from ptqkit.workflows.runs import open_run
from ptqkit.workflows.sources import source_with_hashes, verify_source
from tests.unit.digits_files import FACTORY, digits_files


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs of the digits CNN (w8a8 with ONNX and bench.json, w8a16), made once."""
    root = tmp_path_factory.mktemp("made")
    digits_files(root, samples=16)
    for name, preset in (("w8a8", "w8a8"), ("w8a16", "w8a16")):
        assert main(_quantize(root, root / name, preset)) == 0
    assert main(["bench", str(root / "w8a8"), "--reps", "2", "--warmup", "1", "--quiet", "--trust-factory"]) == 0
    return {"root": root, "w8a8": root / "w8a8", "w8a16": root / "w8a16"}


def _quantize(root: Path, out: Path | str, preset: str = "w8a8") -> list[str]:
    return [
        "quantize", "--model", FACTORY, "--weights", str(root / "digits.safetensors"), "--calib", str(root / "calib.pt"),
        "--out", str(out), "--preset", preset, "--set", "calibration.samples=8", "--quiet",
    ]


@pytest.fixture()
def work(made: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the made runs and their inputs under tmp_path (the test's working directory)."""
    for name in ("digits.safetensors", "calib.pt"):
        shutil.copy2(made["root"] / name, tmp_path / name)
    for name in ("w8a8", "w8a16"):
        shutil.copytree(made[name], tmp_path / name)
        source = json.loads((tmp_path / name / "source.json").read_text())
        source["weights"] = str(tmp_path / "digits.safetensors")
        (tmp_path / name / "source.json").write_text(json.dumps(source))
    return {"root": tmp_path, "w8a8": tmp_path / "w8a8", "w8a16": tmp_path / "w8a16"}


def _tree(root: Path, skip: Path | None = None) -> dict[str, bytes | str | None]:
    found: dict[str, bytes | str | None] = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        key = str(path.relative_to(root))
        found[key] = ("-> " + os.readlink(path)) if path.is_symlink() else path.read_bytes() if path.is_file() else None
    return found


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "ptqkit.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *culprits: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ptqkit: error:")]
    assert len(errors) == 1, proc.stderr
    for culprit in culprits:
        assert culprit in errors[0], (culprit, errors[0])
    return errors[0]


# ---- 1. a run directory never runs code unless the user allows it ------------------------------
@pytest.mark.parametrize("command", ["eval", "export", "bench", "report"])
def test_a_factory_named_by_a_run_is_not_called_without_trust(work, command: str) -> None:
    run = work["w8a8"]
    source = json.loads((run / "source.json").read_text())
    (run / "source.json").write_text(json.dumps({**source, "factory": "os:abort"}))
    before = _tree(work["root"])
    proc = _cli(work["root"], command, str(run))
    _one_line_error(proc, 2, "names the model factory 'os:abort'", "--trust-factory")
    assert _tree(work["root"]) == before  # nothing written, nothing aborted


def test_a_module_shipped_next_to_a_run_is_never_imported(work) -> None:
    run = work["w8a8"]
    (work["root"] / "evil.py").write_text("open('PWNED', 'w').close()\ndef build():\n    raise SystemExit(99)\n")
    source = json.loads((run / "source.json").read_text())
    (run / "source.json").write_text(json.dumps({**source, "factory": "evil:build"}))
    proc = _cli(work["root"], "eval", str(run))
    _one_line_error(proc, 2, "'evil:build'", "a run directory does not run code unless you allow it")
    assert not (work["root"] / "PWNED").exists()


def test_open_run_calls_code_only_when_told(work) -> None:
    run = work["w8a8"]
    with pytest.raises(UntrustedCodeError, match=rf"{run}/source.json names the model factory '{FACTORY}'.*trust_factory=True or model="):
        open_run(run)
    from safetensors.torch import load_file

    from ptqkit.models.digits_cnn import DigitsCNN

    mine = DigitsCNN()
    mine.load_state_dict(load_file(str(work["root"] / "digits.safetensors")))
    given, _, example = open_run(run, model=mine.eval())  # the user's own float model: copied, not changed
    assert given.model is not mine
    named, _qmodel, _ = open_run(run, model=FACTORY)  # a factory the user names (weights from source.json)
    trusted, _, _ = open_run(run, trust_factory=True)
    with torch.no_grad():
        torch.testing.assert_close(named.model(example), trusted.model(example))
        torch.testing.assert_close(given.model(example), trusted.model(example))


def test_a_bad_source_json_is_an_artifact_error(work) -> None:
    run = work["w8a8"]
    (run / "source.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"source.json: not valid JSON"):
        open_run(run, trust_factory=True)
    (run / "source.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"source.json: expected \{\"kind\": \"hf\""):
        open_run(run, trust_factory=True)


# ---- 7. the float weights are the ones the run was quantized against ---------------------------
def test_changed_float_weights_are_refused(work) -> None:
    from safetensors.torch import load_file, save_file

    weights = work["root"] / "digits.safetensors"
    expected = file_sha256(weights)
    state = load_file(str(weights))
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights))
    found = file_sha256(weights)
    proc = _cli(work["root"], "eval", str(work["w8a8"]), "--trust-factory")
    _one_line_error(proc, 1, str(weights), expected, found)
    with pytest.raises(ArtifactError, match=rf"the float weights {weights} changed.*expected SHA-256 {expected}, found {found}"):
        open_run(work["w8a8"], trust_factory=True)
    from ptqkit.models.digits_cnn import DigitsCNN

    open_run(work["w8a8"], model=DigitsCNN().eval())  # the user's own float model: the weights file is not read


def test_hugging_face_model_files_are_hashed_and_checked(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    source = source_with_hashes({"kind": "hf", "path": str(model)})
    assert sorted(source["files_sha256"]) == ["config.json", "model.safetensors"]
    verify_source(source, tmp_path / "source.json")
    (model / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ArtifactError, match=r"source.json: the float weights .*hf/model.safetensors changed.*expected SHA-256 [0-9a-f]{64}, found"):
        verify_source(source, tmp_path / "source.json")
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "model-00002.safetensors").write_bytes(b"a shard")
    with pytest.raises(ArtifactError, match=r"holds model files the run was not quantized with: \['model-00002.safetensors'\]"):
        verify_source(source, tmp_path / "source.json")


# ---- 4. outputs: never the working tree, never the user's files --------------------------------
@pytest.mark.parametrize("out", [".", "", "$PWD", "..", "user-dir", "digits.safetensors/sub"])
def test_quantize_refuses_unsafe_outputs(work, out: str) -> None:
    cwd = work["root"] / "project"
    cwd.mkdir()
    (cwd / "user-dir").mkdir()
    (cwd / "user-dir" / "paper.tex").write_text("mine")
    shutil.copy2(work["root"] / "digits.safetensors", cwd / "digits.safetensors")
    out = str(cwd) if out == "$PWD" else out
    before = _tree(work["root"])
    proc = _cli(cwd, *_quantize(work["root"], out))
    culprit = {
        "": "output directory '' is empty", "user-dir": "'user-dir' is not empty (paper.tex) and was not written by ptqkit",
        "digits.safetensors/sub": "cannot write digits.safetensors/sub: a parent of it is a file",
    }.get(out, f"output directory {out!r} is the current directory or one of its parents")
    _one_line_error(proc, 2, culprit)
    assert _tree(work["root"]) == before


def test_save_and_export_refuse_the_working_directory(work, monkeypatch: pytest.MonkeyPatch) -> None:
    _, qmodel, example = open_run(work["w8a16"], trust_factory=True)
    monkeypatch.chdir(work["root"])
    before = _tree(work["root"])
    with pytest.raises(OutputPathError, match=r"output directory '\.' is the current directory or one of its parents"):
        pq.save(qmodel, ".")
    with pytest.raises(OutputPathError, match=r"output directory '(\.)?' is (empty|the current directory)"):
        pq.export(qmodel, "", example_inputs=example)
    with pytest.raises(OutputPathError, match=r"is the current directory or one of its parents"):
        pq.export(qmodel, str(work["root"].parent), example_inputs=example)
    assert _tree(work["root"]) == before


def test_export_into_a_saved_artifact_keeps_it(work) -> None:
    loaded, qmodel, example = open_run(work["w8a16"], trust_factory=True)
    saved = work["root"] / "saved"
    pq.save(qmodel, saved)
    artifact = _tree(saved)
    pq.export(qmodel, saved, example_inputs=example)
    after = _tree(saved)
    assert {k: after[k] for k in artifact} == artifact and "model.onnx" in after
    import copy

    pq.load(saved, copy.deepcopy(loaded.model))  # still a complete, loadable artifact


# ---- 5. symlinks planted in a run directory are never written through ---------------------------
def test_symlinks_planted_in_a_run_are_never_followed(work) -> None:
    run, outside = work["w8a8"], work["root"] / "outside"
    outside.mkdir()
    for name in ("summary.json", "source.json", "recipe.yaml", "recipe.yaml.tmp"):
        (outside / name).write_text("the user's file")
    source = (run / "source.json").read_text()
    for name in ("summary.json", "recipe.yaml", "recipe.yaml.tmp"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(outside / name)
    before = _tree(outside)
    assert _cli(work["root"], *_quantize(work["root"], run)).returncode == 0  # rebuilt aside: links gone, not followed
    assert _tree(outside) == before
    links = sorted(p.name for p in run.iterdir() if p.is_symlink())
    assert links == ["recipe.yaml.tmp"]  # not a name ptqkit writes: carried as a link, never written through
    assert json.loads((run / "summary.json").read_text())["recipe"] == "w8a8" and "scheme" in (run / "recipe.yaml").read_text()
    assert json.loads((run / "source.json").read_text())["factory"] == json.loads(source)["factory"]


def test_a_planted_bench_json_or_onnx_link_is_refused(work) -> None:
    run, outside = work["w8a8"], work["root"] / "outside"
    outside.mkdir()
    (outside / "victim").write_text("the user's file")
    (run / "bench.json").unlink()
    (run / "bench.json").symlink_to(outside / "victim")
    before = _tree(outside)
    proc = _cli(work["root"], "bench", str(run), "--trust-factory", "--reps", "1", "--warmup", "0")
    _one_line_error(proc, 2, f"{run}/bench.json is a symbolic link", "remove it")
    shutil.rmtree(run / "onnx")
    (run / "onnx").symlink_to(outside)
    proc = _cli(work["root"], "export", str(run), "--trust-factory")
    _one_line_error(proc, 2, f"{run}/onnx is a symbolic link")
    assert _tree(outside) == before


# ---- 2. stale derived files are never reported ---------------------------------------------------
def test_report_ignores_a_bench_of_another_artifact_and_bench_reexports_a_stale_graph(work, capsys) -> None:
    old, new = work["w8a8"], work["w8a16"]
    shutil.copy2(old / "bench.json", new / "bench.json")  # timed another model
    shutil.copytree(old / "onnx", new / "onnx")  # the graph of another model
    assert main(["inspect", str(new), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stale"] == ["bench.json", "onnx"]
    assert main(["report", str(new), "--quiet", "--json", "--trust-factory"]) == 0
    saved = json.loads((new / "report/report.json").read_text())
    assert saved["bench"] is None and "faster than float" not in saved["headline"] and "Slower" not in saved["headline"]
    sha = file_sha256(new / "model.safetensors")
    assert saved["provenance"]["evaluation"]["artifact_sha256"] == sha
    # a weight-only run is timed on torch's packed kernels by default; in ONNX Runtime the stale graph is exported again
    assert main(["bench", str(new), "--runtime", "onnxruntime", "--reps", "1", "--warmup", "0", "--json", "--trust-factory"]) == 0
    assert json.loads((new / "onnx/export_report.json").read_text())["artifact_sha256"] == sha  # exported again
    assert json.loads((new / "bench.json").read_text())["artifact_sha256"] == sha
