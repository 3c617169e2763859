"""A corpus as batches through the model under capture: each batch is tokenized (text) or processed (images),
run once, and its captures compacted to real (non-padding) tokens as the rows the store writes, with the
token and sequence tables beside them. Device-to-host copies overlap the next batch's forward pass.

`text_batches` and `image_batches` are what `extract` stores and what `live` places; `attention_of_token_ids`
runs sequences given as token ids (probes) through the same capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from attnatlas.errors import InputError, ModelError
from attnatlas.extract.adapters import patch_size
from attnatlas.extract.capture import LayerCapture, attention_probs, capturing
from attnatlas.extract.device import autocast, resolve_device, to_device
from attnatlas.extract.loading import LoadedModel
from attnatlas.extract.options import ExtractOptions
from attnatlas.extract.recipe import Recipe
from attnatlas.inputs import ImageRecord, TextRecord, patch_colour_table

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a text model is given of an encoding


class Batch:
    """What one forward pass yields, already compacted to real (non-padding) tokens: the arrays as the store
    takes them (q, k, v, top-k: (layer, head, real_token, width); hidden: (layer + 1, real_token, d_model)),
    and one row per token and per sequence (Arrow tables for text, DataFrames for images)."""

    def __init__(self, arrays: dict[str, Any], tokens: pa.Table | pd.DataFrame, sequences: pa.Table | pd.DataFrame):
        self.arrays, self.tokens, self.sequences = arrays, tokens, sequences


class _HeadRows:
    """(layer, head, real_token, d) rows of every head, held as (layer, real_token, head * d) rows (a list of
    per-layer tensors or one tensor) in host memory and laid out by the store straight into its chunk buffer
    (`fill`), so each array is copied once on the host, not twice."""

    def __init__(self, rows: Sequence[torch.Tensor] | torch.Tensor, heads: int):
        self.rows, self.heads = rows, heads
        n, hd = rows[0].shape
        self.shape = (len(rows), heads, n, hd // heads)
        self.dtype = np.dtype(str(rows[0].dtype).removeprefix("torch."))

    def fill(self, out: np.ndarray, start: int, stop: int) -> None:
        """Write token rows start:stop into `out` (layer, head, stop - start, d), a view of a buffer."""
        dst = torch.from_numpy(out)
        for layer in range(len(self.rows)):
            dst[layer].copy_(self.rows[layer][start:stop].view(stop - start, self.heads, -1).transpose(0, 1))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self.fill(out, 0, self.shape[2])
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class _Rows:
    """Where one batch's real tokens lie, known on the host from the tokenizer's mask (so nothing waits on the
    device to learn it), and the same on the model's device."""

    real: torch.Tensor | None  # (real_token,) flat (batch * token) index of each real token; None: every row
    key_row: torch.Tensor  # (real_token,) global token row of position 0 of the token's sequence
    length: torch.Tensor  # (real_token,) length of the token's sequence

    @staticmethod
    def of(valid: torch.Tensor, first_row: int, device: torch.device) -> _Rows:
        """valid: (batch, token) bool on the host, True for real tokens (right padding)."""
        lengths = valid.sum(1)
        starts = torch.cumsum(lengths, 0) - lengths + first_row
        real = valid.reshape(-1).nonzero().squeeze(1)
        every = bool(valid.all())
        return _Rows(None if every else to_device(real, device), to_device(starts.repeat_interleave(lengths), device),
                     to_device(lengths.repeat_interleave(lengths), device))


def _topk_rows(layers: list[LayerCapture], rows: _Rows, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer, real_token, head * K) global token rows of each query's strongest keys (int32, -1 = none: padding,
    a masked key, or fewer than K keys) and their weights (float16), for all layers in a few whole-batch ops.
    The recorder has kept each layer's top-k of the real tokens only, as (real_token, head, k)."""
    w = torch.stack([c.topk_weight for c in layers])  # (layer, real_token, head, k)
    pos = torch.stack([c.topk_key for c in layers])
    L, n, H, k = w.shape
    if k < K:  # sequences shorter than K keys: pad to the stored width
        w = torch.nn.functional.pad(w, (0, K - k))
        pos = torch.nn.functional.pad(pos, (0, K - k))
    keep = (w > 0) & (pos < rows.length[:, None, None])
    index = torch.where(keep, pos + rows.key_row[:, None, None], -1).to(torch.int32)
    return index.view(L, n, H * K), torch.where(keep, w, 0).to(torch.float16).view(L, n, H * K)


