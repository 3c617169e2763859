"""Run an atlas's own model over new input, the way `extract` ran it over the corpus (needs torch).

The model is loaded by extract's `load_model` (same adapter and capture), and the forward pass and the
compaction to real tokens are extract's own batch functions, run with the storage dtype, precision,
token limit and top-k width recorded in the atlas, so a corpus sentence placed again gives the vectors
that were stored for it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from attnatlas.errors import InputError, ModelError
from attnatlas.store import Atlas

PLACE_BATCH = 16  # sequences per forward pass


@dataclass
class Encoded:
    """New input as the model saw it: tokens and every head's q and k."""

    tokens: pd.DataFrame  # sequence, position, token, is_special, ... one row per real token
    queries: np.ndarray  # (layer, head, token, d_head) float32
    keys: np.ndarray  # (layer, kv_head, token, d_head) float32
    topk_index: np.ndarray | None  # (layer, head, token, k) int32 rows into `tokens`, -1 = none
    topk_weight: np.ndarray | None  # (layer, head, token, k) float32
    texts: list[str]  # per sequence: the text (or image name) it was made from
    notes: list[str] = field(default_factory=list)  # truncation, windows: said to the user


def load_atlas_model(atlas: Atlas, model: str, device: str = "cpu", purpose: str = "nothing can be placed") -> Any:
    """The stored model's weights loaded here (extract's loader), checked to be the model of the atlas;
    `purpose` ends the refusal's first clause ("cannot be loaded here, so <purpose>")."""
    from attnatlas.extract.adapters import split_stack
    from attnatlas.extract.loading import load_model

    info = atlas.info(model)  # StoreError names the models it holds
    attrs = info.attrs
    model_id = str(attrs.get("model_id") or model)
    source = attrs.get("source")
    try:
        loaded = load_model(model_id, device)
    except ModelError as first:
        # A hub id may be cached under the folder recorded at extraction; try it before giving up.
        if not (isinstance(source, str) and source != model_id and os.path.isdir(source)):
            raise ModelError(f"The weights of {model!r} cannot be loaded here, so {purpose}: {first}") from None
        try:
            stack = split_stack(model_id)[1]  # a CLIP/SigLIP tower or T5's encoder: the same stack again
            loaded = load_model(f"{source}#{stack}" if stack else source, device)
        except ModelError as exc:
            raise ModelError(f"The weights of {model!r} cannot be loaded here, so {purpose}: {exc}") from None
    a = loaded.adapter
    want = (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head)
    got = (a.n_layers, a.n_heads, a.n_kv_heads, a.d_head)
    if got != want:
        raise ModelError(f"{model_id!r} loads here with layers/heads/kv heads/d_head {got}, but the atlas stored "
                         f"{want} for {model!r}; its weights changed since extraction.")
    return loaded


def _options(attrs: dict[str, Any], device: str) -> Any:
    from attnatlas.extract.options import ExtractOptions

    return ExtractOptions(dtype=str(attrs.get("dtype", "float16")), batch_size=PLACE_BATCH,
                          max_tokens=attrs.get("max_tokens"), attention_topk=int(attrs.get("attention_topk") or 8),
                          precision=str(attrs.get("precision", "float32")), device=device, progress=False)


def read_texts(texts: str | list[str]) -> list[Any]:
    """Text records of the non-blank texts; InputError when none is left (checked before any model loads)."""
    from attnatlas.inputs import load_texts

    texts = [texts] if isinstance(texts, str) else list(texts or [])
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    if not kept:
        raise InputError("The text is empty; type a sentence to place.")
    return load_texts(kept)


