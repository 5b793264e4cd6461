"""`bench`: side-by-side timing of float and quantized models, and an honest verdict."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ConfigError
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.bench import BenchResult, Timing, bench, current_rss_bytes, deployable_runtime


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()


def test_weight_only_model_runs_on_packed_kernels() -> None:
    model = _mlp()
    qmodel = pq.quantize(model, Recipe.from_preset("w8a16"), progress=False)
    assert deployable_runtime(qmodel) == "torch"
    result = bench(model, qmodel, torch.randn(4, 256), threads=1, warmup=1, reps=5)
    assert result.runtime == "torch" and result.batch == 4 and result.threads == 1
    assert result.kernels == {"int8_weight_only": 2} and "every quantized layer runs on a packed torch kernel" in result.note
    for timing in (result.float, result.quantized):
        assert timing.calls == 5 and 0 < timing.median_ms <= timing.p90_ms
        assert timing.throughput_per_s == pytest.approx(1000 * 4 / timing.median_ms)
        assert timing.rss_peak_bytes > 0
    assert result.speedup == pytest.approx(result.float.median_ms / result.quantized.median_ms)
    assert torch.get_num_threads() >= 1


def _w8a8() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = _mlp()
    x = torch.randn(32, 256)
    return model, pq.quantize(model, Recipe.from_preset("w8a8"), pq.CalibrationData.from_tensors(x), progress=False), x[:4]


def test_w8a8_is_timed_in_onnx_runtime_by_default() -> None:
    model, qmodel, example = _w8a8()
    assert deployable_runtime(qmodel) == "onnxruntime"
    result = bench(model, qmodel, example, threads=1, warmup=1, reps=3)
    assert result.runtime == "onnxruntime" and "onnxruntime, batch 4, 1 thread(s)" in result.headline()
    assert sum(result.kernels.values()) == 2  # what ORT ran each layer on, read from its optimized graph
    assert {"QGemm", "MatMulIntegerToFloat"} & set(result.kernels)


def test_w8a8_on_torch_and_the_simulation_are_labelled() -> None:
    model, qmodel, example = _w8a8()
    result = bench(model, qmodel, example, runtime="torch", threads=1, warmup=1, reps=3)
    assert result.kernels == {"simulated": 2} and "measures the simulation, not a deployment" in result.note
    simulated = bench(model, qmodel, example, runtime="simulated", threads=1, warmup=1, reps=3)
    assert simulated.runtime == "simulated" and simulated.kernels == {"simulated": 2}
    assert simulated.headline().startswith("simulated in eager torch (not a deployment)") and "SLOWER" not in simulated.headline()


def test_headline_says_slower_first() -> None:
    slow = BenchResult("torch", Timing(1.0, 1.2, 4000, 1, 5), Timing(2.0, 2.5, 2000, 1, 5), batch=4, threads=2)
    assert slow.speedup == 0.5 and "SLOWER than float here (0.50x the speed)" in slow.headline()
    fast = BenchResult("onnxruntime", Timing(2.0, 2.5, 2000, 1, 5), Timing(1.0, 1.2, 4000, 1, 5), batch=4, threads=2)
    assert "2.00x faster than float" in fast.headline() and fast.to_dict()["machine"]["cores"] >= 1


def test_bad_arguments() -> None:
    model = _mlp()
    qmodel = pq.quantize(model, Recipe.from_preset("w8a16"), progress=False)
    with pytest.raises(ConfigError, match="reps=0 must be an integer >= 1"):
        bench(model, qmodel, torch.randn(2, 256), reps=0)
    with pytest.raises(ConfigError, match="bench.runtime: 'gpu' is unknown; valid: auto, onnxruntime, torch, simulated"):
        bench(model, qmodel, torch.randn(2, 256), runtime="gpu")
    assert current_rss_bytes() > 10 * 2**20
