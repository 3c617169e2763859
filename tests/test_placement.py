"""Every token placed: tokens outside a capped layout's sample get coordinates from their neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnatlas import testing
from attnatlas.project import project_model
from attnatlas.project.placement import FAR, place
from attnatlas.store import ArraySpec, Atlas, open_atlas, tokens_per_chunk


def test_place_lands_duplicates_on_their_twins_and_flags_outsiders():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 16)).astype(np.float32)
    ref_xy = rng.normal(size=(500, 2)).astype(np.float32)
    new = np.vstack([ref[[3, 77, 400]], 50 * rng.normal(size=(1, 16)) + 200])  # three twins, one far point
    p = place(new, ref, ref_xy, metric="euclidean")
    assert np.allclose(p.xy[:3], ref_xy[[3, 77, 400]], atol=1e-3)
    assert p.fit[:3].max() < 1.5 and p.far.tolist() == [False, False, False, True] and p.fit[3] > FAR


def _doubled_atlas(path, n_seq=150, seq_len=10, d=8, seed=0):
    """A text model whose corpus holds every sequence twice: each token has an exact twin."""
    rng = np.random.default_rng(seed)
    tokens, seqs = testing.synthetic_tokens(n_seq, seq_len, rng)
    T = len(tokens)
    centres = rng.normal(size=(5, d)) * 2
    lab = rng.integers(0, 5, T)
    q = (centres[lab][None, None] + 0.3 * rng.normal(size=(1, 2, T, d))).astype(np.float32)
    k = (centres[lab][None, None] + 1 + 0.3 * rng.normal(size=(1, 2, T, d))).astype(np.float32)
    tokens2 = pd.concat([tokens, tokens.assign(sequence=tokens.sequence + n_seq)], ignore_index=True)
    seqs2 = pd.concat([seqs, seqs.assign(sequence=seqs.sequence + n_seq)], ignore_index=True)
    q2, k2 = np.concatenate([q, q], 2), np.concatenate([k, k], 2)
    tc = tokens_per_chunk(d)
    specs = {"queries": ArraySpec((1, 2, 2 * T, d), "float32", 2, (1, 1, tc, d)),
             "keys": ArraySpec((1, 2, 2 * T, d), "float32", 2, (1, 1, tc, d))}
    attrs = dict(model_id="twins", family="synthetic", modality="text", n_layers=1, n_heads=2, n_kv_heads=2,
                 d_head=d, causal=False, dtype="float32", scaling=[d ** -0.5])
    atlas = Atlas.open(path, create=True)
    with atlas.model_writer("twins", 2 * T, specs, attrs) as w:
        w.append({"queries": q2, "keys": k2}, tokens2, seqs2)
        w.commit()
    return atlas, T


def test_every_token_of_a_capped_head_is_placed_near_its_twin(tmp_path):
    atlas, T = _doubled_atlas(tmp_path / "a")
    s = project_model(atlas, "twins", methods="pca,tsne", max_points=800, progress=False)  # 400 of 3,000 tokens
    assert s["sampled"] and s["placed_points"] == 2 * (2 * T - 400)
    for method in ("pca", "tsne"):
        df = open_atlas(tmp_path / "a").layout("twins", 0, 1, method)
        assert len(df) == 2 * 2 * T and np.isfinite(df[["x", "y"]].to_numpy()).all()
        assert int(df.placed.sum()) == 2 * (2 * T - 400)
        xy = df[["x", "y"]].to_numpy()
        sampled = ~df.placed.to_numpy()
        # token t and t + T are twins; where one of them was sampled and the other placed, compare them
        n = 2 * T
        twin = np.concatenate([np.arange(T, 2 * T), np.arange(T)])
        twin = np.concatenate([twin, twin + n])  # keys
        pairs = np.flatnonzero(~sampled & sampled[twin])
        assert len(pairs) > 100
        gap = np.linalg.norm(xy[pairs] - xy[twin[pairs]], axis=1)
        lay = xy[sampled]
        from sklearn.neighbors import NearestNeighbors

        spacing = NearestNeighbors(n_neighbors=2).fit(lay).kneighbors(lay)[0][:, 1]
        assert np.median(gap) < 0.05 * np.median(spacing) + 1e-6, (np.median(gap), np.median(spacing))
    pq = open_atlas(tmp_path / "a").layout_placed_quality("twins", "tsne")
    assert len(pq) == 2 and (pq.points == 2 * (2 * T - 400)).all() and pq.trustworthiness.between(0, 1).all()


def test_no_place_keeps_the_sample_only_and_small_heads_are_unchanged(tmp_path):
    atlas, T = _doubled_atlas(tmp_path / "a", n_seq=60)
    s = project_model(atlas, "twins", methods="pca", max_points=400, progress=False, place=False)
    assert s["placed_points"] == 0
    assert len(atlas.layout("twins", 0, 0, "pca")) == 400 and not atlas.layout("twins", 0, 0, "pca").placed.any()
    small = testing.synthetic_atlas(tmp_path / "b", n_seq=10)
    project_model(small, "synthetic", methods="pca", progress=False)
    assert "placement" not in small.layout_params("synthetic", "pca")  # nothing to place: same layouts as before
    assert small.layout_sampled("synthetic", "pca").all()


def test_placed_layouts_resume_and_refuse_other_settings(tmp_path):
    from attnatlas.errors import InputError

    atlas, T = _doubled_atlas(tmp_path / "a", n_seq=60)
    project_model(atlas, "twins", methods="pca", max_points=400, progress=False)
    again = project_model(atlas, "twins", methods="pca", max_points=400, progress=False)
    assert again["done"] == 0 and again["skipped"] == 2
    with pytest.raises(InputError, match="other settings"):
        project_model(atlas, "twins", methods="pca", max_points=400, progress=False, place=False)


def test_large_references_use_an_approximate_index_that_still_finds_twins():
    pytest.importorskip("faiss")
    from attnatlas.project.placement import EXACT_BELOW, knn_query

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 24)) * 3
    ref = (centres[rng.integers(0, 40, EXACT_BELOW + 2000)] + rng.normal(size=(EXACT_BELOW + 2000, 24))).astype(np.float32)
    new = ref[:300] + 1e-4 * rng.normal(size=(300, 24)).astype(np.float32)
    idx, dist = knn_query(ref, new, 10)
    assert (idx[:, 0] == np.arange(300)).mean() > 0.95  # each point's own twin comes first
    exact = np.argsort(1 - (new / np.linalg.norm(new, axis=1, keepdims=True)) @
                       (ref / np.linalg.norm(ref, axis=1, keepdims=True)).T, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact)])
    assert recall > 0.8, recall


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_torch_search_equals_brute_force(metric):
    from sklearn.neighbors import NearestNeighbors

    from attnatlas.project.quality import knn_torch  # what placement uses on cuda

    rng = np.random.default_rng(0)
    ref, new = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(size=(333, 16)).astype(np.float32)
    idx, dist = knn_torch(ref, 10, metric, device="cpu", queries=new, block=40)
    want_d, want_i = NearestNeighbors(n_neighbors=10, metric=metric, algorithm="brute").fit(ref).kneighbors(new)
    np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-4)
    assert (idx == want_i).mean() > 0.999  # ties aside, the same neighbours
