"""One run, same heads: AttentionViz recipe vs attnatlas backends (sklearnex / umap-learn vs batched).

Per-head wall seconds and trustworthiness (k=10, quality.layout_quality, same seeded subsample).
Batched backends embed the given heads of one layer together; their time is divided by the head count
and includes the shared batched kNN graph, as the per-head backends include the per-head kNN.

    python scripts/compare_batched.py --atlas ATLAS --model M --layer 3 --heads 0,1 --recipe-heads 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--heads", default="0,1")
    ap.add_argument("--recipe-heads", type=int, default=1, help="first N of --heads also run the recipe")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import torch

    from attnatlas.project import get_reducer, joint_points, knn_graph, layout_quality, normalise_head, sample_rows
    from attnatlas.project.batched import knn_graph_batch, tsne_batch, umap_batch
    from attnatlas.project.runner import MAX_POINTS
    from attnatlas.store import Atlas

    torch.set_num_threads(a.threads)
    atlas = Atlas.open(a.atlas)
    heads = [int(h) for h in a.heads.split(",")]
    rows = sample_rows(len(atlas.tokens(a.model)), MAX_POINTS, 0)
    Q = [atlas.queries(a.model, a.layer, h)[rows] for h in heads]
    K = [atlas.keys(a.model, a.layer, h)[rows] for h in heads]
    X = np.stack([joint_points(*normalise_head(q, k)[:2]) for q, k in zip(Q, K)])  # (head, point, d)
    H, n, _ = X.shape
    print(f"{a.model} L{a.layer} heads {heads}: {n} points per head, torch threads {a.threads}", flush=True)
    res: dict[str, list] = {}

    def add(name, secs, tw):
        res.setdefault(name, []).append((secs, tw))
        print(f"  {name:24s} {secs:8.2f} s  tw {tw:.4f}", flush=True)

    # Warm-up, untimed: umap-learn numba compile, oneDAL start.
    import umap

    Z = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    umap.UMAP(n_epochs=10).fit_transform(Z)
    get_reducer("tsne").fit_transform(Z[:300])

    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    for i in range(min(a.recipe_heads, H)):  # the recipe: translation only, library defaults
        q, k = Q[i], K[i]
        Xr = joint_points(q, k - k.mean(0) + q.mean(0))
        for name, make in [("recipe tsne", lambda: TSNE(2, perplexity=50, max_iter=300, metric="cosine", random_state=0)),
                           ("recipe umap", lambda: umap.UMAP(metric="cosine", init="random", random_state=0)),
                           ("recipe pca", lambda: PCA(2))]:
            t = time.perf_counter()
            Y = make().fit_transform(Xr)
            add(name, time.perf_counter() - t, layout_quality(Xr, np.asarray(Y, np.float32), "cosine")["trustworthiness"])

    for i in range(H):  # current per-head backends, shared per-head kNN
        t = time.perf_counter()
        knn = knn_graph(X[i], 151, "cosine")
        tk = time.perf_counter() - t
        for m in ("tsne", "umap"):
            t = time.perf_counter()
            Y = get_reducer(m).fit_transform(X[i], knn=knn)
            add(f"{m} per-head backend", time.perf_counter() - t + tk / 2, layout_quality(X[i], Y, knn=knn)["trustworthiness"])

    t = time.perf_counter()
    idx, dist = knn_graph_batch(X, 151, "cosine")
    tk = (time.perf_counter() - t) / H
    for m, f in (("tsne", tsne_batch), ("umap", umap_batch)):
        t = time.perf_counter()
        Y = f(X, idx, dist)
        secs = (time.perf_counter() - t) / H + tk / 2
        for i in range(H):
            add(f"{m} batched", secs, layout_quality(X[i], Y[i], knn=(idx[i], dist[i]))["trustworthiness"])
    print("summary (mean per head):")
    for name, v in res.items():
        print(f"  {name:24s} {np.mean([s for s, _ in v]):8.2f} s  tw {np.mean([t for _, t in v]):.4f}  (n={len(v)})")


if __name__ == "__main__":
    main()
