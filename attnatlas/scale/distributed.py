"""Projection on Dask distributed: every head is one task.

The driver (`project_model`) creates each method's layout arrays before anything is submitted;
each head then writes only its own chunks (coords (1,1,2N,2), quality (1,1,4)), so workers need
no locks, and a task re-run after a lost worker rewrites the same chunks with the same values.

The atlas must be storage every worker reaches under the same name: a local folder for a
LocalCluster, a shared filesystem, or an fsspec URL (s3://bucket/atlas) for a real cluster;
workers are checked before any task runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from attnatlas.errors import AtlasError, InputError
from attnatlas.project.pool import THREAD_VARS

log = logging.getLogger(__name__)
RETRIES = 2  # each head's chunks are written idempotently, so a re-run is safe


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise InputError("Distributed projection needs dask[distributed]: pip install 'dask[distributed]'.") from None
    return distributed


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int = 2, threads_per_worker: int = 1, timeout: float = 10.0,
                processes: bool = True) -> Iterator[Any]:
    """A connected `distributed.Client`: `local` starts a LocalCluster of `workers` x
    `threads_per_worker`; `tcp://host:port` joins a running scheduler, failing within `timeout` s."""
    dd = _distributed()
    if scheduler == "local":
        env = {v: str(threads_per_worker) for v in THREAD_VARS}  # BLAS/numba threads match the worker's share
        kw: dict[str, Any] = dict(n_workers=workers, threads_per_worker=threads_per_worker, processes=processes,
                                  dashboard_address=None)
        if processes:
            kw["env"] = env
        cluster = dd.LocalCluster(**kw)
        try:
            with dd.Client(cluster, timeout=timeout) as client:
                yield client
        finally:
            cluster.close()
        return
    if "://" not in scheduler:
        raise InputError(f"--scheduler {scheduler!r}: use local or an address like tcp://host:8786.")
    t0 = time.monotonic()
    try:
        client = dd.Client(scheduler, timeout=timeout)
    except Exception as exc:  # OSError on timeout; garbage from a non-Dask port can raise anything
        raise AtlasError(f"Cannot reach a Dask scheduler at {scheduler} (gave up after "
                         f"{time.monotonic() - t0:.0f} s: {type(exc).__name__}: {str(exc)[:200]}). "
                         f"Start one with `dask scheduler` and workers with `dask worker {scheduler}`.") from None
    try:
        yield client
    finally:
        client.close()


def _worker_ready(path: str) -> str:
    """'' if this worker sees the atlas and can import the projection code, else why not.
    Importing here also pays sklearn/torch start-up before heads are timed."""
    try:
        from attnatlas.store.location import Location

        if not (Location.of(path) / "zarr.json").is_file():
            return f"no atlas at {path}"
        import sklearn.neighbors  # noqa: F401

        from attnatlas.project.reducers import set_threads

        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # oneDAL's pool does not read the variable
            set_threads(int(os.environ["OMP_NUM_THREADS"]))
    except Exception as exc:
        return f"cannot import the projection code ({type(exc).__name__}: {exc})"
    return ""


def check_workers(client: Any, atlas_path: str | os.PathLike, wait: float = 30.0) -> int:
    """Number of workers; raises if there are none or one cannot see the atlas folder."""
    deadline = time.monotonic() + wait
    while not client.scheduler_info().get("workers") and time.monotonic() < deadline:
        time.sleep(0.2)
    n = len(client.scheduler_info().get("workers", {}))
    if not n:
        raise AtlasError(f"The Dask scheduler has no workers (waited {wait:.0f} s); start some with `dask worker ADDRESS`.")
    try:
        seen = client.run(_worker_ready, str(atlas_path))
    except Exception as exc:  # e.g. attnatlas is not installed where the workers run
        raise AtlasError(f"Dask workers cannot run attnatlas code ({type(exc).__name__}: {str(exc)[:200]}); install "
                         f"the same attnatlas and Python packages on every worker.") from None
    bad = sorted((w, why) for w, why in seen.items() if why)
    if bad:
        raise AtlasError(f"{len(bad)} of {n} Dask worker(s) are not ready, e.g. {bad[0][0]}: {bad[0][1]}. Put the atlas "
                         f"on storage every worker reaches under the same path or URL, with attnatlas installed there.")
    return n


def dask_dispatch(client: Any, model: str, task: Callable[..., dict] | None = None,
                  retries: int = RETRIES) -> Callable[[Callable[..., dict], list[tuple]], Iterator[dict]]:
    """A `dispatch` for `project_model`: one task per head, results yielded as they finish.
    `task(fn, *call)` replaces `fn(*call)` when given (tests use it to slow or count heads)."""
    dd = _distributed()

    def dispatch(fn: Callable[..., dict], calls: list[tuple]) -> Iterator[dict]:
        token = uuid.uuid4().hex[:8]
        futures = {}
        for call in calls:
            L, h = call[2], call[3]  # (atlas_path, model, layer, head, jobs, rows, metric, seed, normalise)
            args = (fn, *call) if task else call
            f = client.submit(task or fn, *args, key=f"project-{model}-L{L}H{h}-{token}", pure=False, retries=retries)
            futures[f] = (L, h)
        for f in dd.as_completed(list(futures)):
            L, h = futures.pop(f)
            try:
                yield f.result()
            except Exception as exc:  # e.g. KilledWorker after repeated worker deaths: retried once on safe backends
                yield {"layer": L, "head": h, "results": {}, "errors": [], "died": f"{type(exc).__name__}: {exc}"}
            f.release()

    return dispatch


def project_distributed(client: Any, atlas: Any, model: str, task: Callable[..., dict] | None = None,
                        **kwargs: Any) -> dict[str, Any]:
    """`project_model` with each head a Dask task on `client`'s workers; same summary dict."""
    from attnatlas.project.runner import project_model
    from attnatlas.store import Atlas
    from attnatlas.store.location import Location

    path = atlas.path if isinstance(atlas, Atlas) else Location.of(atlas)
    check_workers(client, path)
    return project_model(Atlas.open(path), model, dispatch=dask_dispatch(client, model, task), **kwargs)
