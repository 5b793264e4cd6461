"""Run directories as transactions (issue 28 item 3): atomic helpers, a failure injected at every
write step (exception and SIGKILL) leaves the previous run intact and complete, two writers."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ptqkit.cli import main
from ptqkit.core import atomic
from ptqkit.core.errors import OutputPathError
from tests.unit.digits_files import FACTORY, digits_files


@pytest.fixture()
def digits(tmp_path: Path) -> dict[str, Path]:
    return digits_files(tmp_path, samples=24)


def _quantize(files: dict[str, Path], preset: str, *extra: str) -> list[str]:
    return [
        "quantize", "--model", FACTORY, "--weights", str(files["weights"]), "--calib", str(files["calib"]),
        "--out", str(files["out"]), "--preset", preset, "--set", "calibration.samples=16", "--quiet", *extra,
    ]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: file bytes, or the target of a symlink."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


# ---- the helpers ------------------------------------------------------------------------------
def test_write_text_is_atomic_and_refuses_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    outside = tmp_path / "outside.txt"
    outside.write_text("user data")
    link = tmp_path / "b.json"
    link.symlink_to(outside)
    with pytest.raises(OutputPathError, match=r"b.json is a symbolic link \(to '.*outside.txt'\).*remove it"):
        atomic.write_text(link, "attack")
    assert outside.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "outside.txt"]  # no temporary left


def test_check_output_dir_refuses_cwd_parents_empty_and_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for bad in (".", "", str(tmp_path), str(tmp_path.parent), "/"):
        with pytest.raises(OutputPathError, match=r"current directory or one of its parents|is empty"):
            atomic.check_output_dir(bad)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputPathError, match=r"link is a symbolic link"):
        atomic.check_output_dir("link")
    assert atomic.check_output_dir("new/run") == Path("new/run")


def test_build_directory_keeps_mode_refuses_foreign_dirs_and_cleans_leftovers(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o750)
    os.chmod(empty, 0o750)
    with atomic.build_directory(empty) as build:
        (build.path / "f").write_text("new")
        build.commit()
    assert stat.S_IMODE(empty.stat().st_mode) == 0o750 and (empty / "f").read_text() == "new"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match=r"'.*mine' is not empty \(thesis.tex\) and was not written by ptqkit"):
        with atomic.build_directory(mine, owned=lambda p: False):
            pass
    assert (mine / "thesis.tex").read_text() == "years of work"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".empty.tmp-{dead}-0a0b").mkdir()
    (tmp_path / f".empty.old-{dead}-0c0d").mkdir()
    alive = tmp_path / f".empty.tmp-{os.getppid()}-0e0f"  # a live process's: never touched
    alive.mkdir()
    removed = atomic.clean_leftovers(empty)
    assert sorted(p.name for p in removed) == [f".empty.old-{dead}-0c0d", f".empty.tmp-{dead}-0a0b"] and alive.is_dir()


def test_a_dead_writer_between_two_renames_is_rolled_back(tmp_path: Path) -> None:
    """Where the OS cannot exchange two directories: the previous directory moved aside by a
    process that died before its swap is put back by the next writer."""
    target = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".run.old-{dead}-0a0b"
    aside.mkdir()
    (aside / "quantization.json").write_text("{}")
    atomic.clean_leftovers(target)
    assert (target / "quantization.json").read_text() == "{}" and not aside.exists()


def test_lock_is_exclusive_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "run"
    code = (
        "import sys, time; from ptqkit.core.atomic import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1]):\n    print('LOCKED', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        with pytest.raises(OutputPathError, match=rf"run is being written by process {holder.pid} \(lock .*\.run\.lock\)"):
            with atomic.exclusive_lock(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    with atomic.exclusive_lock(target):  # the dead holder's lock is free again
        with atomic.exclusive_lock(target):  # re-entrant in one thread
            pass
    assert list(tmp_path.iterdir()) == []


# ---- the run directory as one transaction -----------------------------------------------------
def test_a_new_run_drops_stale_derived_files_and_keeps_the_users(digits, capsys) -> None:
    out = digits["out"]
    assert main(_quantize(digits, "w8a8", "--format", "onnx")) == 0
    (out / "notes.txt").write_text("mine")
    (out / "linked").symlink_to(digits["calib"].parent)  # the user's symlinked directory stays a link
    (out / ".bench.json.tmp-99999999-0a0b").write_text("{")  # a killed writer's temporary: not carried
    (out / "bench.json").write_text(json.dumps({"speedup": 9.9, "artifact_sha256": "0" * 64}))  # not this artifact
    same = main(_quantize(digits, "w8a8", "--format", "onnx"))  # deterministic: same artifact bytes
    assert same == 0 and (out / "onnx/model.onnx").is_file()
    assert not (out / "bench.json").exists()  # a derived file of another artifact is dropped
    onnx_before = (out / "onnx/model.onnx").read_bytes()
    assert main(_quantize(digits, "w8a16")) == 0  # another artifact, no --format onnx
    assert not (out / "onnx").exists()  # the old graph is not kept next to the new model
    summary = json.loads((out / "summary.json").read_text())
    assert summary["artifact_sha256"] == atomic.file_sha256(out / "model.safetensors")
    assert (out / "notes.txt").read_text() == "mine" and (out / "linked").is_symlink()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert onnx_before  # (it existed)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".run")) == []


_ZYGOTE = r"""
# Imports ptqkit once, runs no torch computation itself, and forks one child per step: the child
# runs the CLI command with SIGKILL sent to itself at that write step; one JSON line per step.
import json, os, shutil, signal, sys
from pathlib import Path
import safetensors.torch
import ptqkit.cli, ptqkit.workflows.runs, ptqkit.export.onnx_export  # noqa: F401 (imported before forking)
from ptqkit.core import atomic

