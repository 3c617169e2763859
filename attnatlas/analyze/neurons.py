"""Neuron labels, after "From Colors to Classes": every MLP neuron of every layer is named by the patches
(or tokens) of the corpus that excite it most, and the label says what those top patches share.

Activations are not stored by extraction, so the model is re-run over the atlas's own processed inputs
with a forward pre-hook on each block's MLP down-projection (its input is the post-activation hidden
layer of the MLP). Only a running top-N per neuron is kept, so memory does not grow with the corpus.

Image models rank patches only ([CLS] and register tokens have no pixels to describe). Label kinds, tried
in this order, each needing `share` (default 0.75) of the top-N patches to agree:
  colour      one chromatic colour class (6 hue sectors of the patch's mean colour)
  brightness  one achromatic class: dark, grey or light
  texture     busy (grey-level std within the patch above the corpus's 80th percentile) or flat (below 20th)
  position    the same grid cell or its 8 neighbours, in at least 3 different images
  image       one image (on a photo, the nearest this corpus, which has no class labels, gets to "object")
  mixed       none of these
Text models rank all tokens; kinds: token (same string), category (punctuation, number, subword, ...),
position, mixed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from attnatlas.analyze.common import require_image
from attnatlas.analyze.embeddings import HUE_NAMES, colour_class
from attnatlas.errors import AtlasError, StoreError
from attnatlas.inputs.tokens import token_class
from attnatlas.store import Atlas

log = logging.getLogger(__name__)
TOP_TABLE = "neuron_top"
LABEL_TABLE = "neuron_labels"
PATCH_TABLE = "patch_texture"
KINDS_IMAGE = ("colour", "brightness", "texture", "position", "image", "mixed")
KINDS_TEXT = ("token", "category", "position", "mixed")
# The module whose input is the MLP's intermediate activation, per family (ViT/BERT, DINOv2, SwiGLU, GPT-2, Llama).
_DOWN_PROJ = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.(?:output\.dense|mlp\.fc2|mlp\.weights_out|mlp\.c_proj|mlp\.down_proj)$")


def mlp_modules(model: Any) -> dict[int, Any]:
    """{layer: down-projection module} of a loaded transformers model."""
    found = {}
    for name, module in model.named_modules():
        m = _DOWN_PROJ.search(name)
        if m and "attention" not in name:
            found[int(m.group(1))] = module
    return found


class TopN:
    """Running top-N activations per neuron of one layer: values (N, d_ff) and global token rows (N, d_ff)."""

    def __init__(self, n: int):
        self.n = n
        self.values = None
        self.rows = None

    def update(self, acts: Any, rows: Any) -> None:
        """acts: (tokens, d_ff) torch tensor; rows: (tokens,) int64 torch tensor of global token rows."""
        import torch

        r = rows[:, None].expand_as(acts)
        if self.values is not None:
            acts = torch.cat([self.values, acts])
            r = torch.cat([self.rows, r])
        k = min(self.n, acts.shape[0])
        self.values, idx = acts.topk(k, dim=0)
        self.rows = torch.gather(r, 0, idx)


def _stored_image_batches(atlas: Atlas, model: str, pre: Any, batch_size: int):
    """(pixel_values, global rows of ranked tokens, rows per image) rebuilt from the stored processed images."""
    import torch

    images = atlas.array(model, "images")
    tok = atlas.tokens(model)
    seq = tok.sequence.to_numpy()
    patch = (tok.token_kind == "patch").to_numpy()
    mean = np.asarray(getattr(pre, "image_mean", [0.0, 0.0, 0.0]), dtype=np.float32)
    std = np.asarray(getattr(pre, "image_std", [1.0, 1.0, 1.0]), dtype=np.float32)
    for start in range(0, images.shape[0], batch_size):
        px = np.asarray(images[start : start + batch_size], dtype=np.float32) / 255.0  # (B, H, W, 3)
        if getattr(pre, "do_normalize", True):
            px = (px - mean) / std
        keep = [np.flatnonzero(seq == s) for s in range(start, start + len(px))]
        yield torch.from_numpy(px).permute(0, 3, 1, 2).contiguous(), keep, patch


def _stored_text_batches(atlas: Atlas, model: str, tok_: Any, batch_size: int):
    """(encoding, global rows of each sequence's tokens) of the stored texts, tokenized as extract did."""
    from attnatlas.extract.batches import tokenize

    info = atlas.info(model)
    seqs = atlas.sequences(model)
    seq_of = atlas.tokens(model).sequence.to_numpy()
    max_len = int(info.attrs.get("max_tokens") or 512)
    for start in range(0, len(seqs), batch_size):
        part = seqs.iloc[start : start + batch_size]
        enc = tokenize(tok_, part.text.tolist(), max_len)
        keep = [np.flatnonzero(seq_of == s) for s in part.sequence]
        for b, rows in enumerate(keep):
            if int(enc["attention_mask"][b].sum()) != len(rows):
                raise StoreError(f"Re-tokenising sequence {start + b} gave a different token count than the atlas; "
                                 "the tokenizer at the model source changed since extraction.")
        yield enc, keep


def collect_top(atlas: Atlas, model: str, top: int = 16, batch_size: int = 8, device: str = "cpu",
                progress: bool = True) -> pd.DataFrame:
    """Run the model over the atlas's inputs; (layer, neuron, rank, token, activation) of the top-N per neuron."""
    import torch

    from attnatlas.extract.adapters import split_stack
    from attnatlas.extract.batches import model_inputs
    from attnatlas.extract.device import resolve_device
    from attnatlas.extract.loading import load_model

    info = atlas.info(model)
    source = info.attrs.get("source")
    if not source:
        raise StoreError(f"{model!r} records no model source, so its MLP activations cannot be recomputed.")
    if info.modality == "image" and not atlas.has_array(model, "images"):
        raise StoreError(f"{model!r} has no stored processed images; re-extract it with this attnatlas version.")
    # The source is the folder or hub id without the stack: a CLIP/SigLIP tower or T5's encoder keeps its
    # "#vision"/"#text"/"#encoder" only in model_id.
    stack = split_stack(str(info.attrs.get("model_id") or ""))[1]
    dev = resolve_device(device)
    loaded = load_model(f"{source}#{stack}" if stack else str(source), dev)
    mods = mlp_modules(loaded.model)
    if sorted(mods) != list(range(info.n_layers)):
        raise AtlasError(f"Found MLPs for layers {sorted(mods)} in {source}, expected 0..{info.n_layers - 1}; "
                         f"neuron labels do not support this {info.attrs.get('model_type')!r} layout.")
    tops = {layer: TopN(top) for layer in mods}
    current: dict[str, Any] = {}

    def hook(layer: int):
        def pre(_module, args):
            acts = args[0].detach().float()  # (batch, seq, d_ff)
            flat = acts[current["mask"]]  # (kept tokens, d_ff), batch-major like current["rows"]
            tops[layer].update(flat, current["rows"])
        return pre

    handles = [m.register_forward_pre_hook(hook(layer)) for layer, m in mods.items()]
    bar = tqdm(total=len(atlas.sequences(model)), desc=f"neurons {model}", unit="seq", disable=not progress)
    try:
        with torch.inference_mode():
            if info.modality == "image":
                for px, keep, patch in _stored_image_batches(atlas, model, loaded.preprocessor, batch_size):
                    mask = torch.tensor(np.stack([patch[r] for r in keep]))  # (batch, seq) patches only
                    current["mask"] = mask
                    current["rows"] = torch.from_numpy(np.concatenate([r[patch[r]] for r in keep]))
                    out = loaded.model(pixel_values=px.to(dev))
                    bar.update(len(keep))
                    if out.last_hidden_state.shape[1] != mask.shape[1]:
                        raise StoreError("The model now sees a different number of tokens per image than the atlas holds.")
            else:
                for enc, keep in _stored_text_batches(atlas, model, loaded.preprocessor, batch_size):
                    current["mask"] = enc["attention_mask"].bool()
                    current["rows"] = torch.from_numpy(np.concatenate(keep))
                    loaded.model(**model_inputs(enc, dev))
                    bar.update(len(keep))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    frames = []
    for layer, t in sorted(tops.items()):
        vals, rows = t.values.cpu().numpy(), t.rows.cpu().numpy()  # (N, d_ff)
        n, d = vals.shape
        frames.append(pd.DataFrame({
            "layer": layer, "neuron": np.tile(np.arange(d), n), "rank": np.repeat(np.arange(n), d),
            "token": rows.reshape(-1), "activation": vals.reshape(-1).astype(np.float32),
        }))
    return pd.concat(frames, ignore_index=True).sort_values(["layer", "neuron", "rank"], ignore_index=True)


def patch_texture(atlas: Atlas, model: str) -> np.ndarray:
    """(token,) grey-level std of the pixels of each patch (NaN for [CLS]/register tokens)."""
    info = atlas.info(model)
    p = int(info.attrs["patch_size"])
    images = np.asarray(atlas.array(model, "images")[:], dtype=np.float32) / 255.0
    grey = images @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (n, H, W)
    n, H, W = grey.shape
    std = grey.reshape(n, H // p, p, W // p, p).std(axis=(2, 4))  # (n, rows, cols)
    tok = atlas.tokens(model)
    out = np.full(len(tok), np.nan, dtype=np.float32)
    patch = (tok.token_kind == "patch").to_numpy()
    out[patch] = std[tok.sequence.to_numpy()[patch], tok.patch_row.to_numpy()[patch], tok.patch_col.to_numpy()[patch]]
    return out


def _modal(values: np.ndarray) -> tuple[Any, float]:
    u, c = np.unique(values, return_counts=True)
    return u[c.argmax()], float(c.max() / len(values))


def label_image_neurons(atlas: Atlas, model: str, top: pd.DataFrame, share: float = 0.75) -> pd.DataFrame:
    tok = atlas.tokens(model)
    names = atlas.sequences(model).set_index("sequence").source.astype(str).map(lambda s: s.rsplit("/", 1)[-1])
    texture = patch_texture(atlas, model)
    patch = (tok.token_kind == "patch").to_numpy()
    lo, hi = np.nanpercentile(texture[patch], [20, 80])
    colour = colour_class(tok.hue.to_numpy(float), tok.saturation.to_numpy(float), tok.brightness.to_numpy(float))
    seq, pr, pc = tok.sequence.to_numpy(), tok.patch_row.to_numpy(), tok.patch_col.to_numpy()
    out = []
    for (layer, neuron), g in top.groupby(["layer", "neuron"], sort=True):
        r = g.token.to_numpy()
        col, col_share = _modal(colour[r])
        img, img_share = _modal(seq[r])
        busy, flat = float((texture[r] >= hi).mean()), float((texture[r] <= lo).mean())
        cells = pr[r] * 1000 + pc[r]
        cell, _ = _modal(cells)
        near = (np.abs(pr[r] - cell // 1000) <= 1) & (np.abs(pc[r] - cell % 1000) <= 1)
        n_images = len(np.unique(seq[r]))
        if col_share >= share and col in HUE_NAMES:
            kind, label, s = "colour", str(col), col_share
        elif col_share >= share:
            kind, label, s = "brightness", str(col), col_share
        elif max(busy, flat) >= share:
            kind, label, s = "texture", "busy" if busy >= flat else "flat", max(busy, flat)
        elif near.mean() >= share and n_images >= 3:
            kind, label, s = "position", f"patch {cell // 1000},{cell % 1000}", float(near.mean())
        elif img_share >= share:
            kind, label, s = "image", str(names.get(img, img)), img_share
        else:
            kind, label, s = "mixed", f"{col} / {names.get(img, img)}", max(col_share, img_share)
        out.append((layer, neuron, kind, label, s, n_images, float(g.activation.mean()), float(np.nanmean(texture[r]))))
    return pd.DataFrame(out, columns=["layer", "neuron", "kind", "label", "share", "n_images", "mean_activation", "texture"])


def label_text_neurons(atlas: Atlas, model: str, top: pd.DataFrame, share: float = 0.75) -> pd.DataFrame:
    tok = atlas.tokens(model)
    text = tok.token.to_numpy().astype(str)
    cats = np.array([token_class(t, bool(s)) for t, s in zip(text, tok.is_special)])
    pos, seq = tok.position.to_numpy(), tok.sequence.to_numpy()
    out = []
    for (layer, neuron), g in top.groupby(["layer", "neuron"], sort=True):
        r = g.token.to_numpy()
        word, w_share = _modal(np.char.lower(np.char.strip(text[r])))
        cat, c_share = _modal(cats[r])
        p, p_share = _modal(pos[r])
        n_seq = len(np.unique(seq[r]))
        if w_share >= share:
            kind, label, s = "token", repr(str(word)), w_share
        elif c_share >= share:
            kind, label, s = "category", str(cat), c_share
        elif p_share >= share and n_seq >= 3:
            kind, label, s = "position", f"position {p}", p_share
        else:
            kind, label, s = "mixed", f"{cat} / {word!r}", max(w_share, c_share)
        out.append((layer, neuron, kind, label, s, n_seq, float(g.activation.mean()), np.nan))
    return pd.DataFrame(out, columns=["layer", "neuron", "kind", "label", "share", "n_images", "mean_activation", "texture"])


def compute_neurons(atlas: Atlas, model: str, top: int = 16, share: float = 0.75, batch_size: int = 8,
                    device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Top-N per neuron and labels for every layer; writes `neuron_top` and `neuron_labels`, returns labels."""
    if top < 1:
        raise AtlasError("--top must be at least 1.")
    if not 0 < share <= 1:
        raise AtlasError("--share must be in (0, 1].")
    tops = collect_top(atlas, model, top, batch_size, device, progress)
    if atlas.info(model).modality == "image":
        labels = label_image_neurons(atlas, model, tops, share)
    else:
        labels = label_text_neurons(atlas, model, tops, share)
    atlas.write_table(model, TOP_TABLE, tops)
    atlas.write_table(model, LABEL_TABLE, labels)
    return labels


def read_neurons(atlas: Atlas, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not atlas.has_table(model, LABEL_TABLE):
        raise StoreError(f"{model!r} has no neuron labels yet; run `attnatlas analyze {atlas.path} --model {model} --neurons`.")
    return atlas.read_table(model, TOP_TABLE), atlas.read_table(model, LABEL_TABLE)


def kind_summary(labels: pd.DataFrame) -> pd.DataFrame:
    """(layer x kind) share of neurons with each label kind."""
    t = pd.crosstab(labels.layer, labels.kind, normalize="index")
    order = [k for k in (*KINDS_IMAGE, *KINDS_TEXT) if k in t.columns]
    return t[list(dict.fromkeys(order))]


def require_image_neurons(atlas: Atlas, model: str) -> None:
    require_image(atlas, model, "Neuron thumbnails")
