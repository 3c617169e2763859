"""Run a model over a corpus and stream per-head q, k (and optional v, top-k attention, hidden
states) into an atlas, one batch at a time, so memory does not grow with the corpus.

Over-long text is truncated to `max_tokens` (default: the model's limit, at most 512), with one
warning that counts the truncated sequences.

The mechanisms live beside this module: `loading` (model, tokenizer or processor, adapter), `batches`
(the forward passes under capture), `device` and `options`; `extract` puts them in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from attnatlas.errors import InputError, ModelError
from attnatlas.extract.adapters import ADAPTER_VERSION, Adapter
from attnatlas.extract.batches import Batch, image_batches, image_geometry, text_batches
from attnatlas.extract.device import resolve_device
from attnatlas.extract.loading import LoadedModel, default_name, load_model, prepare_model
from attnatlas.extract.offline import OFFLINE_MODELS
from attnatlas.extract.options import DEFAULT_MAX_TOKENS, STORAGE_DTYPES, ExtractOptions, check_options, token_limits
from attnatlas.extract.recipe import Recipe
from attnatlas.extract.windows import window_documents
from attnatlas.inputs import ImageRecord, TextRecord, load_corpus
from attnatlas.store import FORMAT_VERSION, ArraySpec, Atlas, check_name, tokens_per_chunk
from attnatlas.version import __version__

# Kept importable from here (callers from before the split): the loader, the device and the options.
__all__ = ["DEFAULT_MAX_TOKENS", "STORAGE_DTYPES", "ExtractOptions", "LoadedModel", "extract", "hash_images",
           "hash_texts", "load_model", "prepare_model", "resolve_device"]

# Batches differ in padded length, so every batch frees and re-allocates tensors of new sizes, and glibc's
# heap fragments: RSS then grows with the corpus (measured: +291 -> +503 MiB over a 20x demo corpus).
# Handing free heap pages back every few batches makes it level off (docs/scale.md) for one heap walk; spaced in
# time too, since each walk costs about 5 ms and the pages it frees are faulted in again by the next batches.
TRIM_EVERY = 8  # batches
TRIM_SECONDS = 2.0


@dataclass
class _Plan:
    """The corpus as the model will see it, known before the atlas is written."""

    opts: ExtractOptions  # top-k no wider than the longest sequence
    n_tokens: int  # token rows of every array
    n_items: int  # sequences or images
    batches: Iterator[tuple[Batch, int]]  # not run yet: the forward passes start when the writer asks


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
    check_options(opts)
    # Inputs are checked and the atlas looked at before the (slow) model load. A new atlas is only
    # created once there is something to write, so a failed extract leaves no empty folder behind.
    text_records, image_records, provenance = load_corpus(texts, images, dataset, text_column=text_column,
                                                          **(corpus or {}))
    atlas = Atlas.open_or_plan(atlas_path)
    _check_planned_name(atlas, name, model, overwrite)
    device = resolve_device(opts.device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    name = name or loaded.default_name
    _check_name(atlas, name, overwrite)
    _check_modality(loaded, text_records, image_records)
    attrs = _model_attrs(loaded, opts, device, provenance)
    adapter = loaded.adapter
    recipe = Recipe(loaded.config.model_type, adapter.n_layers, adapter.causal, adapter.window_hint, adapter.window_rule,
                    defer=True)
    if text_records is not None:
        plan = _plan_texts(loaded, text_records, opts, attrs, device, recipe)
    else:
        plan = _plan_images(loaded, image_records, opts, attrs, device, recipe)
    specs = _array_specs(adapter, plan.opts, plan.n_tokens, plan.n_items, attrs)
    started = time.perf_counter()
    atlas = atlas or Atlas.open(atlas_path, create=True)
    try:
        _write_model(atlas, name, plan, specs, attrs, overwrite, device, adapter, recipe, started)
    except torch.cuda.OutOfMemoryError:  # the writer has removed what it wrote
        raise ModelError(f"The {device.type.upper()} device ran out of memory with --batch-size {opts.batch_size}: use "
                         "a smaller --batch-size (or --max-tokens), or --device cpu.") from None
    return name


def _check_planned_name(atlas: Atlas | None, name: str | None, model: str | LoadedModel, overwrite: bool) -> None:
    """Without --name the name follows from the model id alone, so a clash is found before any weights load."""
    if name is not None:
        check_name(name)
    planned = name or (model.default_name if isinstance(model, LoadedModel) else default_name(model))
    _check_name(atlas, planned, overwrite, check=False)
    if atlas is not None and planned in atlas.models:
        atlas.refuse_while_projected(planned, "replacing")  # before the weights load; the writer checks again


def _check_name(atlas: Atlas | None, name: str, overwrite: bool, check: bool = True) -> None:
    if check:
        check_name(name)
    if atlas is not None and name in atlas.models and not overwrite:
        raise InputError(f"The atlas already holds a model named {name!r}; pass --overwrite or choose another --name.")


def _check_modality(loaded: LoadedModel, text_records: list[TextRecord] | None,
                    image_records: list[ImageRecord] | None) -> None:
    if loaded.adapter.modality == "text" and text_records is None:
        raise InputError(f"{loaded.model_id!r} is a text model; give --texts, not --images.")
    if loaded.adapter.modality == "image" and image_records is None:
        raise InputError(f"{loaded.model_id!r} is an image model; give --images, not --texts.")


def _model_attrs(loaded: LoadedModel, opts: ExtractOptions, device: torch.device, provenance: dict[str, Any]) -> dict[str, Any]:
    """What the atlas records of the model and the run; the corpus plan adds its sizes."""
    adapter, config = loaded.adapter, loaded.config
    n_heads, d_head = adapter.n_heads, adapter.d_head
    attrs: dict[str, Any] = dict(
        model_id=loaded.model_id, source=loaded.source, revision=getattr(config, "_commit_hash", None),
        model_type=config.model_type, family=adapter.family, adapter_version=ADAPTER_VERSION,
        modality=adapter.modality, causal=adapter.causal, n_layers=adapter.n_layers, n_heads=n_heads,
        n_kv_heads=adapter.n_kv_heads, d_head=d_head, d_model=getattr(config, "hidden_size", None) or n_heads * d_head,
        capture=adapter.capture,
        dtype=opts.dtype, attention_topk=opts.attention_topk, attnatlas_version=__version__,
        format_version=FORMAT_VERSION, config=config.to_dict(), device=str(device), precision=opts.precision,
    )
    attrs["input"] = provenance  # where the corpus came from: file, folder or dataset, and which rows
    if loaded.model_id in OFFLINE_MODELS:
        attrs["description"] = OFFLINE_MODELS[loaded.model_id].description
    return attrs


def _plan_texts(loaded: LoadedModel, records: list[TextRecord], opts: ExtractOptions, attrs: dict[str, Any],
                device: torch.device, recipe: Recipe) -> _Plan:
    """Texts cut to the token limit (or windowed with --chunk), counted in a pre-pass that keeps lengths only."""
    tok = loaded.preprocessor
    limit, max_len = token_limits(loaded.config, opts.max_tokens)
    if opts.max_tokens and opts.max_tokens > limit:
        raise InputError(f"--max-tokens {opts.max_tokens} exceeds the model's limit of {limit} positions.")
    room = tok.num_special_tokens_to_add() + 1  # the special tokens plus at least one of the text's own
    if max_len < room:
        raise InputError(f"--max-tokens {max_len} leaves no room for text: {loaded.model_id!r} adds "
                         f"{room - 1} special token(s), so use at least {room}.")
    n_documents = len(records)
    if opts.chunk:
        records = window_documents(records, tok, max_len, opts.stride)
    # Counted in slices so the pre-pass holds lengths only, never the whole tokenized corpus.
    lengths = np.concatenate([
        np.fromiter((len(x) for x in tok([r.text for r in records[i : i + 1024]])["input_ids"]), dtype=np.int64)
        for i in range(0, len(records), 1024)
    ])
    truncated = int((lengths > max_len).sum())
    if truncated:
        warnings.warn(f"{truncated} of {len(lengths)} sequences are longer than {max_len} tokens and were truncated "
                      f"(raise --max-tokens up to {limit}, or pass --chunk to keep every token as windows).",
                      stacklevel=3)  # extract's caller
    opts = _clamp_topk(opts, int(min(lengths.max(), max_len)), attrs)
    attrs.update(input_hash=hash_texts(records), n_sequences=len(records), max_tokens=max_len,
                 truncated_sequences=truncated, n_documents=n_documents,
                 windows={"stride": opts.stride} if opts.chunk else None)
    batches = text_batches(loaded, records, opts, max_len, device, np.dtype(opts.dtype), recipe)
    return _Plan(opts, int(np.minimum(lengths, max_len).sum()), len(records), batches)


def _plan_images(loaded: LoadedModel, records: list[ImageRecord], opts: ExtractOptions, attrs: dict[str, Any],
                 device: torch.device, recipe: Recipe) -> _Plan:
    """Every image processed to one size: the first one tells the tokens per image."""
    patch, prefix = image_geometry(loaded)
    probe = loaded.preprocessor(images=[records[0].image], return_tensors="pt")["pixel_values"]
    H, W = probe.shape[-2:]
    per_image = len(prefix) + (H // patch) * (W // patch)
    opts = _clamp_topk(opts, per_image, attrs)
    attrs.update(input_hash=hash_images(records), n_sequences=len(records), patch_size=patch,
                 image_size=[int(H), int(W)], prefix_tokens=prefix, grid=[int(H // patch), int(W // patch)])
    batches = image_batches(loaded, records, opts, device, np.dtype(opts.dtype), recipe)
    return _Plan(opts, per_image * len(records), len(records), batches)


def _array_specs(adapter: Adapter, opts: ExtractOptions, n_tokens: int, n_items: int,
                 attrs: dict[str, Any]) -> dict[str, ArraySpec]:
    """Shape, dtype and chunking of every array the model's entry holds."""
    n_layers, n_heads, n_kv, d_head = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_head
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
        specs["hidden"] = ArraySpec((n_layers + 1, n_tokens, d_model), opts.dtype, 1,
                                    (1, min(tokens_per_chunk(d_model), n_tokens), d_model))
    if adapter.modality == "image":
        H, W = attrs["image_size"]
        specs["images"] = ArraySpec((n_items, H, W, 3), "uint8", 0, (1, H, W, 3), compress=True, per_token=False)
    return specs


