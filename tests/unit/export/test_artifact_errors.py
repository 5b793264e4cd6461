"""Damaged artifacts raise ArtifactError naming the file and tensor: truncation, corruption, tampering
(with a recomputed checksum, so the structural checks themselves are exercised), fuzzing, and a
process killed while saving."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ArtifactError
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Override, Recipe, Scheme
from ptqkit.export.artifact import MODEL_FILE, QUANT_FILE, file_sha256, save_artifact
from ptqkit.export.load import load_artifact


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Embedding(20, 16)).eval()


RECIPE = Recipe(
    scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0))),
    targets=("Linear", "Embedding"),
    overrides=(
        Override(match=("2",), scheme=Scheme(weights=QuantSpec(qtype="int4", granularity=PerGroup(16)))),
        Override(match=("3",), scheme=Scheme(weights=QuantSpec(qtype="int3", granularity=PerChannel(0)))),
    ),
)


@pytest.fixture()
def artifact(tmp_path: Path) -> Path:
    out = tmp_path / "a"
    save_artifact(pq.quantize(_model(), RECIPE, progress=False), out)
    return out


def _rewrite_tensors(out: Path, edit) -> None:
    """Apply `edit` to the tensor dict and re-sign the file (a consistent, deliberate tamper)."""
    tensors = load_file(str(out / MODEL_FILE))
    edit(tensors)
    save_file(tensors, str(out / MODEL_FILE))
    _resign(out)


def _resign(out: Path) -> None:
    manifest = json.loads((out / QUANT_FILE).read_text())
    manifest["model_sha256"] = file_sha256(out / MODEL_FILE)
    (out / QUANT_FILE).write_text(json.dumps(manifest))


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / QUANT_FILE).read_text())
    edit(manifest)
    (out / QUANT_FILE).write_text(json.dumps(manifest))


def test_missing_files(tmp_path: Path, artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"quantization.json: missing; .* is not a ptqkit artifact"):
        load_artifact(tmp_path / "nowhere", _model())
    (artifact / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model.safetensors: missing; the artifact is incomplete"):
        load_artifact(artifact, _model())


def test_bad_json_and_unknown_version(artifact: Path) -> None:
    text = (artifact / QUANT_FILE).read_text()
    (artifact / QUANT_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"quantization.json: not valid JSON"):
        load_artifact(artifact, _model())
    (artifact / QUANT_FILE).write_text(text)
    _edit_manifest(artifact, lambda m: m.update(format_version=2))
    with pytest.raises(ArtifactError, match=r"format_version 2 is not supported; this ptqkit reads version 1"):
        load_artifact(artifact, _model())
    _edit_manifest(artifact, lambda m: (m.update(format_version=1), m.pop("layers")))
    with pytest.raises(ArtifactError, match=r"missing key\(s\) \['layers'\]"):
        load_artifact(artifact, _model())


def test_truncated_or_corrupted_tensors_file(artifact: Path) -> None:
    data = (artifact / MODEL_FILE).read_bytes()
    (artifact / MODEL_FILE).write_bytes(data[:-100])
    with pytest.raises(ArtifactError, match=r"model.safetensors: SHA-256 .* does not match .* truncated, corrupted or was modified"):
        load_artifact(artifact, _model())
    _resign(artifact)  # a truncation the checksum does not catch: the safetensors reader must
    with pytest.raises(ArtifactError, match=r"model.safetensors: cannot be read as safetensors"):
        load_artifact(artifact, _model())


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("0.weight_scale"), r"model.safetensors: tensor '0.weight_scale' is missing"),
    (lambda t: t.pop("0.bias"), r"model.safetensors: tensor '0.bias' \(model entry '0.bias'\) is missing"),
    (lambda t: t.update({"0.weight_codes": t["0.weight_codes"][:, :32].contiguous()}), r"tensor '0.weight_codes' has shape \(32, 32\), expected \(32, 64\)"),
    (lambda t: t.update({"0.weight_codes": t["0.weight_codes"].to(torch.int16)}), r"tensor '0.weight_codes' has dtype torch.int16, expected torch.int8"),
    (lambda t: t.update({"2.weight_packed": t["2.weight_packed"][:, :-1].contiguous()}), r"tensor '2.weight_packed' has shape \(16, 15\), expected \(16, 16\)"),
    (lambda t: t.update({"2.weight_scale": t["2.weight_scale"][:, :1].contiguous()}), r"tensor '2.weight_scale' has shape \(16, 1\), expected \(16, 2\)"),
    (lambda t: t.update({"0.weight_scale": -t["0.weight_scale"]}), r"tensors 0.weight_scale / 0.weight_zero_point are invalid: scale must be > 0"),
    (lambda t: t.update({"3.weight_codes": torch.full_like(t["3.weight_codes"], 100)}), r"tensor '3.weight_codes' holds codes in \[100, 100\], outside int3's range \[-4, 3\]"),
    (lambda t: t.update({"0.bias": torch.zeros(33)}), r"tensor '0.bias' has dtype torch.float32 shape \(33,\); the model skeleton's '0.bias' is torch.float32 \(32,\)"),
    (lambda t: t.update({"extra.tensor": torch.zeros(2)}), r"tensor\(s\) \['extra.tensor'\] are not part of the model skeleton Sequential"),
])
def test_tampered_tensors(artifact: Path, edit, message: str) -> None:
    _rewrite_tensors(artifact, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact, _model())


def test_wrong_skeleton_and_tampered_records(artifact: Path) -> None:
    wrong = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 16), nn.Embedding(20, 16))
    with pytest.raises(ArtifactError, match=r"layer '0': weight shape \(32, 64\) does not fit the model skeleton's Linear of weight shape \(40, 64\)"):
        load_artifact(artifact, wrong)
    with pytest.raises(ArtifactError, match=r"layer '0' does not exist in the model skeleton Linear"):
        load_artifact(artifact, nn.Linear(64, 32))
    _edit_manifest(artifact, lambda m: m["layers"][0].update(module="QuantMystery"))
    with pytest.raises(ArtifactError, match=r"layers\[0\].module 'QuantMystery' is unknown"):
        load_artifact(artifact, _model())
    _edit_manifest(artifact, lambda m: m["layers"][0].update(module="QuantLinear", weights={"qtype": "int9"}))
    with pytest.raises(ArtifactError, match=r"quantization.json: layers\['0'\].weights: int qtype bits=9 is not supported; valid: 2..8 or 16$"):
        load_artifact(artifact, _model())


def test_static_input_qparams_must_agree(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    qmodel = pq.quantize(model, Recipe.from_preset("w8a8"), calib=[torch.randn(4, 64) for _ in range(4)], progress=False)
    out = tmp_path / "a"
    save_artifact(qmodel, out)
    loaded = load_artifact(out, nn.Sequential(nn.Linear(64, 32)))
    assert torch.equal(loaded[0].input_quantizer.qparams.scale, qmodel[0].input_quantizer.qparams.scale)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), qmodel(x))
    _rewrite_tensors(out, lambda t: t.update({"0.input_quantizer.scale": t["0.input_quantizer.scale"] * 2}))
    with pytest.raises(ArtifactError, match=r"tensors 0.input_quantizer.scale/zero_point .* disagree with layers\['0'\].input_qparams"):
        load_artifact(out, nn.Sequential(nn.Linear(64, 32)))


def test_fuzz_damaged_files_raise_only_artifact_error(artifact: Path) -> None:
    """Random byte flips, truncations and JSON leaf replacements: loading either succeeds or raises
    ArtifactError — never another exception type, never a crash."""
    rng = random.Random(0)
    model_bytes = (artifact / MODEL_FILE).read_bytes()
    manifest_text = (artifact / QUANT_FILE).read_text()
    outcomes = {"ok": 0, "artifact_error": 0}
    for trial in range(40):
        (artifact / MODEL_FILE).write_bytes(model_bytes)
        (artifact / QUANT_FILE).write_text(manifest_text)
        kind = trial % 4
        if kind == 0:  # flip bytes in the safetensors header or data, re-signed
            data = bytearray(model_bytes)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(len(data), 600) if rng.random() < 0.7 else len(data))] = rng.randrange(256)
            (artifact / MODEL_FILE).write_bytes(bytes(data))
            _resign(artifact)
        elif kind == 1:  # truncate anywhere, re-signed
            (artifact / MODEL_FILE).write_bytes(model_bytes[: rng.randrange(len(model_bytes))])
            _resign(artifact)
        elif kind == 2:  # replace one JSON leaf of a layer record by a value of another type
            manifest = json.loads(manifest_text)
            layer = rng.choice(manifest["layers"])
            key = rng.choice(sorted(layer))
            layer[key] = rng.choice([None, 7, -1.5, "x", [3], {"a": 1}, True])
            (artifact / QUANT_FILE).write_text(json.dumps(manifest))
        else:  # flip characters in the JSON text
            chars = list(manifest_text)
            for _ in range(rng.randint(1, 3)):
                chars[rng.randrange(len(chars))] = rng.choice('{}[]",:0aZ ')
            (artifact / QUANT_FILE).write_text("".join(chars))
        try:
            load_artifact(artifact, _model())
            outcomes["ok"] += 1
        except ArtifactError:
            outcomes["artifact_error"] += 1
    assert outcomes["artifact_error"] >= 20, outcomes


_CHILD = r"""
import os, sys, time, torch
from torch import nn
import ptqkit as pq
from ptqkit.export import artifact as art  # `ptqkit.export` is also the export function
out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(1)
model = nn.Sequential(*[nn.Linear(384, 384) for _ in range(8)]).eval()
qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a16"), progress=False)
if mode == "before_swap":
    def stall(tmp, out_dir):
        print("STALLED", flush=True)
        time.sleep(120)
    art._swap_in = stall
