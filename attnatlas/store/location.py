"""Where an atlas lives: a local folder or any fsspec URL (s3://, gs://, memory://, ...).

`Location` is the small slice of `pathlib.Path` the store needs, on top of an fsspec filesystem, so
one code path serves both. Local folders keep plain paths (and `os.rename`, which is atomic);
object stores have no rename, so a folder "moves" by copying its files, marker file last.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec

from attnatlas.errors import StoreError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# fsspec `info` fields that change whenever an object is written anew (S3, GCS, Azure, memory, ...).
_VERSION_FIELDS = ("ETag", "etag", "LastModified", "last_modified", "generation", "updated", "md5Hash", "created",
                   "mtime", "size")


def is_url(value: Any) -> bool:
    """True for "protocol://..." other than file://, which is a local folder."""
    m = _URL.match(str(value))
    return bool(m) and m.group(1) != "file"


class Location:
    """A file or folder path on one fsspec filesystem; `str()` gives a local path or a URL."""

    def __init__(self, fs: Any, path: str, protocol: str | None = None):
        self.fs, self.path, self.protocol = fs, path, protocol  # protocol None: local

    @classmethod
    def of(cls, value: str | os.PathLike | Location) -> Location:
        if isinstance(value, Location):
            return value
        text = str(value)
        if not is_url(text):
            local = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser().absolute()
            return cls(fsspec.filesystem("file"), str(local))
        protocol = _URL.match(text).group(1)
        try:
            fs, path = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"Cannot open {text}: {exc} (install the fsspec driver for {protocol}://).") from None
        return cls(fs, path.rstrip("/"), protocol)

    # ---- Path-like -----------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.protocol is None

    def __truediv__(self, part: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, part) if not self.is_local else os.path.join(self.path, part),
                        self.protocol)

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.protocol}://{self.path.lstrip('/')}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self} is a URL, not a local path")
        return self.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def with_name(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(posixpath.dirname(self.path.rstrip("/")), name), self.protocol)

    def _fresh(self) -> Any:
        """The filesystem with no cached listing of this path: other processes (and Zarr's own
        filesystem instance) write to the store too, and s3fs & co cache listings."""
        if not self.is_local:
            self.fs.invalidate_cache(self.path)
        return self.fs

    def exists(self) -> bool:
        return bool(self._fresh().exists(self.path))

    def is_dir(self) -> bool:
        return bool(self._fresh().isdir(self.path))

    def is_file(self) -> bool:
        return bool(self._fresh().isfile(self.path))

    def version(self) -> tuple | None:
        """What tells this file's current version from an earlier one (inode and mtime, ETag, ...);
        None when there is no such file. One stat, or one HEAD request on an object store."""
        try:
            if self.is_local:
                st = os.stat(self.path)
                return (st.st_ino, st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None
            info = self._fresh().info(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if info.get("type") != "file":
            return None
        return tuple((k, str(info[k])) for k in _VERSION_FIELDS if k in info)

    def iterdir(self) -> list[Location]:
        if not self.is_dir():
            return []
        return [Location(self.fs, p.rstrip("/"), self.protocol) for p in self.fs.ls(self.path, detail=False)
                if p.rstrip("/") != self.path.rstrip("/")]

    def glob(self, pattern: str) -> list[Location]:
        """Direct children whose name matches `pattern` (no recursion)."""
        return [x for x in self.iterdir() if fnmatch.fnmatchcase(x.name, pattern)]

    def mkdir(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def open(self, mode: str = "rb") -> IO:
        return self.fs.open(self.path, mode)

    def writable(self) -> bool:
        return os.access(self.path, os.W_OK) if self.is_local else True

    def check_writable(self) -> None:
        """Create the folder and a probe file in it, or raise StoreError."""
        probe = self / f".write-test-{os.getpid()}-{id(self):x}"
        try:
            self.mkdir()
            self.fs.pipe_file(probe.path, b"")
            self.fs.rm_file(probe.path)
        except (OSError, PermissionError) as exc:
            raise StoreError(f"Cannot write to {self}: {getattr(exc, 'strerror', None) or exc}.") from None

    @contextmanager
    def atomic_write(self) -> Iterator[str]:
        """Yields where to write this file (path or URL); it appears whole or not at all. Local: a
        temp file then os.replace. Object stores publish an object only when its upload ends."""
        if not self.is_local:
            yield str(self)
            return
        tmp = self.with_name(f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            yield tmp.path
            os.replace(tmp.path, self.path)
        finally:
            if os.path.exists(tmp.path):
                os.remove(tmp.path)

    def rmtree(self, marker: str = "zarr.json") -> None:
        """Remove a folder and everything in it (`marker` first, so it stops counting as a store
        before it is half gone); missing is fine."""
        try:
            if not self.is_local and self.fs.isfile(self.path + "/" + marker):
                self.fs.rm_file(self.path + "/" + marker)
            self.fs.rm(self.path, recursive=True)
        except FileNotFoundError:
            pass

    def rename(self, dst: Location, marker: str = "zarr.json") -> None:
        """Move a folder to `dst` (which must not exist). Atomic on a local disk. On object stores
        every file is copied, `marker` last, so readers that look for the marker never see half."""
        if self.is_local:
            os.rename(self.path, dst.path)
            return
        files = sorted(self._fresh().find(self.path))
        last = posixpath.join(self.path, marker)
        for f in [f for f in files if f != last] + [f for f in files if f == last]:
            self.fs.copy(f, dst.path + f[len(self.path):])
        self.rmtree()
