"""The `ptqkit` command: `quantize`, `export`, `eval`, `report`, `bench`, `doctor`, `search`, `inspect`.

`ptqkit quantize --model M (--recipe FILE | --preset NAME) [--set key=value ...] --calib DATA
--out DIR [--format onnx]` writes a run directory (`ptqkit.workflows.runs`); `ptqkit quantize` with no
arguments runs the bundled MiniLM example. `ptqkit export DIR` exports a run to ONNX.
`ptqkit eval DIR [--data DATA]` measures it against the float model (`eval.evaluate`);
`ptqkit report DIR` also writes report.json and report.html; `ptqkit bench DIR` times it against
the float model in ONNX Runtime or torch (`eval.bench`). `ptqkit doctor --model M --calib
DATA ...` runs the PTQ checklist (`eval.doctor`); `ptqkit search` the mixed-precision search
(`mixed_precision.search`). `ptqkit inspect RECIPE|PRESET|DIR` validates and prints a recipe or describes
an artifact without loading a model. User errors print one line and exit with a typed code,
without a traceback (`--debug` shows it): 0 ok, 2 usage/config error, 3 data error, 4
unsupported model, 1 anything else. Progress bars go to stderr only when it is a terminal and `--quiet` is not given.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

from ptqkit.core.errors import (
    CalibrationDataError,
    ConfigError,
    OutputPathError,
    PTQError,
    UnsupportedModelError,
)
from ptqkit.eval.bench import RUNTIMES
from ptqkit.mixed_precision.search import LAYER_COSTS

__all__ = ["EXIT_CODES", "main"]

EXIT_CODES: dict[type[PTQError], int] = {ConfigError: 2, CalibrationDataError: 3, UnsupportedModelError: 4}
FORMATS = ("safetensors", "onnx")
COMMON_COMMANDS = """the three most common commands:
  ptqkit quantize                                   the bundled example: MiniLM to W8A8, measured against FP32
  ptqkit quantize --model DIR --recipe R.yaml --calib FILE --out RUN [--format onnx]
  ptqkit report RUN --data FILE                     accuracy, size and speed of a run: report.json + report.html
`ptqkit COMMAND --help` describes each command; every recipe field is in the docs' recipe reference."""
EXAMPLE_RUN = "runs/example"  # where `ptqkit quantize` with no arguments writes the bundled example


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _write(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    sys.stdout.write((json.dumps(data, indent=2, default=str) if args.json else text) + "\n")


def _recipe(args: argparse.Namespace) -> Any:
    """The effective recipe: a file or a preset, with --set applied, validated once."""
    from ptqkit.engine.recipe import Recipe
    from ptqkit.workflows.sources import apply_settings

    if (args.recipe is None) == (args.preset is None):
        raise ConfigError("quantize: pass exactly one of --recipe FILE and --preset NAME (w8a8, w8a8_dynamic, w8a16, w4a16, fp8)")
    base = Recipe.load(args.recipe) if args.recipe is not None else Recipe.from_preset(args.preset)
    if not args.set:
        return base
    data = apply_settings(base.to_dict(), args.set)
    try:
        return Recipe.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"--set {' '.join(args.set)}: {exc}") from None


def _recipe_data(args: argparse.Namespace, path: str, tokenizer: Any, recipe: Any) -> Any:
    """`_data` with the recipe's calibration samples, batch size and seed."""
    settings = recipe.calibration
    return _data(args, path, tokenizer, samples=settings.samples, batch_size=settings.batch_size, seed=settings.seed)


def _data(args: argparse.Namespace, path: str, tokenizer: Any, *, samples: int, batch_size: int, seed: int = 0) -> Any:
    """CalibrationData from `path` with the command's --text-field/--max-length/--image-size/--tensor-name."""
    from ptqkit.workflows.sources import load_calibration

    return load_calibration(
        path, tokenizer=tokenizer, samples=samples, batch_size=batch_size, seed=seed, text_field=args.text_field,
        max_length=args.max_length, image_size=args.image_size, tensor_name=args.tensor_name,
    )


@contextlib.contextmanager
def _naming_data(path: str | None) -> Iterator[None]:
    """Prefix a CalibrationDataError raised while the model runs on the data with the data's file."""
    try:
        yield
    except CalibrationDataError as exc:
        if path is None or str(exc).startswith(str(path)):
            raise
        raise CalibrationDataError(f"{path}: {exc}") from exc


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"--format: unknown {unknown}; valid: {', '.join(FORMATS)}")
    return formats


