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

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from attnatlas.errors import StoreError
from attnatlas.store import claims
from attnatlas.store.layouts import PLACED_FIELDS, QUALITY_FIELDS, Layouts, LayoutWriter, open_layout_writer
from attnatlas.store.location import Location
from attnatlas.store.model_info import ModelInfo
from attnatlas.store.names import check_name, incoming_folder, readable_name
from attnatlas.store.protocol import WriteProtocol
from attnatlas.store.writer import ArraySpec, ModelWriter, tokens_per_chunk

__all__ = ["FORMAT_VERSION", "PLACED_FIELDS", "QUALITY_FIELDS", "ArraySpec", "Atlas", "LayoutWriter", "ModelInfo",
           "ModelWriter", "check_name", "open_atlas", "tokens_per_chunk"]

FORMAT_VERSION = 1


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
        self.protocol = WriteProtocol(path, forget=self._forget)

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
        version = (self._model_dir(model) / "zarr.json").version() if readable_name(model) else None
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
            temp = self.path / "models" / incoming_folder(name)
            writer = ModelWriter(temp, name, n_tokens, specs, attrs, lambda t, over: self._install_model(t, name, over),
                                 claim, background)
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

    # ---- the write protocol (see protocol.py) ------------------------------------------------
    def claim_model(self, name: str, doing: str) -> claims.Claim:
        """Become the only writer of model `name`, or StoreError naming who is."""
        return self.protocol.claim_model(name, doing)

    def claim_layout(self, model: str, method: str, params: str, wait: bool = False) -> claims.Claim:
        """Become the only writer of `method` layouts of `model` (made with `params`), or claims.ClaimBusy."""
        return self.protocol.claim_layout(model, method, params, wait)

    def projections_of(self, name: str) -> list[str]:
        return self.protocol.projections_of(name)

    def writer_of(self, name: str) -> str | None:
        return self.protocol.writer_of(name)

    def refuse_while_projected(self, name: str, doing: str) -> None:
        self.protocol.refuse_while_projected(name, doing)

    def recover(self, name: str) -> None:
        """Finish or undo an interrupted write of `name` (the caller holds the name's claim)."""
        self.protocol.recover(name)

    def recover_interrupted(self) -> None:
        """On open: recover every model whose writer died mid-write (its claim is free)."""
        if self.path.writable():
            self.protocol.recover_interrupted()

    def _install_model(self, temp: Location, name: str, overwrite: bool) -> None:
        self.protocol.install(temp, name, overwrite)
        self._first_versions.pop(name, None)  # replaced by this object itself: what it reads next is the new copy

    def delete_model(self, name: str) -> None:
        self.require_model(name)
        self.protocol.delete(name)
        self._first_versions.pop(name, None)

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

    # ---- layouts (see layouts.py) -----------------------------------------------------------
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

    def layouts(self, model: str, method: str) -> Layouts:
        """The stored `method` layouts of `model`: params, rows, sampled, done, quality, placed quality, coords."""
        return Layouts(self.layout_group(model, method))

    def layout_writer(self, model: str, method: str, rows: np.ndarray, params: dict[str, Any],
                      sampled: np.ndarray | None = None) -> LayoutWriter:
        """Open (or create) the layout arrays of one method; see `layouts.open_layout_writer`. `sampled` (rows,)
        bool marks the rows laid out themselves when the others are placed into that layout afterwards."""
        info = self.info(model)
        return open_layout_writer(self._model_dir(model) / "layouts" / method, method, info.n_layers, info.n_heads,
                                  rows, params, sampled)

    def layout_params(self, model: str, method: str) -> dict[str, Any]:
        return self.layouts(model, method).params

    def layout_done(self, model: str, method: str) -> np.ndarray:
        """(layer, head) bool: which heads have a finished layout."""
        return self.layouts(model, method).done()

    def layout_quality(self, model: str, method: str) -> pd.DataFrame:
        """One row per finished head: layer, head and QUALITY_FIELDS."""
        return self.layouts(model, method).quality()

    def layout_rows(self, model: str, method: str) -> np.ndarray:
        return self.layouts(model, method).rows

    def layout_sampled(self, model: str, method: str) -> np.ndarray:
        """(rows,) bool, aligned with `layout_rows`: False for tokens placed from their neighbours."""
        return self.layouts(model, method).sampled

    def layout_placed_quality(self, model: str, method: str) -> pd.DataFrame:
        """One row per finished head with placed tokens: layer, head and PLACED_FIELDS of the placed points."""
        return self.layouts(model, method).placed_quality()

    def layout_coords(self, model: str, method: str, layer: int, head: int) -> np.ndarray:
        """(2 * points, 2) float32: queries first, then keys, for `layout_rows` token rows."""
        self._check_head(self.info(model), layer, head)
        return self.layouts(model, method).coords(layer, head)

    def layout(self, model: str, layer: int, head: int, method: str) -> pd.DataFrame:
        """2 x points rows: x, y, kind (query/key), token (row in the token table) and placed (True for a
        token placed into a capped layout from its neighbours rather than laid out itself)."""
        self._check_head(self.info(model), layer, head)
        frame = self.layouts(model, method).frame(layer, head)
        if frame is None:
            raise StoreError(f"Head L{layer}H{head} of {model!r} has no {method} layout yet; run `attnatlas project`.")
        return frame

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


def open_atlas(path: str | os.PathLike) -> Atlas:
    """Open an existing atlas for reading (and for adding layouts and analyses)."""
    return Atlas.open(path)

