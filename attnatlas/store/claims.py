"""One writer at a time per name: claims that say who holds them and die with their holder.

A claim is a small file under `<atlas>/models/.claims/`. On a local disk it is held with an exclusive
`flock`, which the kernel drops the moment the holder dies (even by SIGKILL), so a dead holder can never
keep it. Object stores have no locks: there the claim is an object carrying a heartbeat that its holder
refreshes every HEARTBEAT_S seconds; a claim whose heartbeat is older than STALE_S counts as dead, and so
does one whose holder ran on this host and is gone.
Either way the file says who holds the claim (pid, host, start, what it is doing), for the message the
next writer gets.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from attnatlas.store import faults
from attnatlas.store.location import Location

CLAIMS_DIR = ".claims"
HEARTBEAT_S = 5.0
STALE_S = 30.0


class ClaimBusy(Exception):
    """Another live process holds the claim; `holder` is what it wrote about itself (may be empty)."""

    def __init__(self, key: str, holder: dict[str, Any]):
        super().__init__(key)
        self.key, self.holder = key, holder

    def describe(self) -> str:
        h = self.holder
        if not h:
            return "another process"
        when = time.strftime("%H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
        return f"pid {h.get('pid', '?')} on {h.get('host', '?')} (since {when}: {h.get('doing', 'writing')})"


def _safe_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)


@dataclass
class Claim:
    """A held claim; `release()` (or leaving the `with` block) gives it up."""

    location: Location
    key: str
    info: dict[str, Any]
    _fd: int | None = None
    _token: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _beat: threading.Thread | None = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # an idle claim file names no holder
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            try:
                if read_holder(self.location).get("token") == self._token:
                    self.location.fs.rm_file(self.location.path)
            except (OSError, FileNotFoundError):
                pass


def read_holder(location: Location) -> dict[str, Any]:
    """What the current holder wrote about itself ({} when idle or unreadable)."""
    try:
        with location.open("rb") as f:
            raw = f.read()
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError, FileNotFoundError):
        return {}


def held_by(models_dir: Location, key: str) -> dict[str, Any] | None:
    """Who holds claim `key` now (what it wrote about itself, perhaps {}), or None when nobody does; takes
    nothing."""
    loc = claim_location(models_dir, key)
    if not loc.exists():
        return None
    if not loc.is_local:
        held = read_holder(loc)
        return held if _alive(held) else None
    import fcntl

    try:
        fd = os.open(loc.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only while no writer holds it
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return read_holder(loc)
        raise
    finally:
        os.close(fd)  # drops the probe's shared lock
    return None


def claim_location(models_dir: Location, key: str) -> Location:
    return models_dir / CLAIMS_DIR / f"{_safe_key(key)}.json"


def acquire(models_dir: Location, key: str, doing: str, extra: dict[str, Any] | None = None,
            wait: bool = False) -> Claim:
    """Take the claim `key`, or raise ClaimBusy (at once, or only after `wait`ing is impossible)."""
    loc = claim_location(models_dir, key)
    (models_dir / CLAIMS_DIR).mkdir()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "doing": doing, **(extra or {})}
    claim = _acquire_local(loc, key, info, wait) if loc.is_local else _acquire_object(loc, key, info, wait)
    faults.checkpoint("claim")
    return claim


def _acquire_local(loc: Location, key: str, info: dict[str, Any], wait: bool) -> Claim:
    import fcntl

    fd = os.open(loc.path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = read_holder(loc)
            if holder or attempt == 4:
                os.close(fd)
                raise ClaimBusy(key, holder) from None
            time.sleep(0.01)  # an empty file: a `held_by` probe, or a holder about to say who it is
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return Claim(loc, key, info, _fd=fd)


def _alive(held: dict[str, Any]) -> bool:
    """A holder is alive while its heartbeat is fresh; on this very host, only while its pid runs too."""
    if not held or time.time() - float(held.get("heartbeat", 0)) >= STALE_S:
        return False
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            pass
    return True


def _acquire_object(loc: Location, key: str, info: dict[str, Any], wait: bool) -> Claim:
    token = uuid.uuid4().hex
    while True:
        held = read_holder(loc)
        if not _alive(held):
            loc.fs.pipe_file(loc.path, json.dumps({**info, "token": token, "heartbeat": time.time()}).encode())
            time.sleep(0.5)  # a rival that wrote at the same moment wins or loses by the read-back
            if read_holder(loc).get("token") == token:
                break
            held = read_holder(loc)
        if not wait:
            raise ClaimBusy(key, held)
        time.sleep(HEARTBEAT_S)
    claim = Claim(loc, key, info, _token=token)

    def beat() -> None:
        while not claim._stop.wait(HEARTBEAT_S):
            try:
                loc.fs.pipe_file(loc.path, json.dumps({**info, "token": token, "heartbeat": time.time()}).encode())
            except OSError:
                pass

    claim._beat = threading.Thread(target=beat, daemon=True, name=f"attnatlas-claim-{key}")
    claim._beat.start()
    return claim
