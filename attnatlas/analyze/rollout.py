"""Attention rollout (Abnar & Zuidema, 2020): how much each token's input flows into the [CLS] output.

Per layer: average the heads, add the identity for the residual path, renormalise the rows, and multiply
the layers' matrices from the first up. Stored per image as table `rollout` with, for every layer,
the [CLS] row of the rollout up to that layer and the raw (head-averaged) [CLS] attention of that layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attnatlas.analyze.common import layer_attention, require_image, sequence_rows
from attnatlas.errors import StoreError
from attnatlas.store import Atlas

TABLE = "rollout"


def rollout(attn: np.ndarray, residual: float = 0.5) -> np.ndarray:
    """(layer, head, n, n) attention -> (layer, n, n) rollout after each layer.

    A_l = residual * I + (1 - residual) * mean_h(attn_l) (rows still sum to 1 when attn rows do);
    R_0 = A_0, R_l = A_l @ R_{l-1}. residual=0.5 is the paper's 0.5 * (A + I).
    """
    L, _, n, _ = attn.shape
    eye = np.eye(n)
    out = np.empty((L, n, n))
    r = eye
    for layer in range(L):
        a = residual * eye + (1.0 - residual) * attn[layer].mean(0)
        a = a / a.sum(-1, keepdims=True)
        r = a @ r
        out[layer] = r
    return out


def compute_rollout(atlas: Atlas, model: str, residual: float = 0.5) -> pd.DataFrame:
    """Rollout of every image, from the stored q and k; writes and returns the `rollout` table."""
    require_image(atlas, model, "Attention rollout")
    info = atlas.info(model)
    tokens = atlas.tokens(model)
    n_seq = int(tokens.sequence.max()) + 1
    seqs = [sequence_rows(atlas, model, s) for s in range(n_seq)]
    attn = [np.zeros((info.n_layers, info.n_heads, len(r), len(r))) for r in seqs]
    for layer in range(info.n_layers):
        for s, a in enumerate(layer_attention(atlas, model, layer, seqs)):
            attn[s][layer] = a
    frames = []
    for s, rows in enumerate(seqs):
        r = rollout(attn[s], residual)  # (L, n, n)
        n = len(rows)
        frames.append(pd.DataFrame({
            "sequence": s,
            "layer": np.repeat(np.arange(info.n_layers), n),
            "position": np.tile(tokens.position.to_numpy()[rows], info.n_layers),
            "token": np.tile(rows, info.n_layers),
            "rollout": r[:, 0, :].reshape(-1).astype(np.float32),  # [CLS] is position 0 in every ViT family
            "cls_attention": attn[s][:, :, 0, :].mean(1).reshape(-1).astype(np.float32),
        }))
    df = pd.concat(frames, ignore_index=True)
    atlas.write_table(model, TABLE, df)
    return df


def read_rollout(atlas: Atlas, model: str) -> pd.DataFrame:
    require_image(atlas, model, "Attention rollout")
    if not atlas.has_table(model, TABLE):
        raise StoreError(f"{model!r} has no rollout yet; run `attnatlas analyze {atlas.path} --model {model} --rollout`.")
    return atlas.read_table(model, TABLE)


def rollout_grid(df: pd.DataFrame, atlas: Atlas, model: str, sequence: int, layer: int, column: str = "rollout") -> np.ndarray:
    """(grid_rows, grid_cols) values of one image's patches, for drawing over the image."""
    rows_, cols_ = atlas.info(model).attrs["grid"]
    sub = df[(df.sequence == sequence) & (df.layer == layer)]
    tok = atlas.tokens(model)
    t = tok.iloc[sub.token.to_numpy()]
    patch = (t.token_kind == "patch").to_numpy()
    grid = np.full((rows_, cols_), np.nan)
    grid[t.patch_row.to_numpy()[patch], t.patch_col.to_numpy()[patch]] = sub[column].to_numpy()[patch]
    return grid
