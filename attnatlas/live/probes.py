"""Named probe sets: a placed input kept beside the corpus, never mixed into its tokens.

A probe set is one Parquet file, models/<model>/probes/<NAME>.parquet: the placement table (its `text`
column dictionary-encoded: each input text stored once) with the layouts' settings it was placed into in the file's metadata, written
atomically (whole or not at all). Re-projecting the model makes it stale; `read_probe` says so.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attnatlas.errors import InputError, StoreError
from attnatlas.store import Atlas, check_name
from attnatlas.store.location import Location

META_KEY = b"attnatlas_probe"


def probe_file(atlas: Atlas, model: str, name: str) -> Location:
    atlas.require_model(model)
    try:
        check_name(name)
    except StoreError:
        raise InputError(f"Invalid probe name {name!r}: use up to 128 letters, digits, '-', '_' or '.', "
                         "starting with a letter or digit.") from None
    return atlas.path / "models" / model / "probes" / f"{name}.parquet"


def _settings(atlas: Atlas, model: str, methods: list[str]) -> dict[str, Any]:
    return {m: atlas.layout_params(model, m) for m in methods}


def save_probe(atlas: Atlas, model: str, name: str, table: pd.DataFrame, overwrite: bool = False) -> Location:
    """Store `table` (from `place`) as probe set `name` of `model`; refuses to replace one unless `overwrite`."""
    final = probe_file(atlas, model, name)
    if final.is_file() and not overwrite:
        raise InputError(f"{model!r} already has a probe set named {name!r}; choose another --save NAME "
                         "or pass --overwrite.")
    methods = sorted(table["method"].unique().tolist()) if len(table) else []
    meta = {"name": name, "model": model, "texts": [str(t) for t in table["text"].unique()],
            "notes": list(table.attrs.get("notes", [])), "layouts": _settings(atlas, model, methods)}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), META_KEY: json.dumps(meta, default=str).encode()})
    (atlas.path / "models" / model / "probes").mkdir()
    with final.atomic_write() as target:
        pq.write_table(arrow, target)
    return final


def list_probes(atlas: Atlas, model: str) -> list[str]:
    d = atlas.path / "models" / model / "probes"
    return sorted(f.stem for f in d.glob("*.parquet")) if d.is_dir() else []


def read_probe(atlas: Atlas, model: str, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(table, metadata) of a stored probe set; metadata["stale"] lists methods re-projected since."""
    f = probe_file(atlas, model, name)
    if not f.is_file():
        raise StoreError(f"{model!r} has no probe set named {name!r} (has: {', '.join(list_probes(atlas, model)) or 'none'}).")
    table = pq.read_table(str(f))
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    now = _settings(atlas, model, [m for m in meta.get("layouts", {}) if m in atlas.layout_methods(model)])
    meta["stale"] = [m for m, p in meta.get("layouts", {}).items() if json.dumps(now.get(m), default=str) != json.dumps(p, default=str)]
    return table.to_pandas(), meta
