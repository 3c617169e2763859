"""`attnatlas` command line: one module per sub-command, each with `register(subparsers)`.

User mistakes raise AtlasError; they are printed as one line, without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from attnatlas import __version__
from attnatlas.errors import AtlasError

# Each module defines register(subparsers) and sets a `func(args) -> int | None` default.
COMMANDS = ["extract", "info", "project", "serve", "demo", "compare", "analyze", "build"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnatlas", description="Explore what every attention head of a transformer does.")
    parser.add_argument("--version", action="version", version=f"attnatlas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"attnatlas.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"attnatlas.cli.{name}":
                continue  # command not shipped in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AtlasError as exc:
        if args.verbose:
            raise
        print(f"attnatlas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written is visible in the atlas", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
