"""Run a model over a corpus and stream per-head q, k (and optional v, top-k attention, hidden
states) into an atlas, one batch at a time, so memory does not grow with the corpus.

Over-long text is truncated to `max_tokens` (default: the model's limit, at most 512), with one
warning that counts the truncated sequences.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from attnatlas import __version__
from attnatlas.errors import InputError, ModelError
from attnatlas.extract.adapters import (ADAPTER_VERSION, Adapter, base_class, check_config, discover, eager_wrapper,
                                       encoder_only, modality_of, patch_size, split_stack)
from attnatlas.extract.capture import LayerCapture, attention_probs, capturing
from attnatlas.extract.recipe import Recipe
from attnatlas.extract.offline import OFFLINE_MODELS, prepare_offline_model
from attnatlas.extract.windows import window_documents
from attnatlas.inputs import ImageRecord, TextRecord, load_corpus, patch_colour_table
from attnatlas.store import FORMAT_VERSION, ArraySpec, Atlas, check_name, tokens_per_chunk

DEFAULT_MAX_TOKENS = 512
STORAGE_DTYPES = ("float16", "float32")
# Batches differ in padded length, so every batch frees and re-allocates tensors of new sizes, and glibc's
# heap fragments: RSS then grows with the corpus (measured: +291 -> +503 MiB over a 20x demo corpus).
# Handing free heap pages back every few batches makes it level off (docs/scale.md) for one heap walk; spaced in
# time too, since each walk costs about 5 ms and the pages it frees are faulted in again by the next batches.
TRIM_EVERY = 8  # batches
TRIM_SECONDS = 2.0


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (not Linux, or a libc without it, such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_heap() -> None:
    """Return free pages of every malloc arena to the OS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class ExtractOptions:
    dtype: str = "float16"  # storage dtype of q, k, v, hidden
    batch_size: int = 16
    max_tokens: int | None = None
    values: bool = False
    attention_topk: int = 8  # 0 = do not store attention
    hidden_states: bool = False
    device: str = "auto"
    precision: str = "float32"  # compute: float32 | bfloat16 | float16 (autocast)
    progress: bool = True
    chunk: bool = False  # split long documents into windows of max_tokens instead of truncating them
    stride: int = 0  # tokens shared by consecutive windows


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocessor: Any  # tokenizer (text) or image processor (image)
    adapter: Adapter
    config: Any
    model_id: str
    source: str  # local folder or hub id actually loaded
    default_name: str
    layer_of_module: dict[int, list[int]] = field(repr=False, default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but no CUDA device is available (use --device auto or cpu).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps was asked for, but MPS is not available (use --device auto or cpu).")
    if device not in ("cpu", "cuda", "mps"):
        raise ModelError(f"Unknown device {device!r}: use auto, cpu, cuda or mps.")
    return torch.device(device)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def default_name(model_id: str) -> str:
    """The atlas name a model gets without --name (known before anything loads)."""
    base, stack = split_stack(model_id)
    if base in OFFLINE_MODELS:
        return base
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(base.rstrip("/")).name).strip(".-") or "model"
    return f"{name}-{stack}" if stack else name


def _model_class(config: Any, stack_config: Any, stack: str | None) -> Any:
    """The transformers class that loads one stack: AutoModel's, the sub-config's, or <X>EncoderModel (for the
    encoder of an encoder-decoder checkpoint and for an encoder-only one alike)."""
    import transformers
    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if stack is None:
        return AutoModel
    if stack == "encoder":
        name = MODEL_MAPPING[type(config)].__name__.replace("Model", "EncoderModel")
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ModelError(f"transformers has no {name} for the encoder of {config.model_type!r}.")
        return cls
    return MODEL_MAPPING[type(stack_config)]


