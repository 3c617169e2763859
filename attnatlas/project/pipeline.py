"""The per-head pipeline, over a (head, point, d) batch of one layer's heads: read each head's q and k (k from the
key head serving it), check they are finite and not one point, normalise, stack (queries first), build the exact
kNN graph shared by the reducers and the quality check, run each reducer, then per head check, measure and write
its layout (with the tokens outside a capped sample placed into it). One bad head is reported, never fatal.

Reducers that are `batched` embed the whole batch in one program; the others run head by head."""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnatlas.project.jobs import Job, reducers_of
from attnatlas.project.normalize import joint_points, normalise_head
from attnatlas.project.placement import Placer
from attnatlas.project.pool import mark
from attnatlas.project.quality import QUALITY_K, knn_graph, layout_quality
from attnatlas.project.reducers import Reducer
from attnatlas.store import Atlas, LayoutWriter
from attnatlas.store.writer import jsonable

_WRITERS: dict[tuple, LayoutWriter] = {}
_ATLASES: dict[str, Atlas] = {}
# The storage itself failed (full disk, lost permission): every further head would fail the same way, so the
# whole run stops with one message instead of one per head.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO}


def raise_if_storage_failed(exc: Exception) -> None:
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        raise exc


def cached_atlas(path: str) -> Atlas:
    """One open atlas per path and process (a worker runs many heads)."""
    if path not in _ATLASES:
        _ATLASES[path] = Atlas.open(path)
    return _ATLASES[path]


def layout_writer(atlas: Atlas, model: str, method: str, rows: np.ndarray, params: dict, n_tokens: int,
                  place: bool) -> LayoutWriter:
    """The layout writer of the stored rows: the sample itself, or every token when the rest are placed."""
    # Keyed by settings too: new settings (with --force) must reach layout_writer, which starts over.
    key = (str(atlas.path), model, method, repr(jsonable(params)), len(rows), hash(rows.tobytes()), n_tokens, place)
    if key not in _WRITERS:
        stored, sampled = (np.arange(n_tokens, dtype=np.int64), np.isin(np.arange(n_tokens), rows)) if place else (rows, None)
        _WRITERS[key] = atlas.layout_writer(model, method, stored, params, sampled)
    return _WRITERS[key]


@dataclass
class HeadResult:
    """What became of one head: quality per method written, errors as (method or "*", message)."""

    layer: int
    head: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "results": self.results, "errors": self.errors}


@dataclass
class Batch:
    """The heads of one layer that read well: X (head, point, d) normalised points, queries then keys."""

    heads: list[int]
    X: np.ndarray
    scales: list[float]
    placers: list[Placer | None]
    knn: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per head: (idx, dist) each (point, k)


def read_batch(atlas: Atlas, model: str, layer: int, heads: list[int], rows: np.ndarray, metric: str,
               normalise: dict, place: bool, safe: bool, out: dict[int, HeadResult], device: str | None = None) -> Batch:
    """Read, check and normalise each head; a head that fails is noted in `out` and left out of the batch."""
    good, Xs, scales, placers = [], [], [], []
    for h in heads:
        try:
            mark("reading the head")
            q_all = atlas.queries(model, layer, h)  # (token, d_head)
            k_all = atlas.keys(model, layer, h)  # (token, d_head), GQA key head
            q, k = q_all[rows], k_all[rows]  # (points, d_head)
            bad = int((~np.isfinite(q)).sum() + (~np.isfinite(k)).sum())
            if bad:
                out[h].errors.append(("*", f"{bad} NaN/inf values in its query/key vectors; skipped"))
                continue
            qn, kn, applied = normalise_head(q, k, **normalise)
            X = joint_points(qn, kn)  # (2 * points, d_head)
            if (X == X[:1]).all():
                out[h].errors.append(("*", "all its queries and keys are one and the same point; nothing to lay out"))
                continue
            mark("placing the tokens outside the sample")
            placers.append(Placer.of(X, q_all, k_all, rows, applied, metric, exact=safe, device=device) if place else None)
            Xs.append(X)
            scales.append(applied["scale"])
            good.append(h)
        except Exception as exc:
            raise_if_storage_failed(exc)
            out[h].errors.append(("*", f"{type(exc).__name__}: {exc}"))
    d = Xs[0].shape[1] if Xs else 0
    return Batch(good, np.stack(Xs) if Xs else np.empty((0, 2 * len(rows), d), np.float32), scales, placers)


