"""The mixed-precision search: greedy path, Pareto front, budgets, and every point re-measured."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.eval.sensitivity import model_metrics
from ptqkit.mixed_precision.formats import apply_assignment
from ptqkit.mixed_precision.search import (
    SearchPoint,
    _choose,
    _greedy_path,
    pareto_front,
    search,
    versus_uniform,
)


def _point(name: str, degradation: float, ms: float, size: int, float_ms: float = 10.0) -> SearchPoint:
    return SearchPoint(name, {}, 1 - degradation, degradation, ms, ms, size, float_ms)


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    a, b, c, d = _point("a", 0.0, 10, 100), _point("b", 0.1, 5, 50), _point("c", 0.2, 6, 60), _point("d", 0.05, 8, 100)
    front = pareto_front([a, b, c, d])
    assert [p.name for p in front] == ["b", "d", "a"]  # c is beaten by b on everything; sorted by latency


COSTS = {
    "x": {"fp32": {"degradation": 0.0, "ms": 4.0, "bytes": 400}, "int8_wo": {"degradation": 0.01, "ms": 2.0, "bytes": 100}},
    "y": {"fp32": {"degradation": 0.0, "ms": 4.0, "bytes": 400}, "int8_wo": {"degradation": 0.10, "ms": 2.0, "bytes": 100},
          "int4_g128": {"degradation": 0.30, "ms": 5.0, "bytes": 50}},  # int4 is slower here than fp32
}


def test_latency_path_takes_only_faster_moves_cheapest_degradation_first() -> None:
    assert _greedy_path(COSTS, "latency") == [{"x": "int8_wo"}, {"x": "int8_wo", "y": "int8_wo"}]


def test_size_path_takes_byte_savings_even_when_slower() -> None:
    # x: 300 bytes / 0.01; y int8: 300 / 0.10; y int4: 350 / 0.30; then y int8 -> int4: 50 / 0.20
    assert _greedy_path(COSTS, "size") == [{"x": "int8_wo"}, {"x": "int8_wo", "y": "int8_wo"}, {"x": "int8_wo", "y": "int4_g128"}]


def test_choice_needs_the_budget_and_a_real_speedup() -> None:
    fast_but_bad, slow_but_good, good = _point("a", 0.2, 5, 10), _point("b", 0.0, 12, 80), _point("c", 0.01, 8, 60)
    assert _choose([fast_but_bad, slow_but_good, good], 0.05, None) == (good, "")
    chosen, why = _choose([fast_but_bad, slow_but_good], 0.05, None)
    assert chosen is None and "never recommends a slower model" in why
    assert _choose([_point("n", 0.0, 9.8, 60)], 0.05, None)[0] is None  # 1.02x: within timing noise
    chosen, why = _choose([good], 0.05, 50)
    assert chosen is None and "bytes <= 50" in why


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    data = [torch.randn(32, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, data


def test_search_measures_every_point_and_respects_the_budget(tmp_path: Path) -> None:
    model, data = _model_and_data()
    result = search(
        model, data, example=data[0], max_degradation=0.05, table_path=tmp_path / "lat.json",
        formats=("int8_wo", "int4_g128"), stride=2, progress=False,
    )
    assert result.metric == "top1_agreement" and result.float_metric == 1.0
    names = [p.name for p in result.points]
    assert "uniform int8_wo" in names and "uniform int4_g128" in names and any(n.startswith("size step") for n in names)
    some = result.points[-1]
    remeasured = model_metrics(model, apply_assignment(model, some.assignment), data)["top1_agreement"]
    assert some.metric == pytest.approx(remeasured)  # the point's accuracy is a measurement of that configuration
    assert set(result.layer_costs) == {"0", "2", "4"} and result.layer_costs["0"]["int8_wo"]["ms"] > 0
    front = set(p.name for p in result.front)
    for point in result.points:  # everything off the front is dominated by a front point
        if point.name not in front:
            assert any(q.degradation <= point.degradation and q.measured_ms <= point.measured_ms and q.weight_bytes <= point.weight_bytes for q in result.front)
    assert all(p.float_ms > 0 for p in result.points)  # float timed alternately with every point
    if result.chosen is not None:
        assert result.chosen.degradation <= 0.05 and result.chosen.speedup >= 1.05
    else:
        assert "budget" in result.why_none or "never recommends a slower model" in result.why_none
    assert result.to_dict()["front"] == [p.name for p in result.front]


def test_time_limit_stops_and_says_so(tmp_path: Path) -> None:
    model, data = _model_and_data()
    result = search(model, data, example=data[0], max_degradation=0.05, table_path=tmp_path / "l.json", time_limit_s=0.0, progress=False)
    assert result.stopped_early and result.points == () and result.chosen is None


def test_weight_sqnr_proxy_and_its_rank_correlation() -> None:
    from scipy.stats import spearmanr

    from ptqkit.mixed_precision.search import proxy_rank_correlation, weight_sqnr_db

    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    assert weight_sqnr_db(linear, "int8_wo") > weight_sqnr_db(linear, "int4_g128") + 15  # ~6 dB per bit
    costs = {
        f"l{i}": {"fp32": {"degradation": 0.0, "weight_sqnr_db": float("inf")},
                  "int8_wo": {"degradation": d8, "weight_sqnr_db": s8}, "int4_g128": {"degradation": d4, "weight_sqnr_db": s4}}
        for i, (d8, s8, d4, s4) in enumerate([(0.001, 40.0, 0.03, 20.0), (0.002, 38.0, 0.02, 21.0), (0.0, 42.0, 0.05, 18.0)])
    }
    pairs = [(-c["weight_sqnr_db"], c["degradation"]) for layer in costs.values() for f, c in layer.items() if f != "fp32"]
    expected = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    assert proxy_rank_correlation(costs) == pytest.approx(expected)
    assert proxy_rank_correlation({"x": costs["l0"]}) is None  # two pairs: too few


def test_proxy_layer_costs_skip_per_layer_evaluations_but_points_are_measured(tmp_path: Path, monkeypatch) -> None:
    import ptqkit.mixed_precision.search as mixed

    model, data = _model_and_data()
    calls = []
    measured = mixed.model_metrics
    monkeypatch.setattr(mixed, "model_metrics", lambda *a, **k: calls.append(1) or measured(*a, **k))
    result = search(
        model, data, example=data[0], max_degradation=0.05, table_path=tmp_path / "lat.json",
        formats=("int8_wo", "int4_g128"), stride=2, layer_costs="proxy", progress=False,
    )
    assert len(calls) == 1 + len(result.points)  # the float baseline and the end-to-end points only
    cost = result.layer_costs["0"]["int4_g128"]
    assert cost["degradation"] == pytest.approx(10 ** (-cost["weight_sqnr_db"] / 10))
    assert result.proxy_rank_correlation is None and result.layer_costs_source == "proxy"  # a proxy is not checked against itself
    with pytest.raises(ConfigError, match=r"^search\.layer_costs: 'guess' is unknown; valid: measured, proxy$"):
        search(model, data, example=data[0], max_degradation=0.05, table_path=tmp_path / "l.json", layer_costs="guess", progress=False)


def test_decode_step_input_is_one_token_of_the_first_sample() -> None:
    import ptqkit as pq
    from ptqkit.mixed_precision.search import decode_step_input

    ids = torch.arange(12).reshape(3, 4)
    step = decode_step_input(pq.CalibrationData.from_tensors({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    assert step["input_ids"].tolist() == [[0]] and step["attention_mask"].shape == (1, 1)
    with pytest.raises(Exception, match="token data"):
        decode_step_input(pq.CalibrationData.from_tensors(torch.randn(3, 4)))


def test_budget_bisection_finds_the_last_step_within_budget() -> None:
    from ptqkit.mixed_precision.search import _budget_bisection

    path = [{"l": "x"}] * 20
    points = {f"size step {s}": _point(f"size step {s}", 0.1 * s, 1.0, 1) for s in (8, 16, 20)}
    asked = []
    for step in _budget_bisection("size", path, points, max_degradation=1.05):
        asked.append(step)
        points[f"size step {step}"] = _point("", 0.1 * step, 1.0, 1)  # degradation grows along the path
    assert asked == [12, 10, 11]  # 10 (1.0) is within the budget, 11 (1.1) is not
    assert list(_budget_bisection("latency", path, points, max_degradation=1.05)) == []  # nothing measured there


def test_versus_uniform_says_which_is_faster_or_smaller_or_why_not() -> None:

    uniform = _point("uniform int8_wo", 0.01, 5.0, 100)
    faster = _point("size step 9", 0.015, 4.0, 110)
    neither = _point("size step 8", 0.01, 6.0, 120)
    beyond = _point("size step 12", 0.3, 3.0, 80)
    assert "is faster" in versus_uniform([uniform, faster], faster, 0.02) and "not smaller" in versus_uniform([uniform, faster], faster, 0.02)
    text = versus_uniform([uniform, neither, beyond], neither, 0.02)
    assert "nor smaller than uniform int8_wo" in text and "size step 12, degrades by 0.3" in text
    assert versus_uniform([beyond], None, 0.02) == "no uniform configuration stays within the budget"
    tie = _point("size step 7", 0.01, 4.9, 100)  # 2% faster than the uniform point: a tie
    assert "neither faster (a gain under 5% is a tie) nor smaller" in versus_uniform([uniform, tie], tie, 0.02)


def test_layers_narrow_the_search_and_the_example_defaults_to_the_first_batch(tmp_path: Path) -> None:
    model, data = _model_and_data()
    result = search(model, data, max_degradation=0.05, layers=["2", "re:4"], table_path=tmp_path / "l.json", stride=1, progress=False)
    assert set(result.layer_costs) == {"2", "4"}
    assert all(set(p.assignment) <= {"2", "4"} for p in result.points) and result.points
    with pytest.raises(ConfigError, match=r"search layers: pattern 'mlp\.\*' matches no Linear the example calls"):
        search(model, data, max_degradation=0.05, layers=["mlp.*"], table_path=tmp_path / "l.json", progress=False)


def test_holdout_decides_the_choice() -> None:
    good_here_bad_held_out = replace(_point("a", 0.01, 5, 10), holdout_degradation=0.2)
    confirmed = replace(_point("b", 0.02, 8, 60), holdout_degradation=0.03)
    unchecked = _point("c", 0.0, 6, 40)  # within the budget, never checked on held-out data (time limit)
    assert _choose([good_here_bad_held_out, confirmed, unchecked], 0.05, None) == (good_here_bad_held_out, "")
    assert _choose([good_here_bad_held_out, confirmed, unchecked], 0.05, None, holdout=True) == (confirmed, "")
    chosen, why = _choose([good_here_bad_held_out], 0.05, None, holdout=True)
    assert chosen is None and "on the search data and the held-out data" in why
    uniform = replace(_point("uniform int8_wo", 0.0, 8, 50), holdout_degradation=0.0)
    text = versus_uniform([good_here_bad_held_out, uniform, confirmed], confirmed, 0.05, holdout=True)
    assert "neither faster" in text and "a, degrades by 0.01 (0.2 held out)" in text


def test_search_checks_points_within_the_budget_on_holdout_data(tmp_path: Path) -> None:
    model, data = _model_and_data()
    result = search(model, data, max_degradation=0.05, holdout_data=data, table_path=tmp_path / "l.json", stride=1, progress=False)
    within = [p for p in result.points if p.degradation <= 0.05]
    assert within and all(p.holdout_degradation == pytest.approx(p.degradation, abs=1e-12) for p in within)  # same data
    assert all(p.holdout_degradation is None for p in result.points if p.degradation > 0.05)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"stride": 0}, r"^search\.stride: 0 must be an integer >= 1$"),
        ({"stride": True}, r"^search\.stride: True must be an integer >= 1$"),
        ({"min_speedup": -1.0}, r"^search\.min_speedup: -1\.0 must be a number >= 0$"),
        ({"time_limit_s": "10"}, r"^search\.time_limit_s: '10' must be a number >= 0 or null$"),
        ({"layer_costs": "Proxy"}, r"^search\.layer_costs: 'Proxy' is unknown; valid: measured, proxy$"),
    ],
)
def test_bad_search_options_are_refused_before_anything_is_measured(option: dict, message: str) -> None:
    """The options are one typed config (core.fields): each bad value names the option and what is valid."""
    with pytest.raises(ConfigError, match=message):
        search(nn.Linear(4, 4), [torch.randn(2, 4)], max_degradation=0.1, **option)


def test_the_cli_offers_the_layer_costs_the_search_accepts() -> None:
    from ptqkit.cli import _parser
    from ptqkit.mixed_precision.search import LAYER_COSTS

    searching = next(a for a in _parser()._subparsers._group_actions[0].choices["search"]._actions if a.dest == "layer_costs")
    assert tuple(searching.choices) == LAYER_COSTS == ("measured", "proxy")