print("START", flush=True)
while True:
    art.save_artifact(qmodel, out)
    if mode == "before_swap":
        break
"""


def _spawn(out: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(out), mode], stdout=subprocess.PIPE, text=True, env=env)


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == word, f"child said {line!r}"


def test_killed_mid_write_leaves_old_artifact_or_none(tmp_path: Path) -> None:
    out = tmp_path / "a"
    old = pq.quantize(_model(), RECIPE, progress=False)
    save_artifact(old, out)
    # 1) killed after every file is written but before the rename: the old artifact is intact
    proc = _spawn(out, "before_swap")
    try:
        _wait_for(proc, "START")
        _wait_for(proc, "STALLED")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    loaded = load_artifact(out, _model(seed=5))
    assert torch.equal(loaded[0].weight_codes, old[0].weight_codes)
    # 2) killed at a random moment of repeated saves: whatever is at `out` loads completely, or nothing is there
    rng = random.Random(0)
    for _ in range(1):
        proc = _spawn(out, "loop")
        try:
            _wait_for(proc, "START")
            time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if out.exists():
            skeleton = nn.Sequential(*[nn.Linear(384, 384) for _ in range(8)])
            try:
                load_artifact(out, skeleton)
            except ArtifactError:  # the parent's own small artifact, before the first child save landed
                load_artifact(out, _model())
