"""Shared exact neighbour graph of a head, and how faithful a 2-D layout is to it."""

from __future__ import annotations

import numpy as np

QUALITY_K = 10
QUALITY_SAMPLE = 1000  # trustworthiness is O(n^2 log n); a fixed seeded subsample keeps it cheap


def knn_graph(X: np.ndarray, k: int, metric: str = "cosine", device: str | None = None,
              block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by blocked torch matmul: (n, k) int64 indices and (n, k) float32 distances, self first.

    Distances are cosine distances or euclidean distances, as umap-learn expects for `precomputed_knn`.
    """
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = len(X)
    k = min(k, n)
    Z = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(dev)
    if metric == "cosine":
        Z = torch.nn.functional.normalize(Z, dim=1)
    sq = (Z * Z).sum(1)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, block):
        b = min(n, a + block)
        S = Z[a:b] @ Z.T  # (block, n) similarity
        if metric == "euclidean":
            S = 2 * S - sq[None, :]  # -|x-y|^2 + |x|^2: same order per row
        rows = torch.arange(a, b, device=dev)
        S[rows - a, rows] = float("inf")  # self first even among duplicates
        v, i = torch.topk(S, k, dim=1)
        if metric == "cosine":
            d = (1 - v).clamp_min(0)
        else:
            d = (sq[a:b, None] - v).clamp_min(0).sqrt()
        d[:, 0] = 0
        idx[a:b] = i.cpu().numpy()
        dist[a:b] = d.cpu().numpy()
    return idx, dist


def quality_sample(n_points: int, seed: int = 0, size: int = QUALITY_SAMPLE) -> np.ndarray:
    """The fixed subsample (sorted point indices) that trustworthiness is computed on."""
    if n_points <= size:
        return np.arange(n_points)
    return np.sort(np.random.default_rng(seed).choice(n_points, size, replace=False))


def layout_quality(X: np.ndarray, Y: np.ndarray, metric: str = "cosine", knn: tuple | None = None,
                   seed: int = 0, sample: int = QUALITY_SAMPLE, k: int = QUALITY_K) -> dict[str, float]:
    """Trustworthiness (k=10) on a seeded subsample, and the mean share of each sampled point's
    k nearest neighbours (among all points, in d dimensions) that are also among its k nearest in 2-D."""
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    sub = quality_sample(n, seed, sample)
    k_eff = min(k, max(1, (len(sub) - 1) // 2))  # sklearn requires k < n_samples / 2
    tw = float(trustworthiness(X[sub], Y[sub], n_neighbors=k_eff, metric=metric))
    kk = min(k, n - 1)
    if knn is None or knn[0].shape[1] < kk + 1:
        knn = knn_graph(X, kk + 1, metric)
    high = knn[0][sub, 1 : kk + 1]
    low = NearestNeighbors(n_neighbors=kk + 1).fit(Y).kneighbors(Y[sub], return_distance=False)
    kept = [len(np.intersect1d(h, l[l != s][:kk])) for h, l, s in zip(high, low, sub)]
    return {"trustworthiness": tw, "knn_kept": float(np.mean(kept) / kk), "points": float(n)}
