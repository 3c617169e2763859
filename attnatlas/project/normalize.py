"""Per-head query/key normalisation before the joint projection (AttentionViz, Yeh et al. 2023).

Scaling rule: c = sqrt(mean|q| / mean|k|) (or medians with rule="median"); q' = q / c, k' = k * c makes
both mean norms equal and leaves every q.k unchanged. Translation: k' = k - mean(K') + mean(Q') moves the
key centroid onto the query centroid; for one query it adds the same q.v to every key logit, so each
query's softmax is unchanged. Scaling runs first, so translation (computed on the scaled vectors) keeps
the centroids together under both cosine and euclidean distance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_NORMALISE: dict[str, Any] = {"translate": True, "scale": True, "scale_rule": "mean"}


def scale_factor(q: np.ndarray, k: np.ndarray, rule: str = "mean") -> float:
    """c such that |q / c| and |k * c| have the same mean (or median) norm."""
    agg = {"mean": np.mean, "median": np.median}.get(rule)
    if agg is None:
        raise ValueError(f"unknown scale rule {rule!r} (mean or median)")
    nq = float(agg(np.linalg.norm(q, axis=1)))
    nk = float(agg(np.linalg.norm(k, axis=1)))
    if nq <= 0 or nk <= 0:
        return 1.0  # all-zero vectors: nothing to balance
    return float(np.sqrt(nq / nk))


def normalise_head(
    q: np.ndarray, k: np.ndarray, translate: bool = True, scale: bool = True, scale_rule: str = "mean"
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(token, d_head) queries and keys -> normalised copies and what was applied."""
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    c = scale_factor(q, k, scale_rule) if scale else 1.0
    if scale:
        q, k = q / c, k * c
    shift = np.zeros(q.shape[1], np.float32)
    if translate:
        k_mean = k.mean(0, dtype=np.float64).astype(np.float32)
        q_mean = q.mean(0, dtype=np.float64).astype(np.float32)
        k = k - k_mean + q_mean
        shift = q_mean - k_mean
    return q, k, {"scale": c, "shift": shift}


def apply_normalisation(q: np.ndarray, k: np.ndarray, applied: dict) -> tuple[np.ndarray, np.ndarray]:
    """The transform `normalise_head` found on one set of tokens, applied to others (tokens placed into
    that layout later), so they live in the same space as the layout's own points."""
    c = float(applied["scale"])
    q = np.asarray(q, dtype=np.float32) / c
    k = np.asarray(k, dtype=np.float32) * c + np.asarray(applied["shift"], dtype=np.float32)
    return q, k


def joint_points(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(2 * token, d_head): queries first, then keys, the order layouts are stored in."""
    return np.ascontiguousarray(np.vstack([q, k]), dtype=np.float32)
