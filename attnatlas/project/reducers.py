"""Reducers to 2-D, by name. A new reducer is one small class decorated with `register_reducer`.

Every reducer is sklearn-style: `__init__` stores parameters, `fit_transform(X, init=None, knn=None)`
maps (n, d) float32 points to (n, 2). `knn` is the shared exact neighbour graph of the head, so t-SNE,
UMAP and the quality check do not each search neighbours again.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import warnings
from typing import Any, ClassVar

import numpy as np

from attnatlas.errors import InputError

METRICS = ("cosine", "euclidean")
REDUCERS: dict[str, type[Reducer]] = {}
# Threads a reducer may use; None = the library's default. Set by the runner when heads run in parallel
# (threadpoolctl covers OpenMP/BLAS, but not oneDAL's TBB pool).
THREADS: int | None = None


def set_threads(n: int | None) -> None:
    global THREADS
    THREADS = n
    if _has("daal4py"):
        # scikit-learn-intelex's TSNE ignores n_jobs: measured 1.7 cores busy at n_jobs=1 per process,
        # so two workers oversubscribed two cores. daalinit sets oneDAL's pool for this process.
        import daal4py

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        daal4py.daalinit(n or cores or 1)


def register_reducer(cls: type[Reducer]) -> type[Reducer]:
    """Class decorator: make `cls` available under `cls.name` to the runner and the CLI."""
    REDUCERS[cls.name] = cls
    return cls


def get_reducer(name: str, **kwargs: Any) -> Reducer:
    if name not in REDUCERS:
        raise InputError(f"Unknown projection method {name!r}; choose from {', '.join(sorted(REDUCERS))}.")
    return REDUCERS[name](**kwargs)


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1: euclidean distance on them orders pairs like cosine distance."""
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(n, 1e-12)).astype(np.float32)


