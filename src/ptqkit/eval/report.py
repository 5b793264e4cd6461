"""`write_report`: a `QuantReport` as `report.json` (schema-versioned, every number) and
`report.html`, one self-contained page (inline CSS, JS and SVG; nothing fetched) with the
headline, the speed when a benchmark was run (latency of float and quantized, side by side, and
the runtime that ran them), the model-wide metrics, a per-layer table sortable by any column, a
chart of per-layer SQNR, the recipe and the provenance (versions, machine, calibration
fingerprint). Every chart has labelled axes with units."""
from __future__ import annotations

import datetime
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptqkit.core.machine import describe as describe_machine
from ptqkit.eval.evaluate import QuantReport

__all__ = ["headline", "write_report"]

_METRIC_NAMES = {
    "output_sqnr_db": "output SQNR (dB)",
    "top1_agreement": "top-1 agreement with float",
    "top5_agreement": "top-5 agreement with float",
    "softmax_kl": "softmax KL to float (nats)",
    "accuracy_float": "accuracy, float",
    "accuracy_quantized": "accuracy, quantized",
    "perplexity_float": "perplexity, float",
    "perplexity_quantized": "perplexity, quantized",
    "next_token_agreement": "next-token agreement with float",
    "embedding_cosine_mean": "embedding cosine to float, mean",
    "embedding_cosine_min": "embedding cosine to float, worst",
}


def headline(report: QuantReport, bench: Mapping[str, Any] | None = None) -> str:
    """One sentence: the accuracy change, the size ratio and, when measured, the speed ratio;
    a quantized model slower than float says so first."""
    metrics, parts = report.metrics, []
    if "accuracy_quantized" in metrics:
        change = 100 * (metrics["accuracy_quantized"] - metrics["accuracy_float"])
        parts.append(f"accuracy {metrics['accuracy_quantized']:.4f} ({change:+.2f} points vs float {metrics['accuracy_float']:.4f})")
    elif "top1_agreement" in metrics:
        parts.append(f"top-1 agreement with float {metrics['top1_agreement']:.4f}")
    elif "perplexity_quantized" in metrics:
        parts.append(f"perplexity {metrics['perplexity_quantized']:.2f} (float {metrics['perplexity_float']:.2f})")
    elif "embedding_cosine_mean" in metrics:
        parts.append(f"embedding cosine to float {metrics['embedding_cosine_mean']:.4f}")
    if "output_sqnr_db" in metrics:
        parts.append(f"output SQNR {metrics['output_sqnr_db']:.1f} dB")
    size = report.size
    if size.get("quantized_bytes"):
        parts.append(f"{size['float_bytes'] / size['quantized_bytes']:.2f}x smaller in memory")
    text = ", ".join(parts)
    if bench and bench.get("speedup") is not None and bench.get("runtime") == "simulated":
        text += f", {float(bench['speedup']):.2f}x float's speed as an eager-torch simulation (not a deployment)"
    elif bench and bench.get("speedup") is not None:
        speedup = float(bench["speedup"])
        runtime = f" in {bench['runtime']}" if bench.get("runtime") else ""
        if speedup < 1:
            return f"Slower than float on this machine{runtime} ({speedup:.2f}x the speed). {text[0].upper()}{text[1:]}."
        text += f", {speedup:.2f}x faster than float{runtime}"
    return f"{text[0].upper()}{text[1:]}." if text else "No metrics were measured."


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return html.escape(str(value))


