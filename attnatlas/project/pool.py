"""Per-head work in child processes, so that native code which aborts, segfaults, hangs or is OOM-killed
fails only the call it was running (pebble's pool replaces the dead worker; the other calls go on).

`run_in_children(fn, calls, ...)` yields `(index, result)` as calls finish, where a call whose process
died is a `Died` (one line naming the cause, and what it was doing when it died, from `mark`).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Thread-count variables a spawned worker reads at start, set to its share of the cores.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
_STAGE_FILE: Path | None = None  # in a worker: where `mark` records what the current call is doing


@dataclass(frozen=True)
class Died:
    """A call whose process ended without a result."""

    cause: str  # one line, e.g. "the process was killed by SIGSEGV (a crash in native code)"
    stage: str  # what it was doing then ("tsne", "knn graph", ...), "" when unknown


def mark(stage: str) -> None:
    """Record what this call is doing now, so that a crash can be attributed (no-op outside a pool call)."""
    if _STAGE_FILE is not None:
        _STAGE_FILE.write_text(stage)


def signal_cause(exitcode: int | None) -> str:
    """Plain words for a worker's exit code (negative: the signal that ended it)."""
    if exitcode is None or exitcode >= 0:
        return f"the process exited with code {exitcode} without a result"
    sig = -exitcode
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    why = {signal.SIGSEGV: "a crash in native code", signal.SIGABRT: "an abort in native code",
           signal.SIGBUS: "a crash in native code", signal.SIGKILL: "most often: out of memory"}.get(sig, "")
    return f"the process was killed by {name}" + (f" ({why})" if why else "")


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (spawned workers, also replacements, read them at start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def die_with_parent(parent_pid: int) -> None:
    """End this worker process the moment its driver dies (even by SIGKILL), so no orphan keeps writing
    into layouts another run may own by then. Linux: the kernel's parent-death signal; elsewhere a
    thread that watches the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the driver died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="attnatlas-parent-watch").start()


def _init_worker(threads: int, parent_pid: int, setup: Callable[[int], None] | None) -> None:
    die_with_parent(parent_pid)
    if setup is not None:
        setup(threads)


def _traced(stage_file: str, fn: Callable[..., Any], *args: Any) -> Any:
    global _STAGE_FILE
    _STAGE_FILE = Path(stage_file)
    try:
        return fn(*args)
    finally:
        _STAGE_FILE = None


_POOL: tuple[tuple, Any] | None = None  # (settings, pebble pool): kept between runs, its start-up paid once


def _pool(workers: int, threads: int, setup: Callable[[int], None] | None) -> Any:
    """A pool of `workers` spawned processes with `threads` threads each; the one kept from the previous run
    when its settings match (a new process imports torch and friends: seconds)."""
    global _POOL
    from pebble import ProcessPool

    key = (workers, threads, setup, os.getpid())
    if _POOL is not None and _POOL[0] == key and _POOL[1].active:
        return _POOL[1]
    close_pool()
    # A worker that dies natively leaves its named semaphores to the resource tracker, which unlinks them at
    # exit but warns of "leaked semaphore objects": noise after a crash already reported. The tracker is a
    # process of its own, so its warning filter comes through the environment it starts with.
    with environ({"PYTHONWARNINGS": "ignore::UserWarning:multiprocessing.resource_tracker"}):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    with environ({v: str(threads) for v in THREAD_VARS}):  # read by each worker at start (replacements too)
        pool = ProcessPool(workers, initializer=_init_worker, initargs=(threads, os.getpid(), setup),
                           context=mp.get_context("spawn"))
    _POOL = (key, pool)
    return pool


def close_pool() -> None:
    """Stop the kept worker processes (also at exit)."""
    global _POOL
    if _POOL is not None:
        _POOL[1].stop()
        _POOL[1].join()
        _POOL = None


atexit.register(close_pool)


def run_in_children(fn: Callable[..., Any], calls: list[tuple], workers: int, timeout: float | None = None,
                    setup: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Run `fn(*call)` for every call in `workers` spawned processes; yield (call index, result or `Died`)
    as each finishes. `setup(threads)` runs once in each worker (its share of the cores). An exception
    that `fn` raises is raised here, after the pool is stopped."""
    from pebble import ProcessExpired

    workers = max(1, min(workers, len(calls)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    stages = tempfile.mkdtemp(prefix="attnatlas-stages-")
    finished = False
    try:
        pool = _pool(workers, threads, setup)
        futures = {}
        for i, call in enumerate(calls):
            f = pool.schedule(_traced, (os.path.join(stages, str(i)), fn, *call), timeout=timeout)
            futures[f] = i
        for f in as_completed(futures):
            i = futures.pop(f)
            try:
                yield i, f.result()
            except ProcessExpired as e:
                yield i, Died(signal_cause(e.exitcode), _stage(stages, i))
            except FutureTimeout:
                yield i, Died(f"no result within {timeout:.0f} s, so the process was stopped", _stage(stages, i))
        finished = True
    finally:
        if not finished:  # an error or an interrupt: calls may still run; stop them
            close_pool()
        shutil.rmtree(stages, ignore_errors=True)


def _stage(stages: str, i: int) -> str:
    try:
        return Path(stages, str(i)).read_text()
    except OSError:
        return ""
