"""`attnatlas project ATLAS`: joint query-key layouts of every (or selected) head."""

from __future__ import annotations

import argparse
import sys

from attnatlas.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from attnatlas.project.reducers import REDUCERS
    from attnatlas.project.runner import DEFAULT_METHODS, HEAD_TIMEOUT, MAX_POINTS

    p = subparsers.add_parser("project", help="project each head's queries and keys together to 2-D",
                              description="Project each head's queries and keys together to 2-D and store "
                                          "the layouts and their faithfulness in the atlas.")
    p.add_argument("atlas", help="atlas folder")
    p.add_argument("--model", help="model in the atlas (default: the only one)")
    p.add_argument("--method", default=",".join(DEFAULT_METHODS),
                   help="comma list of " + ", ".join(sorted(REDUCERS)) + f" (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--layers", help="e.g. 0,2,5-7 (default: all)")
    p.add_argument("--heads", help="e.g. 0-3 (default: all)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one head each (default 1)")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="redo heads that already have a layout")
    p.add_argument("--no-translate", action="store_true", help="do not move the key centroid onto the queries'")
    p.add_argument("--no-scale", action="store_true", help="do not balance query and key norms")
    p.add_argument("--max-points", type=int, default=MAX_POINTS,
                   help=f"cap on points (2 x tokens) per head; above it a seeded token sample is used (default {MAX_POINTS})")
    p.add_argument("--no-place", action="store_true",
                   help="above --max-points, give coordinates to the sampled tokens only (default: place every other "
                        "token into the sampled layout from its nearest neighbours)")
    p.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT, metavar="SECONDS",
                   help="stop a head whose process gives no result in this time, and retry it once on the safe "
                        f"backends (default {HEAD_TIMEOUT:.0f})")
    p.add_argument("--reducer-options", action="append", default=[], metavar="METHOD=JSON",
                   help='a method\'s own options, e.g. tsne=\'{"backend": "sklearn"}\' (repeat per method)')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where t-SNE and UMAP run: cuda lays out each layer's heads together on the GPU (the batched "
                        "backend, unless --reducer-options names one); auto is cuda when torch sees a GPU (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--scheduler", default="none", metavar="none|local|tcp://HOST:PORT",
                   help="run heads as Dask tasks: 'local' starts a LocalCluster of --workers, tcp://... joins a cluster")
    p.set_defaults(func=run)


def parse_reducer_options(items: list[str]) -> dict[str, dict]:
    """["tsne={...}", ...] -> {"tsne": {...}}; each value a JSON object."""
    import json

    out: dict[str, dict] = {}
    for item in items:
        method, sep, text = item.partition("=")
        try:
            value = json.loads(text) if sep else None
        except json.JSONDecodeError as exc:
            raise InputError(f"--reducer-options {method}: not JSON ({exc.msg} at character {exc.pos}).") from None
        if not isinstance(value, dict):
            raise InputError(f"--reducer-options {item[:80]!r}: give METHOD={{\"option\": value, ...}}.")
        out.setdefault(method.strip().lower(), {}).update(value)
    return out


def run(args: argparse.Namespace) -> int:
    from attnatlas.project.runner import project_model
    from attnatlas.store import Atlas

    atlas = Atlas.open(args.atlas)
    model = atlas.resolve_model(args.model)
    if args.workers < 1:
        raise InputError("--workers must be at least 1.")
    if args.max_points < 10:
        raise InputError("--max-points must be at least 10.")
    if not args.head_timeout > 0:
        raise InputError("--head-timeout must be a positive number of seconds.")
    kwargs = dict(reducer_params=parse_reducer_options(args.reducer_options), methods=args.method, layers=args.layers,
                  heads=args.heads, metric=args.metric, seed=args.seed,
                  force=args.force, normalise={"translate": not args.no_translate, "scale": not args.no_scale},
                  max_points=args.max_points, progress=not args.quiet, place=not args.no_place, device=args.device)
    if args.scheduler == "none":
        kwargs["head_timeout"] = args.head_timeout
        s = project_model(atlas, model, workers=args.workers, **kwargs)
    else:
        from attnatlas.scale.distributed import dask_client, project_distributed

        with dask_client(args.scheduler, workers=args.workers) as client:
            s = project_distributed(client, atlas, model, **kwargs)
    placed = f" + {s['placed_points']} placed" if s.get("placed_points") else ""
    print(f"{model}: {s['done']} layouts made, {s['skipped']} already done (kept), {len(s['failed'])} failed, "
          f"{s['points']} points per head{' (sampled)' if s['sampled'] else ''}{placed}, {s['seconds']:.1f} s "
          f"({s['heads_per_min']:.1f} heads/min) on {s['device']}: "
          + ", ".join(f"{m} {b}" for m, b in s["backends"].items()))
    for m, changes in s["adapted"].items():
        for key, value in changes.items():
            print(f"  {m}: {key} lowered to {value:g} (too few points for the default)")
    for m, tw in s["quality"].items():
        if tw is not None:
            placed = (s.get("placed_quality") or {}).get(m)
            print(f"  {m}: mean trustworthiness {tw:.3f}" + (f" (placed points: {placed:.3f})" if placed is not None else ""))
    for L, h, m, why in s.get("fallbacks", []):
        print(f"  L{L}H{h} {m}: made on the safe backend after its first process died: {why}", file=sys.stderr)
    if s["failed"]:
        print(f"{len(s['failed'])} head/method(s) failed; the others were kept:", file=sys.stderr)
        for L, h, m, msg in s["failed"]:
            print(f"  L{L}H{h} {'all methods' if m == '*' else m}: {msg}", file=sys.stderr)
        return 1
    return 0
