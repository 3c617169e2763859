"""Place new points into a stored 2-D layout from their neighbours in the original space.

One function serves two callers: `project` places the tokens a capped layout left out of its sample, and
`place` (live text) puts a user's own sentence into every head. A new point lands at the distance-weighted
mean of the 2-D positions of its k nearest reference points (in the d-dimensional, normalised space the
layout was made from). How well it fits is reported beside it: its mean distance to those neighbours over
the typical such distance of the reference points themselves (1 = as close as the corpus is to itself).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from attnatlas.project.normalize import apply_normalisation, joint_points
from attnatlas.project.quality import knn_torch, layout_quality, quality_sample

PLACE_K = 10
# Above this many reference points an inverted-file index (approximate) answers the neighbour queries: exact
# search of 180,000 new points against 20,000 references cost more than the layout itself. Measured on real
# MiniLM heads (20,000 references): 2.5-3x faster than exact search, 90-93% of the 10 exact neighbours found
# (HNSW was no faster than exact search there).
EXACT_BELOW = 8192
IVF_PROBES = 8
FAR = 3.0  # fit above this: the point is far outside the corpus and is flagged, not silently placed


@dataclass(frozen=True)
class Placement:
    xy: np.ndarray  # (new, 2) float32 positions in the reference layout
    neighbours: np.ndarray  # (new, k) int64 reference rows used
    distance: np.ndarray  # (new,) float32 mean distance to those neighbours
    fit: np.ndarray  # (new,) float32 distance / the reference's own typical neighbour distance

    @property
    def far(self) -> np.ndarray:
        """(new,) bool: points well outside the reference cloud."""
        return self.fit > FAR


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn_query(ref: np.ndarray, new: np.ndarray, k: int, metric: str = "cosine",
              use_faiss: bool = True, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(new, k) indices into `ref` and (new, k) distances (cosine or euclidean), nearest first. On `device`
    cuda, exact (`quality.knn_torch`): faster there than the CPU's approximate index, and exact."""
    k = min(k, len(ref))
    if device == "cuda":
        return knn_torch(ref, k, metric, device, queries=new)
    R = _unit(ref) if metric == "cosine" else np.ascontiguousarray(ref, dtype=np.float32)
    N = _unit(new) if metric == "cosine" else np.ascontiguousarray(new, dtype=np.float32)
    if use_faiss and importlib.util.find_spec("faiss") is not None:
        import faiss

        ip = metric == "cosine"
        if len(R) >= EXACT_BELOW:
            # faiss's k-means wants 39 training points per list, and says so on stderr for every head.
            lists = int(np.clip(2 ** round(np.log2(4 * np.sqrt(len(R)))), 64, 1024))
            lists = min(lists, 2 ** int(np.log2(len(R) // 39)))
            coarse = faiss.IndexFlatIP(R.shape[1]) if ip else faiss.IndexFlatL2(R.shape[1])
            index = faiss.IndexIVFFlat(coarse, R.shape[1], lists, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
            index.train(R)  # faiss's k-means is seeded: the same references give the same index
            index.nprobe = IVF_PROBES
        else:
            index = faiss.IndexFlatIP(R.shape[1]) if ip else faiss.IndexFlatL2(R.shape[1])
        index.add(R)
        score, idx = index.search(N, k)
        dist = (1 - score).clip(min=0) if ip else np.sqrt(score.clip(min=0))
        return idx.astype(np.int64), dist.astype(np.float32)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine" if metric == "cosine" else "euclidean", algorithm="brute")
    dist, idx = nn.fit(R).kneighbors(N)
    return idx.astype(np.int64), dist.astype(np.float32)


def typical_distance(ref: np.ndarray, metric: str = "cosine", k: int = PLACE_K, sample: int = 2000,
                     seed: int = 0) -> float:
    """Median over a seeded sample of reference points of their mean distance to their k nearest others."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ref), min(sample, len(ref)), replace=False) if len(ref) > sample else np.arange(len(ref))
    idx, dist = knn_query(ref, ref[pick], k + 1, metric)
    own = idx == pick[:, None]
    dist = np.where(own, np.nan, dist)  # each point itself does not count
    return float(np.nanmedian(np.nanmean(dist, axis=1))) if len(ref) > 1 else 1.0


def positions(idx: np.ndarray, dist: np.ndarray, ref_xy: np.ndarray) -> np.ndarray:
    """(new, 2): the inverse-distance weighted mean of the neighbours' 2-D positions (one neighbour search
    serves every layout of the same points); an exact duplicate of a reference point lands on it."""
    w = 1.0 / np.maximum(dist, 1e-6)
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkc->nc", w, np.asarray(ref_xy, dtype=np.float32)[idx]).astype(np.float32)


def place(new: np.ndarray, ref: np.ndarray, ref_xy: np.ndarray, metric: str = "cosine", k: int = PLACE_K,
          typical: float | None = None) -> Placement:
    """Positions of `new` (n, d) points in the layout `ref_xy` (m, 2) of `ref` (m, d) points."""
    if len(new) == 0:
        return Placement(np.zeros((0, 2), np.float32), np.zeros((0, k), np.int64), np.zeros(0, np.float32),
                         np.zeros(0, np.float32))
    idx, dist = knn_query(ref, new, k, metric)
    xy = positions(idx, dist, ref_xy)
    mean = dist.mean(1).astype(np.float32)
    scale = typical if typical is not None else typical_distance(ref, metric, k)
    return Placement(xy, idx, mean, (mean / max(scale, 1e-12)).astype(np.float32))


class Placer:
    """The tokens a capped layout left out, placed into each of the head's layouts from their neighbours
    among the laid-out points (one neighbour search per head, shared by every method)."""

    def __init__(self, X: np.ndarray, q_all: np.ndarray, k_all: np.ndarray, rows: np.ndarray, applied: dict,
                 metric: str, exact: bool = False, device: str | None = None):
        self.n, self.rows = len(q_all), rows
        self.rest = np.setdiff1d(np.arange(self.n), rows)
        qr, kr = apply_normalisation(q_all[self.rest], k_all[self.rest], applied)
        self.X = joint_points(qr, kr)  # (2 * rest, d): queries, then keys
        self.idx, self.dist = knn_query(X, self.X, PLACE_K, metric, use_faiss=not exact, device=None if exact else device)
        self.metric = metric

    @classmethod
    def of(cls, X: np.ndarray, q_all: np.ndarray, k_all: np.ndarray, rows: np.ndarray, applied: dict, metric: str,
           exact: bool = False, device: str | None = None) -> Placer | None:
        """The placer of a head laid out from `rows` (None when that is every token); ValueError on NaN/inf."""
        if len(rows) >= len(q_all):
            return None
        bad = int((~np.isfinite(q_all)).sum() + (~np.isfinite(k_all)).sum())
        if bad:
            raise ValueError(f"{bad} NaN/inf values in the query/key vectors of tokens outside the layout sample")
        return cls(X, q_all, k_all, rows, applied, metric, exact, device)

    def coords(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(2 * n_tokens, 2) coordinates of every token (queries, then keys, in token order) and the
        placed points' own (2 * rest, 2)."""
        Yr = positions(self.idx, self.dist, Y)
        full = np.empty((2 * self.n, 2), np.float32)
        S, R = len(self.rows), len(self.rest)
        full[self.rows], full[self.n + self.rows] = Y[:S], Y[S:]
        full[self.rest], full[self.n + self.rest] = Yr[:R], Yr[R:]
        return full, Yr

    def quality(self, Yr: np.ndarray, seed: int) -> dict[str, float]:
        """Faithfulness of the placed points, by the same measure as the laid-out ones (a seeded subsample)."""
        sub = quality_sample(len(self.X), seed)
        q = layout_quality(self.X[sub], Yr[sub], self.metric, seed=seed)
        return {**q, "points": float(len(self.X))}
