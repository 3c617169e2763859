"""Projection speed and faithfulness: the AttentionViz recipe vs attnatlas, side by side in one run.

The recipe (one head after another): translate keys, then scikit-learn TSNE (perplexity 50, 300
iterations, cosine), umap-learn UMAP (cosine, random init, random_state 0) and PCA. It runs on a
sample of --recipe-heads heads (spread over the model: the whole recipe takes hours). attnatlas runs
the same heads one process, for per-method ratios, and then the whole model (or --full-layers) with
--workers processes, for heads/min and the overall ratio (recipe per-head time x heads / attnatlas wall).
Both sides are judged by the same quality function (trustworthiness k=10 on the same seeded subsample).
numba/oneDAL warm-up is paid once, before either side is timed, and reported.

    python scripts/bench_project.py                                  # synthetic 12 x 12 heads, 10k points
    python scripts/bench_project.py --atlas ATLAS --model minilm      # a real atlas
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def recipe_head(atlas, model, L, h, rows, seed=0):
    import umap
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from attnatlas.project import joint_points, layout_quality

    q, k = atlas.queries(model, L, h)[rows], atlas.keys(model, L, h)[rows]
    k = k - k.mean(0) + q.mean(0)  # AttentionViz ships translation only
    X = joint_points(q, k)
    out = {}
    for name, make in [
        ("tsne", lambda: TSNE(2, perplexity=50, max_iter=300, metric="cosine", random_state=seed)),
        ("umap", lambda: umap.UMAP(metric="cosine", init="random", random_state=seed)),
        ("pca", lambda: PCA(2)),
    ]:
        t = time.perf_counter()
        Y = make().fit_transform(X)
        secs = time.perf_counter() - t
        out[name] = {"seconds": secs, **layout_quality(X, np.asarray(Y, np.float32), "cosine", seed=seed)}
    return out


def warm_up():
    """First numba compile of umap-learn/pynndescent and oneDAL start-up, for both sides, untimed."""
    import umap

    from attnatlas.project import knn_graph

    X = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    t = time.perf_counter()
    umap.UMAP(metric="cosine", init="random", random_state=0, n_epochs=10).fit_transform(X)
    idx, d = knn_graph(X, 16, "cosine")
    umap.UMAP(metric="cosine", random_state=0, n_epochs=10, precomputed_knn=(idx[:, :15], d[:, :15], None)).fit_transform(X)
    from attnatlas.project import get_reducer

    get_reducer("tsne").fit_transform(X[:300])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", help="existing atlas (default: build a synthetic one in --work)")
    ap.add_argument("--model", default="synthetic")
    ap.add_argument("--work", default="/tmp/attnatlas-bench", help="where the synthetic atlas / copy goes")
    ap.add_argument("--recipe-heads", type=int, default=3, help="heads the recipe runs on (spread over the model)")
    ap.add_argument("--full-layers", default=None, help="layers of the whole-model attnatlas run (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from attnatlas.project import project_model, sample_rows
    from attnatlas.project.runner import MAX_POINTS
    from attnatlas.store import Atlas
    from attnatlas.testing import synthetic_atlas

    work = Path(a.work)
    if a.atlas is None:
        src = work / "synthetic144"
        if not (src / "zarr.json").exists():
            print("building synthetic atlas: 12 layers x 12 heads, 5,000 tokens, d_head 64 ...", flush=True)
            synthetic_atlas(src, name=a.model, n_layers=12, n_heads=12, n_seq=250, seq_len=20, d_head=64)
    else:
        src = Path(a.atlas)
    # Work on a copy so the benchmark never touches the user's layouts.
    dst = work / "copy"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("layouts"))
    atlas = Atlas.open(dst)
    info = atlas.info(a.model)
    n_heads = info.n_layers * info.n_heads
    rows = sample_rows(len(atlas.tokens(a.model)), MAX_POINTS, a.seed)
    flat = np.unique(np.linspace(0, n_heads - 1, a.recipe_heads).round().astype(int))
    sample = [(int(i) // info.n_heads, int(i) % info.n_heads) for i in flat]
    print(f"{a.model}: {info.n_layers} x {info.n_heads} heads, {2 * len(rows)} points per head; "
          f"recipe heads {['L%dH%d' % s for s in sample]}", flush=True)
    print(f"warm-up (untimed, both sides): {warm_up():.1f} s", flush=True)

    methods = ("tsne", "umap", "pca")
    rec = {m: [] for m in methods}
    for L, h in sample:
        r = recipe_head(atlas, a.model, L, h, rows, a.seed)
        for m in methods:
            rec[m].append(r[m])
        print(f"  recipe L{L}H{h}: " + ", ".join(f"{m} {r[m]['seconds']:.2f} s tw {r[m]['trustworthiness']:.4f}" for m in methods), flush=True)

    ours = {m: [] for m in methods}
    for L, h in sample:  # same heads, one process, one head after another
        project_model(atlas, a.model, methods, layers=[L], heads=[h], seed=a.seed, force=True, progress=False)
        for m in methods:
            q = atlas.layout_quality(a.model, m).set_index(["layer", "head"]).loc[(L, h)]
            ours[m].append({"seconds": float(q.seconds), "trustworthiness": float(q.trustworthiness)})
        print(f"  attnatlas L{L}H{h}: " + ", ".join(f"{m} {ours[m][-1]['seconds']:.2f} s tw {ours[m][-1]['trustworthiness']:.4f}" for m in methods), flush=True)

    print("\nper method, same heads (mean per head):")
    rec_total = ours_total = 0.0
    for m in methods:
        rt, ot = np.mean([x["seconds"] for x in rec[m]]), np.mean([x["seconds"] for x in ours[m]])
        rtw, otw = np.mean([x["trustworthiness"] for x in rec[m]]), np.mean([x["trustworthiness"] for x in ours[m]])
        rec_total, ours_total = rec_total + rt, ours_total + ot
        print(f"  {m:5s} recipe {rt:7.2f} s  attnatlas {ot:6.2f} s  ratio {rt / ot:6.1f}x  "
              f"trustworthiness {rtw:.4f} -> {otw:.4f} (diff {otw - rtw:+.4f})")
    print(f"  all   recipe {rec_total:7.2f} s  attnatlas {ours_total:6.2f} s  ratio {rec_total / ours_total:6.1f}x (one process)")

    t = time.perf_counter()
    s = project_model(atlas, a.model, methods, layers=a.full_layers, seed=a.seed, force=True, workers=a.workers, progress=True)
    wall = time.perf_counter() - t
    n = s["heads_done"]
    print(f"\nattnatlas whole run: {n} heads x 3 methods in {wall:.1f} s with {a.workers} workers "
          f"({60 * n / wall:.1f} heads/min), {len(s['failed'])} failed")
    print(f"recipe estimate for the same {n} heads: {rec_total * n:.0f} s ({60 / rec_total:.2f} heads/min)")
    print(f"overall ratio (recipe per-head time x heads / attnatlas wall): {rec_total * n / wall:.1f}x")
    print("mean trustworthiness, whole run: " + ", ".join(f"{m} {v:.4f}" for m, v in s["quality"].items() if v is not None))


if __name__ == "__main__":
    main()
