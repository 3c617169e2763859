"""The atlas on disk: Zarr arrays per model (one chunk column per head) and Parquet token tables.

An atlas is a local folder or any fsspec URL (s3://bucket/atlas, memory://x); see location.py.

Layout of an atlas folder:
    zarr.json                      root group, attrs {"attnatlas_format": FORMAT_VERSION}
    models/<name>/                 one model, written atomically (temp folder, then rename)
        queries   (layer, head, token, d_head)
        keys      (layer, kv_head, token, d_head)
        values    (layer, kv_head, token, d_head)          optional
        attn_topk_index  (layer, head, token, k) int32     optional, global token rows, -1 = none
        attn_topk_weight (layer, head, token, k) float16   optional
        hidden    (layer + 1, token, d_model)              optional, embeddings first
        attention_c2p_keys, attention_p2c_queries (layer, head, 2 * span, d_head) float32
                                                   DeBERTa: position tables of its attention recipe
        tokens.parquet, sequences.parquet
        layouts/<method>/coords  (layer, head, 2 * points, 2) float32, queries first then keys
        layouts/<method>/quality (layer, head, len(QUALITY_FIELDS)) float32, NaN = not done
        layouts/<method>/rows    (points,) int64, token rows used (a sample when capped)
        analysis/...             per-model results of later stages
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from attnatlas.errors import StoreError
from attnatlas.store import claims, faults
from attnatlas.store.location import Location
from attnatlas.store.shards import ShardFiles, block_rows, shard_files

FORMAT_VERSION = 1
# fallback: 1 when the head was laid out on the safe backends, after its first process died (crash, hang, OOM).
QUALITY_FIELDS = ("trustworthiness", "knn_kept", "seconds", "points", "fallback")
# Faithfulness of the tokens placed into a capped layout (not laid out themselves), measured apart.
PLACED_FIELDS = ("trustworthiness", "knn_kept", "points")
TOKEN_ROW_GROUP = 65_536  # token rows buffered per Parquet row group: few conversions, bounded memory
log = logging.getLogger(__name__)
_INCOMING = ".incoming-"
_TRASH = ".trash-"  # the old copy during an overwrite: the marker that a swap is under way
_DELETED = ".deleted-"  # a deleted model on its way out: never restored


def tokens_per_chunk(d_head: int, heads: int | None = None, column_bytes: int = 64 << 20) -> int:
    """Tokens per chunk of one head's float16 rows: at least 256 KiB (and 1024 tokens), so a head reads in a few
    files; up to 1 MiB while one chunk column of all `heads` (what a writer buffers for an object store) stays
    within `column_bytes`, because Zarr spends about 0.5 ms on every chunk it writes, whatever its size."""
    row = 2 * d_head
    floor = max(1024, 2 ** round(np.log2((1 << 18) / row)))
    fit = min(1 << 20, column_bytes // heads) // row if heads else 0
    return int(max(floor, 2 ** int(np.log2(fit)) if fit >= 1 else 0))


# A model name is an identifier: it reaches file names, URLs, HTML and JS, so no markup or path characters.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Temp and trash folders of a write of model NAME: .incoming-NAME-PID-HEX, .trash-NAME-HEX, .deleted-NAME-HEX.
_SIDE_FOLDER = re.compile(r"\.incoming-(?P<incoming>.+)-\d+-[0-9a-f]{8}|\.(?:trash|deleted)-(?P<old>.+)-[0-9a-f]{8}")


def check_name(name: str) -> str:
    """A model name for writing: letters, digits, '.', '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "models":
        raise StoreError(f"Invalid model name {name!r}: use up to 128 letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit.")
    return name


