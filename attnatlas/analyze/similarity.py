"""Patch similarity (EL-VIT's interpretation view): cosine similarity of one token's hidden state to every
token of the same image, at every depth. Read live from stored hidden states; nothing is written."""

from __future__ import annotations

import numpy as np
import pandas as pd

from attnatlas.analyze.common import require_hidden, require_image, sequence_rows
from attnatlas.errors import AtlasError
from attnatlas.store import Atlas


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sequence_hidden(atlas: Atlas, model: str, sequence: int) -> np.ndarray:
    """(layer + 1, n, d_model) float32 hidden states of one image, embeddings first."""
    require_hidden(atlas, model, "Patch similarity")
    rows = sequence_rows(atlas, model, sequence)
    arr = atlas.array(model, "hidden")
    return np.asarray(arr[:, int(rows[0]) : int(rows[-1]) + 1], dtype=np.float32)  # rows are contiguous


def patch_similarity(atlas: Atlas, model: str, sequence: int, position: int) -> np.ndarray:
    """(layer + 1, n) cosine similarity of token `position` of image `sequence` to all its tokens."""
    require_image(atlas, model, "Patch similarity")
    h = _unit(sequence_hidden(atlas, model, sequence))
    if not 0 <= position < h.shape[1]:
        raise AtlasError(f"Image {sequence} of {model!r} has tokens 0..{h.shape[1] - 1}, not {position}.")
    return np.einsum("lnd,ld->ln", h, h[:, position])


def similarity_by_depth(atlas: Atlas, model: str, sequences: list[int] | None = None) -> pd.DataFrame:
    """Per layer, mean over images: cosine of a patch to its 4 grid neighbours, to all other patches,
    and to [CLS]. Shows whether patches grow alike through depth, and whether locally first."""
    require_image(atlas, model, "Patch similarity")
    tok = atlas.tokens(model)
    seqs = sequences if sequences is not None else sorted(tok.sequence.unique().tolist())
    out = []
    for s in seqs:
        rows = sequence_rows(atlas, model, s)
        t = tok.iloc[rows]
        patch = np.flatnonzero((t.token_kind == "patch").to_numpy())
        pr, pc = t.patch_row.to_numpy()[patch], t.patch_col.to_numpy()[patch]
        near = (np.abs(pr[:, None] - pr[None]) + np.abs(pc[:, None] - pc[None])) == 1
        other = ~np.eye(len(patch), dtype=bool)
        h = _unit(sequence_hidden(atlas, model, s))
        for layer in range(h.shape[0]):
            hp = h[layer, patch]
            c = hp @ hp.T
            out.append((s, layer, float(c[near].mean()), float(c[other].mean()), float((hp @ h[layer, 0]).mean())))
    df = pd.DataFrame(out, columns=["sequence", "layer", "neighbour_cosine", "all_cosine", "cls_cosine"])
    return df.groupby("layer", as_index=False)[["neighbour_cosine", "all_cosine", "cls_cosine"]].mean()
