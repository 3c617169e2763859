"""Batched t-SNE/UMAP (attnatlas.project.batched) and the runner's per-layer path."""

from __future__ import annotations

import numpy as np
import pytest

from attnatlas.project import get_reducer, knn_graph, layout_quality, project_model
from attnatlas.project.batched import find_ab, knn_graph_batch, tsne_batch, umap_batch
from attnatlas.testing import synthetic_atlas

M = "synthetic"


def _clusters(H=3, n=300, d=8, seed=0):
    """(head, point, d): 5 well separated Gaussian clusters per head."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(H, 5, d)) * 4
    lab = rng.integers(0, 5, (H, n))
    return (np.take_along_axis(c, lab[..., None], 1) + rng.normal(size=(H, n, d))).astype(np.float32)


def test_knn_batch_matches_per_head_graph():
    X = _clusters(H=2, n=200)
    for metric in ("cosine", "euclidean"):
        idx, dist = knn_graph_batch(X, 11, metric, block=64)
        for h in range(2):
            i1, d1 = knn_graph(X[h], 11, metric)
            np.testing.assert_allclose(dist[h], d1, rtol=1e-5, atol=1e-5)  # float32 rounding differs by backend
            assert (idx[h, :, 0] == np.arange(200)).all()


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_batched_shapes_quality_and_determinism(method):
    X = _clusters()
    idx, dist = knn_graph_batch(X, 91, "cosine")
    f = tsne_batch if method == "tsne" else umap_batch
    kw = {"perplexity": 30.0} if method == "tsne" else {}
    Y = f(X, idx, dist, seed=3, **kw)
    assert Y.shape == (3, 300, 2) and Y.dtype == np.float32 and np.isfinite(Y).all()
    for h in range(3):
        assert layout_quality(X[h], Y[h], "cosine")["trustworthiness"] >= 0.9
    np.testing.assert_array_equal(Y, f(X, idx, dist, seed=3, **kw))
    assert not np.array_equal(Y, f(X, idx, dist, seed=4, **kw))


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_few_points_adapt(method):
    X = _clusters(H=2, n=12)
    r = get_reducer(method, backend="batched")
    r.adapt(12)
    idx, dist = knn_graph_batch(X, max(r.knn_needed, 11), "cosine")
    Y = r.fit_batch(X, (idx, dist))
    assert Y.shape == (2, 12, 2) and np.isfinite(Y).all()


def test_find_ab_matches_umaps_curve():
    a, b = find_ab(1.0, 0.1)
    assert a == pytest.approx(1.577, abs=0.01) and b == pytest.approx(0.895, abs=0.01)


def test_backend_option_keeps_names_and_params():
    assert get_reducer("tsne").backend() in ("sklearnex", "sklearn", "cuml")
    assert "negatives" not in get_reducer("tsne").params  # library layouts keep their stored params
    r = get_reducer("umap", backend="batched", negatives=4)
    assert r.batched and r.params["backend"] == "batched" and r.params["negatives"] == 4
    assert get_reducer("tsne", backend="batched", exact_below=5000).params["exact_below"] == 5000  # a stored setting
    with pytest.raises(Exception, match="backend"):
        get_reducer("tsne", backend="nope")


def test_runner_batches_layers_skips_nan_head_and_stores_quality_per_head(tmp_path):
    atlas = synthetic_atlas(tmp_path / "a", n_layers=2, n_heads=3, n_seq=10, seq_len=10, d_head=8,
                            nonfinite_head=(1, 2))
    params = {"tsne": {"backend": "batched"}, "umap": {"backend": "batched"}}
    s = project_model(atlas, M, ("tsne", "umap", "pca"), progress=False, reducer_params=params)
    assert s["done"] == 3 * 5
    assert {(L, h) for L, h, _, _ in s["failed"]} == {(1, 2)} and "NaN" in s["failed"][0][3]
    for m in ("tsne", "umap", "pca"):
        q = atlas.layout_quality(M, m).set_index(["layer", "head"])
        assert atlas.layout_done(M, m).sum() == 5
        # Stored quality is the per-head quality of the stored layout.
        lay = atlas.layout(M, 0, 1, m)
        from attnatlas.project import joint_points, normalise_head
        qn, kn, _ = normalise_head(atlas.queries(M, 0, 1), atlas.keys(M, 0, 1))
        X = joint_points(qn, kn)
        ref = layout_quality(X, lay[["x", "y"]].to_numpy(np.float32), "cosine")
        assert q.loc[(0, 1), "trustworthiness"] == pytest.approx(ref["trustworthiness"], abs=1e-6)
        if m != "pca":  # PCA of this random 8-D data is not faithful, whatever the backend
            assert q.loc[(0, 1), "trustworthiness"] >= 0.8
    assert atlas.layout_params(M, "tsne")["backend"] == "batched"
    # Resume: nothing left to do.
    s2 = project_model(atlas, M, ("tsne", "umap", "pca"), progress=False, reducer_params=params)
    assert s2["done"] == 0 and s2["skipped"] == 15


def test_exact_repulsion_is_every_pairs_force():
    import torch

    from attnatlas.project.batched import _exact_repulsion

    rng = np.random.default_rng(0)
    Y = rng.normal(size=(2, 37, 2))
    x, y = (torch.tensor(Y[:, :, c].reshape(-1), dtype=torch.float32) for c in (0, 1))
    rx, ry, z = _exact_repulsion(x, y, 2, 37, budget=200)  # row blocks of 2 rows: the block edges are exercised
    diff = Y[:, :, None, :] - Y[:, None, :, :]  # (head, i, j, 2)
    q = 1 / (1 + (diff**2).sum(-1))
    q[:, np.arange(37), np.arange(37)] = 0
    np.testing.assert_allclose(z.numpy(), q.sum((1, 2)), rtol=1e-5)
    want = ((q**2)[..., None] * diff).sum(2)
    np.testing.assert_allclose(np.stack([rx.numpy(), ry.numpy()], -1), want, rtol=1e-4, atol=1e-6)


def test_exact_repulsion_below_a_head_size_is_at_least_as_faithful():
    X = _clusters(H=2, n=240)
    idx, dist = knn_graph_batch(X, 91, "cosine")
    sampled = tsne_batch(X, idx, dist, perplexity=30.0, seed=1)
    exact = tsne_batch(X, idx, dist, perplexity=30.0, seed=1, exact_below=240)
    assert not np.array_equal(sampled, exact)  # the switch takes effect at n <= exact_below
    np.testing.assert_array_equal(sampled, tsne_batch(X, idx, dist, perplexity=30.0, seed=1, exact_below=239))
    for h in range(2):
        tw = [layout_quality(X[h], Y[h], "cosine")["trustworthiness"] for Y in (sampled, exact)]
        assert tw[1] >= tw[0] - 0.005 and tw[1] >= 0.9


def test_device_cuda_takes_the_batched_backend_unless_one_is_named(monkeypatch):
    from attnatlas.project.jobs import plan_jobs, project_device

    jobs = {j.method: j for j in plan_jobs(["tsne", "umap", "pca"], 200, "cosine", 0, {}, 20_000, False,
                                           {"umap": {"backend": "umap-learn"}}, device="cuda")}
    assert jobs["tsne"].params["backend"] == "batched" and jobs["tsne"].device == "cuda"
    assert jobs["umap"].params["backend"] == "umap-learn"  # the user's own choice stands
    assert jobs["pca"].params["backend"] == "numpy"
    cpu = {j.method: j.params["backend"] for j in plan_jobs(["tsne", "umap"], 200, "cosine", 0, {}, 20_000, False, device="cpu")}
    assert cpu["tsne"] != "batched" and cpu["umap"] != "batched"  # the CPU keeps the measured library defaults
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert project_device("auto") == "cpu" and project_device("cpu") == "cpu"
    with pytest.raises(Exception, match="no CUDA device"):
        project_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert project_device("auto") == "cuda" and project_device("cpu") == "cpu"


def test_cli_device_cuda_without_a_gpu_is_one_message_and_nothing_written(tmp_path, capsys, monkeypatch):
    import torch

    from attnatlas.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    atlas = synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=6, seq_len=8)
    assert main(["project", str(tmp_path / "a"), "--model", M, "--method", "pca", "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err
    assert atlas.layout_methods(M) == []
    assert main(["project", str(tmp_path / "a"), "--model", M, "--method", "tsne,pca", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "on cpu: tsne " in out and "pca numpy" in out  # the summary says where and on which backends it ran


from attnatlas.project.reducers import Reducer, register_reducer  # noqa: E402


@register_reducer
class OutOfMemoryReducer(Reducer):
    """A batched reducer whose device holds one head at a time, and not even that for its `poison`-th single head."""

    name = "oom-test"
    defaults = {"poison": 3}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.singles = 0

    @property
    def batched(self) -> bool:
        return True

    def fit_batch(self, X, knn=None):
        import torch

        if len(X) == 1:
            self.singles += 1
        if len(X) > 1 or self.singles == self.options["poison"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.ascontiguousarray(X[:, :, :2], dtype=np.float32)


def test_a_batch_out_of_device_memory_is_halved_and_a_head_that_never_fits_is_reported(tmp_path):
    atlas = synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=4, n_seq=6, seq_len=8)
    s = project_model(atlas, M, ("oom-test", "pca"), progress=False, place=False)
    # Halving 4 heads: [0, 2) -> 0, 1 fit; [2, 4) -> head 2 (the third single) does not fit even alone; head 3 fits.
    assert s["done"] == 4 + 3
    assert [(L, h, m) for L, h, m, _ in s["failed"]] == [(0, 2, "oom-test")]
    assert "out of device memory" in s["failed"][0][3] and "--device cpu" in s["failed"][0][3]
    assert atlas.layout_done(M, "oom-test").tolist() == [[True, True, False, True]]
    assert atlas.layout_done(M, "pca").all()
