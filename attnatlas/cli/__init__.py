"""`attnatlas` command line: one module per sub-command, each with `register(subparsers)`.

User mistakes raise AtlasError; they are printed as one line, without a traceback, with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import warnings

from attnatlas.errors import AtlasError
from attnatlas.version import __version__

# Each module defines register(subparsers) and sets a `func(args) -> int | None` default.
COMMANDS = ["extract", "info", "project", "serve", "demo", "compare", "analyze", "build", "export", "place"]


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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (truncation, sampling) as one line, without a source line under them."""
    return f"attnatlas: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        warnings.formatwarning = _one_line_warning
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
    except OSError as exc:  # a full disk, a lost permission or object store: the machine's fault, not a bug
        if args.verbose:
            raise
        print(f"attnatlas {args.command}: error: {_describe_os_error(exc)}; nothing half-written is kept "
              "and what the atlas held before is unchanged", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _is_storage_error(exc) or args.verbose:
            raise
        print(f"attnatlas {args.command}: error: the storage service failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); what the atlas held before is unchanged", file=sys.stderr)
        return 2


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename or ""
    hint = {errno.ENOSPC: " (free some space, or write the atlas elsewhere with --out)",
            errno.EDQUOT: " (disk quota reached)",
            errno.EACCES: " (check the folder's permissions)", errno.EROFS: " (the file system is read-only)"}
    return f"{reason}" + (f": {where}" if where else "") + hint.get(exc.errno, "")


def _is_storage_error(exc: BaseException) -> bool:
    """Errors of object-store clients (botocore, aiohttp, gcsfs, ...), which are not OSErrors."""
    return type(exc).__module__.split(".")[0] in {"botocore", "aiobotocore", "aiohttp", "gcsfs", "google", "azure", "adlfs"}


if __name__ == "__main__":
    sys.exit(main())