def encode_texts(loaded: Any, attrs: dict[str, Any], records: list[Any], chunk: bool = False,
                 device: str = "cpu", n_methods: int = 1) -> Encoded:
    """q and k of every head for each text record; over-long texts are truncated (or windowed with
    `chunk`) and a note says so.

    Bounded whatever the input: each string is cut to `bounds.CHARS_PER_TOKEN` characters per token it may
    keep before the tokenizer sees it (the token limit, or with `chunk` the call's token budget), and texts
    or windows past the budget (`bounds.token_budget`: at most `bounds.MAX_PLACE_POINTS` placed points over
    every head and `n_methods` methods) are left out, with a note."""
    from attnatlas.extract.batches import text_batches
    from attnatlas.extract.device import resolve_device
    from attnatlas.extract.options import token_limits
    from attnatlas.extract.windows import window_documents
    from attnatlas.live.bounds import CHARS_PER_TOKEN, token_budget

    if loaded.adapter.modality != "text":
        raise InputError(f"{loaded.model_id!r} is an image model; give an image, not text.")
    opts = _options(attrs, device)
    tok = loaded.preprocessor
    max_len = token_limits(loaded.config, opts.max_tokens)[1]
    a = loaded.adapter
    budget = token_budget(a.n_layers * a.n_heads, n_methods, max_len)
    notes: list[str] = []
    # Cut before tokenizing: a string's tokenizer cost and the token list it makes grow with its length.
    max_chars = CHARS_PER_TOKEN * (budget if chunk else max_len)
    cut = [i for i, r in enumerate(records) if len(r.text) > max_chars]
    if cut:
        longest = max(len(records[i].text) for i in cut)
        records = [dataclasses.replace(r, text=r.text[:max_chars]) if len(r.text) > max_chars else r for r in records]
        notes.append(f"{len(cut)} text(s) are longer than {max_chars:,} characters ({longest:,}); only the first "
                     f"{max_chars:,} ({CHARS_PER_TOKEN} per token of the {'budget' if chunk else 'limit'}) were "
                     "tokenized and the rest is not placed.")
    lengths = [len(ids) for ids in tok([r.text for r in records])["input_ids"]]
    if chunk:
        records = window_documents(records, tok, max_len, 0)
        if len(records) > len(lengths):
            notes.append(f"{sum(n > max_len for n in lengths)} text(s) longer than the model's {max_len}-token limit "
                         f"were split into {len(records)} windows of at most {max_len} tokens, each placed on its own.")
        lengths = [len(ids) for ids in tok([r.text for r in records])["input_ids"]]
    else:
        over = [n for n in lengths if n > max_len]
        if over:
            notes.append(f"{len(over)} text(s) are longer than the model's {max_len}-token limit ({max(over)} tokens) "
                         f"and were truncated to {max_len}; the rest is not placed (use --chunk to place it as windows).")
    kept, total = 0, 0
    for n in lengths:  # in order, the first one always
        if kept and total + min(n, max_len) > budget:
            break
        kept, total = kept + 1, total + min(n, max_len)
    if kept < len(records):
        what = "windows" if chunk else "texts"
        notes.append(f"Only the first {kept} of {len(records)} {what} ({total:,} tokens) were placed: one placement "
                     f"takes at most {budget:,} tokens into {a.n_layers * a.n_heads} heads x {n_methods} method(s) "
                     f"(a bound on memory); place the rest in another call.")
        records = records[:kept]
    batches = text_batches(loaded, records, opts, max_len, resolve_device(device), np.dtype(opts.dtype),
                           _recipe(loaded))
    return _collect([b for b, _ in batches], [r.text for r in records], notes)


def read_images(paths: list[str | os.PathLike]) -> list[Any]:
    """Image files read as extract reads them (InputError names a file that cannot be read)."""
    from attnatlas.inputs import load_images

    if not paths:
        raise InputError("No image given; choose an image file to place.")
    return load_images([os.fspath(p) for p in paths])


def read_image_bytes(data: bytes, name: str) -> list[Any]:
    """An uploaded image (bytes), written to a private temp file and read like any image file; messages
    name the upload, not the temp file."""
    if not data:
        raise InputError(f"The image {name!r} is empty.")
    ext = Path(name).suffix.lower()
    fd, tmp = tempfile.mkstemp(prefix="attnatlas-upload-", suffix=ext if ext.isascii() and len(ext) <= 6 else ".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            records = read_images([tmp])
        except InputError as exc:
            raise InputError(str(exc).replace(tmp, name)) from None
        return [dataclasses.replace(r, source=name) for r in records]
    finally:
        os.remove(tmp)


def encode_images(loaded: Any, attrs: dict[str, Any], records: list[Any], device: str = "cpu") -> Encoded:
    """q and k of every head for each image record (`read_images`)."""
    from attnatlas.extract.batches import image_batches
    from attnatlas.extract.device import resolve_device

    if loaded.adapter.modality != "image":
        raise InputError(f"{loaded.model_id!r} is a text model; give text, not an image.")
    opts = _options(attrs, device)
    batches = image_batches(loaded, records, opts, resolve_device(device), np.dtype(opts.dtype), _recipe(loaded))
    return _collect([b for b, _ in batches], [Path(r.source).name for r in records], [])


def _recipe(loaded: Any) -> Any:
    """extract's per-batch checks (attention sinks, masks it cannot record), for the new input too."""
    from attnatlas.extract.recipe import Recipe

    a = loaded.adapter
    return Recipe(loaded.config.model_type, a.n_layers, a.causal, a.window_hint, a.window_rule)


def _collect(batches: list[Any], texts: list[str], notes: list[str]) -> Encoded:
    """Concatenate extract's batches (token rows of top-k attention are already global to this input)."""
    if not batches:
        raise InputError("Nothing to place: the input has no tokens.")
    arrays = [b.arrays for b in batches]

    def cat(key: str, dtype: Any) -> np.ndarray | None:
        if key not in arrays[0]:
            return None
        return np.concatenate([a[key] for a in arrays], axis=2).astype(dtype, copy=False)

    tables = [b.tokens for b in batches]  # Arrow tables for text, DataFrames for images
    tokens = pa.concat_tables(tables).to_pandas() if isinstance(tables[0], pa.Table) else pd.concat(tables, ignore_index=True)
    return Encoded(tokens, cat("queries", np.float32), cat("keys", np.float32), cat("attn_topk_index", np.int32),
                   cat("attn_topk_weight", np.float32), texts, notes)