def _chart(report: QuantReport) -> str:
    """Inline SVG: one bar per layer, isolated output SQNR (accumulated where isolated is absent)."""
    values = []
    for layer in report.layers:
        value = layer.output_sqnr_db if layer.output_sqnr_db is not None else layer.accumulated_sqnr_db
        values.append((layer.name, value if value is not None and math.isfinite(value) else None))
    finite = [v for _, v in values if v is not None]
    if not finite:
        return "<p>No per-layer SQNR was measured.</p>"
    top = max(max(finite), 1.0)
    worst = sorted((v, n) for n, v in values if v is not None)[:5]
    worst_names = {n for _, n in worst}
    step = 8  # px per layer; a bar fills three quarters of its step
    width, height, bar = max(300, step * len(values)), 180, 0.75 * step
    bars = []
    for i, (name, value) in enumerate(values):
        if value is None:
            continue
        h = max(1.0, (max(value, 0.0) / top) * (height - 20))
        colour = "#c0392b" if name in worst_names else "#2e86c1"
        bars.append(
            f'<rect x="{i * step}" y="{height - h:.1f}" width="{bar}" height="{h:.1f}" fill="{colour}">'
            f"<title>{html.escape(name)}: {value:.2f} dB</title></rect>"
        )
    left, bottom = 40, 30  # room for the axis titles
    axes = (
        f'<line x1="{left}" y1="0" x2="{left}" y2="{height}" stroke="#444"/>'
        f'<line x1="{left}" y1="{height}" x2="{left + width}" y2="{height}" stroke="#444"/>'
        f'<text class="axis-title" x="{left + width / 2 - 60:.0f}" y="{height + 22}" font-size="11">layers, in model order</text>'
        f'<text class="axis-title" x="12" y="{height / 2 + 40:.0f}" font-size="11" transform="rotate(-90 12 {height / 2 + 40:.0f})">output SQNR (dB)</text>'
        f'<text x="{left - 4}" y="12" font-size="10" text-anchor="end">{top:.0f}</text>'
        f'<text x="{left - 4}" y="{height}" font-size="10" text-anchor="end">0</text>'
    )
    return (
        f'<svg id="sqnr-chart" role="img" aria-label="per-layer SQNR" width="{width + left}" height="{height + bottom}" '
        f'viewBox="0 0 {width + left} {height + bottom}" xmlns="http://www.w3.org/2000/svg">'
        f'{axes}<g transform="translate({left + 2},0)">{"".join(bars)}</g></svg>'
        f"<p>Bars: per-layer output SQNR in model order; red: the five worst ({', '.join(html.escape(n) for _, n in worst)}).</p>"
    )


def _speed_html(bench: Mapping[str, Any] | None) -> str:
    """The benchmark beside the headline: a bar chart of median latency (float, quantized) with
    labelled axes, and a table of what was timed where."""
    if not bench or not isinstance(bench.get("float"), Mapping) or not isinstance(bench.get("quantized"), Mapping):
        return ""
    bars = [("float", float(bench["float"]["median_ms"]), "#7f8c8d"), ("quantized", float(bench["quantized"]["median_ms"]), "#2e86c1")]
    top = max(ms for _, ms, _ in bars) or 1.0
    width, height, left, bottom, bar = 320, 160, 50, 36, 80
    shapes = "".join(
        f'<rect x="{left + 30 + i * (bar + 40)}" y="{height - ms / top * (height - 20):.1f}" width="{bar}" height="{ms / top * (height - 20):.1f}" '
        f'fill="{colour}"><title>{name}: {ms:.2f} ms</title></rect>'
        f'<text x="{left + 30 + i * (bar + 40) + bar / 2:.0f}" y="{height + 14}" font-size="11" text-anchor="middle">{name}</text>'
        f'<text x="{left + 30 + i * (bar + 40) + bar / 2:.0f}" y="{height - ms / top * (height - 20) - 4:.1f}" font-size="10" text-anchor="middle">{ms:.2f}</text>'
        for i, (name, ms, colour) in enumerate(bars)
    )
    axes = (
        f'<line x1="{left}" y1="0" x2="{left}" y2="{height}" stroke="#444"/><line x1="{left}" y1="{height}" x2="{width}" y2="{height}" stroke="#444"/>'
        f'<text class="axis-title" x="12" y="{height - 10}" font-size="11" transform="rotate(-90 12 {height - 10})">median latency (ms)</text>'
        f'<text class="axis-title" x="{left + 60}" y="{height + 30}" font-size="11">model, batch {html.escape(str(bench.get("batch")))}</text>'
    )
    kernels = ", ".join(f"{html.escape(str(k))} x{v}" for k, v in (bench.get("kernels") or {}).items()) or "—"
    rows = "".join(
        f"<tr><td>{label}</td><td>{value}</td></tr>"
        for label, value in (
            ("runtime", html.escape(str(bench.get("runtime", "")))), ("batch, threads", f"{bench.get('batch')}, {bench.get('threads')}"),
            ("median latency, float / quantized (ms)", f"{bars[0][1]:.2f} / {bars[1][1]:.2f}"),
            ("speed-up", _number(bench.get("speedup"))), ("quantized layers ran on", kernels),
            ("note", html.escape(str(bench.get("note") or "—"))),
        )
    )
    return (
        f'<h2>Speed</h2><svg id="speed-chart" role="img" aria-label="median latency" width="{width}" height="{height + bottom}" '
        f'viewBox="0 0 {width} {height + bottom}" xmlns="http://www.w3.org/2000/svg">{axes}{shapes}</svg>'
        f'<table id="speed"><tbody>{rows}</tbody></table>'
    )


