"""The up-front memory plan (`ptqkit.engine.memory_plan`): its parts are the model's own sizes, a run
that cannot fit is refused with the setting to change, and the memory available honours a
limit set with setrlimit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ptqkit as pq
from ptqkit.algorithms import GPTQConfig
from ptqkit.core.errors import ConfigError
from ptqkit.engine.memory_plan import (
    MemoryPlan,
    available_memory,
    check_memory,
    plan_from_config,
    plan_memory,
)
from ptqkit.models.mappings import find_block_list

from ..algorithms.tiny_transformers import tiny_llama

RECIPE = pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(GPTQConfig(),))


def _bytes(module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def test_parts_are_the_models_sizes() -> None:
    model = tiny_llama()
    _, blocks = find_block_list(model)
    linear_weights = sum(m.weight.numel() for b in blocks for m in b.modules() if type(m).__name__ == "Linear")
    memory = plan_memory(model, RECIPE, samples=8, seq_len=24, batch_size=2, onload=False)
    assert memory.parts["float model"] == memory.parts["copy quantized by pq.quantize"] == _bytes(model)
    assert memory.parts["quantized layers (codes + float cache)"] == 5 * linear_weights  # lm_head stays float
    onload = plan_memory(model, RECIPE, samples=8, seq_len=24, batch_size=2, onload=True)
    assert onload.parts["one float block"] == _bytes(blocks[0])
    assert onload.parts["weights outside the blocks"] == _bytes(model) - sum(_bytes(b) for b in blocks)
    assert onload.parts["integer codes of quantized layers"] == linear_weights
    assert onload.parts["block inputs and outputs (all samples)"] == 2 * 8 * 24 * 64 * 4
    assert onload.peak < memory.peak and "predicted peak" in onload.render()


def test_a_run_that_cannot_fit_is_refused_with_the_setting_to_change() -> None:
    memory = MemoryPlan(onload=False, baseline=100, parts={"float model": 3 << 30, "copy quantized by pq.quantize": 3 << 30})
    with pytest.raises(ConfigError, match="needs about 6.00 GiB.*only 1.00 GiB.*test limit.*--onload"):
        check_memory(memory, available=(1 << 30, "test limit"))
    onloaded = MemoryPlan(onload=True, baseline=100, parts={"one float block": 2 << 30})
    with pytest.raises(ConfigError, match="calibration.samples"):
        check_memory(onloaded, available=(1 << 30, "test limit"))
    check_memory(onloaded, available=(3 << 30, "test limit"))  # fits: no error
    with pytest.raises(ConfigError, match="15% safety margin"):  # fits, but not with the safety margin
        check_memory(onloaded, available=(int(2.2 * (1 << 30)), "test limit"))


def test_preflight_reads_only_the_config(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf/model.safetensors").unlink()  # no weights needed to plan
    memory = plan_from_config(tmp_path / "hf", RECIPE, samples=8, seq_len=24, batch_size=2, onload=False)
    assert memory is not None and memory.parts["float model"] == _bytes(tiny_llama())


def test_available_memory_honours_rlimit_data() -> None:
    script = (
        "import json, resource; from ptqkit.engine.memory_plan import proc_status, available_memory\n"
        "used = proc_status()['VmData']\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (used + (300 << 20), resource.RLIM_INFINITY))\n"
        "print(json.dumps(available_memory()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    room, source = json.loads(done.stdout)
    assert "RLIMIT_DATA" in source and 250 << 20 < room <= 300 << 20
    assert available_memory()[0] > 0
