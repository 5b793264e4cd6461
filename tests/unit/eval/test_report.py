"""report.json / report.html: content, honesty of the headline, and a real browser render."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.engine.recipe import Recipe
from ptqkit.eval.evaluate import evaluate
from ptqkit.eval.report import headline, write_report


@pytest.fixture(scope="module")
def small_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(96, 16)
    qmodel = pq.quantize(model, Recipe.from_preset("w8a8"), pq.CalibrationData.from_tensors(x[:64]), progress=False)
    return evaluate(qmodel, model, [x[64:80], x[80:]], labels=torch.randint(0, 10, (32,)))


def test_json_holds_every_number_and_is_strict(small_report, tmp_path: Path) -> None:
    paths = write_report(small_report, tmp_path, title="MLP W8A8", calibration={"fingerprint": "abc"})
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["schema_version"] == 1 and data["samples"] == 32 and data["title"] == "MLP W8A8"
    assert data["metrics"]["top1_agreement"] == pytest.approx(small_report.metrics["top1_agreement"])
    assert [layer["name"] for layer in data["layers"]] == ["0", "2", "4"]
    assert data["provenance"]["calibration"] == {"fingerprint": "abc"}
    assert "avx2" in data["provenance"]["machine"]["isa"] and data["provenance"]["machine"]["versions"]["torch"]
    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert 'id="layers"' in page and 'id="sqnr-chart"' in page and data["headline"] in page


def test_headline_says_when_quantized_is_slower(small_report) -> None:
    assert headline(small_report, {"speedup": 0.8}).startswith("Slower than float on this machine (0.80x the speed).")
    faster = headline(small_report, {"speedup": 1.7})
    assert faster.startswith("Accuracy ") and "points vs float" in faster and faster.endswith("1.70x faster than float.")


BENCH = {
    "runtime": "onnxruntime", "batch": 8, "threads": 2, "speedup": 2.5, "note": "",
    "float": {"median_ms": 10.0, "p90_ms": 11.0, "throughput_per_s": 800.0, "rss_peak_bytes": 1, "calls": 20},
    "quantized": {"median_ms": 4.0, "p90_ms": 4.5, "throughput_per_s": 2000.0, "rss_peak_bytes": 1, "calls": 20},
    "kernels": {"MatMulIntegerToFloat": 3},
}


def test_speed_leads_beside_accuracy_with_the_runtime_named(small_report, tmp_path: Path) -> None:
    page = write_report(small_report, tmp_path, bench=BENCH)["html"].read_text()
    assert page.index('id="speed-chart"') < page.index('id="metrics"')  # speed right after the headline
    assert "2.50x faster than float in onnxruntime." in page and "median latency (ms)" in page
    assert "10.00 / 4.00" in page and "MatMulIntegerToFloat x3" in page
    simulated = headline(small_report, {**BENCH, "runtime": "simulated", "speedup": 0.7})
    assert "0.70x float's speed as an eager-torch simulation (not a deployment)" in simulated and not simulated.startswith("Slower")
    assert 'id="speed-chart"' not in write_report(small_report, tmp_path / "none")["html"].read_text()


def test_every_chart_has_axis_titles(small_report, tmp_path: Path) -> None:
    page = write_report(small_report, tmp_path, bench=BENCH)["html"].read_text()
    for title in ("layers, in model order", "output SQNR (dB)", "median latency (ms)", "model, batch 8", "input value", "count (log scale)"):
        assert f'class="axis-title"' in page and title in page, title


def test_pareto_plot_from_a_search(small_report, tmp_path: Path) -> None:
    search = {
        "metric": "top1_agreement", "float_ms": 10.0, "front": ["a"], "chosen": {"name": "a"}, "why_none": "",
        "points": [{"name": "a", "measured_ms": 8.0, "degradation": 0.01, "weight_bytes": 100},
                   {"name": "b", "measured_ms": 12.0, "degradation": 0.02, "weight_bytes": 200}],
    }
    page = write_report(small_report, tmp_path, search=search)["html"].read_text()
    assert 'id="pareto"' in page and page.count('class="point"') == 2 and 'stroke="#27ae60"' in page
    assert json.loads((tmp_path / "report.json").read_text())["search"]["front"] == ["a"]


def test_non_finite_numbers_become_strings(small_report, tmp_path: Path) -> None:
    from dataclasses import replace

    exact = replace(small_report, layers=(replace(small_report.layers[0], weight_sqnr_db=math.inf),) + small_report.layers[1:])
    data = json.loads(write_report(exact, tmp_path)["json"].read_text())
    assert data["layers"][0]["weight_sqnr_db"] == "inf"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (scripts/ensure_system_data.sh installs it as root)")
def test_report_renders_in_headless_chromium_without_console_errors(small_report, tmp_path: Path) -> None:
    paths = write_report(small_report, tmp_path, title="MLP W8A8", bench=BENCH)
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--window-size=1280,1800"]
    png = tmp_path / "report.png"
    shot = subprocess.run([*base, f"--screenshot={png}", paths["html"].as_uri()], capture_output=True, text=True, timeout=120)
    assert png.is_file() and png.stat().st_size > 10_000, shot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CONSOLE" not in shot.stderr and "Uncaught" not in shot.stderr, shot.stderr[-2000:]
    # sorting: click the "output SQNR dB" header, then the page records the first row's layer
    probe = tmp_path / "probe.html"
    column = 5  # output SQNR dB
    probe.write_text(paths["html"].read_text().replace("</body>", (
        f"<script>document.querySelectorAll('#layers th')[{column}].click();"
        "document.title = 'first:' + document.querySelector('#layers tbody tr td').textContent;</script></body>"
    )))
    dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    worst = min(small_report.layers, key=lambda layer: layer.output_sqnr_db).name
    assert f"<title>first:{worst}</title>" in dom.stdout, dom.stderr[-2000:]
    for element in ('id="headline"', 'id="speed-chart"', 'id="speed"', 'id="metrics"', 'id="layers"', 'id="sqnr-chart"', 'id="histograms"', 'class="clip"', 'id="recipe"', 'id="provenance"'):
        assert element in dom.stdout, element
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr, dom.stderr[-2000:]
