"""`pq.search` (mixed precision) on real models: MiniLM from the library call, SmolLM2 (its first
decoder layers) through `ptqkit search --decode-step` as a user runs it. Timings are measured but
never asserted here (benchmarks/mixed_precision.py reports them); what is asserted is what must
hold on any machine: the points are measured (metrics recomputed independently), the front is
the Pareto front of the points, the choice respects the budget or says why, the time limit
stops the search, and the JSON and the report's Pareto plot are written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ptqkit as pq
from ptqkit.eval.metrics import embedding_cosine
from ptqkit.mixed_precision.formats import apply_assignment

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 0.02  # 1 - mean embedding cosine


def _dominates(q, p) -> bool:
    no_worse = q.degradation <= p.degradation and q.measured_ms <= p.measured_ms and q.weight_bytes <= p.weight_bytes
    better = q.degradation < p.degradation or q.measured_ms < p.measured_ms or q.weight_bytes < p.weight_bytes
    return no_worse and better


@torch.inference_mode()
def _pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings by mean pooling over the attention mask: [B, H]."""
    hidden = model(**batch).last_hidden_state  # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_search_measures_its_points(minilm, python_doc_eval_texts, tmp_path: Path) -> None:
    model, tokenizer = minilm
    texts = python_doc_eval_texts[:16]
    data = pq.CalibrationData.from_text(texts, tokenizer, max_length=128, batch_size=8)
    result = pq.search(
        model, data, max_degradation=BUDGET, formats=("int8_dyn", "int8_wo"), layer_costs="proxy", stride=12,
        max_samples=len(texts), threads=1, table_path=tmp_path / "latency.json", progress=False,
    )
    names = {p.name for p in result.points}
    assert {"uniform int8_dyn", "uniform int8_wo"} <= names and len(result.points) >= 4, names
    assert result.layer_costs_source == "proxy" and len(result.layer_costs) == 37  # 36 encoder Linears + pooler

    # the reported metric is the measured one: the uniform int8_dyn model's mean-pooled cosine,
    # recomputed here on the same batches (per-tensor dynamic activation ranges depend on them)
    point = next(p for p in result.points if p.name == "uniform int8_dyn")
    candidate = apply_assignment(model, point.assignment)
    cosine = float(torch.cat([embedding_cosine(_pooled(model, batch), _pooled(candidate, batch)) for batch in data.batches()]).mean())
    assert point.metric == pytest.approx(cosine, abs=1e-5)
    assert 0.9 < cosine < 1.0  # measured 0.98 (7-bit per-tensor activations on every layer)
    weight_only = next(p for p in result.points if p.name == "uniform int8_wo")
    assert weight_only.degradation < point.degradation  # weights alone lose less than weights + activations

    # the front is exactly the non-dominated points; the choice is within the budget and faster
    assert {p.name for p in result.front} == {p.name for p in result.points if not any(_dominates(q, p) for q in result.points)}
    if result.chosen is not None:
        assert result.chosen.degradation <= BUDGET and result.chosen.speedup >= 1.05
    else:
        assert result.why_none
    assert result.versus_uniform
    json.dumps(result.to_dict())  # plain JSON

    stopped = pq.search(model, data, max_degradation=BUDGET, formats=("int8_dyn",), table_path=tmp_path / "latency.json",
                        max_samples=len(texts), time_limit_s=0.0, progress=False)
    assert stopped.stopped_early and stopped.points == () and stopped.chosen is None and "no measured configuration" in stopped.why_none


def test_smollm2_search_from_the_command_line(python_doc_eval_texts, tmp_path: Path) -> None:
    """`ptqkit search --decode-step --layer-costs proxy --layers ...` on SmolLM2's FP32 directory,
    moving the MLPs of its first two decoder layers: search.json with measured points."""
    from ptqkit.models.zoo import smollm2_fp32_dir

    (tmp_path / "eval.txt").write_text("\n\n".join(python_doc_eval_texts[:40]), encoding="utf-8")
    command = [
        sys.executable, "-m", "ptqkit.cli", "search", "--model", str(smollm2_fp32_dir()), "--data", str(tmp_path / "eval.txt"),
        "--max-degradation", "1.0", "--formats", "int8_wo,int4_g64", "--layer-costs", "proxy", "--decode-step",
        "--layers", "model.layers.0.mlp.*,model.layers.1.mlp.*", "--samples", "4", "--batch-size", "2", "--max-length", "64",
        "--stride", "2", "--latency-cache", str(tmp_path / "latency.json"), "--out", str(tmp_path / "search"), "--json", "--quiet",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "search" / "search.json").read_text())
    assert saved["metric"] == "perplexity_quantized" and saved["layer_costs_source"] == "proxy"
    assert sorted(saved["layer_costs"]) == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("down", "gate", "up")]
    points = {p["name"]: p for p in saved["points"]}
    assert {"uniform int8_wo", "uniform int4_g64"} <= set(points) and len(points) >= 4
    assert points["uniform int8_wo"]["degradation"] < points["uniform int4_g64"]["degradation"]  # measured -0.04 vs +0.50 (float 52.1)
    assert all(p["predicted_ms"] > 0 and p["measured_ms"] > 0 for p in points.values())
    assert set(saved["front"]) <= set(points)
