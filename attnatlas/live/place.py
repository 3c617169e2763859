"""`place(atlas, model, texts)`: a user's own text (or images) in every head's stored layout.

The atlas's own model runs over the new input (`encode`: extract's loader and batch code), and each new
token's query and key is normalised with its head's stored transform and placed into the head's layout
from its nearest laid-out corpus points (`project.placement.place`, the function that places the tokens a
capped layout left out). Nothing is written to the atlas (see `probes.save_probe` for that).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import pandas as pd

from attnatlas.errors import InputError, StoreError
from attnatlas.live.reference import References, place_heads, placement_table
from attnatlas.store import Atlas


class Placer:
    """One atlas, its references and the models loaded so far (lazily: a model loads on its first use)."""

    def __init__(self, atlas: Atlas | str | os.PathLike, device: str = "cpu"):
        self.atlas = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
        self.refs = References(self.atlas)
        self.device = device
        self._loaded: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}  # model -> seconds its first load took

    def methods(self, model: str, methods: str | Iterable[str] | None) -> list[str]:
        """The asked methods (all stored ones by default), each checked to have layouts."""
        self.atlas.require_model(model)
        have = self.atlas.layout_methods(model)
        if not have:
            raise StoreError(f"{model!r} has no layouts to place into; run `attnatlas project` first.")
        if methods is None:
            return have
        names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
        for m in names:
            if m not in have:
                raise StoreError(f"{model!r} has no {m!r} layouts (has: {', '.join(have)}).")
        return list(dict.fromkeys(names)) or have

    def check_input(self, model: str, texts: Any = None, images: Any = None) -> tuple[str, list[Any]]:
        """('text' | 'image', records) for the model's modality; every input error comes before any load."""
        from attnatlas.live.encode import read_images, read_texts

        modality = self.atlas.info(model).modality
        if (texts is None) == (images is None):
            raise InputError("Give either text or an image to place.")
        if modality == "text" and texts is None:
            raise InputError(f"{model!r} is a text model; give text, not an image.")
        if modality == "image" and images is None:
            raise InputError(f"{model!r} is an image model; give an image, not text.")
        return ("text", read_texts(texts)) if texts is not None else ("image", images if _records(images) else read_images(
            [images] if isinstance(images, (str, os.PathLike)) else list(images)))

    def model(self, name: str) -> Any:
        if name not in self._loaded:
            from attnatlas.live.encode import load_atlas_model

            t0 = time.perf_counter()
            self._loaded[name] = load_atlas_model(self.atlas, name, self.device)
            self.load_seconds[name] = time.perf_counter() - t0
        return self._loaded[name]

    def encode(self, model: str, kind: str, records: list[Any], chunk: bool = False, n_methods: int = 1) -> Any:
        """The model run over the input, bounded for placing into every head x `n_methods` methods."""
        from attnatlas.live.encode import encode_images, encode_texts

        loaded = self.model(model)
        attrs = self.atlas.info(model).attrs
        if kind == "text":
            return encode_texts(loaded, attrs, records, chunk, self.device, n_methods)
        return encode_images(loaded, attrs, records, self.device)

    def table(self, model: str, enc: Any, methods: list[str], heads: list[tuple[int, int]] | None = None) -> pd.DataFrame:
        corpus_tokens = self.atlas.tokens(model)["token"]
        frames = []
        for method in methods:
            cols = place_heads(self.refs, model, method, enc.queries, enc.keys, heads)
            frames.append(placement_table(cols, method, enc.tokens, enc.texts, corpus_tokens, enc.topk_index,
                                          enc.topk_weight))
        df = pd.concat(frames, ignore_index=True)
        df.attrs["notes"] = list(enc.notes)
        return df


def texts_table(table: pd.DataFrame) -> pd.DataFrame:
    """(sequence, text): each text (or window) of a placement table once, in order."""
    pairs = table[["sequence", "text"]].drop_duplicates("sequence").sort_values("sequence")
    return pd.DataFrame({"sequence": pairs["sequence"].to_numpy(), "text": pairs["text"].astype(str).to_numpy()})


def _records(images: Any) -> bool:
    """Already-read image records (from `encode.read_image_bytes`), not paths."""
    return isinstance(images, list) and bool(images) and all(hasattr(r, "image") for r in images)


def place(atlas: Atlas | str | os.PathLike, model: str, texts: str | list[str] | None = None,
          images: str | os.PathLike | list[Any] | None = None, methods: str | Iterable[str] | None = None,
          chunk: bool = False, device: str = "cpu", placer: Placer | None = None, warn: bool = True) -> pd.DataFrame:
    """Every new token's query and key placed into every head's layout of `methods` (default: all stored).

    One row per (method, head, token, kind): text, sequence, token, position, kind, layer, head, method,
    x, y, top_keys / top_weights (the new input's own top-k attention, for queries), distance, fit (the
    mean distance to its nearest corpus points over the corpus's own typical such distance), far (fit
    above project.placement.FAR: well outside the corpus) and the nearest corpus token. Over-long text is
    truncated (or windowed with `chunk`); each such note is kept in `table.attrs["notes"]` and, with
    `warn`, also given as a warning.

    Each text is held once: `text` is a categorical column (one copy per text, a code per row; Parquet
    stores it as a dictionary), `sequence` numbers the texts (or windows), and `texts_table(table)` lists
    them. Memory is bounded (`attnatlas.live.bounds`): a string is cut to 32 characters per token of the
    limit before it is tokenized, and one call places at most 1,000,000 points (methods x heads x 2 x
    tokens; never less than one text at the token limit); texts or windows past the budget are left out,
    with a note. Measured peak RSS, MiniLM with two methods: 0.84-0.94 GB for one 100,000-character text, 1.38 GB at
    the bound (884,736 points), model and torch included."""
    p = placer or Placer(atlas, device)
    p.atlas.require_model(model)  # StoreError names the models the atlas holds
    names = p.methods(model, methods)
    kind, records = p.check_input(model, texts, images)
    enc = p.encode(model, kind, records, chunk, len(names))
    for note in enc.notes if warn else []:
        warnings.warn(note, stacklevel=2)
    return p.table(model, enc, names)
