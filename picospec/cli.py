"""The `picospec` console command. Each subcommand lives with its concern and is imported lazily,
so that `picospec chat` on a Pi never imports torch."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines register(subparsers)
SUBCOMMANDS = {
    "generate": "picospec.generate_cmd",
    "serve": "cloud.cli",
    "models": "models.cli",
    "doctor": "edge_app.doctor",
    "bench": "bench.cli",
    "chat": "edge_app.repl",
    "demo": "edge_app.demo",
    "edge-serve": "edge_app.openai_server",
    "load": "bench.loadtest",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picospec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:  # a partial install (edge-only) still offers the rest
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda args, exc=exc: _unavailable(exc))
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"picospec: this command needs a package that is not installed: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
