"""Projection stage: normalisation, reducers, whole-model runs, quality, bad input, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from attnatlas.cli import main
from attnatlas.errors import InputError, StoreError
from attnatlas.project import (
    REDUCERS,
    Reducer,
    get_reducer,
    joint_points,
    knn_graph,
    layout_quality,
    normalise_head,
    project_model,
    register_reducer,
)
from attnatlas.store import Atlas
from attnatlas.testing import synthetic_atlas

M = "synthetic"


@pytest.fixture()
def small(tmp_path):
    """2 layers x 4 query heads sharing 2 key heads, 80 tokens (160 points), d_head 8."""
    return synthetic_atlas(tmp_path / "a", n_layers=2, n_heads=4, n_kv_heads=2, n_seq=10, seq_len=8, d_head=8)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ---- normalisation ------------------------------------------------------------------------------
def test_scaling_keeps_every_dot_product_and_balances_norms():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(50, 16)) * 3, rng.normal(size=(40, 16)) * 0.5 + 1
    qn, kn, applied = normalise_head(q, k, translate=False, scale=True)
    np.testing.assert_allclose(qn @ kn.T, (q @ k.T), rtol=1e-4, atol=1e-4)
    assert applied["scale"] != pytest.approx(1.0)
    assert np.linalg.norm(qn, axis=1).mean() == pytest.approx(np.linalg.norm(kn, axis=1).mean(), rel=1e-5)


def test_translation_keeps_each_querys_softmax_and_moves_key_centroid():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 5
    qn, kn, _ = normalise_head(q, k, translate=True, scale=False)
    np.testing.assert_allclose(_softmax(qn @ kn.T), _softmax(q @ k.T), atol=1e-5)
    np.testing.assert_allclose(kn.mean(0), qn.mean(0), atol=1e-5)
    assert not np.allclose(q @ k.T, qn @ kn.T)  # logits did change, only the softmax is kept


def test_both_scale_then_translate_keep_softmax_and_centroids_together():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(30, 8)) * 4, rng.normal(size=(30, 8)) + 2
    qn, kn, _ = normalise_head(q, k)
    np.testing.assert_allclose(_softmax(qn @ kn.T), _softmax(q @ k.T), atol=1e-5)
    np.testing.assert_allclose(kn.mean(0), qn.mean(0), atol=1e-5)
    X = joint_points(qn, kn)
    assert X.shape == (60, 8) and X.dtype == np.float32
    np.testing.assert_array_equal(X[:30], qn)


# ---- neighbours and quality ----------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_graph_matches_sklearn(metric):
    from sklearn.neighbors import NearestNeighbors

    X = np.random.default_rng(4).normal(size=(300, 12)).astype(np.float32)
    idx, dist = knn_graph(X, 11, metric, block=128)
    ref_d, ref_i = NearestNeighbors(n_neighbors=11, metric=metric, algorithm="brute").fit(X).kneighbors(X)
    assert (idx[:, 0] == np.arange(300)).all() and (dist[:, 0] == 0).all()
    np.testing.assert_array_equal(np.sort(idx[:, 1:], 1), np.sort(ref_i[:, 1:], 1))
    np.testing.assert_allclose(dist[:, 1:], ref_d[:, 1:], atol=1e-4)


def test_quality_is_one_for_a_faithful_layout_and_low_for_noise():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 2)).astype(np.float32)
    good = layout_quality(X, X.copy(), "euclidean")
    assert good["trustworthiness"] == pytest.approx(1.0) and good["knn_kept"] == pytest.approx(1.0)
    bad = layout_quality(X, rng.normal(size=(400, 2)).astype(np.float32), "euclidean")
    assert 0 <= bad["trustworthiness"] < 0.7 and 0 <= bad["knn_kept"] < 0.2
    assert good["points"] == 400


# ---- registry -----------------------------------------------------------------------------------
def test_registry_has_builtins_and_takes_a_new_reducer(small):
    assert {"pca", "tsne", "umap"} <= set(REDUCERS)
    with pytest.raises(InputError, match="Unknown projection method 'mds'"):
        get_reducer("mds")

    @register_reducer
    class FirstTwo(Reducer):
        name = "first2"
        defaults = {"offset": 0.0}

        def fit_transform(self, X, init=None, knn=None):
            return X[:, :2] + self.options["offset"]

    try:
        s = project_model(small, M, methods="first2", layers=[0], heads=[1], progress=False)
        assert s["done"] == 1
        assert small.layout_params(M, "first2")["offset"] == 0.0
        df = small.layout(M, 0, 1, "first2")
        assert len(df) == 160 and (df.kind[:80] == "query").all() and (df.kind[80:] == "key").all()
    finally:
        REDUCERS.pop("first2")


# ---- whole-model runs -----------------------------------------------------------------------------
def test_gqa_head_uses_its_key_head(small):
    project_model(small, M, methods="pca", layers=[1], heads=[3], progress=False)
    q = np.asarray(small.array(M, "queries")[1, 3], np.float32)
    k = np.asarray(small.array(M, "keys")[1, 1], np.float32)  # 4 query heads / 2 key heads: head 3 -> key head 1
    X = joint_points(*normalise_head(q, k)[:2])
    expect = get_reducer("pca").fit_transform(X)
    np.testing.assert_allclose(small.layout_coords(M, "pca", 1, 3), expect, atol=1e-5)
    wrong = joint_points(*normalise_head(q, np.asarray(small.array(M, "keys")[1, 0], np.float32))[:2])
    assert not np.allclose(small.layout_coords(M, "pca", 1, 3), get_reducer("pca").fit_transform(wrong), atol=1e-3)


def test_tsne_is_deterministic_for_a_seed(small, tmp_path):
    shutil.copytree(small.path, tmp_path / "b")
    other = Atlas.open(tmp_path / "b")
    project_model(small, M, methods="tsne", layers=[0], heads=[0], seed=3, progress=False)
    project_model(other, M, methods="tsne", layers=[0], heads=[0], seed=3, progress=False)
    a, b = small.layout_coords(M, "tsne", 0, 0), other.layout_coords(M, "tsne", 0, 0)
    np.testing.assert_array_equal(a, b)
    project_model(other, M, methods="tsne", layers=[0], heads=[0], seed=4, force=True, progress=False)
    # PCA initialisation leaves t-SNE nothing random: the seed only picks the quality subsample.
    assert other.layout_params(M, "tsne")["random_state"] == 4
    q = small.layout_quality(M, "tsne").iloc[0]
    assert 0.5 < q.trustworthiness <= 1 and 0 < q.knn_kept <= 1 and q.points == 160 and q.seconds > 0


def test_resume_skips_done_heads_and_force_redoes_them(small):
    s1 = project_model(small, M, methods="pca", layers=[0], progress=False)
    assert (s1["done"], s1["skipped"]) == (4, 0)
    before = small.layout_coords(M, "pca", 0, 0).copy()
    s2 = project_model(small, M, methods="pca", progress=False)  # layer 1 is new, layer 0 is kept
    assert (s2["done"], s2["skipped"]) == (4, 4)
    assert small.layout_done(M, "pca").all()
    np.testing.assert_array_equal(small.layout_coords(M, "pca", 0, 0), before)
    s3 = project_model(small, M, methods="pca", force=True, progress=False)
    assert (s3["done"], s3["skipped"]) == (8, 0)


def test_other_settings_never_silently_replace_layouts(small):
    project_model(small, M, methods="pca", layers=[0], heads=[0], progress=False)
    with pytest.raises(InputError, match="--force"):
        project_model(small, M, methods="pca", layers=[0], heads=[0], metric="euclidean", progress=False)
    assert small.layout_done(M, "pca")[0, 0]
    assert small.layout_params(M, "pca")["metric"] == "cosine"


def test_point_cap_samples_token_rows(small, tmp_path):
    shutil.copytree(small.path, tmp_path / "c")
    other = Atlas.open(tmp_path / "c")
    project_model(small, M, methods="pca", layers=[0], heads=[0], max_points=100, progress=False)
    df = small.layout(M, 0, 0, "pca")
    rows = small.layout_rows(M, "pca")
    sampled = small.layout_sampled(M, "pca")
    n_tokens = len(small.tokens(M))
    # 50 sampled tokens are laid out; every other token is placed into that layout
    assert len(rows) == n_tokens and sampled.sum() == 50 and len(df) == 2 * n_tokens
    np.testing.assert_array_equal(df.token.to_numpy(), np.concatenate([rows, rows]))
    # without placement only the sample is stored, as before
    project_model(other, M, methods="pca", layers=[0], heads=[0], max_points=100, progress=False, place=False)
    rows = other.layout_rows(M, "pca")
    assert len(rows) == 50 and (np.diff(rows) > 0).all() and len(other.layout(M, 0, 0, "pca")) == 100


@pytest.mark.slow  # two spawned workers import torch: about 20 s here
def test_workers_give_the_same_layouts_as_one_process(small, tmp_path):
    shutil.copytree(small.path, tmp_path / "c")
    other = Atlas.open(tmp_path / "c")
    project_model(small, M, methods="pca", progress=False)
    s = project_model(other, M, methods="pca", workers=2, progress=False)
    assert s["done"] == 8 and not s["failed"]
    for L in range(2):
        for h in range(4):
            np.testing.assert_array_equal(small.layout_coords(M, "pca", L, h), other.layout_coords(M, "pca", L, h))


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_model_method_layer_head(small):
    with pytest.raises(StoreError, match="'nope' is not in the atlas"):
        project_model(small, "nope", progress=False)
    with pytest.raises(InputError, match="Unknown projection method 'tnse'"):
        project_model(small, M, methods="tnse", progress=False)
    with pytest.raises(InputError, match="Layer 2 is out of range"):
        project_model(small, M, methods="pca", layers=[2], progress=False)
    with pytest.raises(InputError, match="Head 7 is out of range"):
        project_model(small, M, methods="pca", heads="0,7", progress=False)
    with pytest.raises(InputError, match="metric"):
        project_model(small, M, methods="pca", metric="manhattan", progress=False)


def test_too_few_points_adapts_and_records(tmp_path):
    tiny = synthetic_atlas(tmp_path / "t", n_layers=1, n_heads=1, n_seq=2, seq_len=5, d_head=4)  # 20 points
    s = project_model(tiny, M, methods="tsne", progress=False)
    assert s["adapted"]["tsne"]["perplexity"] == pytest.approx(19 / 3)
    assert tiny.layout_params(M, "tsne")["adapted"]["perplexity"] == pytest.approx(19 / 3)
    assert tiny.layout_done(M, "tsne")[0, 0]
    u = get_reducer("umap", init="spectral")
    assert u.adapt(8) == {"n_neighbors": 7} and u.knn_needed == 7
    assert get_reducer("umap").init_reducer(4) is None  # too few points for its t-SNE start
    with pytest.raises(InputError, match="at least 5 points"):
        get_reducer("tsne").adapt(4)


def test_nonfinite_head_is_reported_and_others_go_on(tmp_path):
    a = synthetic_atlas(tmp_path / "n", n_layers=2, n_heads=2, n_seq=10, seq_len=8, d_head=8, nonfinite_head=(1, 0))
    s = project_model(a, M, methods="pca", progress=False)
    assert s["done"] == 3
    assert [(L, h) for L, h, _, _ in s["failed"]] == [(1, 0)] and "NaN/inf" in s["failed"][0][3]
    assert a.layout_done(M, "pca").tolist() == [[True, True], [False, True]]


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    a = synthetic_atlas(tmp_path / "cli", n_layers=2, n_heads=2, n_seq=10, seq_len=8, d_head=8, nonfinite_head=(0, 1))
    rc = main(["project", str(a.path), "--method", "pca,tsne", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1  # one head had NaN: the others are done, the run says so and fails
    assert "L0H1 all methods" in err and "NaN/inf" in err and "6 layouts made" in out
    assert a.layout_done(M, "tsne").sum() == 3
    rc = main(["project", str(a.path), "--model", M, "--method", "pca", "--layers", "1", "--quiet"])
    assert rc == 0 and "0 layouts made, 2 already done" in capsys.readouterr().out
    assert main(["project", str(a.path), "--method", "isomap"]) == 2
    assert "Unknown projection method 'isomap'" in capsys.readouterr().err
    assert main(["project", str(a.path), "--heads", "9"]) == 2
    assert "Head 9 is out of range" in capsys.readouterr().err
    assert main(["project", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_umap_runs_deterministically_on_the_shared_graph(small, tmp_path):
    shutil.copytree(small.path, tmp_path / "u")
    other = Atlas.open(tmp_path / "u")
    for at in (small, other):
        s = project_model(at, M, methods="umap", layers=[0], heads=[2], seed=1, progress=False)
        assert s["done"] == 1 and not s["failed"]
    np.testing.assert_array_equal(small.layout_coords(M, "umap", 0, 2), other.layout_coords(M, "umap", 0, 2))
    assert small.layout_quality(M, "umap").trustworthiness.iloc[0] > 0.8


def _blobs(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d)) * 3
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_tsne_short_schedule_runs_the_iterations_it_records():
    from attnatlas.project.reducers import _short_schedule

    X = _blobs(300)
    for backend in ("sklearn", "sklearnex"):
        cls = _short_schedule(backend, 20)
        assert cls._EXPLORATION_MAX_ITER == 20
        t = cls(n_components=2, perplexity=10, max_iter=60, init="pca", random_state=0).fit(X)
        assert t.n_iter_ <= 60  # below scikit-learn's own floor of 250


def test_tsne_learning_rate_rules_and_a_bad_one_is_refused_at_once():
    assert get_reducer("tsne")._learning_rate(24_000) == 2_000.0  # n / early_exaggeration
    assert get_reducer("tsne", early_exaggeration=4.0)._learning_rate(24_000) == 6_000.0
    assert get_reducer("tsne")._learning_rate(100) == 50.0  # scikit-learn's floor
    assert get_reducer("tsne", learning_rate="auto")._learning_rate(24_000) == "auto"
    assert get_reducer("tsne", learning_rate=300)._learning_rate(24_000) == 300.0
    with pytest.raises(InputError, match="learning_rate 'fast'"):
        get_reducer("tsne", learning_rate="fast")


def test_tsne_on_the_shared_graph_matches_tsne_on_the_points():
    """The shared kNN graph gives t-SNE the neighbours it would have searched itself."""
    X = _blobs()
    r = get_reducer("tsne", random_state=0)
    r.adapt(len(X))
    knn = knn_graph(X, r.knn_needed, "cosine")
    assert r._input(X, knn)[1] == "precomputed" and r._input(X, None)[1] == "euclidean"
    shared, own = r.fit_transform(X, knn=knn), r.fit_transform(X)
    for Y in (shared, own):
        assert layout_quality(X, Y, "cosine")["trustworthiness"] > 0.9
    assert abs(layout_quality(X, shared, "cosine")["trustworthiness"]
               - layout_quality(X, own, "cosine")["trustworthiness"]) < 0.01


@pytest.mark.parametrize("k", [12, 60])  # faiss keeps heaps below 50 neighbours, a reservoir above
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_backends_agree_and_put_self_first_among_duplicates(metric, k, monkeypatch):
    import attnatlas.project.quality as Q

    pytest.importorskip("faiss")
    rng = np.random.default_rng(6)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    X[100:130] = X[0]  # 31 identical points: more twins than k
    fa = Q.knn_graph(X, k, metric, device="cpu")
    monkeypatch.setattr(Q, "_has_faiss", lambda: False)
    th = Q.knn_graph(X, k, metric, device="cpu")
    for idx, dist in (fa, th):
        assert (idx[:, 0] == np.arange(200)).all() and (dist[:, 0] == 0).all()
        assert all(len(set(r)) == k for r in idx)
    np.testing.assert_allclose(fa[1], th[1], atol=1e-5)
    twins = np.r_[0, 100:130]
    clean = np.setdiff1d(np.arange(200), twins)
    canon = [np.sort(np.where(np.isin(idx[clean], twins), -1, idx[clean]), 1) for idx, _ in (fa, th)]
    np.testing.assert_array_equal(*canon)  # which of the tied twins is listed is arbitrary


def test_tsne_layout_does_not_depend_on_which_methods_run_with_it(small, tmp_path):
    """t-SNE takes the PCA layout as its init when PCA runs in the same job, and computes the same
    PCA itself otherwise: the stored layouts are identical."""
    shutil.copytree(small.path, tmp_path / "alone")
    alone = Atlas.open(tmp_path / "alone")
    project_model(small, M, "tsne,pca", layers=[1], heads=[3], progress=False)
    project_model(alone, M, "tsne", layers=[1], heads=[3], progress=False)
    np.testing.assert_array_equal(small.layout_coords(M, "tsne", 1, 3), alone.layout_coords(M, "tsne", 1, 3))


def test_umap_starts_from_the_same_tsne_whether_or_not_tsne_runs(small, tmp_path):
    shutil.copytree(small.path, tmp_path / "alone")
    alone = Atlas.open(tmp_path / "alone")
    project_model(small, M, "umap,tsne,pca", layers=[0], heads=[1], progress=False)
    project_model(alone, M, "umap", layers=[0], heads=[1], progress=False)
    np.testing.assert_array_equal(small.layout_coords(M, "umap", 0, 1), alone.layout_coords(M, "umap", 0, 1))
    assert alone.layout_params(M, "umap")["init"] == "tsne"
    # A changed t-SNE is not handed to UMAP: it still starts from the default t-SNE.
    shutil.copytree(small.path, tmp_path / "custom", ignore=shutil.ignore_patterns("layouts"))
    custom = Atlas.open(tmp_path / "custom")
    project_model(custom, M, "tsne,umap", layers=[0], heads=[1], progress=False,
                  reducer_params={"tsne": {"perplexity": 10.0}})
    np.testing.assert_array_equal(custom.layout_coords(M, "umap", 0, 1), alone.layout_coords(M, "umap", 0, 1))


def test_cached_umap_kernels_compute_what_umap_learns_own_do():
    import umap.umap_ as U

    from attnatlas.project.numba_cache import ORIGINALS, cache_umap_kernels

    assert cache_umap_kernels() == 3
    twin = U.smooth_knn_dist
    assert type(twin._cache).__name__ != "NullCache"  # cached on disk
    own = ORIGINALS[("umap.umap_", "smooth_knn_dist")]
    assert own is not twin and own.py_func is twin.py_func
    rng = np.random.default_rng(0)
    dists = np.sort(rng.random((300, 15)).astype(np.float32), axis=1)
    dists[:, 0] = 0
    s1, r1 = twin(dists, 15.0)
    s2, r2 = own(dists, 15.0)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(r1, r2)
    idx = rng.integers(0, 300, (300, 15)).astype(np.int32)
    own_m = ORIGINALS[("umap.umap_", "compute_membership_strengths")]
    for a, b in zip(U.compute_membership_strengths(idx, dists, s1, r1), own_m(idx, dists, s1, r1)):
        np.testing.assert_array_equal(a, b)


def test_umap_uses_the_shared_graph_on_small_heads_too(monkeypatch):
    """Below 4,096 points umap-learn would compute all pairwise distances through a Python callable."""
    import umap.umap_ as U

    from attnatlas.project import get_reducer, knn_graph

    def no_pairwise(*a, **k):
        raise AssertionError("umap-learn computed pairwise distances itself")

    monkeypatch.setattr(U, "pairwise_distances", no_pairwise)
    X = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    r = get_reducer("umap", init="spectral")
    r.adapt(len(X))
    Y = r.fit_transform(X, knn=knn_graph(X, 16, "cosine"))
    assert Y.shape == (600, 2) and np.isfinite(Y).all()
