"""`attnatlas build CONFIG.toml`: models x corpora x methods in one resumable job."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build", help="extract and project models x corpora x methods from a TOML config",
        description="Run every model over every corpus, then project every head with every method. Rerunning "
                    "skips what is already in the atlas; projection may run on a Dask cluster.")
    p.add_argument("config", help="build config (.toml); see data/build-example.toml")
    p.add_argument("--stage", choices=["all", "extract", "project"], default="all", help="run only one stage")
    p.add_argument("--scheduler", metavar="none|local|tcp://HOST:PORT",
                   help="where projection runs: this machine's processes (none), a new Dask LocalCluster "
                        "(local), or a running Dask scheduler (default: the config's build.scheduler)")
    p.add_argument("--workers", type=int, help="worker processes (none, local); overrides build.workers")
    p.add_argument("--threads-per-worker", type=int, help="threads per Dask LocalCluster worker")
    p.add_argument("--connect-timeout", type=float, help="seconds to wait for a remote scheduler (default 10)")
    p.add_argument("--force", action="store_true", help="redo layouts made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attnatlas.errors import InputError
    from attnatlas.scale.build import STAGES, run_build
    from attnatlas.scale.config import load_config

    cfg = load_config(args.config)
    for opt in ("workers", "threads_per_worker"):
        v = getattr(args, opt)
        if v is not None:
            if v < 1:
                raise InputError(f"--{opt.replace('_', '-')} must be at least 1.")
            setattr(cfg, opt, v)
    if args.connect_timeout is not None:
        if args.connect_timeout <= 0:
            raise InputError("--connect-timeout must be a positive number of seconds.")
        cfg.connect_timeout = args.connect_timeout
    sched = args.scheduler
    if sched is not None and sched not in ("none", "local") and "://" not in sched:
        raise InputError(f"--scheduler {sched!r}: use none, local, or an address like tcp://host:8786.")
    stages = STAGES if args.stage == "all" else (args.stage,)
    report = run_build(cfg, stages=stages, scheduler=sched, force=args.force, progress=not args.quiet,
                       say=lambda s: print(s, flush=True))
    failed = sum(len(s["failed"]) for s in report["project"].values())
    if failed:
        print(f"{failed} head/method(s) failed; the rest were kept. Rerun to retry them.", file=sys.stderr)
        return 1
    return 0
