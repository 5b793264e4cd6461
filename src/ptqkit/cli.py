"""The `ptqkit` command (first commands: `inspect`, `quantize` with no arguments runs the bundled
example). User errors print one line and exit with a typed code, without a traceback:
0 ok, 2 usage/config error, 3 data error, 4 unsupported model, 1 unexpected."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ptqkit.errors import CalibrationDataError, ConfigError, PTQError, UnsupportedModelError

__all__ = ["main", "EXIT_CODES"]

EXIT_CODES: dict[type[PTQError], int] = {ConfigError: 2, CalibrationDataError: 3, UnsupportedModelError: 4}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ptqkit.recipe import PRESETS, Recipe

    recipe = Recipe.from_preset(args.recipe) if args.recipe in PRESETS and not Path(args.recipe).exists() else Recipe.load(args.recipe)
    sys.stdout.write(recipe.to_json() if args.json else recipe.to_yaml())
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise ConfigError("quantize --model is not available yet; run `ptqkit quantize` with no arguments for the bundled example")
    from ptqkit.examples import minilm

    result = minilm.run(progress=not args.quiet)
    sys.stdout.write((json.dumps(result, indent=2) if args.json else minilm.render(result)) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptqkit", description="Post-training quantization for PyTorch models.")
    parser.add_argument("--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="validate and print a recipe (a YAML/JSON file or a preset name)")
    inspect.add_argument("recipe", help="recipe file or preset name (w8a8, w8a8_dynamic, w8a16, w4a16, fp8)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    inspect.set_defaults(handler=_cmd_inspect)
    quantize = sub.add_parser("quantize", help="quantize a model; with no arguments, the bundled MiniLM W8A8 example")
    quantize.add_argument("--model", default=None, help="local model directory (not available yet)")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar")
    quantize.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    quantize.set_defaults(handler=_cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except PTQError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"ptqkit: error: {exc}\n")
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 1)


if __name__ == "__main__":
    raise SystemExit(main())