out, pristine, first, last, args = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
state = {"count": 0, "target": 0}

def step():
    state["count"] += 1
    if state["count"] == state["target"]:
        os.kill(os.getpid(), signal.SIGKILL)

def hooked(module, name):
    original = getattr(module, name)
    def wrapper(*a, **k):
        step()
        result = original(*a, **k)
        step()
        return result
    setattr(module, name, wrapper)

for name in ("write_bytes", "fsync_path", "swap_in", "copy_entry", "_remove", "clean_leftovers"):
    hooked(atomic, name)
hooked(os, "replace")
hooked(os, "rename")
hooked(safetensors.torch, "save_file")

def snapshot(root):
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = ("-> " + os.readlink(path)) if path.is_symlink() else path.read_bytes().hex() if path.is_file() else None
    return found

for target in range(first, last + 1):
    if target:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out, symlinks=True)
    pid = os.fork()
    if pid == 0:
        state["target"] = target
        code = ptqkit.cli.main(args)
        print(json.dumps({"steps": state["count"]}), flush=True)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print(json.dumps({"step": target, "killed": killed, "snapshot": snapshot(out)}), flush=True)
"""


def test_killed_at_every_write_step_the_previous_run_stays_intact(digits, tmp_path: Path) -> None:
    """SIGKILL at each write step of `quantize` into an existing run (before and after every
    file write, fsync, rename, swap and removal): `out` is the complete previous run, or the
    complete new one; the next writer removes the dead one's temporaries."""
    import shutil

    out = digits["out"]
    assert main(_quantize(digits, "w8a16")) == 0
    (out / "notes.txt").write_text("mine")
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine, symlinks=True)
    args = _quantize(digits, "w8a8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def run(first: int, last: int) -> list[dict]:
        proc = subprocess.run(
            [sys.executable, "-c", _ZYGOTE, str(out), str(pristine), str(first), str(last), *args], capture_output=True, text=True, env=env,
            cwd=tmp_path, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    probe = run(0, 0)
    steps, new = probe[0]["steps"], probe[1]["snapshot"]
    previous = _hex_snapshot(pristine)
    assert 15 < steps < 400 and json.loads(bytes.fromhex(new["quantization.json"]))["recipe"]["name"] == "w8a8"
    outcomes = {"previous": 0, "new": 0}
    for record in (r for r in run(1, steps) if "step" in r):
        assert record["killed"], record["step"]
        now = record["snapshot"]
        if now == previous:
            outcomes["previous"] += 1
            continue
        # the swap happened: the whole new run (summary.json and quantization.json hold timings)
        assert sorted(now) == sorted(new), (record["step"], sorted(set(now) ^ set(new)))
        timed = ("summary.json", "quantization.json")
        assert {k: v for k, v in now.items() if k not in timed} == {k: v for k, v in new.items() if k not in timed}, record["step"]
        summary = json.loads(bytes.fromhex(now["summary.json"]))
        assert summary["artifact_sha256"] == json.loads(bytes.fromhex(now["quantization.json"]))["model_sha256"]
        outcomes["new"] += 1
    assert outcomes["previous"] and outcomes["new"] and sum(outcomes.values()) == steps, outcomes
    assert main(_quantize(digits, "w8a8")) == 0  # the next writer cleans what the killed ones left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def _hex_snapshot(root: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = ("-> " + os.readlink(path)) if path.is_symlink() else path.read_bytes().hex() if path.is_file() else None
    return found


def test_a_failure_at_every_write_step_keeps_the_previous_run(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with an exception (a full disk, an I/O error) at each step, in process."""
    out = digits["out"]
    assert main(_quantize(digits, "w8a16")) == 0
    previous = _snapshot(out)
    calls = {"n": 0, "fail_at": 0}
    originals = {name: getattr(atomic, name) for name in ("write_bytes", "fsync_path", "swap_in", "copy_entry")}

    def failing(name):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise OSError(28, "No space left on device")
            return originals[name](*args, **kwargs)
        return wrapper

    for name in originals:
        monkeypatch.setattr(atomic, name, failing(name))
    previous = _snapshot(out)
    step = 0
    while True:
        step += 1
        calls.update(n=0, fail_at=step)
        try:
            failed = main(_quantize(digits, "w8a8", "--format", "onnx")) != 0  # a full disk: one-line OutputPathError
        except OSError:
            failed = True
        if failed:
            now = _snapshot(out)
            if now != previous:  # failed after the swap (the directory's fsync): the complete new run
                summary = json.loads(now["summary.json"])
                assert summary["recipe"] == "w8a8" and summary["artifact_sha256"] == atomic.file_sha256(out / "model.safetensors"), step
                assert main(_quantize(digits, "w8a16")) == 0 and _snapshot(out).keys() == previous.keys()
                previous = _snapshot(out)
            assert [p.name for p in out.parent.iterdir() if p.name.startswith(".run")] == [], step
            continue
        break
    assert step > 5 and json.loads((out / "quantization.json").read_text())["recipe"]["name"] == "w8a8"


_STALLING_WRITER = r"""
import sys, time
from pathlib import Path
import ptqkit.workflows.runs as runs
original = runs.quantize
def stalled(*args, **kwargs):
    print("LOCKED", flush=True)
    while not Path(sys.argv[1]).exists():
        time.sleep(0.05)
    return original(*args, **kwargs)
runs.quantize = stalled
from ptqkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_writers_one_waits_for_nobody_and_the_run_is_never_mixed(digits, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    go = tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", _STALLING_WRITER, str(go), *_quantize(digits, "w8a8")], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert first.stdout.readline().strip() == "LOCKED"  # holds the lock on --out, quantizing
        second = subprocess.run([sys.executable, "-m", "ptqkit.cli", *_quantize(digits, "w8a16")], capture_output=True, text=True, env=env)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run is being written by process {first.pid}" in lines[0], lines
        assert "Traceback" not in second.stderr
        go.write_text("")
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    out = digits["out"]
    manifest = json.loads((out / "quantization.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert manifest["recipe"]["name"] == "w8a8" == summary["recipe"]
    assert summary["artifact_sha256"] == atomic.file_sha256(out / "model.safetensors") == manifest["model_sha256"]
    # now the second writer may: its whole run replaces the first's
    assert main(_quantize(digits, "w8a16")) == 0
    assert json.loads((out / "summary.json").read_text())["recipe"] == "w8a16"


def test_a_full_disk_is_a_typed_error_and_leaves_the_previous_directory(tmp_path: Path) -> None:
    import errno

    import pytest

    from ptqkit.core import atomic
    from ptqkit.core.errors import OutputPathError

    target = tmp_path / "out"
    with atomic.build_directory(target) as build:
        atomic.write_text(build.path / "a.txt", "first")
        build.commit()
    with pytest.raises(OutputPathError, match=r"cannot write .*out: No space left on device \(.*b.txt\); .*out is unchanged"):
        with atomic.build_directory(target) as build:
            raise OSError(errno.ENOSPC, "No space left on device", str(build.path / "b.txt"))
    assert (target / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_full_disk_on_a_single_file_is_a_typed_error(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    import pytest

    from ptqkit.core import atomic
    from ptqkit.core.errors import OutputPathError

    target = tmp_path / "bench.json"
    atomic.write_json(target, {"speedup": 1.0})
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputPathError, match=r"cannot write .*bench.json: No space left on device; bench.json is unchanged"):
        atomic.write_json(target, {"speedup": 2.0})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert '"speedup": 1.0' in target.read_text() and [p.name for p in tmp_path.iterdir()] == ["bench.json"]
