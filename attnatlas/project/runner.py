"""Whole-model projection: every selected head, every method, resumable, in parallel across cores.

Per head: read q and k (k from the key head serving it), check they are finite, normalise, stack
(queries first), build ONE exact kNN graph shared by UMAP and the quality check, then run each
reducer and write its layout and quality. One bad head is reported and skipped, never fatal.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from attnatlas.errors import InputError, SettingsChanged
from attnatlas.project.normalize import DEFAULT_NORMALISE, apply_normalisation, joint_points, normalise_head
from attnatlas.project.placement import PLACE_K, knn_query, positions
from attnatlas.project.pool import Died, mark, run_in_children
from attnatlas.project.quality import QUALITY_K, QUALITY_SAMPLE, knn_graph, layout_quality, quality_sample
from attnatlas.project.reducers import METRICS, REDUCERS, get_reducer
from attnatlas.store import Atlas, claims

DEFAULT_METHODS = ("tsne", "umap", "pca")
# Above this many points per head (2 x tokens) a seeded sample of token rows is projected: t-SNE
# and UMAP cost grows faster than linearly and 20k points is past what one scatter plot shows well.
MAX_POINTS = 20_000
# A head whose process gives no result within this many seconds is stopped (and retried once on safe backends).
HEAD_TIMEOUT = 900.0


def parse_list(value: str | Iterable[int] | None, upper: int, what: str) -> list[int] | None:
    """'0,2,5-7' or a list of ints -> sorted unique ints, each checked against 0..upper-1."""
    if value is None:
        return None
    out: set[int] = set()
    items = value.split(",") if isinstance(value, str) else list(value)
    for item in items:
        try:
            if isinstance(item, str) and "-" in item.strip()[1:]:
                a, b = item.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise InputError(f"Cannot read {what} {item!r}; use numbers like 0,2,5-7.") from None
    bad = sorted(x for x in out if not 0 <= x < upper)
    if bad:
        raise InputError(f"{what.capitalize()} {bad[0]} is out of range (the model has {what}s 0..{upper - 1}).")
    return sorted(out)


def parse_methods(methods: str | Iterable[str]) -> list[str]:
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    if not names:
        raise InputError("No projection method given; choose from " + ", ".join(sorted(REDUCERS)) + ".")
    for m in names:
        if m not in REDUCERS:
            raise InputError(f"Unknown projection method {m!r}; choose from {', '.join(sorted(REDUCERS))}.")
    return list(dict.fromkeys(names))


def sample_rows(n_tokens: int, max_points: int, seed: int) -> np.ndarray:
    """Token rows projected: all, or a sorted seeded sample so that 2 x rows <= max_points."""
    cap = max(1, max_points // 2)
    if n_tokens <= cap:
        return np.arange(n_tokens, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, cap, replace=False)).astype(np.int64)


# ---- one head (runs in the main process or in a worker) ---------------------------------------
_WRITERS: dict[tuple, Any] = {}
_ATLASES: dict[str, Atlas] = {}


def _writer(atlas: Atlas, model: str, method: str, rows: np.ndarray, params: dict, n_tokens: int,
            place: bool) -> Any:
    """The layout writer of the stored rows: the sample itself, or every token when the rest are placed."""
    # Keyed by settings too: new settings (with --force) must reach layout_writer, which starts over.
    key = (str(atlas.path), model, method, repr(_json(params)), len(rows), hash(rows.tobytes()), n_tokens, place)
    if key not in _WRITERS:
        stored, sampled = (np.arange(n_tokens, dtype=np.int64), np.isin(np.arange(n_tokens), rows)) if place else (rows, None)
        _WRITERS[key] = atlas.layout_writer(model, method, stored, params, sampled)
    return _WRITERS[key]


class _Placer:
    """The tokens a capped layout left out, placed into each of the head's layouts from their neighbours
    among the laid-out points (one neighbour search per head, shared by every method)."""

    def __init__(self, X: np.ndarray, q_all: np.ndarray, k_all: np.ndarray, rows: np.ndarray, applied: dict,
                 metric: str, exact: bool = False):
        self.n, self.rows = len(q_all), rows
        self.rest = np.setdiff1d(np.arange(self.n), rows)
        qr, kr = apply_normalisation(q_all[self.rest], k_all[self.rest], applied)
        self.X = joint_points(qr, kr)  # (2 * rest, d): queries, then keys
        self.idx, self.dist = knn_query(X, self.X, PLACE_K, metric, use_faiss=not exact)
        self.metric = metric

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


def _cached_atlas(path: str) -> Atlas:
    if path not in _ATLASES:
        _ATLASES[path] = Atlas.open(path)
    return _ATLASES[path]


@dataclass(frozen=True)
class Job:
    """One method to run on a head: the reducer's options and the parameters the driver adapted to the
    head size, the params stored with the layout, and the module that registers the reducer (imported in
    worker processes, Dask's included, that have not imported it yet)."""

    method: str
    options: dict[str, Any]
    adapted: dict[str, Any]
    params: dict[str, Any]
    module: str


def _reducers(jobs: list[Job], metric: str, seed: int, safe: bool = False) -> list[tuple[Any, dict]]:
    """Rebuild each job's reducer, with the parameters the driver already adapted, beside its params;
    with `safe`, on the backend without known native crashes (`Reducer.make_safe`)."""
    out = []
    for job in jobs:
        if job.method not in REDUCERS:
            importlib.import_module(job.module)
        name, options, adapted, params = job.method, job.options, job.adapted, job.params
        r = get_reducer(name, metric=metric, random_state=seed, **options)
        if safe:
            r.make_safe()
        r.adapted = dict(adapted)
        out.append((r, params))
    return out


def project_head(atlas_path: str, model: str, layer: int, head: int, jobs: list[Job],
                 rows: np.ndarray, metric: str, seed: int, normalise: dict, place: bool = False,
                 safe: bool = False) -> dict[str, Any]:
    """Project one head with each (method, options, adapted, params) job; never raises. With `place`, the
    tokens outside `rows` (the layout sample) are placed into each layout and stored with it. `safe` (the
    retry of a head whose process died) uses backends without known native crashes and no faiss, and
    flags the head's quality with fallback = 1."""
    out: dict[str, Any] = {"layer": layer, "head": head, "results": {}, "errors": []}
    try:
        mark("reading the head")
        atlas = _cached_atlas(atlas_path)
        q_all = atlas.queries(model, layer, head)  # (token, d_head)
        k_all = atlas.keys(model, layer, head)  # (token, d_head), GQA key head
        q, k = q_all[rows], k_all[rows]  # (points, d_head)
        bad = int((~np.isfinite(q)).sum() + (~np.isfinite(k)).sum())
        if bad:
            out["errors"].append(("*", f"{bad} NaN/inf values in its query/key vectors; skipped"))
            return out
        qn, kn, applied = normalise_head(q, k, **normalise)
        X = joint_points(qn, kn)  # (2 * points, d_head)
        if (X == X[:1]).all():
            out["errors"].append(("*", "all its queries and keys are one and the same point; nothing to lay out"))
            return out
        mark("placing the tokens outside the sample")
        placer = _place_all(X, q_all, k_all, rows, applied, metric, place, safe)
        reducers = _reducers(jobs, metric, seed, safe)
        t0 = time.perf_counter()
        need = max([QUALITY_K + 1] + [r.knn_needed for r, _ in reducers])
        mark("the kNN graph")
        knn = knn_graph(X, need, metric, device="cpu" if safe else None, use_faiss=not safe)
        share = (time.perf_counter() - t0) / len(reducers)
        layouts: dict[str, np.ndarray] = {}
        by_name = {r.name: r for r, _ in reducers}

        def depth(r: Any) -> int:  # providers of an init run before the reducers they start
            start = r.init_reducer(len(X))
            return 0 if start is None or start.name not in by_name else 1 + depth(by_name[start.name])

        for r, params in sorted(reducers, key=lambda rp: depth(rp[0])):
            try:
                mark(f"{r.name} ({r.backend()})")
                t1 = time.perf_counter()
                Y = r.fit_transform(X, init=_given_init(r, reducers, layouts, len(X)), knn=knn)
                secs = time.perf_counter() - t1 + share
                if Y.shape != (len(X), 2) or not np.isfinite(Y).all():
                    raise RuntimeError("the reducer returned non-finite or misshapen coordinates")
                layouts[r.name] = Y
                mark(f"{r.name} quality and write")
                qual = layout_quality(X, Y, metric, knn=knn, seed=seed)
                qual["seconds"] = secs
                qual["fallback"] = float(safe)
                _write(atlas, model, r.name, rows, params, layer, head, Y, qual, placer, seed)
                out["results"][r.name] = {**qual, "scale": applied["scale"]}
            except Exception as exc:  # one method failing must not stop the others
                _raise_if_storage_failed(exc)
                out["errors"].append((r.name, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        _raise_if_storage_failed(exc)
        out["errors"].append(("*", f"{type(exc).__name__}: {exc}"))
    return out


# The storage itself failed (full disk, lost permission): every further head would fail the same way, so the
# whole run stops with one message instead of one per head.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO}


def _raise_if_storage_failed(exc: Exception) -> None:
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        raise exc


def _place_all(X: np.ndarray, q_all: np.ndarray, k_all: np.ndarray, rows: np.ndarray, applied: dict, metric: str,
               place: bool, safe: bool = False) -> _Placer | None:
    if not place or len(rows) >= len(q_all):
        return None
    bad = int((~np.isfinite(q_all)).sum() + (~np.isfinite(k_all)).sum())
    if bad:
        raise ValueError(f"{bad} NaN/inf values in the query/key vectors of tokens outside the layout sample")
    return _Placer(X, q_all, k_all, rows, applied, metric, exact=safe)


def _write(atlas: Atlas, model: str, method: str, rows: np.ndarray, params: dict, layer: int, head: int,
           Y: np.ndarray, qual: dict, placer: _Placer | None, seed: int) -> None:
    """Store one head's layout: the sample's own points, or every token with the rest placed."""
    if placer is None:
        _writer(atlas, model, method, rows, params, len(rows), False).write_head(layer, head, Y, qual)
        return
    full, Yr = placer.coords(Y)
    _writer(atlas, model, method, rows, params, placer.n, True).write_head(layer, head, full, qual,
                                                                         placer.quality(Yr, seed))


def _given_init(r: Any, reducers: list[tuple[Any, dict]], layouts: dict[str, np.ndarray], n_points: int) -> np.ndarray | None:
    """The layout `r` starts from, when the same job already made it with exactly the settings `r`
    would use itself; otherwise None, and `r` computes its own (so results never depend on the job)."""
    want = r.init_reducer(n_points)
    if want is None or want.name not in layouts:
        return None
    made = next(p for p, _ in reducers if p.name == want.name)
    return layouts[want.name] if _json(want.params) == _json(made.params) else None


def project_layer(atlas_path: str, model: str, layer: int, heads: list[int], jobs: list[Job],
                  rows: np.ndarray, metric: str, seed: int, normalise: dict, place: bool = False) -> list[dict[str, Any]]:
    """Project several heads of one layer together (every job's reducer is `batched`): one batched kNN
    graph, one `fit_batch` per method over a (head, point, d) tensor, then quality and writes per head.
    Returns one `project_head`-style result per head; never raises. Seconds are the batch's / heads."""
    from attnatlas.project.batched import knn_graph_batch

    outs = {h: {"layer": layer, "head": h, "results": {}, "errors": []} for h in heads}
    try:
        atlas = _cached_atlas(atlas_path)
        good, Xs, scales, placers = [], [], {}, {}
        for h in heads:
            try:
                q_all, k_all = atlas.queries(model, layer, h), atlas.keys(model, layer, h)
                q, k = q_all[rows], k_all[rows]
                bad = int((~np.isfinite(q)).sum() + (~np.isfinite(k)).sum())
                if bad:
                    outs[h]["errors"].append(("*", f"{bad} NaN/inf values in its query/key vectors; skipped"))
                    continue
                qn, kn, applied = normalise_head(q, k, **normalise)
                Xs.append(joint_points(qn, kn))
                placers[h] = _place_all(Xs[-1], q_all, k_all, rows, applied, metric, place)
                scales[h] = applied["scale"]
                good.append(h)
            except Exception as exc:
                _raise_if_storage_failed(exc)
                outs[h]["errors"].append(("*", f"{type(exc).__name__}: {exc}"))
        if good:
            X = np.stack(Xs)  # (head, point, d)
            reducers = _reducers(jobs, metric, seed)
            t0 = time.perf_counter()
            need = max([QUALITY_K + 1] + [r.knn_needed for r, _ in reducers])
            idx, dist = knn_graph_batch(X, need, metric)
            share = (time.perf_counter() - t0) / len(reducers) / len(good)
            for r, params in reducers:
                try:
                    t1 = time.perf_counter()
                    Y = r.fit_batch(X, knn=(idx, dist))  # (head, point, 2)
                    secs = (time.perf_counter() - t1) / len(good) + share
                except Exception as exc:
                    _raise_if_storage_failed(exc)
                    for h in good:
                        outs[h]["errors"].append((r.name, f"{type(exc).__name__}: {exc}"))
                    continue
                for i, h in enumerate(good):
                    try:
                        if Y[i].shape != (X.shape[1], 2) or not np.isfinite(Y[i]).all():
                            raise RuntimeError("the reducer returned non-finite or misshapen coordinates")
                        qual = layout_quality(X[i], Y[i], metric, knn=(idx[i], dist[i]), seed=seed)
                        qual["seconds"] = secs
                        _write(atlas, model, r.name, rows, params, layer, h, Y[i], qual, placers[h], seed)
                        outs[h]["results"][r.name] = {**qual, "scale": scales[h]}
                    except Exception as exc:
                        _raise_if_storage_failed(exc)
                        outs[h]["errors"].append((r.name, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:
        _raise_if_storage_failed(exc)
        for h in heads:
            outs[h]["errors"].append(("*", f"{type(exc).__name__}: {exc}"))
    return [outs[h] for h in heads]


def worker_setup(threads: int) -> None:
    """Run once in each worker process: every library there uses `threads` threads."""
    from attnatlas.project.reducers import set_threads

    set_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:
        pass


# ---- whole model ---------------------------------------------------------------------------------
def project_model(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Project the selected heads of `model` with each method; returns a summary dict
    (done, skipped, failed [(layer, head, method, message)], adapted parameters, seconds, quality).
    See `_project_model` for the arguments. Each (model, method) is claimed while it is written."""
    with ExitStack() as stack:
        return _project_model(*args, hold=stack.enter_context, **kwargs)


def _claim_layout(atlas: Atlas, model: str, method: str, params: dict, progress: bool) -> claims.Claim:
    """The claim on writing `method` layouts of `model`. Held by a run with other settings: refused (the
    two would mix settings in one layout). Held by a run with the same settings: wait for it, then
    keep what it made."""
    want = _json(params)
    for _ in range(50):
        try:
            return atlas.claim_layout(model, method, want)
        except claims.ClaimBusy as busy:
            held = busy.holder.get("params")
            if held is None:  # the holder has not written who it is yet
                time.sleep(0.1)
                continue
            if held != want:
                raise InputError(
                    f"{busy.describe()} is projecting {method} layouts of {model!r} with other settings; wait "
                    "for it to finish (two runs would mix their settings in one layout).") from None
            print(f"waiting for {busy.describe()}, which projects the same {method} layouts of {model!r}; "
                  "the heads it makes are kept, not redone", file=sys.stderr, flush=True)
            return atlas.claim_layout(model, method, want, wait=True)
    raise InputError(f"Cannot tell who holds the {method} layouts of {model!r} in {atlas.path}; try again.")


def _project_model(
    atlas: Atlas | str | os.PathLike,
    model: str,
    methods: str | Iterable[str] = DEFAULT_METHODS,
    layers: str | Iterable[int] | None = None,
    heads: str | Iterable[int] | None = None,
    workers: int = 1,
    metric: str = "cosine",
    seed: int = 0,
    force: bool = False,
    normalise: dict[str, Any] | None = None,
    max_points: int = MAX_POINTS,
    progress: bool = True,
    reducer_params: dict[str, dict[str, Any]] | None = None,
    dispatch: Callable[[Callable[..., dict], list[tuple]], Iterable[dict]] | None = None,
    hold: Callable[[Any], Any] = lambda claim: claim,
    place: bool = True,
    head_timeout: float | None = HEAD_TIMEOUT,
) -> dict[str, Any]:
    """`dispatch(project_head, calls)`, if given, runs each argument tuple elsewhere (e.g. a Dask cluster)
    and yields one result per call; the layout arrays already exist when it is called.

    A head with more than `max_points` points is laid out from a seeded sample of tokens; with `place`
    (the default) every other token is then placed into that layout from its neighbours, so every token
    of the corpus has coordinates (flagged as placed), and their faithfulness is stored apart.

    Heads run in child processes (`project.pool`), also with workers=1: a head whose process crashes in
    native code, is killed (out of memory) or gives no result within `head_timeout` seconds is retried once,
    alone, on the safe backends (listed in the summary's "fallbacks" and flagged in its quality); if that
    dies too, the head is reported failed. The other heads are kept either way."""
    atlas = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    info = atlas.info(model)  # StoreError if the model is missing
    names = parse_methods(methods)
    if metric not in METRICS:
        raise InputError(f"Unknown metric {metric!r}; choose cosine or euclidean.")
    norm = {**DEFAULT_NORMALISE, **(normalise or {})}
    sel_layers = parse_list(layers, info.n_layers, "layer") or list(range(info.n_layers))
    sel_heads = parse_list(heads, info.n_heads, "head") or list(range(info.n_heads))
    n_tokens = len(atlas.tokens(model))
    if n_tokens == 0:
        raise InputError(f"Model {model!r} has no tokens to project.")
    rows = sample_rows(n_tokens, max_points, seed)
    n_points = 2 * len(rows)
    place = bool(place) and len(rows) < n_tokens
    stored_rows = np.arange(n_tokens, dtype=np.int64) if place else rows

    jobs, adapted_all, done = [], {}, {}
    for name in names:
        r = get_reducer(name, metric=metric, random_state=seed, **(reducer_params or {}).get(name, {}))
        adapted_all[name] = r.adapt(n_points)  # InputError if too few points at all
        params = {**r.params, "normalise": norm, "max_points": max_points, "quality_sample": QUALITY_SAMPLE}
        safe = get_reducer(name, metric=metric, random_state=seed, **r.options).make_safe()
        if safe.backend() != r.backend():  # heads flagged fallback = 1 in their quality were made on it
            params["fallback_backend"] = safe.backend()
        if place:
            params["placement"] = {"method": "knn-weighted", "k": PLACE_K}
        jobs.append(Job(name, r.options, dict(r.adapted), params, type(r).__module__))
    # One run at a time writes a (model, method): claimed in sorted order, so two runs never deadlock.
    for job in sorted(jobs, key=lambda j: j.method):
        hold(_claim_layout(atlas, model, job.method, job.params, progress))
    # With the layout claims held, a writer of the model itself (an `extract --overwrite` or a delete) refuses to
    # swap it; one already under way is refused here.
    writer = atlas.writer_of(model)
    if writer is not None:
        raise InputError(f"Model {model!r} is being written by {writer}; project it when that has finished.")
    for job in jobs:
        name, params = job.method, job.params
        if name in atlas.layout_methods(model):
            old = atlas.layout_params(model, name)
            same_rows = np.array_equal(atlas.layout_rows(model, name), stored_rows)
            if (not same_rows or _json(old) != _json(params)) and not force:
                raise SettingsChanged(
                    f"{model!r} already has {name} layouts made with other settings; pass --force to replace "
                    f"them (existing layouts are kept otherwise).")
        _writer(atlas, model, name, rows, params, n_tokens, place)  # creates the arrays once, before any worker
        done[name] = atlas.layout_done(model, name)  # read under the claim: heads another run made are kept

    targets, skipped = [], 0
    for L in sel_layers:
        for h in sel_heads:
            todo = [j for j in jobs if force or not done[j.method][L, h]]
            skipped += len(jobs) - len(todo)
            if todo:
                targets.append((L, h, todo))

    summary: dict[str, Any] = {"model": model, "methods": names, "heads": len(sel_layers) * len(sel_heads),
                               "points": n_points, "sampled": len(rows) < n_tokens, "adapted": adapted_all,
                               "placed_points": 2 * (n_tokens - len(rows)) if place else 0,
                               "done": 0, "skipped": skipped, "failed": [], "fallbacks": [],
                               "quality": {m: [] for m in names}}
    t0 = time.perf_counter()
    bar = _bar(len(targets), progress)
    args = (str(atlas.path), model)
    tail = (rows, metric, seed, norm, place)

    def collect(res: dict, count: bool = True) -> None:
        for m, q in res["results"].items():
            summary["done"] += 1
            summary["quality"][m].append(q["trustworthiness"])
        for m, msg in res["errors"]:
            summary["failed"].append((res["layer"], res["head"], m, msg))
        if count:
            bar.update(1)

    # Per layer when every method embeds heads in one batch (and no external dispatcher wants heads).
    batched = dispatch is None and all(
        get_reducer(j.method, metric=metric, random_state=seed, **j.options).batched for j in jobs)
    if batched:
        groups: dict[tuple, list[int]] = {}
        for L, h, todo in targets:
            groups.setdefault((L, tuple(j.method for j in todo)), []).append(h)
        fn, calls = project_layer, [(*args, L, hs, [j for j in jobs if j.method in names_], *tail)
                                    for (L, names_), hs in groups.items()]
    else:
        fn, calls = project_head, [(*args, L, h, todo, *tail) for L, h, todo in targets]
    workers = max(1, min(int(workers), len(calls) or 1))
    # Worker processes import each reducer's module; one defined in __main__ or inside a function (a notebook,
    # a test) exists in this process only, so such a run stays here, without isolation.
    classes = [REDUCERS[j.method] for j in jobs]
    local = [c.name for c in classes if c.__module__ == "__main__" or "<locals>" in c.__qualname__]
    in_process = atlas.path.protocol == "memory" or bool(local)
    if in_process and workers > 1 and dispatch is None:
        where = (f"{atlas.path} lives inside this process" if not local else
                 f"the reducer {local[0]!r} is defined in __main__ or inside a function, so it exists in this process")
        raise InputError(f"{where}, where worker processes cannot see it; use workers=1"
                         + (" or storage they share (a folder, s3://...)." if not local else " or define it in a module."))

    def run(fn: Callable[..., Any], calls: list[tuple]) -> Iterator[dict]:
        """Every result of `fn` over `calls`, flattened to per-head results; a call whose process died
        becomes a result per head with "died" (the cause)."""
        if dispatch is not None:
            yield from dispatch(fn, calls)
        elif in_process:  # memory:// atlases live in this process only: no isolation possible
            from attnatlas.project import reducers

            saved = reducers.THREADS
            reducers.set_threads(max(1, (os.cpu_count() or 1) // workers))  # as a worker has them: same layouts
            try:
                for call in calls:
                    res = fn(*call)
                    yield from (res if isinstance(res, list) else [res])
            finally:
                reducers.set_threads(saved)
        else:
            for i, res in run_in_children(fn, calls, workers, head_timeout, setup=worker_setup):
                if isinstance(res, Died):
                    L, hs = calls[i][2], calls[i][3]
                    why = res.cause + (f", during {res.stage}" if res.stage else "")
                    res = [{"layer": L, "head": h, "results": {}, "errors": [], "died": why}
                           for h in (hs if isinstance(hs, list) else [hs])]
                yield from (res if isinstance(res, list) else [res])

    died: dict[tuple[int, int], str] = {}
    for res in run(fn, calls):
        if res.get("died"):
            died[res["layer"], res["head"]] = res["died"]
            bar.update(1)
        else:
            collect(res)
    if died:
        # Each head whose process died is retried once, alone, on the safe backends; the methods it
        # had already written are kept.
        done = {j.method: atlas.layout_done(model, j.method) for j in jobs}
        retry = [(*args, L, h, [j for j in jobs if force or not done[j.method][L, h]], *tail, True)
                 for (L, h) in sorted(died)]
        retry = [c for c in retry if c[4]]
        for res in run(project_head, retry):
            key = (res["layer"], res["head"])
            if res.get("died"):
                summary["failed"].append((*key, "*", f"{died[key]}; the retry on safe backends died too: {res['died']}"))
                continue
            for m in res["results"]:
                summary["fallbacks"].append((*key, m, died[key]))
            res["errors"] = [(m, f"{msg} (retried on safe backends after: {died[key]})") for m, msg in res["errors"]]
            collect(res, count=False)
    bar.close()
    secs = time.perf_counter() - t0
    summary["seconds"] = secs
    summary["heads_done"] = len(targets)
    summary["heads_per_min"] = 60 * len(targets) / secs if targets and secs > 0 else 0.0
    summary["quality"] = {m: float(np.mean(v)) if v else None for m, v in summary["quality"].items()}
    summary["placed_quality"] = {}
    if place:
        for m in names:
            pq = atlas.layout_placed_quality(model, m)
            summary["placed_quality"][m] = float(pq["trustworthiness"].mean()) if len(pq) else None
    summary["failed"].sort()
    summary["fallbacks"].sort()
    return summary


def _json(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _bar(total: int, on: bool) -> Any:
    if on:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="head", desc="project")
        except ImportError:
            pass

    class _Null:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...

    return _Null()