class Reducer:
    """Base class: `params` are what changes the result and are stored with the layout."""

    name: ClassVar[str] = ""
    knn_needed: ClassVar[int] = 0  # neighbours (self included) it reads from the shared graph
    defaults: ClassVar[dict[str, Any]] = {}
    min_points: ClassVar[int] = 3
    has_batched_backend: ClassVar[bool] = False  # its `backend` option takes "batched"
    device: str | None = None  # where `fit_batch` runs a batched backend; None: CUDA when torch sees it (not stored)

    def __init__(self, metric: str = "cosine", random_state: int = 0, **params: Any):
        if metric not in METRICS:
            raise InputError(f"Unknown metric {metric!r}; choose cosine or euclidean.")
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise InputError(f"{self.name} has no parameter(s) {', '.join(sorted(unknown))}.")
        self.metric = metric
        self.random_state = random_state
        self.options = {**self.defaults, **params}
        self.adapted: dict[str, Any] = {}
        self.safe = False

    def make_safe(self) -> Reducer:
        """Switch to the backend without known native crashes: the retry of a head whose process died."""
        self.safe = True
        return self

    @property
    def params(self) -> dict[str, Any]:
        return {"method": self.name, "metric": self.metric, "random_state": self.random_state, **self.options,
                "adapted": dict(self.adapted), "backend": self.backend()}

    def backend(self) -> str:
        return "numpy"

    def adapt(self, n_points: int) -> dict[str, Any]:
        """Shrink parameters that need more points than a head has; returns (and records) the changes."""
        if n_points < self.min_points:
            raise InputError(f"{self.name} needs at least {self.min_points} points; this head has {n_points}.")
        return {}

    def fit_transform(self, X: np.ndarray, init: np.ndarray | None = None, knn: tuple | None = None) -> np.ndarray:
        raise NotImplementedError

    def init_reducer(self, n_points: int | None = None) -> Reducer | None:
        """The reducer whose layout starts this one, computed here when `init` is not given. The runner
        runs it first and hands its layout over only when its params match, so results never depend
        on which methods share a job."""
        return None

    @property
    def batched(self) -> bool:
        """True when `fit_batch` embeds a whole layer's heads in one program (the runner then goes per layer)."""
        return False

    def fit_batch(self, X: np.ndarray, knn: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """X (head, point, d), knn (idx, dist) each (head, point, k) -> (head, point, 2); default: one head at a time."""
        return np.stack([self.fit_transform(X[h], knn=None if knn is None else (knn[0][h], knn[1][h]))
                         for h in range(len(X))])


class _Backends(Reducer):
    """Reducer with a `backend` option: "auto" (the measured default), a library, or "batched"
    (attnatlas.project.batched: all heads of a layer in one torch program). Options in `batched_defaults`
    apply to the batched backend only and are stored only with its layouts."""

    backends: ClassVar[tuple[str, ...]] = ()
    batched_defaults: ClassVar[dict[str, Any]] = {}
    has_batched_backend = True

    def __init__(self, metric: str = "cosine", random_state: int = 0, **params: Any):
        extra = {k: params.pop(k) for k in list(params) if k in self.batched_defaults}
        super().__init__(metric, random_state, **params)
        if self.options["backend"] not in ("auto", "batched", *self.backends):
            raise InputError(f"{self.name} backend {self.options['backend']!r} is unknown; choose auto, batched, "
                             + ", ".join(self.backends) + ".")
        self.batch_options = {**self.batched_defaults, **extra}
        if self.backend() == "batched":
            self.options.update(self.batch_options)

    @property
    def batched(self) -> bool:
        return self.backend() == "batched"

    def library_backend(self) -> str:
        raise NotImplementedError

    safe_backend: ClassVar[str] = ""

    def make_safe(self) -> Reducer:
        super().make_safe()
        for k in self.batched_defaults:
            self.options.pop(k, None)
        self.options["backend"] = self.safe_backend
        return self

    def backend(self) -> str:
        b = self.options.get("backend", "auto")
        return self.library_backend() if b == "auto" else b


@register_reducer
class PCAReducer(Reducer):
    """Exact PCA (full SVD): deterministic, milliseconds per head."""

    name = "pca"

    @property
    def batched(self) -> bool:  # milliseconds per head: looping inside a layer batch costs nothing
        return True

    def fit_transform(self, X, init=None, knn=None):
        from sklearn.decomposition import PCA

        Z = unit_rows(X) if self.metric == "cosine" else X
        return PCA(2, svd_solver="full").fit_transform(Z).astype(np.float32)


@register_reducer
class TSNEReducer(_Backends):
    """Barnes-Hut t-SNE on the head's shared exact kNN graph, PCA initialised, with a short schedule:
    40 early-exaggeration iterations and 100 in all, learning rate n / early_exaggeration and
    Barnes-Hut angle 0.7 (AttentionViz: 250 and 300 iterations, perplexity 50; scikit-learn:
    learning rate n / early_exaggeration / 4, angle 0.5).

    Perplexity 30 reads 91 neighbours instead of 151. Measured with scripts/bench_project.py and on
    6 real MiniLM heads (13,938 points) and 3 synthetic ones (10,000 points): the 4x larger step
    (the rule of openTSNE and Belkina et al. 2019) converges in 100 iterations to the trustworthiness
    that 125 reached before, and angle 0.7 cuts time by 14-23% at -0.002. Angle 0.8 lost 0.008-0.012
    per head and perplexity 20 lost 0.009. Cosine runs as euclidean on unit rows: squared euclidean is
    then 2 x cosine distance, and the perplexity calibration absorbs the factor. Backend: cuML on a
    GPU when installed, else scikit-learn-intelex, else scikit-learn.
    """

    name = "tsne"
    defaults = {"perplexity": 30.0, "max_iter": 100, "early_iter": 40, "early_exaggeration": 12.0, "angle": 0.7,
                "learning_rate": "n/early_exaggeration", "backend": "auto"}
    backends = ("cuml", "sklearnex", "sklearn")
    safe_backend = "sklearn"
    # Batched: sampled repulsion converges slower than Barnes-Hut, so a longer schedule, and 64 negatives per point
    # and iteration: on 12 real MiniLM heads of 20,000 points every head was at least as trustworthy as the library
    # default (+0.001 to +0.046), where 16 negatives and 300 iterations (250 exaggerated) lost up to 0.043.
    # exact_below: heads of at most that many points get every pair's repulsion (O(n^2) per iteration).
    batched_defaults = {"negatives": 64, "batched_max_iter": 400, "batched_early_iter": 200, "exact_below": 0}
    min_points = 5

    def __init__(self, metric: str = "cosine", random_state: int = 0, **params: Any):
        super().__init__(metric, random_state, **params)
        self._learning_rate(100)  # a bad value is the user's mistake: say so now, not once per head

    def library_backend(self) -> str:
        # "auto" stays the per-head library: batched was slower on the 2-core CPU (scripts/compare_batched.py).
        if _cuda() and _has("cuml"):
            return "cuml"  # untested here: no GPU on the development machine
        return "sklearnex" if _has("sklearnex") else "sklearn"

    @property
    def _n_neighbors(self) -> int:
        return int(3 * self.adapted.get("perplexity", self.options["perplexity"]) + 1)

    @property
    def knn_needed(self) -> int:  # type: ignore[override]
        if self.backend() == "cuml":
            return 0
        # scikit-learn reads n_neighbors + 1 columns of a precomputed graph; +1 more for self.
        return self._n_neighbors + 2

    def fit_batch(self, X, knn=None):
        if not self.batched:
            return super().fit_batch(X, knn)
        from attnatlas.project.batched import knn_graph_batch, tsne_batch

        o = self.options
        if knn is None:
            knn = knn_graph_batch(X, self.knn_needed, self.metric, device=self.device)
        return tsne_batch(X, knn[0], knn[1], self.metric, perplexity=self.adapted.get("perplexity", o["perplexity"]),
                          max_iter=int(o["batched_max_iter"]), early_iter=int(o["batched_early_iter"]),
                          early_exaggeration=o["early_exaggeration"], negatives=int(o["negatives"]),
                          seed=self.random_state, device=self.device, exact_below=int(o["exact_below"]))

    def adapt(self, n_points):
        super().adapt(n_points)
        # scikit-learn needs perplexity < n; Barnes-Hut uses 3 x perplexity neighbours.
        top = max(1.0, (n_points - 1) / 3.0)
        if self.options["perplexity"] > top:
            self.adapted["perplexity"] = float(top)
        return dict(self.adapted)

    def fit_transform(self, X, init=None, knn=None):
        if self.batched:
            return self.fit_batch(X[None], None if knn is None else (knn[0][None], knn[1][None]))[0]
        o = self.options
        perplexity = self.adapted.get("perplexity", o["perplexity"])
        if self.backend() == "cuml":
            from cuml.manifold import TSNE as CuTSNE

            Z = unit_rows(X) if self.metric == "cosine" else np.asarray(X, np.float32)
            # cuML renamed n_iter to max_iter (the old name is gone from 26.02 on): ask the signature.
            iters = "max_iter" if "max_iter" in inspect.signature(CuTSNE).parameters else "n_iter"
            return np.asarray(CuTSNE(n_components=2, perplexity=perplexity, random_state=self.random_state,
                                     **{iters: int(o["max_iter"])}).fit_transform(Z), np.float32)
        if init is None:
            init = self.init_reducer().fit_transform(X)
        # scikit-learn's own PCA init convention: std of the first axis 1e-4.
        init = (init / max(float(np.std(init[:, 0])), 1e-12) * 1e-4).astype(np.float32)
        Z, metric = self._input(X, knn)
        cls = _short_schedule(self.backend(), int(o["early_iter"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Y = cls(n_components=2, perplexity=perplexity, max_iter=int(o["max_iter"]), metric=metric, init=init,
                    early_exaggeration=o["early_exaggeration"], angle=o["angle"], n_jobs=THREADS,
                    learning_rate=self._learning_rate(len(X)),
                    random_state=self.random_state).fit_transform(Z)
        return np.asarray(Y, dtype=np.float32)

    def init_reducer(self, n_points=None):
        return PCAReducer(self.metric, self.random_state)

    def _learning_rate(self, n_points: int) -> float | str:
        """A number, scikit-learn's "auto" (n / early_exaggeration / 4), or "n/early_exaggeration"."""
        lr = self.options["learning_rate"]
        if lr == "n/early_exaggeration":
            return max(n_points / float(self.options["early_exaggeration"]), 50.0)
        if lr == "auto":
            return lr
        try:
            return float(lr)
        except (TypeError, ValueError):
            raise InputError(f"tsne learning_rate {lr!r} is not a number, 'auto' or 'n/early_exaggeration'.") from None

    def _input(self, X: np.ndarray, knn: tuple | None) -> tuple[Any, str]:
        """The shared kNN graph as sparse distances when it is deep enough, else the points themselves."""
        m = self._n_neighbors + 1  # columns past self
        n = len(X)
        if knn is None or knn[0].shape[1] < m + 1 or m >= n:
            return (unit_rows(X) if self.metric == "cosine" else np.asarray(X, np.float32)), "euclidean"
        import scipy.sparse as sp

        d = knn[1][:, 1 : m + 1]
        if self.metric == "cosine":
            d = np.sqrt(2 * d)  # euclidean distance between unit rows
        graph = sp.csr_matrix((d.astype(np.float32).ravel(), knn[0][:, 1 : m + 1].ravel(),
                               np.arange(0, n * m + 1, m)), shape=(n, n))
        return graph, "precomputed"


def _short_schedule(backend: str, early_iter: int) -> type:
    """The backend's TSNE class with `early_iter` early-exaggeration iterations. scikit-learn and
    scikit-learn-intelex read that count from the class attribute `_EXPLORATION_MAX_ITER` (fixed at 250)
    and require max_iter >= 250; a subclass lifts both."""
    if backend == "sklearnex":
        from sklearnex.manifold import TSNE
    else:
        from sklearn.manifold import TSNE
    from numbers import Integral

    from sklearn.utils._param_validation import Interval

    constraints = {**TSNE._parameter_constraints, "max_iter": [Interval(Integral, 1, None, closed="left"), None]}
    return type("ShortScheduleTSNE", (TSNE,), {"_EXPLORATION_MAX_ITER": early_iter,
                                                "_parameter_constraints": constraints})


@register_reducer
class UMAPReducer(_Backends):
    """umap-learn on the shared exact kNN graph, started from the head's t-SNE layout, 30 epochs
    with 2 negative samples per edge.

    umap-learn runs 500 epochs up to 10k points (200 above) with 5 negative samples, and the epochs
    are nearly all of its time: cost grows with epochs x (1 + negative samples). From spectral init,
    short schedules lost up to 0.04 trustworthiness on real MiniLM heads. From the t-SNE layout
    (default settings, the same one `tsne` stores, computed here when t-SNE is not run alongside),
    30 epochs x 2 negatives cost a quarter of 60 x 5 and stayed within 0.001 of the AttentionViz
    recipe's UMAP on 3 real MiniLM heads (3 negatives: +0.003 more, 20% slower). `init` may also be
    spectral, pca or random. A seed makes umap-learn single-threaded; the runner gets its
    parallelism from heads.
    """

    name = "umap"
    defaults = {"n_neighbors": 15, "min_dist": 0.1, "n_epochs": 30, "negative_sample_rate": 2, "init": "tsne",
                "backend": "auto"}
    backends = ("cuml", "umap-learn")
    safe_backend = "umap-learn"
    # Batched: PCA init (spectral is a per-head eigensolve), so a longer schedule than umap-learn's 100 epochs.
    # 400 epochs and 16 negatives: on 12 MiniLM heads of 20,000 points every head at least as trustworthy as the
    # library default (+0.008 to +0.028); 200 epochs and 8 negatives lost up to 0.027.
    batched_defaults = {"batched_epochs": 400, "negatives": 16}
    min_points = 4

    @property
    def knn_needed(self) -> int:  # type: ignore[override]
        nn = int(self.adapted.get("n_neighbors", self.options["n_neighbors"]))
        start = self.init_reducer()
        return max(nn, start.knn_needed) if start is not None else nn

    def init_reducer(self, n_points=None):
        """The t-SNE (default settings, this seed) whose layout starts UMAP; None for other inits."""
        if self.options["init"] != "tsne" or self.batched:
            return None
        if n_points is not None and n_points < TSNEReducer.min_points:
            return None  # too few points for t-SNE: umap-learn's spectral init
        t = TSNEReducer(self.metric, self.random_state)
        if self.safe:
            t.make_safe()
        t.adapt(n_points if n_points is not None else self.adapted.get("n_points", 10**9))
        return t

    def library_backend(self) -> str:
        if _cuda() and _has("cuml"):
            return "cuml"  # untested here: no GPU on the development machine
        return "umap-learn"

    def fit_batch(self, X, knn=None):
        if not self.batched:
            return super().fit_batch(X, knn)
        from attnatlas.project.batched import knn_graph_batch, umap_batch

        o = self.options
        if knn is None:
            knn = knn_graph_batch(X, self.knn_needed, self.metric, device=self.device)
        return umap_batch(X, knn[0], knn[1], self.metric, n_neighbors=self.knn_needed, min_dist=o["min_dist"],
                          n_epochs=int(o["batched_epochs"]), negatives=int(o["negatives"]), seed=self.random_state,
                          device=self.device)

    def adapt(self, n_points):
        super().adapt(n_points)
        if self.options["n_neighbors"] > n_points - 1:
            self.adapted["n_neighbors"] = int(n_points - 1)
        return dict(self.adapted)

    def fit_transform(self, X, init=None, knn=None):
        if self.batched:
            return self.fit_batch(X[None], None if knn is None else (knn[0][None], knn[1][None]))[0]
        nn = int(self.adapted.get("n_neighbors", self.options["n_neighbors"]))
        start = self.init_reducer(len(X))
        if start is not None and init is None:
            init = start.fit_transform(X, knn=knn)
        elif start is None and self.options["init"] == "tsne":
            init = "spectral"
        if self.backend() == "cuml":
            from cuml.manifold import UMAP as CuUMAP

            return np.asarray(CuUMAP(n_neighbors=nn, min_dist=self.options["min_dist"], metric=self.metric,
                                     random_state=self.random_state).fit_transform(X), np.float32)
        import umap

        from attnatlas.project.numba_cache import cache_umap_kernels

        cache_umap_kernels()
        pre = None
        if knn is not None and knn[0].shape[1] >= nn:
            # Always hand the graph over: below 4,096 points umap-learn would otherwise compute every
            # pairwise distance through a Python callable (31 s for one 4,000-point head here).
            pre = (knn[0][:, :nn], knn[1][:, :nn], None)
        ini: Any = self.options["init"] if init is None else init  # an array, or umap-learn's own init
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            red = umap.UMAP(n_neighbors=nn, min_dist=self.options["min_dist"], n_epochs=int(self.options["n_epochs"]),
                            negative_sample_rate=int(self.options["negative_sample_rate"]), metric=self.metric, init=ini,
                            random_state=self.random_state, precomputed_knn=pre or (None, None, None))
            Y = red.fit_transform(X)
        return np.asarray(Y, dtype=np.float32)