def _compact(caps: dict[int, LayerCapture], rows: _Rows, opts: ExtractOptions,
             hidden: tuple[torch.Tensor, ...] | None, np_dtype: np.dtype) -> tuple[dict[str, Any], dict[str, int]]:
    """Every layer's captures as (layer, real_token, head * width) rows on the model's device, and the heads of
    each array. q and k (and v) arrive as the recorder's real-token rows, one tensor per layer."""
    layers = [caps[i] for i in range(len(caps))]
    d_head = layers[0].shape[3]
    names = ("queries", "keys", "values")[: 3 if opts.values else 2]
    arrays: dict[str, Any] = {name: [c.rows[name] for c in layers] for name in names}
    heads = {name: layers[0].rows[name].shape[1] // d_head for name in names}
    if opts.attention_topk:
        arrays["attn_topk_index"], arrays["attn_topk_weight"] = _topk_rows(layers, rows, opts.attention_topk)
        heads["attn_topk_index"] = heads["attn_topk_weight"] = layers[0].shape[1]
    if hidden is not None:
        h = torch.stack(hidden)  # (layer + 1, batch, token, d_model)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        arrays["hidden"] = (h if rows.real is None else h.index_select(1, rows.real)).to(getattr(torch, np_dtype.name))
    return arrays, heads


class _Staged:
    """One batch's arrays on their way to host memory; `arrays()` waits for them and hands them to the store."""

    def __init__(self, host: dict[str, Any], heads: dict[str, int], done: Any = None):
        self.host, self.heads, self.done = host, heads, done
        self.extra: dict[str, np.ndarray] = {}  # arrays made on the host (processed images)

    def arrays(self) -> dict[str, Any]:
        if self.done is not None:
            self.done.synchronize()  # long done by now: the next batch's forward pass ran meanwhile
        return {**{key: rows.numpy() if key == "hidden" else _HeadRows(rows, self.heads[key])
                   for key, rows in self.host.items()}, **self.extra}


# One forward pass as a step yields it: staged arrays, token table, sequence table, sequences in the batch.
_Step = tuple[_Staged, Any, Any, int]


class HostCopies:
    """Device-to-host copies that overlap compute: each array of a batch, (layer, real_token, width) rows, is
    copied layer by layer into one pinned host tensor on a stream of its own, so the forward pass of the next
    batch runs meanwhile; the copies are waited for one batch later (see _pipelined). Host memory holds at
    most two batches of rows (this one and the one being stored), whatever the corpus. On the CPU the rows are
    already in host memory and are used as they are, unless `copy` asks for the copying path anyway (tests)."""

    def __init__(self, device: torch.device, copy: bool | None = None):
        self.copy = device.type != "cpu" if copy is None else copy
        self.cuda, self.device = device.type == "cuda", device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def start(self, arrays: dict[str, Any], heads: dict[str, int]) -> _Staged:
        if not self.copy:
            return _Staged(arrays, heads)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # copies start once the rows are made
        host = {}
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            for key, rows in arrays.items():
                shape = (len(rows), *rows[0].shape)
                host[key] = out = torch.empty(shape, dtype=rows[0].dtype, pin_memory=self.cuda)
                for layer in range(len(rows)):
                    out[layer].copy_(rows[layer], non_blocking=self.cuda)
                    if self.cuda:  # the allocator must not hand its memory out again before the copy has read it
                        rows[layer].record_stream(self.stream)
        if not self.cuda:
            return _Staged(host, heads)
        done = torch.cuda.Event()
        done.record(self.stream)
        return _Staged(host, heads, done)


def _pipelined(steps: Iterator[_Step]) -> Iterator[tuple[Batch, int]]:
    """Yield each batch one step late: a batch's host arrays are waited for only after the next batch's forward
    pass has been queued, so the device computes while the host stores. Closing this closes `steps` (and so
    its capture context) at once."""
    waiting = None
    try:
        for step in steps:
            if waiting is not None:
                yield Batch(waiting[0].arrays(), waiting[1], waiting[2]), waiting[3]
            waiting = step
        if waiting is not None:
            yield Batch(waiting[0].arrays(), waiting[1], waiting[2]), waiting[3]
    finally:
        steps.close()


def _decode_tokens(tok: Any, token_ids: torch.Tensor, cache: dict[int, str]) -> list[str]:
    """One decode per distinct token id (kept across batches), so byte-level BPE pieces read as text
    (" Paris", not "ĠParis")."""
    ids = token_ids.tolist()
    new = sorted(set(ids).difference(cache))
    if new:
        cache.update(zip(new, tok.batch_decode([[i] for i in new], clean_up_tokenization_spaces=False)))
    return [cache[i] for i in ids]


def tokenize(tok: Any, texts: list[str], max_len: int) -> Any:
    """Extract's tokenisation of one batch: padded on the right, cut to `max_len` tokens, torch tensors; a slow
    tokenizer also gives its special-tokens mask (a fast one's encodings carry it)."""
    return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
               return_special_tokens_mask=not tok.is_fast)


