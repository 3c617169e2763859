"""Shards written straight to their files (attnatlas/store/shards.py) hold exactly what Zarr would write."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import zarr

import attnatlas.store.writer as writer_mod
from attnatlas.store import ArraySpec, Atlas, shards

TOKENS, TC = 50, 16  # four chunk columns, the last cut short by the array's end


def _write(path, data: dict[str, np.ndarray], background: bool, batches=(5, 7, 1, 13, 9, 15)) -> dict[str, bool]:
    """Write `data` through a ModelWriter; returns which arrays went straight to their shard files."""
    atlas = Atlas.open(path, create=True)
    specs = {key: ArraySpec(a.shape, str(a.dtype), 2, (1, 1, TC, a.shape[3]), shards=(1, a.shape[1], TC, a.shape[3]))
             for key, a in data.items()}
    with atlas.model_writer("m", TOKENS, specs, {"n_layers": 3}, background=background) as writer:
        start = 0
        for n in batches:  # uneven batches: blocks and chunk columns end inside them
            rows = {key: a[:, :, start : start + n] for key, a in data.items()}
            tokens = pd.DataFrame({"sequence": np.zeros(n, np.int64), "position": np.arange(start, start + n)})
            writer.append(rows, tokens, pd.DataFrame({"sequence": [len(batches)]}) if start == 0 else tokens.iloc[:0, :1])
            start += n
        assert start == TOKENS
        used = {key: files is not None for key, files in writer._shard_files.items()}
        writer.commit()
    return used


def _data(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if dtype == "int32":  # as the top-k index: key rows, fill value -1
        return {"queries": rng.integers(-1, 1000, (3, 4, TOKENS, 8), dtype=np.int32),
                "keys": rng.integers(-1, 1000, (3, 2, TOKENS, 8), dtype=np.int32)}
    return {"queries": rng.standard_normal((3, 4, TOKENS, 8)).astype(dtype),
            "keys": rng.standard_normal((3, 2, TOKENS, 8)).astype(dtype)}


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int32"])
def test_shard_files_are_byte_for_byte_zarrs_own(tmp_path, monkeypatch, dtype, background):
    data = _data(dtype)
    monkeypatch.setattr(writer_mod, "block_rows", lambda tc, token_bytes: 6)  # blocks that straddle the columns
    used = _write(tmp_path / "direct", data, background)
    assert used == {"queries": True, "keys": True}
    monkeypatch.setattr(writer_mod, "shard_files", lambda array: None)
    assert _write(tmp_path / "zarr", data, background) == {"queries": False, "keys": False}
    for key, expected in data.items():
        direct, reference = (tmp_path / "direct" / "models" / "m" / key), (tmp_path / "zarr" / "models" / "m" / key)
        names = sorted(p.name for p in direct.iterdir())
        assert names == sorted(p.name for p in reference.iterdir()) and len(names) == 3 * 4 + 1  # + zarr.json
        for name in names:
            assert (direct / name).read_bytes() == (reference / name).read_bytes(), (key, name)
        np.testing.assert_array_equal(zarr.open_array(str(direct), mode="r")[:], expected)


def test_only_plain_local_sharded_arrays_take_the_direct_path(tmp_path):
    def array(store, **kw):
        options = dict(shape=(2, 3, 40, 4), dtype="float16", chunks=(1, 1, 16, 4), shards=(1, 3, 16, 4),
                       compressors=None, fill_value=0, chunk_key_encoding={"name": "default", "separator": "."},
                       config={"write_empty_chunks": True})
        return zarr.open_group(store, mode="w").create_array("a", **{**options, **kw})

    assert shards.shard_files(array(str(tmp_path / "plain"))) is not None
    assert shards.shard_files(array(str(tmp_path / "compressed"), compressors="auto")) is None
    # A fill value other than 0 is written into the rows past the array's end, as Zarr does.
    assert shards.shard_files(array(str(tmp_path / "filled"), fill_value=1.5)) is not None
    assert shards.shard_files(array(str(tmp_path / "unsharded"), shards=None)) is None
    assert shards.shard_files(array(str(tmp_path / "heads_split"), shards=(1, 1, 16, 4))) is None
    assert shards.shard_files(array(zarr.storage.MemoryStore())) is None  # object stores: Zarr writes


def test_a_failed_self_check_leaves_writing_to_zarr(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_crc32c", lambda data: 0)  # as if Zarr's index encoding had changed
    shards._reference.cache_clear()
    try:
        assert _write(tmp_path / "a", _data("float16"), background=False) == {"queries": False, "keys": False}
    finally:
        shards._reference.cache_clear()
    np.testing.assert_array_equal(Atlas.open(tmp_path / "a").array("m", "keys")[:], _data("float16")["keys"])


def test_an_interrupted_write_leaves_no_file_open(tmp_path, monkeypatch):
    open_files = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(writer_mod, "block_rows", lambda tc, token_bytes: 4)
    with pytest.raises(RuntimeError, match="stopped"):
        atlas = Atlas.open(tmp_path / "a", create=True)
        data = _data("float16")
        specs = {k: ArraySpec(a.shape, "float16", 2, (1, 1, TC, 8), shards=(1, a.shape[1], TC, 8)) for k, a in data.items()}
        with atlas.model_writer("m", TOKENS, specs, {}, background=False) as writer:
            rows = {k: a[:, :, :10] for k, a in data.items()}
            writer.append(rows, pd.DataFrame({"position": np.arange(10)}), pd.DataFrame({"sequence": [0]}))
            assert any(files._files for files in writer._shard_files.values())  # shards half written
            raise RuntimeError("stopped")
    assert len(os.listdir("/proc/self/fd")) == open_files
    assert Atlas.open(tmp_path / "a").models == []