def given_init(r: Reducer, reducers: list[tuple[Reducer, dict]], layouts: dict[str, np.ndarray],
               n_points: int) -> np.ndarray | None:
    """The layout `r` starts from, when the same job already made it with exactly the settings `r`
    would use itself; otherwise None, and `r` computes its own (so results never depend on the job)."""
    want = r.init_reducer(n_points)
    if want is None or want.name not in layouts:
        return None
    made = next(p for p, _ in reducers if p.name == want.name)
    return layouts[want.name] if jsonable(want.params) == jsonable(made.params) else None


def in_init_order(reducers: list[tuple[Reducer, dict]], n_points: int) -> list[tuple[Reducer, dict]]:
    """Providers of an init run before the reducers they start."""
    by_name = {r.name: r for r, _ in reducers}

    def depth(r: Reducer) -> int:
        start = r.init_reducer(n_points)
        return 0 if start is None or start.name not in by_name else 1 + depth(by_name[start.name])

    return sorted(reducers, key=lambda rp: depth(rp[0]))


def project_heads(atlas_path: str, model: str, layer: int, heads: list[int], jobs: list[Job], rows: np.ndarray,
                  metric: str, seed: int, normalise: dict, place: bool = False, safe: bool = False) -> list[dict[str, Any]]:
    """Project heads of one layer with each job; one result dict per head, in order; never raises (except for a
    failed storage). With `place`, the tokens outside `rows` (the sample) are placed into each layout and stored
    with it. `safe` (the retry of a head whose process died) uses backends without known native crashes and no
    faiss, and flags the head's quality with fallback = 1. Seconds per head are a batch's share."""
    out = {h: HeadResult(layer, h) for h in heads}
    try:
        atlas = cached_atlas(atlas_path)
        device = jobs[0].device if jobs else None  # cuda: the other tokens are placed by exact search there too
        batch = read_batch(atlas, model, layer, heads, rows, metric, normalise, place, safe, out, device)
        if batch.heads:
            reducers = reducers_of(jobs, metric, seed, safe)
            batched = not safe and all(r.batched for r, _ in reducers)
            run = run_batched if batched else run_each
            for i, r, params, Y, secs in run(batch, reducers, metric, safe, out):
                h = batch.heads[i]
                try:
                    write_head(atlas, model, layer, h, batch, i, r.name, params, Y, secs, rows, metric, seed, safe, out[h])
                except Exception as exc:  # one method failing must not stop the others
                    raise_if_storage_failed(exc)
                    out[h].errors.append((r.name, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        raise_if_storage_failed(exc)
        for h in heads:
            out[h].errors.append(("*", f"{type(exc).__name__}: {exc}"))
    return [out[h].as_dict() for h in heads]


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device running out of memory (torch's CUDA error, or a RuntimeError that says so)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_parts(fit, n: int, lo: int = 0, hi: int | None = None):
    """`fit(lo, hi)` over heads lo..hi of a batch, halving the part whenever the device runs out of memory; yields
    (lo, hi, result or the exception). A single head out of memory yields its exception."""
    hi = n if hi is None else hi
    try:
        result = fit(lo, hi)
    except Exception as exc:
        if hi - lo > 1 and out_of_memory(exc):
            _free_device_memory()
            mid = (lo + hi) // 2
            yield from in_parts(fit, n, lo, mid)
            yield from in_parts(fit, n, mid, hi)
            return
        yield lo, hi, exc
        return
    yield lo, hi, result


def run_batched(batch: Batch, reducers: list[tuple[Reducer, dict]], metric: str, safe: bool, out: dict[int, HeadResult]):
    """One batched kNN graph and one `fit_batch` per method over (head, point, d); yields per head and method
    (index in the batch, reducer, params, (point, 2) layout, seconds). A part of the batch that does not fit the
    device's memory is halved until it does; a head that does not fit alone is reported, the others go on."""
    from attnatlas.project.batched import knn_graph_batch

    n, n_points = len(batch.heads), batch.X.shape[1]
    need = max([QUALITY_K + 1] + [r.knn_needed for r, _ in reducers])
    device = reducers[0][0].device  # one per run (Job.device)
    graphs: list = [None] * n
    knn_secs = np.zeros(n)

    def knn_part(lo: int, hi: int):
        t = time.perf_counter()
        got = knn_graph_batch(batch.X[lo:hi], need, metric, device=device)  # each (head, point, k)
        knn_secs[lo:hi] = (time.perf_counter() - t) / (hi - lo)
        return got

    for lo, hi, got in in_parts(knn_part, n):
        if isinstance(got, BaseException):
            raise_if_storage_failed(got)
            for h in batch.heads[lo:hi]:
                out[h].errors.append(("*", _say(got, n_points, "the kNN graph")))
            continue
        for i in range(lo, hi):
            graphs[i] = (got[0][i - lo], got[1][i - lo])
    batch.knn = graphs
    ok = [i for i in range(n) if graphs[i] is not None]
    if not ok:
        return
    X = batch.X[ok]
    idx, dist = np.stack([graphs[i][0] for i in ok]), np.stack([graphs[i][1] for i in ok])
    for r, params in reducers:
        mark(f"{r.name} ({r.backend()})")

        def fit_part(lo: int, hi: int, r=r):
            t = time.perf_counter()
            return r.fit_batch(X[lo:hi], knn=(idx[lo:hi], dist[lo:hi])), time.perf_counter() - t  # (head, point, 2)

        for lo, hi, got in in_parts(fit_part, len(ok)):
            if isinstance(got, BaseException):
                raise_if_storage_failed(got)
                for j in range(lo, hi):
                    out[batch.heads[ok[j]]].errors.append((r.name, _say(got, n_points, r.name)))
                continue
            Y, secs = got
            for j in range(lo, hi):
                i = ok[j]
                yield i, r, params, Y[j - lo], secs / (hi - lo) + knn_secs[i] / len(reducers)


def _say(exc: BaseException, n_points: int, what: str) -> str:
    if out_of_memory(exc):
        return (f"out of device memory for {what} of one head of {n_points} points; project it with --device cpu "
                f"or a smaller --max-points ({type(exc).__name__})")
    return f"{type(exc).__name__}: {exc}"


def run_each(batch: Batch, reducers: list[tuple[Reducer, dict]], metric: str, safe: bool, out: dict[int, HeadResult]):
    """Head by head: one kNN graph per head (exact, in torch, when `safe`), each reducer started from the layout
    it asks for when the job made it; yields as `run_batched`."""
    n_points = batch.X.shape[1]
    for i, h in enumerate(batch.heads):
        X = batch.X[i]
        mark("the kNN graph")
        t0 = time.perf_counter()
        need = max([QUALITY_K + 1] + [r.knn_needed for r, _ in reducers])
        knn = knn_graph(X, need, metric, device="cpu" if safe else None, use_faiss=not safe)
        batch.knn.append(knn)
        share = (time.perf_counter() - t0) / len(reducers)
        layouts: dict[str, np.ndarray] = {}
        for r, params in in_init_order(reducers, n_points):
            try:
                mark(f"{r.name} ({r.backend()})")
                t1 = time.perf_counter()
                Y = r.fit_transform(X, init=given_init(r, reducers, layouts, n_points), knn=knn)
                secs = time.perf_counter() - t1 + share
            except Exception as exc:
                raise_if_storage_failed(exc)
                out[h].errors.append((r.name, f"{type(exc).__name__}: {exc}"))
                continue
            layouts[r.name] = Y
            yield i, r, params, Y, secs


def write_head(atlas: Atlas, model: str, layer: int, head: int, batch: Batch, i: int, method: str, params: dict,
               Y: np.ndarray, secs: float, rows: np.ndarray, metric: str, seed: int, safe: bool, out: HeadResult) -> None:
    """Check one head's layout, measure its faithfulness, and store it: the sample's own points, or every token
    with the rest placed."""
    X = batch.X[i]
    if Y.shape != (len(X), 2) or not np.isfinite(Y).all():
        raise RuntimeError("the reducer returned non-finite or misshapen coordinates")
    mark(f"{method} quality and write")
    qual = layout_quality(X, Y, metric, knn=batch.knn[i], seed=seed)
    qual["seconds"] = secs
    qual["fallback"] = float(safe)
    placer = batch.placers[i]
    if placer is None:
        layout_writer(atlas, model, method, rows, params, len(rows), False).write_head(layer, head, Y, qual)
    else:
        full, Yr = placer.coords(Y)
        layout_writer(atlas, model, method, rows, params, placer.n, True).write_head(layer, head, full, qual,
                                                                                 placer.quality(Yr, seed))
    out.results[method] = {**qual, "scale": batch.scales[i]}
