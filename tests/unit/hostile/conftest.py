"""Shared fixtures of the hostile-input suite: a quantized run of the digits CNN (seconds), a
copy helper, and `run_cli`, which runs `python -m ptqkit.cli` in a subprocess and checks what
every refused input must give: the typed exit code, one line on stderr naming the culprit, no
traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

FACTORY = "ptqkit.models.digits_cnn:DigitsCNN"
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Digits:
    """A float DigitsCNN's weights, 48 calibration images and a w8a8 run directory made from them."""

    root: Path
    weights: Path
    calib: Path
    run: Path

    def quantize_args(self, out: Path, *extra: str) -> list[str]:
        return ["quantize", "--model", FACTORY, "--weights", str(self.weights), "--calib", str(self.calib), "--out", str(out), "--quiet", *extra]

    def run_copy(self, tmp_path: Path, name: str = "run") -> Path:
        """A copy of the run directory to tamper with."""
        return Path(shutil.copytree(self.run, tmp_path / name, symlinks=True))


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from safetensors.torch import save_file

    from ptqkit.cli import main
    from ptqkit.models.digits_cnn import DigitsCNN

    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    weights = root / "digits.safetensors"
    save_file(DigitsCNN().state_dict(), str(weights))
    calib = root / "calib.pt"
    torch.save(torch.rand(48, 1, 8, 8), calib)
    made = Digits(root, weights, calib, root / "run")
    assert main(made.quantize_args(made.run, "--preset", "w8a8")) == 0
    return made


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        return self.stderr.strip()


def run_cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """`python -m ptqkit.cli ARGS` in a subprocess (memory capped at 4 GB where the platform allows)."""
    env = dict(env or {})
    paths = [env.pop("PYTHONPATH", None), str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH")]
    environment = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, paths))}

    def cap_memory() -> None:  # a regression to the old alias bomb or tokenizer blow-up fails here, not the machine
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
        except (ImportError, ValueError, OSError):
            pass

    proc = subprocess.run(
        [sys.executable, "-m", "ptqkit.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=environment,
        timeout=timeout, preexec_fn=cap_memory if os.name == "posix" else None,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(result: CliResult, code: int, *fragments: str) -> None:
    """Exit `code`, exactly one stderr line "ptqkit: error: ..." holding every fragment, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ptqkit: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.code == code, (result.code, result.stderr[-3000:])
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


WORDS = ["the", "a", "word", "late", "words", "of", "text", "and", "model", "data"]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face directory: a 2-layer BERT (random weights) and a WordPiece tokenizer."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def hf_copy(tiny_hf: Path, tmp_path: Path, name: str = "model", *, weights: bool = True) -> Path:
    """A copy of the tiny Hugging Face directory to tamper with (without weights if asked)."""
    ignore = None if weights else shutil.ignore_patterns("model.safetensors")
    return Path(shutil.copytree(tiny_hf, tmp_path / name, ignore=ignore))
