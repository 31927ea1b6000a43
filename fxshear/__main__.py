"""Command line: ``python -m fxshear inspect --model minilm --batch 8 --seq 128 --html out.html``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python-literal value (``memory_budget=0.5``, ``exclude=['x*']``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_PRESET, PRESETS
    from .zoo.models import MODEL_NAMES

    parser = argparse.ArgumentParser(prog="fxshear", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="compare what fxshear and torch.compile save for backward")
    ins.add_argument("--model", required=True,
                     help=f"one of {', '.join(MODEL_NAMES)}, or module:factory for your own model")
    ins.add_argument("--size", default="small", help="size of a built-in config model (small|bench)")
    ins.add_argument("--batch", type=int, default=8)
    ins.add_argument("--seq", type=int, default=128)
    ins.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS)
    ins.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                     help="an fxshear option, repeatable (e.g. memory_budget=0.5)")
    ins.add_argument("--ledger", action="store_true",
                     help="also print every saved tensor, one unabridged line each")
    ins.add_argument("--html", help="write the HTML report here")
    ins.add_argument("--json", help="write the report data here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from .config import ConfigError
    from .inspection import inspect
    from .zoo.models import MODEL_NAMES, build_model, load_user_model

    console = Console()
    try:
        example = (build_model(args.model, size=args.size) if args.model in MODEL_NAMES
                   else load_user_model(args.model))
        batch = example.make_batch(args.batch, args.seq)
        with console.status(f"tracing {example.name} under torch.compile and fxshear"):
            report = inspect(example.model, preset=args.preset, example_kwargs=batch, **dict(args.option))
    except (ConfigError, ValueError, TypeError, ModuleNotFoundError) as error:
        console.print(f"[red]fxshear inspect: {error}[/red]", soft_wrap=True)
        return 2
    report.print(console, ledger=args.ledger)
    if args.html:
        console.print(f"HTML report: {report.save_html(args.html)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
        console.print(f"JSON report: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
