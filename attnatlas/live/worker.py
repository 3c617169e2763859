"""The live worker: a separate process that runs the atlas's models for the dashboard (`serve --live`).

The dashboard never imports torch; it sends placement requests over a multiprocessing connection on a
local socket pair (nothing listens on the network) to one worker process, which loads each model the first
time it is asked for it and keeps it and every head's reference for later requests. This module is
imported by the server too, so it imports no torch at its top; only the spawned process does.

If the worker dies (killed, out of memory) while a request waits, that request gets one message and
the next request starts a fresh worker.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from attnatlas.errors import AtlasError

log = logging.getLogger(__name__)

FIRST_TIMEOUT = 600.0  # seconds: the first request of a model imports torch and loads its weights
TIMEOUT = 120.0


class LiveError(AtlasError):
    """A placement request that failed, in one message for the dashboard (bad input, unloadable weights,
    a worker that died)."""


class LiveWorker:
    """The server side of the channel: starts the worker, sends requests one at a time, restarts it after
    it died."""

    def __init__(self, atlas: str, device: str = "cpu"):
        self.atlas, self.device = str(atlas), device
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()
        self._warm: set[str] = set()  # models the current process has loaded
        self._starts = 0

    @property
    def restarts(self) -> int:
        """Workers started after the first one (each after one died or stopped answering)."""
        return max(0, self._starts - 1)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the process (models load on their first request, not here)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        # A fresh interpreter (`python -m attnatlas.live.worker`), not multiprocessing's spawn: spawn re-runs
        # the server's main script, which an embedding script may not guard with `if __name__ == "__main__"`.
        # The channel is a socket pair inherited by the child: local only, nothing listens.
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "attnatlas.live.worker", str(theirs.fileno()), self.atlas, self.device,
               str(os.getpid())]
        # OpenMP threads that spin after a job steal the cores from the next pool: faiss's after a search,
        # torch's forward pass then ran 0.3-1.3 s instead of 0.04 s (MiniLM, 27 tokens, 2 cores). Passive
        # waiting lets each library's threads sleep when idle.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self._proc, self._conn, self._warm = proc, Connection(ours.detach()), set()
        self._starts += 1

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                conn.send({"op": "stop"})
            except (OSError, ValueError):
                pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def request(self, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request and wait for its answer; LiveError with one message on any failure."""
        with self._lock:
            if not self.alive:
                if self._proc is not None:
                    self._stop()
                self._start()
            model = str(payload.get("model"))
            limit = timeout or (TIMEOUT if model in self._warm else FIRST_TIMEOUT)
            try:
                self._conn.send(payload)
            except (OSError, ValueError):
                self._stop()
                raise LiveError("The live worker could not be reached; it is restarted on the next request.") from None
            end = time.monotonic() + limit
            reply, late = None, False
            while True:
                try:
                    if self._conn.poll(0.05):
                        reply = self._conn.recv()
                        break
                except (EOFError, OSError):
                    break  # the worker closed its end: it is exiting
                if self._proc.poll() is not None:
                    break
                if time.monotonic() > end:
                    late = True
                    break
            if reply is None:
                code = None
                if not late:
                    try:
                        code = self._proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                self._stop()
                why = f"gave no answer within {limit:.0f} s" if late else f"stopped (exit code {code})"
                raise LiveError(f"The live worker {why} while placing your input; it is restarted on the next "
                                "request. The atlas is unchanged.")
            if not reply.get("ok"):
                raise LiveError(str(reply.get("error", "placing failed")))
            self._warm.add(model)
            return reply


# ---- the worker process ----------------------------------------------------------------------------------
def serve(conn: Any, atlas: str, device: str, parent_pid: int) -> None:
    """The worker's loop: one request at a time until 'stop' or the server goes away."""
    from attnatlas.project.pool import die_with_parent

    die_with_parent(parent_pid)  # never outlive the dashboard
    _one_search_thread()
    from attnatlas.live.place import Placer

    placer: Placer | None = None
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(req, dict) or req.get("op") == "stop":
            return
        try:
            placer = placer or Placer(atlas, device)
            reply = {"ok": True, **handle(placer, req)}
        except AtlasError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one failed request, not a dead worker
            log.exception("live request failed")
            reply = {"ok": False, "error": f"Placing failed: {type(exc).__name__}: {exc}"}
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def _one_search_thread() -> None:
    """A request searches tens of new points per head: faiss's thread pool costs more than it saves there
    (measured on the demo's MiniLM, 72 heads: 0.22 s with 2 threads, 0.07 s with 1)."""
    import importlib.util

    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(1)


def handle(placer: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Place one text or image into every head of one method; compact arrays for drawing."""
    from attnatlas.errors import InputError
    from attnatlas.live.encode import read_image_bytes
    from attnatlas.live.reference import place_heads

    if req.get("op") != "place":
        raise InputError(f"Unknown request {req.get('op')!r}.")
    model, method = str(req.get("model")), str(req.get("method"))
    placer.atlas.require_model(model)
    methods = placer.methods(model, [method])
    image = req.get("image")
    if image is not None:
        name = str(req.get("image_name") or "upload")
        kind, records = placer.check_input(model, images=read_image_bytes(bytes(image), name))
    else:
        kind, records = placer.check_input(model, texts=[str(req.get("text") or "")])
    t0 = time.perf_counter()
    fresh = model not in placer.load_seconds
    placer.model(model)
    t1 = time.perf_counter()
    enc = placer.encode(model, kind, records, bool(req.get("chunk", False)))
    t2 = time.perf_counter()
    cols = place_heads(placer.refs, model, methods[0], enc.queries, enc.keys)
    t3 = time.perf_counter()
    corpus = placer.atlas.tokens(model)["token"].to_numpy()
    tok = enc.tokens
    return {
        "model": model, "method": methods[0], "notes": enc.notes, "texts": enc.texts,
        "tokens": tok["token"].astype(str).tolist(), "positions": tok["position"].to_numpy(np.int32),
        "sequences": tok["sequence"].to_numpy(np.int32), "special": tok["is_special"].to_numpy(bool),
        "cols": {k: v for k, v in cols.items() if k != "skipped_heads"},
        "nearest_token": corpus[cols["nearest_row"]].astype(str).tolist(),
        "topk_index": enc.topk_index, "topk_weight": None if enc.topk_weight is None else enc.topk_weight.astype(np.float16),
        "seconds": {"load": (t1 - t0) if fresh else 0.0, "model": t2 - t1, "place": t3 - t2},
        "first_load": fresh,
    }


def main(argv: list[str]) -> int:
    """`python -m attnatlas.live.worker FD ATLAS DEVICE PARENT_PID` (started by LiveWorker)."""
    fd, atlas, device, parent = int(argv[0]), argv[1], argv[2], int(argv[3])
    serve(Connection(fd), atlas, device, parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
