"""Writing one model: its arrays streamed chunk column by chunk column into a temp folder the writer owns,
token tables as Parquet row groups, then the install step it is handed (a rename) makes it visible at once."""

from __future__ import annotations

import json
import mmap
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from attnatlas.store import claims, faults
from attnatlas.store.location import Location
from attnatlas.store.shards import ShardFiles, block_rows, shard_files

TOKEN_ROW_GROUP = 65_536  # token rows buffered per Parquet row group: few conversions, bounded memory


def tokens_per_chunk(d_head: int, heads: int | None = None, column_bytes: int = 64 << 20) -> int:
    """Tokens per chunk of one head's float16 rows: at least 256 KiB (and 1024 tokens), so a head reads in a few
    files; up to 1 MiB while one chunk column of all `heads` (what a writer buffers for an object store) stays
    within `column_bytes`, because Zarr spends about 0.5 ms on every chunk it writes, whatever its size."""
    row = 2 * d_head
    floor = max(1024, 2 ** round(np.log2((1 << 18) / row)))
    fit = min(1 << 20, column_bytes // heads) // row if heads else 0
    return int(max(floor, 2 ** int(np.log2(fit)) if fit >= 1 else 0))


def jsonable(obj: Any) -> Any:
    """Attrs must survive json.dumps: numpy scalars and tuples become plain types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))



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

    def __init__(self, temp: Location, name: str, n_tokens: int, specs: dict[str, ArraySpec], attrs: dict[str, Any],
                 install: Callable[[Location, bool], None], claim: claims.Claim | None = None, background: bool = True):
        """`temp`: the folder this writer owns; `install(temp, overwrite)` puts the finished copy in place."""
        self.temp, self.name, self.n_tokens, self.claim, self.install = temp, name, n_tokens, claim, install
        self.background = background  # chunk columns written on a thread of their own, else in the caller's
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
        self.group.update_attributes(jsonable(self.attrs))  # one write of zarr.json (attrs.update writes per key)
        faults.checkpoint("attrs")
        self.install(self.temp, overwrite)
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
        remove_settled(self.temp)
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


def remove_settled(folder: Location, tries: int = 6) -> None:
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