def _histogram_svg(name: str, histogram: Mapping[str, Any]) -> str:
    """Inline SVG of one layer's input histogram (log counts) with the clipping thresholds."""
    counts, low, high = histogram["counts"], float(histogram["low"]), float(histogram["high"])
    width, height, bins = 320, 110, max(1, len(counts))
    top = max(math.log1p(c) for c in counts) or 1.0
    step = width / bins
    bars = "".join(
        f'<rect x="{i * step:.1f}" y="{height - 15 - (math.log1p(c) / top) * (height - 25):.1f}" width="{max(step - 0.5, 0.5):.1f}" '
        f'height="{(math.log1p(c) / top) * (height - 25):.1f}" fill="#5d6d7e"/>'
        for i, c in enumerate(counts)
    )
    lines = ""
    for value in histogram.get("clip") or []:
        x = (min(max(value, low), high) - low) / (high - low) * width
        lines += f'<line class="clip" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height - 15}" stroke="#c0392b" stroke-width="2"><title>clip at {value:.4g}</title></line>'
    label = (
        f'<text x="0" y="{height - 2}" font-size="10">{low:.3g}</text><text x="{width - 40}" y="{height - 2}" font-size="10">{high:.3g}</text>'
        f'<text class="axis-title" x="{width / 2 - 30:.0f}" y="{height - 2}" font-size="10">input value</text>'
        f'<text class="axis-title" x="2" y="10" font-size="10">count (log scale)</text>'
    )
    return (
        f'<figure class="histogram"><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="input histogram of {html.escape(name)}">{bars}{lines}{label}</svg>'
        f"<figcaption>{html.escape(name)}: input values (log counts); red: calibrated clipping range</figcaption></figure>"
    )


def _histograms_html(report: QuantReport) -> str:
    if not report.histograms:
        return ""
    figures = "".join(_histogram_svg(name, h) for name, h in report.histograms.items())
    return f'<h2>Inputs of the worst layers</h2><div id="histograms">{figures}</div>'


