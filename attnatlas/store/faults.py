"""Named points in the write protocol where tests kill the writer.

`ATTNATLAS_KILL_AT=step[:n]` makes the n-th (default first) pass through `checkpoint(step)` SIGKILL its
own process, so a test can stop a writer exactly after a given rename, chunk or metadata write instead of
at a random time. Unset (always, outside tests) a checkpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "ATTNATLAS_KILL_AT"
_counts: dict[str, int] = {}
_lock = threading.Lock()


def checkpoint(step: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, nth = spec.rpartition(":")
    if not nth.isdigit():  # "rename:trash" is a step name, "chunk:3" its third pass
        name, nth = spec, "1"
    if name != step:
        return
    with _lock:
        _counts[step] = _counts.get(step, 0) + 1
        hit = _counts[step] == int(nth or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