def _readable_name(name: str) -> bool:
    """Names of models already stored (perhaps by an older version) only need to be safe as a path."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")


def side_folder_owner(folder: str) -> str | None:
    """The model name a temp/trash folder belongs to, matched whole (so 'mini' never claims 'mini-2's)."""
    m = _SIDE_FOLDER.fullmatch(folder)
    return (m.group("incoming") or m.group("old")) if m else None


@dataclass
class ArraySpec:
    """Shape and dtype of one array a model writer fills token by token."""

    shape: tuple[int, ...]  # token axis is `token_axis`
    dtype: str
    token_axis: int
    chunks: tuple[int, ...]
    compress: bool = False
    per_token: bool = True  # False: one row per sequence (e.g. processed images), not per token
    shards: tuple[int, ...] | None = None  # chunks stored together in one file (each still read on its own)


MAX_PENDING_WRITES = 2  # chunk columns queued for the write thread (each in its own buffer: bounded memory)


@dataclass
class _Buffer:
    """Holds one chunk-column of token rows so Zarr only ever sees whole, aligned chunks (or, for an array written
    straight to its shard files, one block of rows). With writes in the background two arrays take turns: one
    fills while the other is being written, so a flush hands its array over without a copy."""

    spec: ArraySpec
    data: np.ndarray
    spare: np.ndarray | None = None  # made at the first background flush
    start: int = 0  # global token row of data[..., 0, ...]
    fill: int = 0
    spare_write: Future | None = None  # the write still reading `spare`


class ModelWriter:
    """Streams one model's arrays into a temp folder; `commit` makes it visible in one rename."""

    def __init__(self, atlas: Atlas, name: str, n_tokens: int, specs: dict[str, ArraySpec], attrs: dict[str, Any],
                 claim: claims.Claim | None = None, background: bool = True):
        self.atlas, self.name, self.n_tokens, self.claim = atlas, name, n_tokens, claim
        self.background = background  # chunk columns written on a thread of their own, else in the caller's
        self.temp = atlas.path / "models" / f"{_INCOMING}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.attrs = dict(attrs)
        self.arrays: dict[str, Any] = {}
        self.buffers: dict[str, _Buffer] = {}
        self._shard_files: dict[str, ShardFiles | None] = {}  # arrays written straight to their shard files
        self.committed = False
        self._io = ThreadPoolExecutor(1, thread_name_prefix="attnatlas-write")
        self._writes: deque[Future] = deque()
        try:
            self._create(specs)
        except BaseException:
            self.abort()  # e.g. a full disk while creating the arrays: leave nothing behind
            raise

    def _create(self, specs: dict[str, ArraySpec]) -> None:
        self.group = zarr.open_group(str(self.temp), mode="w", attributes={})
        for key, spec in specs.items():
            self.arrays[key] = self.group.create_array(
                key,
                shape=spec.shape,
                dtype=spec.dtype,
                chunks=spec.chunks,
                compressors="auto" if spec.compress else None,
                fill_value=-1 if spec.dtype.startswith("int") else 0,
                shards=spec.shards,
                # Chunk files side by side ("c.0.1.0"), not a folder per layer and head: creating the folders cost
                # more than writing the data. Every chunk is written once, whole, so Zarr's comparison of each
                # with the fill value would only cost time.
                chunk_key_encoding={"name": "default", "separator": "."},
                config={"write_empty_chunks": True},
            )
            files = self._shard_files[key] = shard_files(self.arrays[key])
            buf_shape = list(spec.shape)
            rows = spec.chunks[spec.token_axis]
            if files is not None:  # written into the shard files block by block: a small buffer, reused
                token_bytes = np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape)) // spec.shape[spec.token_axis]
                rows = block_rows(rows, token_bytes)
            buf_shape[spec.token_axis] = rows
            self.buffers[key] = _Buffer(spec, _buffer(buf_shape, spec.dtype))
        # Token and sequence rows go out as Parquet row groups every TOKEN_ROW_GROUP tokens.
        self._tables = {"tokens": _TableStream(self.temp / "tokens.parquet"),
                        "sequences": _TableStream(self.temp / "sequences.parquet")}
        self._pending_rows = 0
        self.rows_written = 0
        # In the background, Zarr writes run on one thread (self._io) while the next batch computes; at most
        # MAX_PENDING_WRITES chunk columns wait, so memory stays bounded.

    def append(self, arrays: dict[str, Any], tokens: pd.DataFrame | pa.Table, sequences: pd.DataFrame | pa.Table) -> None:
        """Add the next `len(tokens)` token rows of every array (token axis as in the spec). An array is an
        ndarray, or has `shape` and `fill(out, start, stop)`, which writes its token rows start:stop into `out`."""
        n = len(tokens)
        for key, block in arrays.items():
            self._append_array(key, block, n)
        self._tables["tokens"].pending.append(tokens)
        self._tables["sequences"].pending.append(sequences)
        self._pending_rows += n
        if self._pending_rows >= TOKEN_ROW_GROUP:
            self._write_tables()
        self.rows_written += n

    def _write_tables(self) -> None:
        for stream in self._tables.values():
            stream.write()
        self._pending_rows = 0

    def _append_array(self, key: str, block: np.ndarray, n: int) -> None:
        buf = self.buffers[key]
        ax = buf.spec.token_axis
        if not buf.spec.per_token:
            n = block.shape[ax]
        elif block.shape[ax] != n:
            raise ValueError(f"{key}: {block.shape[ax]} token rows, expected {n}")
        size = buf.data.shape[ax]
        column = buf.spec.chunks[ax]
        done = 0
        while done < n:
            # A buffer of blocks (shard files) is also written out where a chunk column ends.
            take = min(n - done, size - buf.fill, column - (buf.start + buf.fill) % column)
            dst = [slice(None)] * buf.data.ndim
            dst[ax] = slice(buf.fill, buf.fill + take)
            if isinstance(block, np.ndarray):
                src = [slice(None)] * block.ndim
                src[ax] = slice(done, done + take)
                buf.data[tuple(dst)] = block[tuple(src)]
            else:  # rows that lay themselves out into the buffer (extract's q and k): no copy in between
                block.fill(buf.data[tuple(dst)], done, done + take)
            buf.fill += take
            done += take
            if buf.fill == size or (buf.start + buf.fill) % column == 0:
                self._flush(key)

    def _flush(self, key: str) -> None:
        buf = self.buffers[key]
        if buf.fill == 0:
            return
        column = (self.arrays[key], self._shard_files.get(key), buf.spec.token_axis, buf.start, buf.fill)
        if not self.background:  # written now; the same array fills again
            _write_column(*column, buf.data)
            buf.start += buf.fill
            buf.fill = 0
            return
        while len(self._writes) >= MAX_PENDING_WRITES:
            self._writes.popleft().result()  # re-raises a failed write here
        if buf.spare_write is not None:
            buf.spare_write.result()  # the spare array is free again once its write has landed
        if buf.spare is None:
            buf.spare = _buffer(list(buf.data.shape), buf.spec.dtype)
        write = self._io.submit(_write_column, *column, buf.data)
        self._writes.append(write)
        buf.data, buf.spare, buf.spare_write = buf.spare, buf.data, write
        buf.start += buf.fill
        buf.fill = 0

    def _drain(self) -> None:
        while self._writes:
            self._writes.popleft().result()

    def write_array(self, key: str, data: np.ndarray) -> None:
        """Write a whole small array that is not per token (e.g. tables the attention recipe points to) as one
        uncompressed chunk; read back with `Atlas.array`. Call before `commit`."""
        if key in self.arrays:
            raise ValueError(f"{key}: the model already has an array of that name")
        data = np.ascontiguousarray(data)
        self.arrays[key] = self.group.create_array(key, shape=data.shape, dtype=data.dtype,
                                                   chunks=tuple(max(1, s) for s in data.shape), compressors=None)
        self.arrays[key][...] = data

    def commit(self, overwrite: bool = False) -> None:
        if self.rows_written != self.n_tokens:
            raise RuntimeError(f"wrote {self.rows_written} token rows, expected {self.n_tokens}")
        for key in self.buffers:
            self._flush(key)
        self._write_tables()  # while the last chunk columns are written
        for stream in self._tables.values():
            stream.close()
        self._drain()
        self._io.shutdown()
        self._close_shard_files()
        # "created" is written last: recovery takes a temp folder that has it as a whole model.
        self.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.group.update_attributes(_jsonable(self.attrs))  # one write of zarr.json (attrs.update writes per key)
        faults.checkpoint("attrs")
        self.atlas._install_model(self.temp, self.name, overwrite)
        self.committed = True
        self._release()

    def abort(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._close_shard_files()
        for stream in getattr(self, "_tables", {}).values():
            try:
                stream.close()
            except Exception:
                pass
        _remove_settled(self.temp)
        self._release()

    def _close_shard_files(self) -> None:
        for files in getattr(self, "_shard_files", {}).values():
            if files is not None:
                files.close()

    def _release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def _buffer(shape: list[int], dtype: str) -> np.ndarray:
    """An uninitialised write buffer, laid out as Zarr stores it (copying chunks out of a token-major buffer cost
    Zarr 90 ms per 64 MiB against 67 ms, more than laying batches into it saved). A large buffer gets its own
    mapping with transparent huge pages asked for: its first touch then costs a tenth (measured: 64 MiB in
    12 ms, against 90-140 ms for np.empty's)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


def _write_column(array: Any, shard_files: ShardFiles | None, axis: int, start: int, fill: int, data: np.ndarray) -> None:
    """Write token rows start:start + fill of one chunk column (or, with shard files, of one block) from `data`,
    its buffer (rows 0:fill)."""
    if shard_files is not None:
        shard_files.write(start, data[:, :, :fill])
    else:
        dst = [slice(None)] * data.ndim
        dst[axis] = slice(start, start + fill)
        src = [slice(None)] * data.ndim
        src[axis] = slice(0, fill)
        array[tuple(dst)] = data[tuple(src)]
    faults.checkpoint("chunk")


def _remove_settled(folder: Location, tries: int = 6) -> None:
    """Remove a folder that writes may still be landing in: after a failed write Zarr's own event loop
    can finish sibling chunk writes after the error surfaced, so remove until it stays gone."""
    for i in range(tries):
        try:
            folder.rmtree()
        except OSError:
            pass
        time.sleep(0.05 * (i + 1))
        if not folder.exists():
            return


@dataclass
class _TableStream:
    """One Parquet file written as row groups; the first group fixes the schema."""

    path: Location
    pending: list[pd.DataFrame | pa.Table] = field(default_factory=list)
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    file: Any = None

    def write(self) -> None:
        if not self.pending:
            return
        if all(isinstance(t, pa.Table) for t in self.pending):  # extract's text batches: no pandas round trip
            table = pa.concat_tables(self.pending)
        else:
            table = pa.Table.from_pandas(pd.concat([t.to_pandas() if isinstance(t, pa.Table) else t for t in self.pending],
                                                   ignore_index=True), preserve_index=False)
        if self.writer is None:
            self.schema = table.schema
            if self.path.is_local:  # Arrow's own file writer
                self.writer = pq.ParquetWriter(self.path.path, table.schema)
            else:
                self.file = self.path.open("wb")
                self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table.cast(self.schema))
        self.pending = []
        faults.checkpoint("table")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.file is not None:
            self.file.close()
            self.file = None


def _jsonable(obj: Any) -> Any:
    """Attrs must survive json.dumps: numpy scalars and tuples become plain types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@dataclass
class LayoutWriter:
    """Writes one head at a time; each head owns its own chunks, so parallel writers need no locks."""

    coords: Any
    quality: Any
    placed_quality: Any = None

    def write_head(self, layer: int, head: int, xy: np.ndarray, quality: dict[str, float],
                   placed: dict[str, float] | None = None) -> None:
        self.coords[layer, head] = xy.astype(np.float32)
        if self.placed_quality is not None and placed is not None:
            self.placed_quality[layer, head] = np.array([placed.get(f, np.nan) for f in PLACED_FIELDS], dtype=np.float32)
        # Quality last: a head counts as done only once its coordinates are on disk.
        fields = QUALITY_FIELDS[: self.quality.shape[-1]]  # an older layout may have fewer
        self.quality[layer, head] = np.array([quality.get(f, np.nan) for f in fields], dtype=np.float32)
        faults.checkpoint("head")


@dataclass
class ModelInfo:
    """What one stored model is, read from its attrs."""

    name: str
    attrs: dict[str, Any] = field(repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.attrs["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.attrs["n_heads"])

    @property
    def n_kv_heads(self) -> int:
        return int(self.attrs["n_kv_heads"])

    @property
    def d_head(self) -> int:
        return int(self.attrs["d_head"])

    @property
    def modality(self) -> str:
        return str(self.attrs.get("modality", "text"))

    def kv_head(self, head: int) -> int:
        """The key/value head that serves query head `head` (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)


class Atlas:
    """An atlas folder. Reading needs no torch; every array read returns float32 numpy.

    An installed model never changes in place (a new one replaces it whole, `zarr.json` last), so its
    metadata, tables and array handles are read once and kept while its `zarr.json` is the same file:
    one stat per read instead of several opens, which on object stores are requests each."""

    def __init__(self, path: Location, root: Any):
        self.path = path
        self.root = root
        self._token_cache: dict[str, pd.DataFrame] = {}
        self._seq_cache: dict[str, pd.DataFrame] = {}
        self._info_cache: dict[str, ModelInfo] = {}
        self._array_cache: dict[tuple[str, str], Any] = {}
        self._versions: dict[str, tuple] = {}
        self._first_versions: dict[str, tuple] = {}  # the copy of each model this object read first

    # ---- opening and creating -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | Location, create: bool = False) -> Atlas:
        p = Location.of(path)
        meta = p / "zarr.json"
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not an atlas folder.")
        if p.is_dir() and meta.is_file():
            try:
                root = zarr.open_group(str(p), mode="r+" if p.writable() else "r")
            except Exception as exc:
                raise StoreError(f"{p} holds a broken zarr.json and is not a readable atlas ({exc}).") from None
            if "attnatlas_format" not in root.attrs:
                raise StoreError(f"{p} is a Zarr store but not an attnatlas atlas; choose another --out.")
            if int(root.attrs["attnatlas_format"]) > FORMAT_VERSION:
                raise StoreError(f"{p} was written by a newer attnatlas (format {root.attrs['attnatlas_format']}).")
            atlas = cls(p, root)
            atlas.recover_interrupted()
            return atlas
        if not create:
            raise StoreError(f"No atlas at {p}. Create one with `attnatlas extract ... --out {p}`.")
        if p.is_dir() and p.iterdir():
            raise StoreError(f"{p} is a non-empty folder that is not an atlas; choose an empty or new --out.")
        p.check_writable()
        root = zarr.open_group(str(p), mode="w", attributes={"attnatlas_format": FORMAT_VERSION})
        root.require_group("models")
        return cls(p, root)

    @classmethod
    def open_or_plan(cls, path: str | os.PathLike | Location) -> Atlas | None:
        """The atlas at `path` if there is one, else None once it is clear one can be created there
        (nothing is created yet: a command that fails before writing leaves no empty atlas behind)."""
        p = Location.of(path)
        if p.is_dir() and (p / "zarr.json").is_file():
            return cls.open(p)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} is a file, not an atlas folder.")
        if p.is_dir() and p.iterdir():
            raise StoreError(f"{p} is a non-empty folder that is not an atlas; choose an empty or new --out.")
        if p.is_local:
            parent = next((str(a) for a in [Path(p.path), *Path(p.path).parents] if a.exists()), None)
            if parent is None or not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
                raise StoreError(f"Cannot create an atlas at {p}: {parent or 'its parent'} is not a writable folder.")
        return None

    def _model_dir(self, name: str) -> Location:
        return self.path / "models" / name

    @property
    def models(self) -> list[str]:
        d = self.path / "models"
        if not d.is_dir():
            return []
        return sorted(x.name for x in d.iterdir() if not x.name.startswith(".") and (x / "zarr.json").is_file())

    def group(self, model: str) -> Any:
        self.require_model(model)
        return zarr.open_group(str(self._model_dir(model)), mode="r+" if self.path.writable() else "r")

    def resolve_model(self, model: str | None) -> str:
        """`model` if given (and present), else the atlas's only model."""
        if model is not None:
            self.require_model(model)
            return model
        if len(self.models) != 1:
            raise StoreError(f"Pass --model: the atlas holds {', '.join(self.models) or 'no models'}.")
        return self.models[0]

    def require_model(self, model: str) -> None:
        """StoreError unless `model` is installed; forget what was read of it if it was replaced since."""
        version = (self._model_dir(model) / "zarr.json").version() if _readable_name(model) else None
        if version is None:
            have = ", ".join(self.models) or "none"
            raise StoreError(f"Model {model!r} is not in the atlas {self.path} (it holds: {have}).")
        if self._versions.get(model) != version:
            self._forget(model)
            self._versions[model] = version
        self._first_versions.setdefault(model, version)

    def info(self, model: str) -> ModelInfo:
        self.require_model(model)
        if model not in self._info_cache:
            self._info_cache[model] = ModelInfo(model, dict(self.group(model).attrs))
        return self._info_cache[model]

    # ---- writing a model ---------------------------------------------------------------------
    @contextmanager
    def model_writer(
        self, name: str, n_tokens: int, specs: dict[str, ArraySpec], attrs: dict[str, Any], overwrite: bool = False,
        background: bool = True,
    ) -> Iterator[ModelWriter]:
        """A writer of model `name` (see ModelWriter). `background`: chunk columns are written on a thread of
        their own while the caller computes the next batch (each buffer then needs a second array)."""
        check_name(name)
        claim = self.claim_model(name, "extract")
        try:
            self.recover(name)
            if name in self.models and not overwrite:
                raise StoreError(f"The atlas already holds a model named {name!r}; pass --overwrite or choose another --name.")
            if name in self.models:
                self.refuse_while_projected(name, "replacing")
            writer = ModelWriter(self, name, n_tokens, specs, attrs, claim, background)
        except BaseException:
            claim.release()
            raise
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        if not writer.committed:
            writer.abort()

    # ---- the write protocol: one writer per name, swaps that survive a kill ----------------------------------
    def claim_model(self, name: str, doing: str) -> claims.Claim:
        """Become the only writer of model `name`, or StoreError naming who is."""
        try:
            return claims.acquire(self.path / "models", f"model.{name}", f"{doing} {name}")
        except claims.ClaimBusy as busy:
            raise StoreError(f"Model {name!r} in {self.path} is being written by {busy.describe()}; "
                             "wait for it to finish, or choose another --name.") from None

    def claim_layout(self, model: str, method: str, params: str, wait: bool = False) -> claims.Claim:
        """Become the only writer of `method` layouts of `model` (made with `params`), or claims.ClaimBusy."""
        return claims.acquire(self.path / "models", f"layout.{model}.{method}", f"project {model} {method}",
                              {"model": model, "params": params}, wait=wait)

    def projections_of(self, name: str) -> list[str]:
        """Who is projecting model `name` right now (live holders of its layout claims), described."""
        d = self.path / "models"
        try:
            files = (d / claims.CLAIMS_DIR).glob(f"layout.{name}.*.json")
        except (OSError, FileNotFoundError):
            return []
        busy = []
        for f in files:
            held = claims.held_by(d, f.name[: -len(".json")])
            if held is not None and held.get("model") == name:  # "layout.a.b.tsne" may be model "a.b"'s
                busy.append(claims.ClaimBusy(f.name, held).describe())
        return busy

    def writer_of(self, name: str) -> str | None:
        """Who is writing model `name` right now (an extract or a delete), described; a recovery does not count."""
        held = claims.held_by(self.path / "models", f"model.{name}")
        if held is None or str(held.get("doing", "")).startswith("recover"):
            return None
        return claims.ClaimBusy(name, held).describe()

    def refuse_while_projected(self, name: str, doing: str) -> None:
        """StoreError when a projection is writing into model `name`, which `doing` would replace or remove."""
        busy = self.projections_of(name)
        if busy:
            raise StoreError(f"Model {name!r} in {self.path} is being projected by {busy[0]}; {doing} it would pull "
                             "the vectors from under that run. Wait for it to finish; the atlas is unchanged.")

    def recover(self, name: str) -> None:
        """Finish or undo an interrupted write of `name` and remove its leftovers; the caller holds the
        name's claim, so every temp folder of `name` belongs to a writer that died.

        A swap (overwrite) moves the old copy to .trash-NAME-*, then the new one into place. Killed between
        the two, the new copy is rolled forward if it was complete ("created" written), else the old one back."""
        d = self.path / "models"
        side = [x for x in d.iterdir() if side_folder_owner(x.name) == name]
        final = self._model_dir(name)
        if not (final / "zarr.json").is_file():
            if final.exists():
                final.rmtree()  # half a copy (object stores move folders file by file, marker last)
            olds = [x for x in side if x.name.startswith(_TRASH) and (x / "zarr.json").is_file()]
            if olds:
                done = [x for x in side if x.name.startswith(_INCOMING) and _created(x)]
                pick = max(done or olds, key=_created)
                pick.rename(final)
                side.remove(pick)
                log.warning("model %r: an interrupted overwrite was %s", name,
                            "completed (the new copy was whole)" if done else "undone (the old copy is back)")
        for x in side:
            _remove_settled(x)
        self._forget(name)

    def recover_interrupted(self) -> None:
        """On open: recover every model whose writer died mid-write (its claim is free), so a killed swap
        never leaves a model missing. Models whose writer is alive, or a read-only atlas, are left alone."""
        d = self.path / "models"
        if not self.path.writable():
            return
        try:
            names = {side_folder_owner(x.name) for x in d.iterdir()} - {None}
        except OSError:
            return
        for name in sorted(names):
            try:
                with claims.acquire(d, f"model.{name}", f"recover {name}"):
                    self.recover(name)
            except (claims.ClaimBusy, OSError):
                continue

    def _install_model(self, temp: Location, name: str, overwrite: bool) -> None:
        final = self._model_dir(name)
        if (final / "zarr.json").is_file():
            if not overwrite:
                raise StoreError(f"The atlas already holds a model named {name!r}.")
            self.refuse_while_projected(name, "replacing")  # again: a projection may have started meanwhile
            trash = final.with_name(f"{_TRASH}{name}-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            faults.checkpoint("rename:trash")
            temp.rename(final)
            faults.checkpoint("rename:final")
            trash.rmtree()
            faults.checkpoint("cleanup")
        else:
            temp.rename(final)
            faults.checkpoint("rename:final")
        self._forget(name)
        self._first_versions.pop(name, None)  # replaced by this object itself: what it reads next is the new copy

    def delete_model(self, name: str) -> None:
        self.require_model(name)
        with self.claim_model(name, "delete"):
            self.refuse_while_projected(name, "deleting")
            gone = self._model_dir(name).with_name(f"{_DELETED}{name}-{uuid.uuid4().hex[:8]}")
            self._model_dir(name).rename(gone)
            self._forget(name)
            self._first_versions.pop(name, None)
            gone.rmtree()

    def _forget(self, name: str) -> None:
        """Drop what this object read of model `name` (it was replaced or deleted)."""
        for cache in (self._token_cache, self._seq_cache, self._info_cache, self._versions):
            cache.pop(name, None)
        for key in [k for k in self._array_cache if k[0] == name]:
            del self._array_cache[key]

    # ---- reading vectors ---------------------------------------------------------------------
    def tokens(self, model: str) -> pd.DataFrame:
        """One row per stored token, aligned with the token axis of every array."""
        self.require_model(model)
        if model not in self._token_cache:
            self._token_cache[model] = pd.read_parquet(str(self._model_dir(model) / "tokens.parquet"))
        return self._token_cache[model]

    def sequences(self, model: str) -> pd.DataFrame:
        """One row per input sequence or image: `sequence`, `source`, `text` (or image path), `n_tokens`."""
        self.require_model(model)
        if model not in self._seq_cache:
            self._seq_cache[model] = pd.read_parquet(str(self._model_dir(model) / "sequences.parquet"))
        return self._seq_cache[model]

    def has_array(self, model: str, key: str) -> bool:
        return (self._model_dir(model) / key / "zarr.json").is_file()

    def array(self, model: str, key: str) -> Any:
        self.require_model(model)
        if (model, key) in self._array_cache:
            return self._array_cache[(model, key)]
        if not self.has_array(model, key):
            hint = {
                "values": "--values",
                "attn_topk_index": "--attention-topk K",
                "attn_topk_weight": "--attention-topk K",
                "hidden": "--hidden-states",
            }.get(key, "")
            raise StoreError(f"Model {model!r} has no stored {key}" + (f"; extract with {hint}." if hint else "."))
        handle = zarr.open_array(str(self._model_dir(model) / key), mode="r")
        self._array_cache[(model, key)] = handle
        return handle

    def _check_head(self, info: ModelInfo, layer: int, head: int) -> None:
        if not 0 <= layer < info.n_layers:
            raise StoreError(f"Layer {layer} is out of range for {info.name!r} (0..{info.n_layers - 1}).")
        if not 0 <= head < info.n_heads:
            raise StoreError(f"Head {head} is out of range for {info.name!r} (0..{info.n_heads - 1}).")

    def queries(self, model: str, layer: int, head: int) -> np.ndarray:
        """(token, d_head) float32 query vectors of one head, rows aligned with `tokens(model)`."""
        info = self.info(model)
        self._check_head(info, layer, head)
        return np.asarray(self.array(model, "queries")[layer, head], dtype=np.float32)

    def keys(self, model: str, layer: int, head: int) -> np.ndarray:
        """(token, d_head) float32 keys of the key head that serves query head `head`."""
        info = self.info(model)
        self._check_head(info, layer, head)
        return np.asarray(self.array(model, "keys")[layer, info.kv_head(head)], dtype=np.float32)

    def values(self, model: str, layer: int, head: int) -> np.ndarray:
        info = self.info(model)
        self._check_head(info, layer, head)
        return np.asarray(self.array(model, "values")[layer, info.kv_head(head)], dtype=np.float32)

    def attention_topk(self, model: str, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """(token, k) key rows (-1 = none) and (token, k) weights, strongest first, per query token."""
        info = self.info(model)
        self._check_head(info, layer, head)
        idx = np.asarray(self.array(model, "attn_topk_index")[layer, head])
        w = np.asarray(self.array(model, "attn_topk_weight")[layer, head], dtype=np.float32)
        return idx, w

    def hidden_states(self, model: str, layer: int) -> np.ndarray:
        """(token, d_model) float32 hidden state after `layer` blocks (0 = embeddings)."""
        arr = self.array(model, "hidden")
        if not 0 <= layer < arr.shape[0]:
            raise StoreError(f"Hidden-state layer {layer} is out of range (0..{arr.shape[0] - 1}).")
        return np.asarray(arr[layer], dtype=np.float32)

    # ---- layouts ---------------------------------------------------------------------------
    def layout_methods(self, model: str) -> list[str]:
        d = self._model_dir(model) / "layouts"
        if not d.is_dir():
            return []
        return sorted(x.name for x in d.iterdir() if (x / "quality" / "zarr.json").is_file())

    def layout_group(self, model: str, method: str) -> Any:
        if method not in self.layout_methods(model):
            have = ", ".join(self.layout_methods(model)) or "none"
            raise StoreError(f"Model {model!r} has no {method!r} layouts (has: {have}); run `attnatlas project`.")
        return zarr.open_group(str(self._model_dir(model) / "layouts" / method), mode="r")

    def layout_writer(self, model: str, method: str, rows: np.ndarray, params: dict[str, Any],
                      sampled: np.ndarray | None = None) -> LayoutWriter:
        """Open (or create) the layout arrays of one method. Existing heads are kept unless the
        sampled rows or parameters changed, in which case the method's layouts start over.
        `sampled` (rows,) bool marks the rows laid out themselves when the others were placed into
        that layout afterwards (a capped head with every token placed)."""
        info = self.info(model)
        path = self._model_dir(model) / "layouts" / method
        params = _jsonable(params)
        if (path / "quality" / "zarr.json").is_file():
            grp = zarr.open_group(str(path), mode="r+")
            same_rows = np.array_equal(np.asarray(grp["rows"][:]), rows)
            same_sample = (sampled is None) == ("sampled" not in grp) and (
                sampled is None or np.array_equal(np.asarray(grp["sampled"][:]), sampled))
            if same_rows and same_sample and dict(grp.attrs).get("params") == params:
                return LayoutWriter(grp["coords"], grp["quality"], grp["placed_quality"] if sampled is not None else None)
            path.rmtree()
        n = len(rows)
        grp = zarr.open_group(str(path), mode="w", attributes={"params": params, "method": method})
        grp.create_array("rows", data=np.asarray(rows, dtype=np.int64))
        placed_quality = None
        if sampled is not None:
            grp.create_array("sampled", data=np.asarray(sampled, dtype=bool))
            placed_quality = grp.create_array("placed_quality", shape=(info.n_layers, info.n_heads, len(PLACED_FIELDS)),
                                              dtype="float32", chunks=(1, 1, len(PLACED_FIELDS)), fill_value=np.nan)
        coords = grp.create_array(
            "coords", shape=(info.n_layers, info.n_heads, 2 * n, 2), dtype="float32", chunks=(1, 1, 2 * n, 2), fill_value=np.nan
        )
        quality = grp.create_array(
            "quality",
            shape=(info.n_layers, info.n_heads, len(QUALITY_FIELDS)),
            dtype="float32",
            chunks=(1, 1, len(QUALITY_FIELDS)),
            fill_value=np.nan,
        )
        return LayoutWriter(coords, quality, placed_quality)

    def layout_params(self, model: str, method: str) -> dict[str, Any]:
        return dict(self.layout_group(model, method).attrs).get("params", {})

    def layout_done(self, model: str, method: str) -> np.ndarray:
        """(layer, head) bool: which heads have a finished layout."""
        q = np.asarray(self.layout_group(model, method)["quality"][:])
        return ~np.isnan(q[..., 0]) | ~np.isnan(q[..., 2])

    def layout_quality(self, model: str, method: str) -> pd.DataFrame:
        """One row per finished head: layer, head and QUALITY_FIELDS."""
        q = np.asarray(self.layout_group(model, method)["quality"][:])
        L, H, _ = q.shape
        # Atlases from before a field was added have fewer columns.
        df = pd.DataFrame(q.reshape(L * H, -1), columns=list(QUALITY_FIELDS[: q.shape[-1]]))
        df.insert(0, "head", np.tile(np.arange(H), L))
        df.insert(0, "layer", np.repeat(np.arange(L), H))
        return df[self.layout_done(model, method).reshape(-1)].reset_index(drop=True)

    def layout_rows(self, model: str, method: str) -> np.ndarray:
        return np.asarray(self.layout_group(model, method)["rows"][:])

    def layout_sampled(self, model: str, method: str) -> np.ndarray:
        """(rows,) bool, aligned with `layout_rows`: True for tokens laid out themselves, False for tokens
        placed into that layout from their neighbours (only capped heads have any)."""
        grp = self.layout_group(model, method)
        return np.asarray(grp["sampled"][:], dtype=bool) if "sampled" in grp else np.ones(grp["rows"].shape[0], bool)

    def layout_placed_quality(self, model: str, method: str) -> pd.DataFrame:
        """One row per finished head with placed tokens: layer, head and PLACED_FIELDS of the placed points."""
        grp = self.layout_group(model, method)
        if "placed_quality" not in grp:
            return pd.DataFrame(columns=["layer", "head", *PLACED_FIELDS])
        q = np.asarray(grp["placed_quality"][:])
        L, H, _ = q.shape
        df = pd.DataFrame(q.reshape(L * H, -1), columns=list(PLACED_FIELDS))
        df.insert(0, "head", np.tile(np.arange(H), L))
        df.insert(0, "layer", np.repeat(np.arange(L), H))
        return df[self.layout_done(model, method).reshape(-1)].reset_index(drop=True)

    def layout_coords(self, model: str, method: str, layer: int, head: int) -> np.ndarray:
        """(2 * points, 2) float32: queries first, then keys, for `layout_rows` token rows."""
        info = self.info(model)
        self._check_head(info, layer, head)
        grp = self.layout_group(model, method)
        return np.asarray(grp["coords"][layer, head], dtype=np.float32)

    def layout(self, model: str, layer: int, head: int, method: str) -> pd.DataFrame:
        """2 x points rows: x, y, kind (query/key), token (row in the token table) and placed (True for a
        token placed into a capped layout from its neighbours rather than laid out itself)."""
        xy = self.layout_coords(model, method, layer, head)
        if np.isnan(xy).all():
            raise StoreError(f"Head L{layer}H{head} of {model!r} has no {method} layout yet; run `attnatlas project`.")
        rows = self.layout_rows(model, method)
        placed = ~self.layout_sampled(model, method)
        n = len(rows)
        return pd.DataFrame(
            {
                "x": xy[:, 0],
                "y": xy[:, 1],
                "kind": pd.Categorical(["query"] * n + ["key"] * n, categories=["query", "key"]),
                "token": np.concatenate([rows, rows]),
                "placed": np.concatenate([placed, placed]),
            }
        )

    # ---- results of later stages -----------------------------------------------------------
    def analysis_dir(self, model: str) -> Location:
        self.require_model(model)
        d = self._model_dir(model) / "analysis"
        d.mkdir()
        return d

    def write_table(self, model: str, name: str, df: pd.DataFrame) -> Location:
        """Atomically write an analysis table (Parquet) of one model; refused when the model was replaced (by
        another process) after this object first read it, since the table would describe the old copy."""
        self.require_model(model)
        if self._versions.get(model) != self._first_versions.get(model):
            raise StoreError(f"Model {model!r} in {self.path} was replaced while its {name!r} results were computed "
                             "from the earlier copy; nothing was written: run it again.")
        final = self.analysis_dir(model) / f"{name}.parquet"
        with final.atomic_write() as target:
            df.to_parquet(target, index=False)
        return final

    def read_table(self, model: str, name: str) -> pd.DataFrame:
        f = self._model_dir(model) / "analysis" / f"{name}.parquet"
        if not f.is_file():
            raise StoreError(f"Model {model!r} has no {name!r} results yet.")
        return pd.read_parquet(str(f))

    def tables(self, model: str) -> list[str]:
        """Names of the analysis tables stored for `model`."""
        d = self._model_dir(model) / "analysis"
        return sorted(f.stem for f in d.glob("*.parquet")) if d.is_dir() else []

    def has_table(self, model: str, name: str) -> bool:
        return (self._model_dir(model) / "analysis" / f"{name}.parquet").is_file()


def _created(folder: Location) -> str:
    """The "created" stamp of a model folder ('' when it has none: an unfinished write)."""
    try:
        with (folder / "zarr.json").open("rb") as f:
            return str(json.load(f).get("attributes", {}).get("created", ""))
    except (OSError, ValueError, FileNotFoundError):
        return ""


def open_atlas(path: str | os.PathLike) -> Atlas:
    """Open an existing atlas for reading (and for adding layouts and analyses)."""
    return Atlas.open(path)