def _pareto_svg(search: Mapping[str, Any]) -> str:
    """Inline SVG scatter of the search's measured points: latency (x) vs degradation (y); the
    Pareto front in red, float as a cross, the chosen point circled."""
    points = [p for p in search.get("points", []) if p.get("measured_ms")]
    if not points:
        return ""
    width, height, pad = 460, 260, 40
    xs = [p["measured_ms"] for p in points] + [search["float_ms"]]
    ys = [p["degradation"] for p in points] + [0.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: pad + (v - x0) / ((x1 - x0) or 1) * (width - 2 * pad)  # noqa: E731
    sy = lambda v: height - pad - (v - y0) / ((y1 - y0) or 1) * (height - 2 * pad)  # noqa: E731
    front = set(search.get("front", []))
    chosen = (search.get("chosen") or {}).get("name")
    marks = []
    for p in points:
        colour = "#c0392b" if p["name"] in front else "#7f8c8d"
        ring = f'<circle cx="{sx(p["measured_ms"]):.1f}" cy="{sy(p["degradation"]):.1f}" r="8" fill="none" stroke="#27ae60" stroke-width="2"/>' if p["name"] == chosen else ""
        marks.append(
            f'<circle class="point" cx="{sx(p["measured_ms"]):.1f}" cy="{sy(p["degradation"]):.1f}" r="4" fill="{colour}">'
            f'<title>{html.escape(p["name"])}: {p["measured_ms"]:.1f} ms, degradation {p["degradation"]:.4g}, {p["weight_bytes"]} bytes</title></circle>{ring}'
        )
    fx, fy = sx(search["float_ms"]), sy(0.0)
    marks.append(f'<path d="M{fx - 5:.1f},{fy - 5:.1f} L{fx + 5:.1f},{fy + 5:.1f} M{fx - 5:.1f},{fy + 5:.1f} L{fx + 5:.1f},{fy - 5:.1f}" stroke="#000" stroke-width="2"><title>float: {search["float_ms"]:.1f} ms</title></path>')
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>'
        f'<text class="axis-title" x="{width / 2 - 40:.0f}" y="{height - 8}" font-size="11">latency (ms, measured)</text>'
        f'<text class="axis-title" x="4" y="{pad - 10}" font-size="11">{html.escape(str(search.get("metric", "")))} degradation</text>'
        f'<text x="{pad - 4}" y="{height - pad + 14}" font-size="10">{x0:.0f}</text><text x="{width - pad - 20}" y="{height - pad + 14}" font-size="10">{x1:.0f}</text>'
    )
    why = f"<p>{html.escape(search['why_none'])}</p>" if search.get("why_none") else ""
    return (
        f'<h2>Mixed-precision search</h2><svg id="pareto" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Pareto front">{axes}{"".join(marks)}</svg>'
        f"<p>Every point measured end to end; red: Pareto front (degradation, latency, bytes); cross: float; green ring: chosen.</p>{why}"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.4em} .headline{font-size:1.15em;padding:.6em;background:#f4f6f7;border-left:4px solid #2e86c1}
table{border-collapse:collapse;font-size:.85em} th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eee;cursor:pointer} figure.histogram{display:inline-block;margin:.5em} td:first-child,th:first-child{text-align:left} pre{background:#f8f8f8;padding:.5em;overflow:auto}
"""

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.dataset.order !== 'asc';
    th.dataset.order = ascending ? 'asc' : 'desc';
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
      var nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return ascending ? cmp : -cmp;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

_LAYER_COLUMNS = (
    ("name", "layer", None), ("module_type", "type", None), ("weights", "weights", None), ("inputs", "inputs", None),
    ("weight_sqnr_db", "weight SQNR dB", 2), ("output_sqnr_db", "output SQNR dB", 2),
    ("accumulated_sqnr_db", "accumulated SQNR dB", 2), ("input_min", "input min", 3), ("input_max", "input max", 3),
    ("clip_rate", "clipped", 4), ("outlier_ratio", "outlier ratio", 1),
)


def _layer_table(report: QuantReport, sensitivity: Mapping[str, float]) -> str:
    titles = [title for _, title, _ in _LAYER_COLUMNS] + (["sensitivity"] if sensitivity else [])
    head = "".join(f"<th>{html.escape(title)}</th>" for title in titles)
    rows = []
    for layer in report.layers:
        cells = []
        if sensitivity:
            value = sensitivity.get(layer.name)
            cells_extra = f'<td data-value="{"" if value is None else value}">{_number(value, 4)}</td>'
        else:
            cells_extra = ""
        for key, _, digits in _LAYER_COLUMNS:
            value = getattr(layer, key)
            sort_value = "" if value is None else (str(value) if not isinstance(value, float) or math.isfinite(value) else ("1e308" if value > 0 else "-1e308"))
            shown = _number(value, digits) if digits is not None else html.escape(str(value if value is not None else "—"))
            cells.append(f'<td data-value="{html.escape(sort_value)}">{shown}</td>')
        title = f' title="{html.escape(layer.note)}"' if layer.note else ""
        rows.append(f"<tr{title}>{''.join(cells)}{cells_extra}</tr>")
    return f'<table id="layers" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _render_html(data: dict[str, Any], report: QuantReport, title: str) -> str:
    metrics = "".join(
        f"<tr><td>{html.escape(_METRIC_NAMES.get(k, k))}</td><td>{_number(v, 4)}</td></tr>" for k, v in data["metrics"].items()
    )
    findings = data.get("findings") or []
    finding_html = "".join(
        f"<li><b>{html.escape(str(f.get('severity', '')))}</b> {html.escape(str(f.get('id', '')))}: {html.escape(str(f.get('message', '')))}"
        f"<br><i>fix:</i> {html.escape(str(f.get('fix', '')))}</li>"
        for f in findings
    )
    size = data["size"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="headline" class="headline">{html.escape(data["headline"])}</p>
{_speed_html(data.get("bench"))}
<h2>Model</h2>
<table id="metrics"><tbody>{metrics}
<tr><td>weights and buffers, float (bytes)</td><td>{size["float_bytes"]}</td></tr>
<tr><td>weights and buffers, quantized (bytes)</td><td>{size["quantized_bytes"]}</td></tr>
{f'<tr><td>artifact on disk (bytes)</td><td>{size["artifact_bytes"]}</td></tr>' if "artifact_bytes" in size else ""}
<tr><td>samples evaluated</td><td>{data["samples"]}</td></tr></tbody></table>
{f'<h2>Findings</h2><ul id="findings">{finding_html}</ul>' if findings else ''}
<h2>Per layer</h2>
{_chart(report)}
<p>Click a column title to sort. Output SQNR: the quantized layer against the float layer on the same inputs;
accumulated: each model on its own activations; clipped: share of inputs beyond the calibrated range;
sensitivity (when measured): how much the task metric degrades with only that layer quantized.</p>
{_layer_table(report, (data.get("sensitivity") or {}).get("degradation", {}))}
{_histograms_html(report)}
{_pareto_svg(data["search"]) if data.get("search") else ""}
<h2>Recipe</h2><pre id="recipe">{html.escape(json.dumps(data["recipe"], indent=2))}</pre>
<h2>Provenance</h2><pre id="provenance">{html.escape(json.dumps(data["provenance"], indent=2))}</pre>
<script>{_SORT_SCRIPT}</script>
</body></html>
"""


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan" (strict JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    from ptqkit.core.atomic import write_text

    write_text(path, text)  # temp file + fsync + rename; a symlink at `path` is refused


def write_report(
    report: QuantReport,
    out_dir: str | Path,
    *,
    title: str = "ptqkit quantization report",
    bench: Mapping[str, Any] | None = None,
    findings: list[dict[str, Any]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    sensitivities: list[Any] | None = None,
    search: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json and report.html into `out_dir`; returns their paths. `bench`: a
    `BenchResult.to_dict()` (the headline states the speed), `findings`: the doctor's,
    `sensitivities`: `eval.sensitivity`'s ranking (a sortable column); `calibration` and
    `evaluation`: descriptions/fingerprints of the data that calibrated and that evaluated;
    `search`: a `mixed_precision.search.SearchResult.to_dict()` (a Pareto plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    data.update(
        title=title,
        headline=headline(report, bench),
        generated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        bench=dict(bench) if bench else None,
        findings=list(findings or []),
        search=dict(search) if search else None,
        sensitivity=(
            {"metric": sensitivities[0].metric, "degradation": {r.name: r.degradation for r in sensitivities}} if sensitivities else None
        ),
        provenance={"machine": describe_machine(), "calibration": dict(calibration or {}), "evaluation": dict(evaluation or {})},
    )
    json_text = json.dumps(_plain(data), indent=2, default=str, allow_nan=False) + "\n"
    paths = {"json": out / "report.json", "html": out / "report.html"}
    _write_atomic(paths["json"], json_text)
    _write_atomic(paths["html"], _render_html(data, report, title))
    return paths
