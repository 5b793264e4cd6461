"""Data-parallel calibration (`ptqkit.stats.distributed`): 2 ranks on gloo, launched with torchrun as
a user would, give the same quantized model as one process on the same data; the pieces
(sharding, statistics merges, refusals) are checked on their own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ptqkit as pq
from ptqkit.algorithms import AdaRoundConfig
from ptqkit.core.errors import ConfigError
from ptqkit.core.threads import torch_threads
from ptqkit.eval.metrics import perplexity
from ptqkit.stats.distributed import DataParallel, shard_ranges
from ptqkit.stats.hessian import HessianAccumulator
from ptqkit.stats.hooks import limited_batches
from ptqkit.stats.input_stats import InputStatistics, StatsRequest

from .cases import CASES, EXACT, SUMMED, eval_windows, model_and_data

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """Every case quantized by `worker.py` on 2 gloo ranks (torchrun, 1 thread per rank)."""
    out = tmp_path_factory.mktemp("two_ranks")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tests.unit.distributed.worker", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _single_process(name: str, out: Path) -> Path:
    model, data = model_and_data()
    with torch_threads(1):  # as each torchrun rank runs
        pq.save(pq.quantize(model, CASES[name](), data, progress=False), out / name)
    return out / name / "model.safetensors"


@pytest.mark.parametrize("name", list(EXACT))
def test_two_ranks_give_byte_identical_models(two_rank_run: Path, tmp_path: Path, name: str) -> None:
    single = _single_process(name, tmp_path)
    assert (two_rank_run / name / "model.safetensors").read_bytes() == single.read_bytes()


@pytest.mark.parametrize("name", list(SUMMED))
def test_two_ranks_match_one_process_to_rounding(two_rank_run: Path, tmp_path: Path, name: str) -> None:
    single = load_file(str(_single_process(name, tmp_path)))
    parallel = load_file(str(two_rank_run / name / "model.safetensors"))
    assert single.keys() == parallel.keys()
    codes = [k for k, v in single.items() if not v.is_floating_point()]
    changed = sum(int((single[k] != parallel[k]).sum()) for k in codes)
    total = sum(single[k].numel() for k in codes)
    # Hessians and mean |x| are summed in another order; measured here: 0 codes changed
    assert changed <= 1e-3 * total, f"{changed} of {total} integer weights differ"
    for key in set(single) - set(codes):
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_data_parallel_perplexity_equals_one_process(two_rank_run: Path) -> None:
    model, _ = model_and_data()
    with torch_threads(1):
        single = perplexity(model, eval_windows(), batch_size=2)
    assert json.loads((two_rank_run / "perplexity.json").read_text()) == single


def test_shards_are_contiguous_whole_batches_covering_the_limit() -> None:
    assert shard_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    batches = [torch.full((3, 2), float(i)) for i in range(5)]  # 15 samples, limited to 11
    shards = [list(DataParallel(rank, 2).shard(iter(batches), 11, total_batches=4)) for rank in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    expected = [batch for batch, _ in limited_batches(batches, 11)]
    assert all(torch.equal(a, b) for a, b in zip(shards[0] + shards[1], expected))
    assert shards[1][-1].shape == (2, 2)  # the last batch sliced to the limit


def test_too_few_batches_for_the_ranks_is_refused() -> None:
    with pytest.raises(ConfigError, match="3 batch\\(es\\) for 4 ranks"):
        DataParallel(0, 4).my_batches(3)


def test_merged_statistics_equal_one_pass_over_both_shards() -> None:
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 7, 6, generator=generator), 3 * torch.randn(4, 7, 6, generator=generator)
    request = StatsRequest(absmax=True, mean_abs=True, rows_per_call=4, hessian=True)
    whole, left, right = (InputStatistics(6, request, "layer") for _ in range(3))
    whole.update(first), whole.update(second)
    left.update(first)
    right.update(second)
    merged = InputStatistics.from_state(6, request, "layer", left.state()).merge_(
        InputStatistics.from_state(6, request, "layer", right.state())
    )
    assert torch.equal(merged.absmax, whole.absmax) and torch.equal(merged.samples, whole.samples)
    torch.testing.assert_close(merged.mean_abs, whole.mean_abs, rtol=1e-12, atol=0)
    assert torch.equal(merged.hessian.hessian(), whole.hessian.hessian())  # float64 sums: no rounding here
    assert merged.hessian.num_samples == whole.hessian.num_samples == 63


def test_hessian_state_round_trips_and_rejects_a_bad_matrix() -> None:
    accumulator = HessianAccumulator(3, name="q")
    accumulator.update(torch.randn(10, 3))
    restored = HessianAccumulator.from_state(accumulator.state(), name="q")
    assert torch.equal(restored.hessian(), accumulator.hessian()) and restored.num_samples == 10
    with pytest.raises(ConfigError, match="square"):
        HessianAccumulator.from_state({"gram_sum": torch.zeros(2, 3, dtype=torch.float64), "samples": torch.tensor(1)}, name="q")


def test_distributed_without_a_process_group_is_refused(monkeypatch) -> None:
    for variable in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    model, data = model_and_data()
    with pytest.raises(ConfigError, match="torchrun"):
        pq.quantize(model, CASES["w8a8_minmax"](), data, progress=False, distributed=True)


def test_layer_by_layer_algorithms_are_not_data_parallel() -> None:
    model, data = model_and_data()
    recipe = pq.Recipe.from_preset("w4a16", group_size=16, algorithms=(AdaRoundConfig(iterations=2),))
    with pytest.raises(ConfigError, match="AdaRoundConfig.*layer by layer"):
        pq.quantize(model, recipe, data, progress=False, distributed=True)


def test_statistics_of_different_layers_across_ranks_are_refused() -> None:
    class OtherRankSawNothing(DataParallel):
        def gather(self, value):
            return [value, {}]

    stats = InputStatistics(4, StatsRequest(absmax=True), "layer")
    stats.update(torch.ones(2, 4))
    with pytest.raises(ConfigError, match="rank 1 and rank 0 saw different layers.*'layer'"):
        OtherRankSawNothing(0, 2).merge_statistics({"layer": stats})


def test_statistics_with_other_requests_do_not_merge() -> None:
    mine, theirs = InputStatistics(4, StatsRequest(absmax=True), "q"), InputStatistics(4, StatsRequest(hessian=True), "q")
    with pytest.raises(ConfigError, match="layer 'q': cannot merge statistics of 4 channels"):
        mine.merge_(theirs)
