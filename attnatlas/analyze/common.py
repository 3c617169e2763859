"""Helpers shared by the analyses: modality checks, per-sequence rows, exact attention from stored q and k."""

from __future__ import annotations

import numpy as np

from attnatlas.attention import recipe
from attnatlas.errors import AtlasError, StoreError
from attnatlas.store import Atlas


def require_image(atlas: Atlas, model: str, what: str) -> None:
    """Image-only analyses name the problem instead of failing on missing patch columns."""
    info = atlas.info(model)
    if info.modality != "image":
        raise AtlasError(
            f"{what} needs an image model, but {model!r} is a {info.modality} model "
            f"({info.attrs.get('model_id')}); pick a ViT, DeiT or DINOv2 model from this atlas."
        )


def require_hidden(atlas: Atlas, model: str, what: str) -> None:
    if not atlas.has_array(model, "hidden"):
        raise StoreError(
            f"{what} needs hidden states, but {model!r} was extracted without them; "
            f"re-run `attnatlas extract ... --hidden-states --overwrite`."
        )


def sequence_rows(atlas: Atlas, model: str, sequence: int) -> np.ndarray:
    """(n,) global token rows of one sequence or image, in position order."""
    seq = atlas.tokens(model).sequence.to_numpy()
    rows = np.flatnonzero(seq == sequence)
    if len(rows) == 0:
        n = int(seq.max()) + 1 if len(seq) else 0
        raise AtlasError(f"{model!r} has no sequence {sequence} (it has 0..{n - 1}).")
    return rows


def check_layer(atlas: Atlas, model: str, layer: int) -> None:
    n = atlas.info(model).n_layers
    if not 0 <= layer < n:
        raise AtlasError(f"Layer {layer} is out of range for {model!r} (0..{n - 1}).")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def attention_logits(atlas: Atlas, model: str, layer: int, head: int, rows: np.ndarray,
                     q: np.ndarray | None = None, k: np.ndarray | None = None) -> np.ndarray:
    """(n, n) float64 logits of one sequence's rows as the model's softmax sees them: q.k (plus any
    content-position terms) * scaling, softcapped, plus any recorded bias, -inf where the causal mask or the
    layer's window hides a key."""
    rec = recipe(atlas, model)
    q = atlas.queries(model, layer, head)[rows] if q is None else q
    k = atlas.keys(model, layer, head)[rows] if k is None else k
    q, k = q.astype(np.float64), k.astype(np.float64)
    return rec.logits(q @ k.T, layer, head, q=q, k=k)


def layer_attention(atlas: Atlas, model: str, layer: int, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """Per sequence, (head, n, n) exact attention of one layer (attnatlas.attention's recipe: scaling,
    softcap, bias, causal mask and window); reads each head's q and k once."""
    info = atlas.info(model)
    rec = recipe(atlas, model)
    out = [np.zeros((info.n_heads, len(r), len(r))) for r in sequences]
    for head in range(info.n_heads):
        q_all = atlas.queries(model, layer, head)
        k_all = atlas.keys(model, layer, head)
        for i, rows in enumerate(sequences):
            q, k = q_all[rows].astype(np.float64), k_all[rows].astype(np.float64)
            out[i][head] = rec.probabilities(q @ k.T, layer, head, q=q, k=k)
    return out
