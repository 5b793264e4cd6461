"""A model larger than memory: a randomly initialised LLaMA-style model whose FP32 weights
(686 MiB) exceed the memory cap imposed on the process (RLIMIT_DATA: 650 MiB beyond what the
process holds once its libraries are loaded). `ptqkit quantize --onload` quantizes it with
GPTQ int4 under the cap; without --onload the memory plan refuses it up front with a clear
error, exit code 2, and writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROOM_MIB = 650

MAKE_MODEL = """
import sys, torch, transformers
from safetensors.torch import save_file
config = transformers.LlamaConfig(
    vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config)
model.save_pretrained(sys.argv[1])
ids = torch.randint(0, 4096, (8, 64), generator=torch.Generator().manual_seed(0))
save_file({"input_ids": ids}, sys.argv[1] + "/calib_ids.safetensors")
print(sum(p.numel() for p in model.parameters()) * 4)
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> tuple[Path, int]:
    directory = tmp_path_factory.mktemp("llama_700mb")
    done = subprocess.run([sys.executable, "-c", MAKE_MODEL, str(directory)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return directory, int(done.stdout.strip().splitlines()[-1])


def _capped(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    command = [
        sys.executable, "-m", "tests.integration.capped_run", str(ROOM_MIB), "quantize", "--model", str(model_dir),
        "--recipe", str(ROOT / "recipes/w4a16-gptq-llm.yaml"), "--calib", str(model_dir / "calib_ids.safetensors"),
        "--set", "calibration.batch_size=4", "--out", str(out), "--quiet", "--json", *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)


def test_weights_larger_than_the_cap_quantize_only_with_onloading(big_model, tmp_path: Path) -> None:
    model_dir, float_bytes = big_model
    assert float_bytes > ROOM_MIB << 20  # 686 MiB of FP32 weights against a 650 MiB cap

    refused = _capped(model_dir, tmp_path / "in_memory")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "quantize with onloading" in refused.stderr and "RLIMIT_DATA" in refused.stderr
    assert not (tmp_path / "in_memory").exists()

    done = _capped(model_dir, tmp_path / "onloaded", "--onload")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["onload"] and summary["quantized_layers"] == 28 * 7
    assert summary["artifact_bytes"] < float_bytes / 4  # int4 codes + scales; the tied embedding stays float
    manifest = json.loads((tmp_path / "onloaded/quantization.json").read_text())
    assert len(manifest["layers"]) == 28 * 7