def model_inputs(encoding: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """What a text model is given of an encoding, each (batch, token), moved to `device` without waiting."""
    return {k: to_device(encoding[k], device) for k in MODEL_INPUTS if k in encoding}


def text_batches(loaded: LoadedModel, records: list[TextRecord], opts: ExtractOptions, max_len: int,
                 device: torch.device, np_dtype: np.dtype, recipe: Recipe,
                 copies: HostCopies | None = None) -> Iterator[tuple[Batch, int]]:
    """(batch, sequences in it) for `records`, each yielded once the next one's forward pass is queued; run with
    the capture `opts` asks for, q and k stored as `np_dtype`, each sequence cut to `max_len` tokens."""
    batches = _text_steps(loaded, records, opts, max_len, device, np_dtype, recipe, copies or HostCopies(device))
    return _pipelined(batches)


def _text_steps(loaded: LoadedModel, records: list[TextRecord], opts: ExtractOptions, max_len: int,
                device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: HostCopies) -> Iterator[_Step]:
    tok = loaded.preprocessor
    adapter = loaded.adapter
    first_row = 0
    decoded: dict[int, str] = {}  # token id -> its text
    # One capture context for the whole corpus: switching the attention implementation walks every module.
    dtype = getattr(torch, np_dtype.name)
    with capturing(loaded.model, loaded.layer_of_module, opts.attention_topk, adapter.causal, adapter.wrapped,
                   adapter.family, values=opts.values) as rec:
        for start in range(0, len(records), opts.batch_size):
            batch = records[start : start + opts.batch_size]
            # A fast tokenizer's offsets and special tokens are read from its encodings below, for real tokens only.
            encoding = tokenize(tok, [r.text for r in batch], max_len)
            # Where the real tokens are is read off the host's mask: nothing below waits for the device.
            real = encoding["attention_mask"].bool()
            rows = _Rows.of(real, first_row, device)
            enc = model_inputs(encoding, device)
            valid = enc["attention_mask"].bool()
            rec.next_batch(rows.real, dtype)  # None: no padding, every row is kept
            with torch.inference_mode(), autocast(device, opts.precision):
                out = loaded.model(**enc, output_hidden_states=opts.hidden_states)
            recipe.observe(rec.layers, valid, image=False)
            staged = copies.start(*_compact(rec.layers, rows, opts, out.hidden_states if opts.hidden_states else None,
                                            np_dtype))
            lengths = real.sum(1).tolist()
            token_ids = encoding["input_ids"][real]  # (real_token,) in sequence order
            total = len(token_ids)
            if tok.is_fast:  # padding is on the right: each sequence's first n entries are its real tokens
                kept = list(zip(encoding.encodings, lengths))
                is_special = np.fromiter(chain.from_iterable(e.special_tokens_mask[:n] for e, n in kept), bool, total)
                spans = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets[:n]) for e, n in kept),
                                    np.int64, 2 * total).reshape(total, 2)
                starts, ends = np.where(is_special, -1, spans[:, 0]), np.where(is_special, -1, spans[:, 1])
                words = np.fromiter((-1 if w is None else w for e, n in kept for w in e.word_ids[:n]), np.int64, total)
            else:
                is_special = encoding["special_tokens_mask"][real].bool().numpy()
                starts = ends = words = np.full(total, -1, dtype=np.int64)
            # Arrow tables straight from numpy and lists: the store writes them as Parquet row groups.
            tokens = pa.table({
                "sequence": np.repeat(np.arange(start, start + len(batch)), lengths),
                "position": np.concatenate([np.arange(n) for n in lengths]),
                "token": pa.array(_decode_tokens(tok, token_ids, decoded), pa.string()),
                "token_id": token_ids.numpy(),
                "is_special": is_special,
                "char_start": starts,
                "char_end": ends,
                "word": words,
                "source": pa.array(np.repeat(np.array([r.source for r in batch], dtype=object), lengths), pa.string()),
            })
            # A window knows its document and where in it it starts; a truncated sequence knows it was cut.
            cut = [bool(e.overflowing) for e in encoding.encodings] if tok.is_fast else [False] * len(batch)
            sequences = pa.table({
                "sequence": np.arange(start, start + len(batch)),
                "source": pa.array([r.source for r in batch], pa.string()),
                "text": pa.array([r.text for r in batch], pa.string()), "n_tokens": np.asarray(lengths, dtype=np.int64),
                "document": np.asarray([r.document if r.document >= 0 else start + i for i, r in enumerate(batch)], np.int64),
                "doc_char_start": np.asarray([r.doc_start for r in batch], np.int64),
                "window": np.asarray([r.window for r in batch], np.int64),
                "n_windows": np.asarray([r.n_windows for r in batch], np.int64), "truncated": np.asarray(cut, dtype=bool)})
            first_row += int(sum(lengths))
            yield staged, tokens, sequences, len(batch)


