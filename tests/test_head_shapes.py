"""Head data that breaks native reducers, tried on every reducer (t-SNE on each backend, UMAP, PCA): each
head is laid out or reported cleanly, in one line, and the run goes on. Heads run isolated, so a native
crash on such data ends as a retry or a report, never as the end of the run."""

from __future__ import annotations

import numpy as np
import pytest

from attnatlas.project import project_model
from attnatlas.testing import synthetic_atlas

M = "synthetic"


def awkward(q: np.ndarray, k: np.ndarray) -> None:
    """One kind of awkward data per head of layer 0 (layer 1 keeps ordinary data)."""
    rng = np.random.default_rng(1)
    T, d = q.shape[2], q.shape[3]
    q[0, 0] = q[0, 0, rng.integers(0, 3, T)]  # exact duplicates: three distinct queries
    k[0, 0] = k[0, 0, rng.integers(0, 3, T)]
    q[0, 1] = q[0, 1, :1] + rng.normal(size=(T, d)) * 1e-4  # near-duplicates around one point
    k[0, 2, : int(0.8 * T)] = k[0, 2, 0]  # most keys at one spot (a [CLS] key stack)
    q[0, 3] *= 1e-3  # queries a thousand times shorter than keys
    k[0, 4] *= 300  # keys hundreds of times longer (float16 keeps them finite)
    q[0, 5], k[0, 5] = 1.0, 1.0  # a constant head
    q[0, 6, 5, 0] = np.inf  # inf in storage


METHODS = ["tsne", "umap", "pca"]
BACKENDS = [{"tsne": {"backend": "sklearnex"}}, {"tsne": {"backend": "sklearn"}}]


def check(s, atlas, n_layers, n_heads):
    """Every (head, method) is either laid out (finite coordinates) or failed with a one-line message."""
    failed = {(L, h, m) for L, h, m, _ in s["failed"]}
    for *_, msg in s["failed"]:
        assert "\n" not in msg and msg
    for m in METHODS:
        done = atlas.layout_done(M, m)
        for L in range(n_layers):
            for h in range(n_heads):
                if done[L, h]:
                    assert np.isfinite(atlas.layout_coords(M, m, L, h)).all()
                else:
                    assert (L, h, m) in failed or (L, h, "*") in failed, (L, h, m)


@pytest.mark.parametrize("params", BACKENDS, ids=["sklearnex", "sklearn"])
def test_awkward_heads_are_laid_out_or_reported(tmp_path, params):
    pytest.importorskip("sklearnex") if params["tsne"]["backend"] == "sklearnex" else None
    atlas = synthetic_atlas(tmp_path / "a", n_layers=2, n_heads=7, n_seq=16, seq_len=16, d_head=16,
                            shape_vectors=awkward)
    s = project_model(atlas, M, methods=METHODS, workers=2, progress=False, reducer_params=params)
    check(s, atlas, 2, 7)
    # Only the constant head and the one with inf, each in one line for all methods.
    assert sorted((L, h, m) for L, h, m, _ in s["failed"]) == [(0, 5, "*"), (0, 6, "*")]
    assert atlas.layout_done(M, "tsne")[1].all()  # ordinary heads all laid out


@pytest.mark.parametrize("tokens", [2, 3, 6, 12])
def test_tiny_heads_of_4_to_24_points(tmp_path, tokens):
    atlas = synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=1, seq_len=tokens, topk=min(tokens, 4))
    try:
        s = project_model(atlas, M, methods=METHODS, workers=1, progress=False)
    except Exception as exc:  # too few points for a method at all: one clear InputError, before any work
        from attnatlas.errors import InputError

        assert isinstance(exc, InputError) and "needs at least" in str(exc)
        return
    check(s, atlas, 1, 2)
    assert s["failed"] == []


def test_exactly_the_cap(tmp_path):
    atlas = synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=10, seq_len=15)  # 150 tokens
    s = project_model(atlas, M, methods=METHODS, workers=1, progress=False, max_points=300)
    assert not s["sampled"] and s["points"] == 300 and s["failed"] == []
    check(s, atlas, 1, 2)