def load_model(model_id: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a supported model from an offline short name, a local folder or a hub id; a composite
    model (T5, CLIP, SigLIP) names its stack after '#': "t5-small#encoder", "clip-vit-base-patch32#vision"."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PretrainedConfig

    base, stack = split_stack(model_id)
    source = str(prepare_offline_model(base)) if base in OFFLINE_MODELS else base
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError/ValueError/HF errors for bad ids
        known = ", ".join(OFFLINE_MODELS)
        raise ModelError(
            f"Could not load a model config from {model_id!r}: {_short_error(exc)} "
            f"(give a Hugging Face hub id, a local model folder, or one of the offline names: {known})."
        ) from None
    try:
        raw = PretrainedConfig.get_config_dict(source)[0]
    except Exception:  # e.g. a config only reachable through AutoConfig's remote code
        raw = None
    stack_config = check_config(config, model_id, stack, raw)  # refusals come before any weights load
    if encoder_only(config):
        stack = "encoder"  # T5EncoderModel & co.: the folder alone or with '#encoder'
    cls = _model_class(config, stack_config, stack)
    # Eager-only families get their own eager attention hooked; the rest use SDPA through the interface.
    base = base_class(stack_config)
    attn = "eager" if base is not None and eager_wrapper(stack_config.model_type, base) is not None else "sdpa"
    try:
        try:
            model = cls.from_pretrained(source, attn_implementation=attn)
        except ValueError as exc:  # no SDPA path (Gemma 2): its eager attention runs between captures
            if "scaled_dot_product_attention" not in str(exc):
                raise
            model = cls.from_pretrained(source, attn_implementation="eager")
        pre = (AutoTokenizer if modality_of(model) == "text" else AutoImageProcessor).from_pretrained(source)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"Could not load {model_id!r}: {_short_error(exc)}") from None
    return prepare_model(model, pre, model_id, source, device)


def prepare_model(model: torch.nn.Module, preprocessor: Any, model_id: str, source: str | None = None,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """Discover a loaded model's attention (one tiny forward pass) and make it ready to extract."""
    model.eval().to(resolve_device(device) if isinstance(device, str) else device)
    adapter = discover(model, model.config)
    pre = preprocessor
    if adapter.modality == "text":
        if pre.pad_token is None:
            # Decoders often ship without one; padded positions are masked out and never stored.
            pre.pad_token = pre.eos_token or pre.unk_token
        pre.padding_side = "right"  # keeps positions of real tokens independent of padding
    return LoadedModel(model, pre, adapter, model.config, model_id, source or model_id, default_name(model_id),
                       adapter.layer_of_module)


def attention_of_token_ids(loaded: LoadedModel, token_ids: np.ndarray, batch_size: int = 16,
                           precision: str = "float32", device: str = "cpu"):
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
            with torch.inference_mode(), _autocast(dev, precision):
                loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch))
            yield start, {layer: attention_probs(cap, adapter.causal).float().cpu().numpy()
                          for layer, cap in sorted(rec.layers.items())}