def image_geometry(loaded: LoadedModel) -> tuple[int, list[str]]:
    """(patch size in pixels, the tokens before the patches: "cls", "register", ...) of an image model."""
    return patch_size(loaded.config), list(loaded.adapter.prefix)


def _image_pixels(pre: Any, pixel_values: torch.Tensor) -> np.ndarray:
    """(batch, H, W, 3) floats in [0, 1]: the processed input with normalisation undone."""
    px = pixel_values.float().cpu()
    if getattr(pre, "do_normalize", False):
        mean = torch.tensor(pre.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.image_std).view(1, 3, 1, 1)
        px = px * std + mean
    if not getattr(pre, "do_rescale", True):
        px = px / 255.0
    return px.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def image_batches(loaded: LoadedModel, records: list[ImageRecord], opts: ExtractOptions, device: torch.device,
                  np_dtype: np.dtype, recipe: Recipe, copies: HostCopies | None = None) -> Iterator[tuple[Batch, int]]:
    """(batch, images in it) for `records`, each yielded once the next one's forward pass is queued; the
    processed images (image, H, W, 3) uint8 go with the arrays as "images"."""
    return _pipelined(_image_steps(loaded, records, opts, device, np_dtype, recipe, copies or HostCopies(device)))


def _image_steps(loaded: LoadedModel, records: list[ImageRecord], opts: ExtractOptions,
                 device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: HostCopies) -> Iterator[_Step]:
    pre = loaded.preprocessor
    patch, prefix = image_geometry(loaded)
    adapter = loaded.adapter
    first_row = 0
    # One capture context for the whole corpus, as for text.
    with capturing(loaded.model, loaded.layer_of_module, opts.attention_topk, adapter.causal, adapter.wrapped,
                   adapter.family, values=opts.values) as rec:
        for start in range(0, len(records), opts.batch_size):
            batch = records[start : start + opts.batch_size]
            pixel_values = pre(images=[r.image for r in batch], return_tensors="pt")["pixel_values"]
            pixels = _image_pixels(pre, pixel_values)  # (batch, H, W, 3)
            B, H, W, _ = pixels.shape
            rows_, cols_ = H // patch, W // patch
            n = len(prefix) + rows_ * cols_
            real = torch.ones(B, n, dtype=torch.bool)
            rows = _Rows.of(real, first_row, device)
            valid = torch.ones(B, n, dtype=torch.bool, device=device)
            rec.next_batch(None, getattr(torch, np_dtype.name))  # no padding: every row is kept
            with torch.inference_mode(), autocast(device, opts.precision):
                out = loaded.model(pixel_values=to_device(pixel_values, device), output_hidden_states=opts.hidden_states)
            got = rec.layers[0].shape[2]
            if got != n:
                raise ModelError(f"The model saw {got} tokens per image, expected {n} ({len(prefix)} + {rows_}x{cols_} patches).")
            recipe.observe(rec.layers, valid, image=True)
            staged = copies.start(*_compact(rec.layers, rows, opts, out.hidden_states if opts.hidden_states else None,
                                            np_dtype))
            staged.extra["images"] = np.rint(pixels * 255).astype(np.uint8)
            frames, seqs = [], []
            for b, record in enumerate(batch):
                seq_id = start + b
                colours = patch_colour_table(pixels[b], patch)
                head = pd.DataFrame({
                    "patch_row": -1, "patch_col": -1,
                    "mean_r": np.nan, "mean_g": np.nan, "mean_b": np.nan,
                    "hue": np.nan, "saturation": np.nan, "brightness": np.nan,
                }, index=range(len(prefix)))
                table = pd.concat([head, colours], ignore_index=True)
                table.insert(0, "token_kind", prefix + ["patch"] * len(colours))
                table.insert(0, "is_special", [True] * len(prefix) + [False] * len(colours))
                names = [f"[{k.upper()}]" for k in prefix] + [f"patch {r},{c}" for r, c in zip(colours.patch_row, colours.patch_col)]
                table.insert(0, "token", names)
                table.insert(0, "position", np.arange(n))
                table.insert(0, "sequence", seq_id)
                table["source"] = record.source
                frames.append(table)
                seqs.append((seq_id, record.source, record.source, n, rows_, cols_, H))
                first_row += n
            tokens = pd.concat(frames, ignore_index=True)
            sequences = pd.DataFrame(seqs, columns=["sequence", "source", "text", "n_tokens", "grid_rows", "grid_cols", "image_size"])
            yield staged, tokens, sequences, len(batch)


