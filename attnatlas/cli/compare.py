"""attnatlas compare: per-head metrics and head-to-head similarity of two models, as CSV and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the heads of two models: metrics, similar heads, HTML report",
                       description="Measure every head of two models over their common inputs, find each head's "
                                   "nearest heads, store the results in the atlas and write CSVs plus report.html.")
    p.add_argument("atlas", metavar="ATLAS")
    p.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two models of the atlas")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the CSVs and report.html")
    p.add_argument("--layout", default=None, metavar="METHOD",
                   help="layout for the layout measures (default: pca if stored, else any; skipped when none)")
    p.add_argument("--max-sequences", type=int, default=200, metavar="N",
                   help="common sequences used by the attention-pattern similarity (default 200; 0 = all)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="nearest heads listed per head (default 5)")
    p.add_argument("--no-store", action="store_true", help="do not write the results into the atlas")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attnatlas.analyze.head_types import types_by_head
    from attnatlas.compare.report import write_outputs
    from attnatlas.compare.run import check_models, compare_models
    from attnatlas.errors import InputError
    from attnatlas.store import Atlas

    if args.max_sequences < 0 or args.top < 1:
        raise InputError("--max-sequences must be 0 or more and --top 1 or more.")
    atlas = Atlas.open(args.atlas)
    check_models(atlas, list(args.models))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create --out {out}: {exc.strerror or exc}.") from None
    res = compare_models(atlas, list(args.models), layout_method=args.layout,
                         max_sequences=args.max_sequences or None, top_k=args.top, store=not args.no_store,
                         progress=not args.quiet)
    files = write_outputs(atlas, res, out, types_by_head(atlas, res.models))
    a, b = res.models
    print(f"compared {a} ({len(res.metrics[a].heads)} heads) with {b} ({len(res.metrics[b].heads)} heads) "
          f"over {res.n_sequences} common sequences in {res.seconds:.1f} s")
    for note in res.notes:
        print(f"note: {note}")
    for f in files:
        print(f"wrote {f}")
    if not args.no_store:
        print(f"stored head_metrics, token_sparsity, similarity__*, nearest__* under each model's analysis/ in {atlas.path}")
    return 0