def hash_texts(records: Sequence[TextRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def hash_images(records: Sequence[ImageRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.image.tobytes())
        h.update(str(r.image.size).encode())
    return h.hexdigest()


class _Batch:
    """What one forward pass yields, already compacted to real (non-padding) tokens."""

    def __init__(self, arrays: dict[str, Any], tokens: pd.DataFrame, sequences: pd.DataFrame):
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
        return _Rows(None if every else _to_device(real, device), _to_device(starts.repeat_interleave(lengths), device),
                     _to_device(lengths.repeat_interleave(lengths), device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: from pinned memory, copied asynchronously."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


class _HostCopies:
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


def _pipelined(steps):
    """Yield each batch one step late: a batch's host arrays are waited for only after the next batch's forward
    pass has been queued, so the device computes while the host stores. Closing this closes `steps` (and so
    its capture context) at once."""
    waiting = None
    try:
        for step in steps:
            if waiting is not None:
                yield _Batch(waiting[0].arrays(), waiting[1], waiting[2]), waiting[3]
            waiting = step
        if waiting is not None:
            yield _Batch(waiting[0].arrays(), waiting[1], waiting[2]), waiting[3]
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


def _text_batches(loaded: LoadedModel, records: list[TextRecord], opts: ExtractOptions, max_len: int,
                  device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: _HostCopies | None = None):
    """Batches of `records` as `_Batch`es, each yielded once the next one's forward pass is queued."""
    batches = _text_steps(loaded, records, opts, max_len, device, np_dtype, recipe, copies or _HostCopies(device))
    return _pipelined(batches)


def _text_steps(loaded: LoadedModel, records: list[TextRecord], opts: ExtractOptions, max_len: int,
                device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: _HostCopies):
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
            encoding = tok([r.text for r in batch], padding=True, truncation=True, max_length=max_len,
                           return_tensors="pt", return_special_tokens_mask=not tok.is_fast)
            # Where the real tokens are is read off the host's mask: nothing below waits for the device.
            real = encoding["attention_mask"].bool()
            rows = _Rows.of(real, first_row, device)
            enc = {k: _to_device(encoding[k], device) for k in ("input_ids", "attention_mask", "token_type_ids")
                   if k in encoding}
            valid = enc["attention_mask"].bool()
            rec.next_batch(rows.real, dtype)  # None: no padding, every row is kept
            with torch.inference_mode(), _autocast(device, opts.precision):
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


def _spare_core(device: torch.device) -> bool:
    """Whether chunk writes can run beside the forward pass without taking a core from it: on an accelerator,
    or with more CPUs than torch's threads. Where torch uses every core, writing between batches from one
    buffer was faster (measured on 2 cores, median of 3-7: SmolLM2 1.10x the forward pass against 1.15x,
    MiniLM 1.14x against 1.22x), and a second buffer per array is never made."""
    if device.type != "cpu":
        return True
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus > torch.get_num_threads()


def _autocast(device: torch.device, precision: str):
    if precision == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def _image_geometry(loaded: LoadedModel) -> tuple[int, list[str]]:
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


def _image_batches(loaded: LoadedModel, records: list[ImageRecord], opts: ExtractOptions,
                   device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: _HostCopies | None = None):
    """Batches of `records` as `_Batch`es, each yielded once the next one's forward pass is queued."""
    return _pipelined(_image_steps(loaded, records, opts, device, np_dtype, recipe, copies or _HostCopies(device)))


def _image_steps(loaded: LoadedModel, records: list[ImageRecord], opts: ExtractOptions,
                 device: torch.device, np_dtype: np.dtype, recipe: Recipe, copies: _HostCopies):
    pre = loaded.preprocessor
    patch, prefix = _image_geometry(loaded)
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
            with torch.inference_mode(), _autocast(device, opts.precision):
                out = loaded.model(pixel_values=_to_device(pixel_values, device), output_hidden_states=opts.hidden_states)
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


def _clamp_topk(opts: ExtractOptions, longest: int, attrs: dict[str, Any]) -> ExtractOptions:
    """No query has more keys than the longest sequence has tokens; a larger K would only store padding
    (and K = 100,000 would allocate (layer, head, token, K) arrays of many GB)."""
    if opts.attention_topk <= longest:
        return opts
    attrs["attention_topk"] = longest
    return dataclasses.replace(opts, attention_topk=longest)


def extract(
    atlas_path: str | Path,
    model: str | LoadedModel,
    texts: str | Path | Sequence[str] | None = None,
    images: str | Path | Sequence[str | Path] | None = None,
    name: str | None = None,
    options: ExtractOptions | None = None,
    overwrite: bool = False,
    text_column: str | None = None,
    dataset: str | None = None,
    corpus: dict[str, Any] | None = None,
) -> str:
    """Extract one model over a corpus into the atlas at `atlas_path`; returns the stored model name.
    The corpus is `texts`, `images` or a Hugging Face `dataset`; `corpus` holds the row selection and
    dataset options of `attnatlas.inputs.load_corpus` (split, image_column, limit, sample, seed)."""
    opts = options or ExtractOptions()
    if opts.dtype not in STORAGE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, not {opts.dtype!r}.")
    if opts.batch_size < 1:
        raise InputError("--batch-size must be at least 1.")
    if opts.attention_topk < 0:
        raise InputError("--attention-topk must be 0 (off) or a positive number of keys.")
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise InputError(f"--max-tokens must be a positive number of tokens, not {opts.max_tokens}.")
    # Inputs are checked and the atlas looked at before the (slow) model load. A new atlas is only
    # created once there is something to write, so a failed extract leaves no empty folder behind.
    text_records, image_records, provenance = load_corpus(texts, images, dataset, text_column=text_column,
                                                          **(corpus or {}))
    atlas = Atlas.open_or_plan(atlas_path)
    if name is not None:
        check_name(name)
    # Without --name the name follows from the model id alone, so a clash is found before any weights load.
    planned = name or (model.default_name if isinstance(model, LoadedModel) else default_name(model))
    if atlas is not None and planned in atlas.models and not overwrite:
        raise InputError(f"The atlas already holds a model named {planned!r}; pass --overwrite or choose another --name.")
    if atlas is not None and planned in atlas.models:
        atlas.refuse_while_projected(planned, "replacing")  # before the weights load; the writer checks again
    device = resolve_device(opts.device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    name = name or loaded.default_name
    check_name(name)
    if atlas is not None and name in atlas.models and not overwrite:
        raise InputError(f"The atlas already holds a model named {name!r}; pass --overwrite or choose another --name.")
    adapter, config = loaded.adapter, loaded.config
    if adapter.modality == "text" and text_records is None:
        raise InputError(f"{loaded.model_id!r} is a text model; give --texts, not --images.")
    if adapter.modality == "image" and image_records is None:
        raise InputError(f"{loaded.model_id!r} is an image model; give --images, not --texts.")

    n_layers, n_heads, n_kv, d_head = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    np_dtype = np.dtype(opts.dtype)
    attrs: dict[str, Any] = dict(
        model_id=loaded.model_id, source=loaded.source, revision=getattr(config, "_commit_hash", None),
        model_type=config.model_type, family=adapter.family, adapter_version=ADAPTER_VERSION,
        modality=adapter.modality, causal=adapter.causal, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, d_head=d_head, d_model=getattr(config, "hidden_size", None) or n_heads * d_head,
        capture=adapter.capture,
        dtype=opts.dtype, attention_topk=opts.attention_topk, attnatlas_version=__version__,
        format_version=FORMAT_VERSION, config=config.to_dict(), device=str(device), precision=opts.precision,
    )
    attrs["input"] = provenance  # where the corpus came from: file, folder or dataset, and which rows
    if loaded.model_id in OFFLINE_MODELS:
        attrs["description"] = OFFLINE_MODELS[loaded.model_id].description
    recipe = Recipe(config.model_type, n_layers, adapter.causal, adapter.window_hint, adapter.window_rule, defer=True)

    if text_records is not None:
        tok = loaded.preprocessor
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or DEFAULT_MAX_TOKENS
        max_len = int(opts.max_tokens or min(limit, DEFAULT_MAX_TOKENS))
        if opts.max_tokens and opts.max_tokens > limit:
            raise InputError(f"--max-tokens {opts.max_tokens} exceeds the model's limit of {limit} positions.")
        room = tok.num_special_tokens_to_add() + 1  # the special tokens plus at least one of the text's own
        if max_len < room:
            raise InputError(f"--max-tokens {max_len} leaves no room for text: {loaded.model_id!r} adds "
                             f"{room - 1} special token(s), so use at least {room}.")
        n_documents = len(text_records)
        if opts.chunk:
            text_records = window_documents(text_records, tok, max_len, opts.stride)
        # Counted in slices so the pre-pass holds lengths only, never the whole tokenized corpus.
        lengths = np.concatenate([
            np.fromiter((len(x) for x in tok([r.text for r in text_records[i : i + 1024]])["input_ids"]), dtype=np.int64)
            for i in range(0, len(text_records), 1024)
        ])
        truncated = int((lengths > max_len).sum())
        if truncated:
            warnings.warn(f"{truncated} of {len(lengths)} sequences are longer than {max_len} tokens and were truncated "
                          f"(raise --max-tokens up to {limit}, or pass --chunk to keep every token as windows).",
                          stacklevel=2)
        n_tokens = int(np.minimum(lengths, max_len).sum())
        opts = _clamp_topk(opts, int(min(lengths.max(), max_len)), attrs)
        attrs.update(input_hash=hash_texts(text_records), n_sequences=len(text_records), max_tokens=max_len,
                     truncated_sequences=truncated, n_documents=n_documents,
                     windows={"stride": opts.stride} if opts.chunk else None)
        n_items = len(text_records)
        batches = _text_batches(loaded, text_records, opts, max_len, device, np_dtype, recipe)
    else:
        patch, prefix = _image_geometry(loaded)
        probe = loaded.preprocessor(images=[image_records[0].image], return_tensors="pt")["pixel_values"]
        H, W = probe.shape[-2:]
        per_image = len(prefix) + (H // patch) * (W // patch)
        n_tokens = per_image * len(image_records)
        opts = _clamp_topk(opts, per_image, attrs)
        attrs.update(input_hash=hash_images(image_records), n_sequences=len(image_records), patch_size=patch,
                     image_size=[int(H), int(W)], prefix_tokens=prefix, grid=[int(H // patch), int(W // patch)])
        n_items = len(image_records)
        batches = _image_batches(loaded, image_records, opts, device, np_dtype, recipe)

    tc = min(tokens_per_chunk(d_head, n_layers * n_heads), n_tokens)  # a small corpus: one exact chunk per head
    # One file per layer and chunk column, holding every head's chunk: a fresh file costs far more than its bytes.
    def per_head(heads: int, width: int, dtype: str, compress: bool = False) -> ArraySpec:
        return ArraySpec((n_layers, heads, n_tokens, width), dtype, 2, (1, 1, tc, width), compress=compress,
                         shards=(1, heads, tc, width))

    specs = {"queries": per_head(n_heads, d_head, opts.dtype), "keys": per_head(n_kv, d_head, opts.dtype)}
    if opts.values:
        specs["values"] = per_head(n_kv, d_head, opts.dtype)
    if opts.attention_topk:
        K = opts.attention_topk
        # Uncompressed, as q and k, so they take the same direct path to their shard files: 6 bytes a key.
        specs["attn_topk_index"] = per_head(n_heads, K, "int32")
        specs["attn_topk_weight"] = per_head(n_heads, K, "float16")
    if opts.hidden_states:
        d_model = attrs["d_model"]
        specs["hidden"] = ArraySpec((n_layers + 1, n_tokens, d_model), opts.dtype, 1, (1, min(tokens_per_chunk(d_model), n_tokens), d_model))
    if adapter.modality == "image":
        H, W = attrs["image_size"]
        specs["images"] = ArraySpec((n_items, H, W, 3), "uint8", 0, (1, H, W, 3), compress=True, per_token=False)

    started = time.perf_counter()
    atlas = atlas or Atlas.open(atlas_path, create=True)
    try:
        _write_model(atlas, name, n_tokens, specs, attrs, overwrite, device, batches, n_items, adapter, opts, recipe,
                     started)
    except torch.cuda.OutOfMemoryError:  # the writer has removed what it wrote
        raise ModelError(f"The {device.type.upper()} device ran out of memory with --batch-size {opts.batch_size}: use "
                         "a smaller --batch-size (or --max-tokens), or --device cpu.") from None
    return name


def _write_model(atlas: Atlas, name: str, n_tokens: int, specs: dict[str, ArraySpec], attrs: dict[str, Any],
                 overwrite: bool, device: torch.device, batches: Any, n_items: int, adapter: Adapter,
                 opts: ExtractOptions, recipe: Recipe, started: float) -> None:
    with atlas.model_writer(name, n_tokens, specs, attrs, overwrite=overwrite, background=_spare_core(device)) as writer:
        # closing(): a failed write ends the batch generator, and so its capture context, at once.
        with tqdm(total=n_items, desc=f"extract {name}", unit="seq" if adapter.modality == "text" else "img",
                  disable=not opts.progress) as bar, contextlib.closing(batches):
            trimmed = (0, time.perf_counter())  # batch and time of the last trim
            for i, (batch, count) in enumerate(batches, 1):
                writer.append(batch.arrays, batch.tokens, batch.sequences)
                bar.update(count)
                if i - trimmed[0] >= TRIM_EVERY and time.perf_counter() - trimmed[1] >= TRIM_SECONDS:
                    _release_free_heap()
                    trimmed = (i, time.perf_counter())
        recipe.finish()
        # What besides q.k shapes attention (attnatlas.attention recomputes it from this alone).
        writer.attrs["attention"] = recipe.to_attrs()
        for key, data in recipe.arrays().items():  # tables the recipe points to (DeBERTa's position tables)
            writer.write_array(key, data)
        writer.attrs["scaling"] = recipe.scaling
        writer.attrs["extract_seconds"] = round(time.perf_counter() - started, 3)
        writer.commit(overwrite=overwrite)