def _human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def _render_summary(summary: dict[str, Any], out: str) -> str:
    sqnr = summary["output_sqnr_db"]
    lines = [
        f"{'':30} {'float':>10} {'quantized':>10}",
        f"{'weights and buffers':30} {_human_bytes(summary['model_float_bytes']):>10} {_human_bytes(summary['model_quantized_bytes']):>10}",
        f"{'output SQNR on one batch (dB)':30} {'':>10} {sqnr:10.2f}" if sqnr is not None else "",
        f"{summary['quantized_layers']} layers quantized ({summary['skipped_modules']} modules left float) with recipe "
        f"{summary['recipe']!r} on {summary['calibration_samples']} calibration samples in {summary['quantize_seconds']:.1f} s",
    ]
    if "onnx" in summary:
        onnx = summary["onnx"]
        lines.append(f"ONNX: {onnx['file']} ({onnx['integer_layers']} layers on integer kernels, {len(onnx['float_layers'])} float)")
    lines.append(f"run directory: {out}")
    return "\n".join(line for line in lines if line)


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.model is None:
        if args.out is not None or args.calib is not None or args.recipe or args.preset or args.set:
            raise ConfigError("quantize: --model is required with --out/--calib/--recipe/--preset/--set")
        from ptqkit.examples import minilm

        result = minilm.run(
            progress=_show_progress(args), out_dir=EXAMPLE_RUN, show_plan=not (args.quiet or args.json)
        )
        _write(args, result, minilm.render(result))
        return 0
    if args.out is None:
        raise ConfigError("quantize: --out DIR is required (the run directory to write)")
    if _is_writer(args.distributed):  # an unsafe, foreign, busy or unwritable --out fails before any work
        from ptqkit.core.atomic import prepare_output
        from ptqkit.export.artifact import written_by_ptqkit

        prepare_output(args.out, owned=written_by_ptqkit, try_lock=True)
    from ptqkit.workflows.runs import quantize_run
    from ptqkit.workflows.sources import load_model

    recipe = _recipe(args)
    formats = _formats(args.format)
    if args.onload:
        return _quantize_onloaded(args, recipe)
    calib = None
    if Path(args.model).expanduser().is_dir():  # plan from the config and the data before loading the weights
        if args.calib is not None:
            calib = _recipe_data(args, args.calib, _hf_tokenizer(args.model), recipe)
        _memory_plan(args, recipe, onload=False, calib=calib)
    loaded = load_model(args.model, args.weights)
    if args.calib is not None and calib is None:
        calib = _recipe_data(args, args.calib, loaded.tokenizer, recipe)
    writer = _is_writer(args.distributed)
    if not args.quiet and not args.json and writer:
        import ptqkit as pq

        sys.stderr.write(pq.plan(loaded.model, recipe).render() + "\n")
    with _naming_data(args.calib):
        summary = quantize_run(
            loaded, recipe, calib, args.out, formats=formats, progress=_show_progress(args), distributed=args.distributed
        )
    if writer:
        _write(args, summary, _render_summary(summary, args.out))
    return 0


