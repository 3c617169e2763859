"""t-SNE backends side by side on real heads: seconds and trustworthiness per head, each run in a child
process with a time limit, so a backend that crashes natively (scikit-learn-intelex, upstream issue 1973)
or hangs is reported as such instead of ending the benchmark.

    python scripts/bench_tsne_backends.py ATLAS --model minilm --heads 3:8,0:0,5:11 --backends sklearnex,opentsne,sklearn
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np


def head_points(atlas_path: str, model: str, layer: int, head: int, max_points: int, seed: int = 0) -> np.ndarray:
    """The (points, d) joint cloud `attnatlas project` lays out for this head (same sample, same normalisation)."""
    from attnatlas.project import joint_points
    from attnatlas.project.normalize import DEFAULT_NORMALISE, normalise_head
    from attnatlas.project.runner import sample_rows
    from attnatlas.store import Atlas

    atlas = Atlas.open(atlas_path)
    rows = sample_rows(len(atlas.tokens(model)), max_points, seed)
    q, k = atlas.queries(model, layer, head)[rows], atlas.keys(model, layer, head)[rows]
    qn, kn, _ = normalise_head(q, k, **DEFAULT_NORMALISE)
    return joint_points(qn, kn)


def run_one(atlas_path: str, model: str, layer: int, head: int, backend: str, max_points: int,
            threads: int) -> dict:
    from attnatlas.project.quality import QUALITY_K, knn_graph, layout_quality
    from attnatlas.project.reducers import get_reducer, set_threads

    set_threads(threads)
    X = head_points(atlas_path, model, layer, head, max_points)
    r = get_reducer("tsne", backend=backend)
    r.adapt(len(X))
    knn = knn_graph(X, max(QUALITY_K + 1, r.knn_needed), "cosine")
    t = time.perf_counter()
    Y = r.fit_transform(X, knn=knn)
    secs = time.perf_counter() - t
    return {"seconds": secs, "points": len(X), **layout_quality(X, Y, "cosine", knn=knn)}


def main() -> None:
    from pebble import ProcessExpired, ProcessPool

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas")
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", default="3:8", help="layer:head comma list")
    ap.add_argument("--backends", default="sklearnex,opentsne,sklearn")
    ap.add_argument("--max-points", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    a = ap.parse_args()
    heads = [tuple(int(x) for x in s.split(":")) for s in a.heads.split(",")]
    backends = a.backends.split(",")
    rows = []
    with ProcessPool(1, context=mp.get_context("spawn")) as pool:
        for L, h in heads:
            for b in backends:
                f = pool.schedule(run_one, (a.atlas, a.model, L, h, b, a.max_points, a.threads), timeout=a.timeout)
                try:
                    r = f.result()
                    line = f"{r['seconds']:7.1f} s  trust {r['trustworthiness']:.4f}  kNN kept {r['knn_kept']:.3f}"
                except ProcessExpired as e:
                    r, line = {}, f"died (exit code {e.exitcode})"
                except FutureTimeout:
                    r, line = {}, f"no result in {a.timeout:.0f} s"
                rows.append((L, h, b, r))
                print(f"L{L}H{h} {b:10s} {line}", flush=True)
    for b in backends:
        got = [r for _, _, bb, r in rows if bb == b and r]
        if got:
            print(f"{b:10s} mean {np.mean([r['seconds'] for r in got]):.1f} s, trust {np.mean([r['trustworthiness'] for r in got]):.4f}"
                  f" over {len(got)} of {len(heads)} heads")


if __name__ == "__main__":
    main()