def attention_of_token_ids(loaded: LoadedModel, token_ids: np.ndarray, batch_size: int = 16,
                           precision: str = "float32",
                           device: str = "cpu") -> Iterator[tuple[int, dict[int, np.ndarray]]]:
    """Run the model over sequences given as token ids (no tokenizer: probes such as repeated random tokens)
    with extract's capture, `batch_size` sequences per forward pass, and yield (first sequence, attention) per
    batch: attention maps layer -> (batch, head, query, key) float32 numpy, recomputed from the captured q and
    k exactly as extract's top-k is. token_ids: (sequence, token) int, every sequence of the same length."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError("Token ids must be a (sequence, token) array with at least one token.")
    if loaded.adapter.modality != "text":
        raise InputError(f"{loaded.model_id!r} is an image model; token ids need a text model.")
    dev = resolve_device(device)
    adapter = loaded.adapter
    with capturing(loaded.model, loaded.layer_of_module, 0, adapter.causal, adapter.wrapped, adapter.family,
                   values=False) as rec:
        for start in range(0, len(ids), batch_size):
            batch = torch.from_numpy(ids[start:start + batch_size]).to(dev)
            rec.next_batch()  # no dtype: each layer keeps its full q and k
            with torch.inference_mode(), autocast(dev, precision):
                loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch))
            yield start, {layer: attention_probs(cap, adapter.causal).float().cpu().numpy()
                          for layer, cap in sorted(rec.layers.items())}