def _clamp_topk(opts: ExtractOptions, longest: int, attrs: dict[str, Any]) -> ExtractOptions:
    """No query has more keys than the longest sequence has tokens; a larger K would only store padding
    (and K = 100,000 would allocate (layer, head, token, K) arrays of many GB)."""
    if opts.attention_topk <= longest:
        return opts
    attrs["attention_topk"] = longest
    return dataclasses.replace(opts, attention_topk=longest)


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


def _write_model(atlas: Atlas, name: str, plan: _Plan, specs: dict[str, ArraySpec], attrs: dict[str, Any],
                 overwrite: bool, device: torch.device, adapter: Adapter, recipe: Recipe, started: float) -> None:
    """Run the batches into a new model entry, then add what the recipe learnt; committed only when complete."""
    batches = plan.batches
    with atlas.model_writer(name, plan.n_tokens, specs, attrs, overwrite=overwrite, background=_spare_core(device)) as writer:
        # closing(): a failed write ends the batch generator, and so its capture context, at once.
        with tqdm(total=plan.n_items, desc=f"extract {name}", unit="seq" if adapter.modality == "text" else "img",
                  disable=not plan.opts.progress) as bar, contextlib.closing(batches):
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


def hash_texts(records: Sequence[TextRecord]) -> str:
    """The corpus's fingerprint (input_hash): its texts in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def hash_images(records: Sequence[ImageRecord]) -> str:
    """The corpus's fingerprint (input_hash): its images' pixels and sizes in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.image.tobytes())
        h.update(str(r.image.size).encode())
    return h.hexdigest()