def _hf_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a Hugging Face directory, or None if it has none (token-id tensor data)."""
    from ptqkit.models.hf import check_hf_config, load_hf_tokenizer

    check_hf_config(model_dir)  # before the memory plan builds a skeleton from it
    has_tokenizer = any((Path(model_dir).expanduser() / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return load_hf_tokenizer(model_dir) if has_tokenizer else None


def _memory_plan(args: argparse.Namespace, recipe: Any, *, onload: bool, calib: Any = None) -> None:
    """Predict the run's peak memory from the model's config and the calibration data's size
    (printed unless --quiet/--json) and refuse a run that cannot fit, before any weight is
    loaded (unless --no-memory-check)."""
    from ptqkit.engine.memory_plan import check_memory, plan_from_config
    from ptqkit.engine.weight_store import tokens_per_sample

    settings = recipe.calibration
    samples, seq_len = settings.samples, args.max_length
    if calib is not None and len(calib):
        samples, seq_len = min(len(calib), settings.samples), tokens_per_sample(calib)
    plan = plan_from_config(args.model, recipe, samples=samples, seq_len=seq_len, batch_size=settings.batch_size, onload=onload)
    if plan is None:
        return
    if not args.quiet and not args.json and _is_writer(args.distributed):
        sys.stderr.write(plan.render() + "\n")
    if not args.no_memory_check:
        check_memory(plan)


def _quantize_onloaded(args: argparse.Namespace, recipe: Any) -> int:
    """`quantize --onload`: a Hugging Face model quantized block by block from disk."""
    from ptqkit.workflows.runs import onload_run

    if args.distributed or args.weights is not None or args.calib is None or not Path(args.model).expanduser().is_dir():
        raise ConfigError("quantize --onload: needs a Hugging Face model directory and --calib; not with --weights or --distributed")
    calib = _recipe_data(args, args.calib, _hf_tokenizer(args.model), recipe)
    _memory_plan(args, recipe, onload=True, calib=calib)
    summary = onload_run(args.model, recipe, calib, args.out, progress=_show_progress(args), memory_check=False)  # planned above
    text = (
        f"{summary['quantized_layers']} layers quantized with onloading on {summary['calibration_samples']} samples in "
        f"{summary['quantize_seconds']:.1f} s; peak resident memory {_human_bytes(summary['peak_rss_bytes'])}; "
        f"artifact {_human_bytes(summary['artifact_bytes'])}\nrun directory: {args.out}"
    )
    _write(args, summary, text)
    return 0


def _is_writer(distributed: bool) -> bool:
    """Whether this process prints and writes: always, except on ranks other than 0."""
    if not distributed:
        return True
    from ptqkit.stats.distributed import DataParallel

    return DataParallel.current().is_writer


def _cmd_export(args: argparse.Namespace) -> int:
    from ptqkit.workflows.runs import export_run

    formats = _formats(args.format)
    if formats != ("onnx",):
        raise ConfigError(f"export: --format {args.format!r}; a run directory already holds the safetensors artifact, export writes onnx")
    result = export_run(args.run, strict=args.strict, trust_factory=args.trust_factory)
    text = f"wrote {result['file']}: {result['integer_layers']} layers on integer kernels, float: {result['float_layers'] or 'none'}"
    _write(args, result, text)
    return 0


def _evaluate_run(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Any]:
    """(QuantReport, data description, float model, quantized model, data) of a run directory on
    --data (default: the run's example batch)."""
    from ptqkit.eval.evaluate import evaluate
    from ptqkit.workflows.runs import open_run

    loaded, qmodel, example = open_run(args.run, trust_factory=args.trust_factory)
    if args.data is None:
        data, described = [example], {"description": "the run's example batch (example_inputs.safetensors)"}
    else:
        settings = qmodel.ptqkit_info.recipe.calibration
        data = _data(args, args.data, loaded.tokenizer, samples=args.samples, batch_size=settings.batch_size, seed=settings.seed)
        described = {"description": data.description, "fingerprint": data.fingerprint}
    with _naming_data(args.data or str(Path(args.run) / "example_inputs.safetensors")):
        report = evaluate(qmodel, loaded.model, data, max_samples=args.samples)
    return report, described, loaded, qmodel, data


def _render_report(report: Any) -> str:
    from ptqkit.eval.report import headline

    lines = [headline(report), ""]
    lines += [f"{key:28} {value:10.4f}" for key, value in report.metrics.items()]
    lines.append("\nworst layers (output SQNR, dB):")
    for layer in report.worst_layers(5):
        value = layer.output_sqnr_db if layer.output_sqnr_db is not None else layer.accumulated_sqnr_db
        clip = f", clipped {layer.clip_rate:.4f}" if layer.clip_rate is not None else ""
        lines.append(f"  {layer.name:40} {value:8.2f}{clip}")
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    report = _evaluate_run(args)[0]
    _write(args, report.to_dict(), _render_report(report))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ptqkit.eval.doctor import findings_from
    from ptqkit.eval.report import write_report

    search = _read_search(args.search) if args.search else None  # before the (slow) evaluation
    report, evaluation, loaded, qmodel, data = _evaluate_run(args)
    sensitivities = None
    if args.sensitivity:
        from ptqkit.eval.sensitivity import sensitivity

        sensitivities = sensitivity(loaded.model, qmodel, data, max_samples=args.samples)
    artifact = Path(args.run) / "model.safetensors"
    report = replace(report, size={**report.size, "artifact_bytes": artifact.stat().st_size})  # on disk, vs float_bytes
    out = Path(args.out) if args.out else Path(args.run) / "report"
    if not args.out and out.is_symlink():  # a run directory is data: never write through its links
        raise OutputPathError(f"{out} is a symbolic link (to {os.readlink(out)!r}); ptqkit does not write through symbolic links: remove it")
    from ptqkit.workflows.runs import current_bench, run_artifact_sha

    bench = current_bench(args.run)  # written by `ptqkit bench`: the report's speed claim, only if it timed this artifact
    evaluation = {**evaluation, "artifact_sha256": run_artifact_sha(args.run)}  # the report is derived from it
    paths = write_report(
        report, out, title=f"ptqkit report: {Path(args.run).name}", calibration=qmodel.ptqkit_info.calibration,
        evaluation=evaluation, bench=bench, sensitivities=sensitivities, findings=[asdict(f) for f in findings_from(qmodel, report)],
        search=search,
    )
    _write(args, {k: str(v) for k, v in paths.items()}, f"{_render_report(report)}\n\nwrote {paths['html']} and {paths['json']}")
    return 0


def _read_search(path: str) -> dict[str, Any]:
    """The search.json of `ptqkit search` named by `report --search`, checked enough to plot."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--search {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"--search {path}: not a search.json written by `ptqkit search` ({type(exc).__name__}: {str(exc)[:200]})") from None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    point_ok = lambda p: (  # noqa: E731
        isinstance(p, dict) and isinstance(p.get("name"), str) and (p.get("measured_ms") is None or number(p["measured_ms"]))
        and number(p.get("degradation")) and number(p.get("weight_bytes"))
    )
    if (
        not isinstance(data, dict) or not isinstance(data.get("points"), list) or not all(point_ok(p) for p in data["points"])
        or not number(data.get("float_ms")) or not isinstance(data.get("front", []), list)
        or not isinstance(data.get("chosen") or {}, dict) or not isinstance(data.get("why_none") or "", str)
    ):
        raise ConfigError(
            f"--search {path}: not a search.json written by `ptqkit search` (needs float_ms and points with a name, "
            "measured_ms, degradation and weight_bytes)"
        )
    return data


def _cmd_bench(args: argparse.Namespace) -> int:
    from ptqkit.workflows.runs import bench_run, write_bench

    result = bench_run(
        args.run, runtime=args.runtime, threads=args.threads, warmup=args.warmup, reps=args.reps, trust_factory=args.trust_factory
    )
    data = result.to_dict()
    lines = [result.headline(), f"{'':12} {'median ms':>10} {'p90 ms':>10} {'samples/s':>10} {'peak RSS':>10}"]
    for key in ("float", "quantized"):
        t = getattr(result, key)
        lines.append(f"{key:12} {t.median_ms:10.2f} {t.p90_ms:10.2f} {t.throughput_per_s:10.1f} {t.rss_peak_bytes / 2**20:8.0f} MB")
    lines.append(f"kernels: {result.kernels}")
    if result.note:
        lines.append(result.note)
    _write(args, data, "\n".join(lines))
    write_bench(args.run, data)  # records the artifact it timed; atomic, no symlink followed
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ptqkit.eval.doctor import doctor
    from ptqkit.workflows.sources import load_model

    recipe = _recipe(args)
    loaded = load_model(args.model, args.weights)
    result = doctor(
        loaded.model, _recipe_data(args, args.calib, loaded.tokenizer, recipe), recipe,
        eval_data=_recipe_data(args, args.data, loaded.tokenizer, recipe) if args.data else None, progress=_show_progress(args),
    )
    lines = [f"{f.severity.upper():8} {f.id}: {f.message}\n         fix: {f.fix}" for f in result.findings]
    text = "\n".join(lines) if lines else "no findings: the checklist passed"
    _write(args, {"findings": result.to_dicts(), "metrics": result.report.metrics}, text)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from ptqkit.mixed_precision.search import decode_step_input, search
    from ptqkit.workflows.sources import load_model

    loaded = load_model(args.model, args.weights)
    data = _data(args, args.data, loaded.tokenizer, samples=args.samples, batch_size=args.batch_size)
    example = decode_step_input(data) if args.decode_step else None  # None: the first batch
    holdout = _data(args, args.holdout_data, loaded.tokenizer, samples=args.samples, batch_size=args.batch_size) if args.holdout_data else None
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    result = search(
        loaded.model, data, example=example, max_degradation=args.max_degradation, formats=formats,
        table_path=args.latency_cache,
        threads=args.threads, stride=args.stride, max_samples=args.samples, time_limit_s=args.time_limit,
        min_speedup=args.min_speedup, layer_costs=args.layer_costs, progress=_show_progress(args),
        layers=[p.strip() for p in args.layers.split(",") if p.strip()] if args.layers else None, holdout_data=holdout,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ptqkit.core.atomic import write_json

    write_json(out / "search.json", result.to_dict())
    front = ", ".join(f"{p.name} ({p.degradation:.4f}, {p.measured_ms:.1f} ms, {p.weight_bytes / 1e6:.2f} MB)" for p in result.front)
    chosen = f"chosen: {result.chosen.name} ({result.chosen.speedup:.2f}x float)" if result.chosen else f"chosen: none: {result.why_none}"
    proxy = result.proxy_rank_correlation
    if result.layer_costs_source == "proxy":
        proxy_text = "per-layer degradations: the weight-SQNR proxy (not measured); every point above was measured"
    else:
        proxy_text = f"weight-SQNR proxy vs measured degradation, Spearman {proxy:.2f}" if proxy is not None else "proxy: too few pairs to rank"
    _write(args, result.to_dict(), f"{len(result.points)} configurations measured; Pareto front: {front}\n{chosen}\n{result.versus_uniform}\n{proxy_text}\nwrote {out / 'search.json'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ptqkit.engine.recipe import PRESETS, Recipe

    target = Path(args.target)
    if target.is_dir():
        from ptqkit.workflows.runs import describe_run

        info = describe_run(target)
        from ptqkit.core.errors import ArtifactError
        from ptqkit.export.artifact import MODEL_FILE

        if not (target / MODEL_FILE).is_file():  # the JSON describes it, but the artifact is unusable
            raise ArtifactError(f"{target / MODEL_FILE} is missing: the artifact is incomplete")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["layers_by_kind"].items()))
        text = (
            f"{info['artifact']}: {info['model_class']} quantized with recipe {info['recipe']!r}\n"
            f"{info['quantized_layers']} quantized layers ({kinds}); {info['skipped_modules']} modules left float\n"
            f"files: {', '.join(info['files'])}"
        )
        if info.get("stale"):
            text += f"\nstale, made from another model.safetensors (not used): {', '.join(info['stale'])}"
        _write(args, info, text)
        return 0
    recipe = Recipe.from_preset(args.target) if args.target in PRESETS and not target.exists() else Recipe.load(target)
    sys.stdout.write(recipe.to_json() if args.json else recipe.to_yaml())
    return 0


def _add_output_flags(command: argparse.ArgumentParser, quiet: str = "no progress output") -> None:
    command.add_argument("--quiet", action="store_true", help=quiet)
    command.add_argument("--json", action="store_true", help="machine-readable result on stdout")


def _add_model_and_recipe(command: argparse.ArgumentParser, *, required: bool) -> None:
    command.add_argument("--model", required=required, default=None, help="a local Hugging Face directory, or package.module:function returning an nn.Module")
    command.add_argument("--weights", default=None, help="state dict (.safetensors, .pt) for a package.module:function model")
    command.add_argument("--recipe", default=None, help="recipe file (.yaml/.json; see recipes/)")
    command.add_argument("--preset", default=None, help="preset recipe: w8a8, w8a8_dynamic, w8a16, w4a16, fp8")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. scheme.weights.group_size=64 (repeatable)")


def _add_data_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--text-field", default="text", help="the JSON field holding the text in a .jsonl file (default: text)")
    command.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    command.add_argument("--image-size", type=int, default=224, help="centre-crop size of images (default 224)")
    command.add_argument("--tensor-name", default=None, help="which tensor of a .safetensors/.pt data file holds the inputs")


def _add_run(command: argparse.ArgumentParser) -> None:
    command.add_argument("run", help="run directory written by `ptqkit quantize`")
    command.add_argument(
        "--trust-factory", action="store_true",
        help="allow calling the package.module:function model factory that the run's source.json names (code execution: "
        "only for runs you trust; see docs/trust-model.md)",
    )


DATA_FORMATS = "an image folder, .txt/.jsonl text, or a .safetensors/.pt tensor [N, ...]"


def _parser() -> argparse.ArgumentParser:
    from ptqkit.core.version import __version__

    parser = argparse.ArgumentParser(
        prog="ptqkit", description="Post-training quantization for PyTorch models.", epilog=COMMON_COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ptqkit {__version__}")
    parser.add_argument("--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command")
    _add_quantize(sub)
    _add_run_commands(sub)
    doctor = sub.add_parser("doctor", help="run the PTQ checklist: quantize, evaluate, and list findings with evidence and fixes")
    _add_model_and_recipe(doctor, required=True)
    doctor.add_argument("--calib", required=True, help=f"calibration data: {DATA_FORMATS}")
    doctor.add_argument("--data", default=None, help="evaluation data in the same formats (default: the calibration data)")
    _add_data_options(doctor)
    _add_output_flags(doctor)
    doctor.set_defaults(handler=_cmd_doctor)
    _add_search(sub)
    inspect = sub.add_parser("inspect", help="validate and print a recipe (file or preset), or describe a run directory")
    inspect.add_argument("target", help="recipe file, preset name (w8a8, w8a8_dynamic, w8a16, w4a16, fp8) or run directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def _add_quantize(sub: Any) -> None:
    quantize = sub.add_parser(
        "quantize", help=f"quantize a model into a run directory; no arguments: the bundled MiniLM example into {EXAMPLE_RUN}/"
    )
    _add_model_and_recipe(quantize, required=False)
    quantize.add_argument("--calib", default=None, help=f"calibration data: {DATA_FORMATS}")
    _add_data_options(quantize)
    quantize.add_argument("--out", default=None, help="run directory to write (artifact, recipe, summary)")
    quantize.add_argument("--format", default="safetensors", help="comma-separated: safetensors (always written), onnx")
    quantize.add_argument(
        "--onload", action="store_true",
        help="layer onloading for models larger than memory: weights stay on disk, one block is loaded at a time (HF directories)",
    )
    quantize.add_argument("--no-memory-check", action="store_true", help="skip the up-front memory plan of a Hugging Face model (its check, not its prediction)")
    quantize.add_argument(
        "--distributed", action="store_true",
        help="data-parallel calibration: run under `torchrun --nproc-per-node N -m ptqkit quantize ...`; rank 0 writes the run",
    )
    _add_output_flags(quantize, quiet="no plan or progress output")
    quantize.set_defaults(handler=_cmd_quantize)


def _add_run_commands(sub: Any) -> None:
    """export, eval, report and bench: the commands that read a run directory."""
    export = sub.add_parser("export", help="export a run directory to ONNX (DIR/onnx/model.onnx, export_report.json)")
    _add_run(export)
    export.add_argument("--format", default="onnx", help="onnx")
    export.add_argument("--strict", action="store_true", help="fail if a quantized layer does not run on an integer kernel")
    _add_output_flags(export)
    export.set_defaults(handler=_cmd_export)

    for name, helptext, handler in (
        ("eval", "measure a run against its float model: task metrics and per-layer SQNR, ranges, clipping", _cmd_eval),
        ("report", "evaluate a run and write report.json + a self-contained report.html", _cmd_report),
    ):
        command = sub.add_parser(name, help=helptext)
        _add_run(command)
        command.add_argument("--data", default=None, help=f"evaluation data ({DATA_FORMATS}); default: the run's example batch")
        command.add_argument("--samples", type=int, default=256, help="most samples to evaluate (default 256)")
        _add_data_options(command)
        if name == "report":
            command.add_argument("--out", default=None, help="report folder (default: RUN/report)")
            command.add_argument("--sensitivity", action="store_true", help="also rank layers by sensitivity (one evaluation per layer)")
            command.add_argument("--search", default=None, help="a search.json from `ptqkit search`, plotted as a Pareto front")
        _add_output_flags(command)
        command.set_defaults(handler=handler)

    bench = sub.add_parser("bench", help="latency, throughput and memory of a run vs its float model, side by side (writes RUN/bench.json)")
    _add_run(bench)
    bench.add_argument(
        "--runtime", default="auto", choices=RUNTIMES,
        help="auto (default: ONNX Runtime for quantized inputs, torch's packed kernels for weight-only), onnxruntime, torch, "
        "or simulated (the eager simulation, labelled as not a deployment)",
    )
    bench.add_argument("--threads", type=int, default=None, help="intra-op threads for both models (default: ORT 1, torch its current)")
    bench.add_argument("--warmup", type=int, default=3, help="warm-up calls per model")
    bench.add_argument("--reps", type=int, default=20, help="timed calls per model, alternating")
    _add_output_flags(bench)
    bench.set_defaults(handler=_cmd_bench)


def _add_search(sub: Any) -> None:
    searching = sub.add_parser("search", help="per-layer formats from measured accuracy, latency and size (mixed precision)")
    searching.add_argument("--model", required=True, help="a local Hugging Face directory, or package.module:function")
    searching.add_argument("--weights", default=None, help="state dict for a package.module:function model")
    searching.add_argument("--data", required=True, help=f"evaluation data: {DATA_FORMATS}")
    searching.add_argument("--max-degradation", type=float, required=True, help="budget: largest task-metric degradation accepted")
    searching.add_argument("--formats", default="int8_dyn,int8_wo,int4_g128,int4_g64", help="candidate formats (comma-separated)")
    searching.add_argument("--threads", type=int, default=1, help="threads for every latency measurement")
    searching.add_argument("--stride", type=int, default=4, help="measure every n-th configuration of each greedy path")
    searching.add_argument("--samples", type=int, default=64, help="evaluation samples")
    searching.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (the first batch is timed)")
    searching.add_argument("--time-limit", type=float, default=None, help="wall-time limit in seconds")
    searching.add_argument(
        "--layer-costs", choices=LAYER_COSTS, default="measured",
        help="per-layer degradation: measured (one evaluation per layer and format) or the weight-SQNR proxy (LLMs)",
    )
    searching.add_argument("--holdout-data", default=None, help="evaluation data the search does not select on: points within the budget must stay within it there too")
    searching.add_argument("--layers", default=None, help="only these Linears may change format (comma-separated globs or re: patterns; default all)")
    searching.add_argument("--decode-step", action="store_true", help="time one token of one sequence (an LLM decode step's shapes)")
    searching.add_argument("--min-speedup", type=float, default=1.05, help="a point is chosen only this much faster than float (default 1.05)")
    searching.add_argument("--latency-cache", default=None, help="latency cache file (default: the ptqkit cache directory)")
    searching.add_argument("--out", required=True, help="folder for search.json")
    _add_data_options(searching)
    _add_output_flags(searching)
    searching.set_defaults(handler=_cmd_search)


# Numeric options and their smallest valid value: checked before a command runs, so that
# NaN, Inf and nonsense sizes are a one-line ConfigError naming the option.
_FLOAT_OPTIONS = {"max_degradation": None, "time_limit": 0.0, "min_speedup": 0.0}
_INT_OPTIONS = {"max_length": 1, "image_size": 1, "samples": 1, "threads": 1, "warmup": 0, "reps": 1, "stride": 1, "batch_size": 1}


def _check_numbers(args: argparse.Namespace) -> None:
    for name, lowest in _FLOAT_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and (not math.isfinite(value) or (lowest is not None and value < lowest)):
            bound = f" >= {lowest:g}" if lowest is not None else ""
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be a finite number{bound}")
    for name, lowest in _INT_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None and value < lowest:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be an integer >= {lowest}")


def _reference_hint(exc: PTQError) -> str | None:
    """Where the recipe field a ConfigError names is documented (`engine.reference`), or None."""
    if not isinstance(exc, ConfigError):
        return None
    from ptqkit.engine.reference import reference_hint

    return reference_hint(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `ptqkit` alone: what it does and the commands most runs start with
        parser.print_help()
        return 0
    level = logging.INFO if args.verbose else logging.ERROR if getattr(args, "quiet", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_numbers(args)
        return args.handler(args)
    except PTQError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"ptqkit: error: {exc}\n")
        hint = _reference_hint(exc)
        if hint:
            sys.stderr.write(f"ptqkit: {hint}\n")
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)


if __name__ == "__main__":
    raise SystemExit(main())
