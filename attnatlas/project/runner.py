"""Whole-model projection: every selected head, every method, resumable, in parallel across cores.

The driver plans the jobs (jobs.py), claims the layouts it writes, and runs the per-head pipeline
(pipeline.py) in worker processes (pool.py): per head, or per layer when every reducer embeds a batch of heads
at once. A head whose process dies is retried alone on the safe backends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np

from attnatlas.errors import InputError, SettingsChanged
from attnatlas.project.jobs import MAX_POINTS, Job, all_batched, parse_list, parse_methods, plan_jobs, project_device, sample_rows
from attnatlas.project.normalize import DEFAULT_NORMALISE
from attnatlas.project.pipeline import layout_writer, project_heads
from attnatlas.project.pool import Died, run_in_children
from attnatlas.project.reducers import METRICS, REDUCERS, set_threads
from attnatlas.store import Atlas, claims
from attnatlas.store.writer import jsonable

__all__ = ["DEFAULT_METHODS", "HEAD_TIMEOUT", "MAX_POINTS", "Job", "parse_list", "project_head", "project_model",
           "sample_rows"]

DEFAULT_METHODS = ("tsne", "umap", "pca")
# A head whose process gives no result within this many seconds is stopped (and retried once on safe backends).
HEAD_TIMEOUT = 900.0


def project_head(atlas_path: str, model: str, layer: int, head: int, jobs: list[Job], rows: np.ndarray, metric: str,
                 seed: int, normalise: dict, place: bool = False, safe: bool = False) -> dict[str, Any]:
    """Project one head with each job (see `pipeline.project_heads`); never raises."""
    return project_heads(atlas_path, model, layer, [head], jobs, rows, metric, seed, normalise, place, safe)[0]


def worker_setup(threads: int) -> None:
    """Run once in each worker process: every library there uses `threads` threads."""
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
    want = jsonable(params)
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
    device: str = "auto",
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

    dev = project_device(device)  # cuda: t-SNE and UMAP take the batched backend there (plan_jobs)
    jobs = plan_jobs(names, n_points, metric, seed, norm, max_points, place, reducer_params, dev)
    done = {}
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
            if (not same_rows or jsonable(old) != jsonable(params)) and not force:
                raise SettingsChanged(
                    f"{model!r} already has {name} layouts made with other settings; pass --force to replace "
                    f"them (existing layouts are kept otherwise).")
        layout_writer(atlas, model, name, rows, params, n_tokens, place)  # creates the arrays once, before any worker
        done[name] = atlas.layout_done(model, name)  # read under the claim: heads another run made are kept

    targets, skipped = [], 0
    for L in sel_layers:
        for h in sel_heads:
            todo = [j for j in jobs if force or not done[j.method][L, h]]
            skipped += len(jobs) - len(todo)
            if todo:
                targets.append((L, h, todo))

    summary: dict[str, Any] = {"model": model, "methods": names, "heads": len(sel_layers) * len(sel_heads),
                               "points": n_points, "sampled": len(rows) < n_tokens,
                               "adapted": {j.method: dict(j.adapted) for j in jobs},
                               "placed_points": 2 * (n_tokens - len(rows)) if place else 0,
                               "device": dev, "backends": {j.method: j.params.get("backend", "") for j in jobs},
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
    if dispatch is None and all_batched(jobs, metric, seed):
        groups: dict[tuple, list[int]] = {}
        for L, h, todo in targets:
            groups.setdefault((L, tuple(j.method for j in todo)), []).append(h)
        fn, calls = project_heads, [(*args, L, hs, [j for j in jobs if j.method in names_], *tail)
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
            set_threads(max(1, (os.cpu_count() or 1) // workers))  # as a worker has them: same layouts
            try:
                for call in calls:
                    res = fn(*call)
                    yield from (res if isinstance(res, list) else [res])
            finally:
                set_threads(saved)
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
