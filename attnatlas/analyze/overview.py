"""Model overview (EL-VIT's model view) and the math of one head for one token pair (BertViz's neuron view).

Everything comes from the atlas: the config stored at extraction and the stored q and k, so the numbers
shown are exactly those that produced the model's attention (float16 storage rounds them to ~1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnatlas.analyze.common import attention_logits, check_layer, sequence_rows, softmax
from attnatlas.errors import AtlasError
from attnatlas.store import Atlas


def architecture(atlas: Atlas, model: str) -> pd.DataFrame:
    """One row per stage of the forward pass: what it is and the shape it produces."""
    info = atlas.info(model)
    a, cfg = info.attrs, info.attrs.get("config") or {}
    d_model = int(a.get("d_model") or info.n_heads * info.d_head)
    d_ff = cfg.get("intermediate_size") or (int(d_model * cfg["mlp_ratio"]) if cfg.get("mlp_ratio") else None)
    d_ff = d_ff or cfg.get("n_inner") or 4 * d_model
    gqa = f", {info.n_kv_heads} shared key/value heads" if info.n_kv_heads != info.n_heads else ""
    rows = []
    if info.modality == "image":
        H, W = a.get("image_size", ["?", "?"])
        gr, gc = a.get("grid", ["?", "?"])
        prefix = a.get("prefix_tokens", ["cls"])
        n = len(prefix) + (gr * gc if isinstance(gr, int) else 0)
        rows += [
            ("input", f"{H}x{W} RGB image, normalised", f"(3, {H}, {W})"),
            ("patching", f"{a.get('patch_size')}x{a.get('patch_size')} patches -> {gr}x{gc} grid, each linearly "
             f"embedded; {', '.join('[' + p.upper() + ']' for p in prefix)} prepended; position embeddings added",
             f"({n}, {d_model})"),
        ]
    else:
        n = "n"
        rows.append(("input", "word pieces of the text; token + position embeddings", f"(n, {d_model})"))
    scale = a.get("scaling", [None])[0]
    rows += [
        (f"blocks x {info.n_layers}", "each: LayerNorm -> attention -> add residual -> LayerNorm -> MLP -> add residual"
         if cfg.get("model_type") not in ("bert", "roberta") else
         "each: attention -> add & LayerNorm -> MLP -> add & LayerNorm", f"({n}, {d_model})"),
        ("q, k, v", f"x W_q, x W_k, x W_v (+ bias), split into {info.n_heads} heads of d_head {info.d_head}{gqa}",
         f"({info.n_heads}, {n}, {info.d_head}) each"),
        ("attention", f"softmax(q k^T * {scale:.4g}) per head" + (" (1/sqrt(d_head))" if scale and abs(scale - info.d_head ** -0.5) < 1e-6 else "")
         + (", causal mask" if a.get("causal") else ", no mask"), f"({info.n_heads}, {n}, {n})"),
        ("mix", "attention @ v per head, heads concatenated, x W_o", f"({n}, {d_model})"),
        ("MLP", f"{d_model} -> {d_ff} ({cfg.get('hidden_act') or cfg.get('activation_function') or '?'}) -> {d_model}",
         f"({n}, {d_model})"),
    ]
    return pd.DataFrame(rows, columns=["stage", "what", "output"])


@dataclass
class HeadMath:
    """The numbers of one head for query token i and key token j of one sequence."""

    layer: int
    head: int
    sequence: int
    i: int
    j: int
    tokens: list[str]  # (n,) token texts of the sequence
    q: np.ndarray  # (d_head,)
    k: np.ndarray  # (d_head,)
    qk: np.ndarray  # (d_head,) element-wise q * k
    dot: float  # sum(qk)
    scaling: float  # 1/sqrt(d_head) for every supported family
    logits: np.ndarray  # (n,) q . k_m * scaling for every key m, -inf where masked
    softmax: np.ndarray  # (n,) attention row of query i

    @property
    def scaled(self) -> float:
        return self.dot * self.scaling

    @property
    def weight(self) -> float:
        return float(self.softmax[self.j])


def head_math(atlas: Atlas, model: str, layer: int, head: int, sequence: int, i: int, j: int) -> HeadMath:
    info = atlas.info(model)
    check_layer(atlas, model, layer)
    if not 0 <= head < info.n_heads:
        raise AtlasError(f"Head {head} is out of range for {model!r} (0..{info.n_heads - 1}).")
    rows = sequence_rows(atlas, model, sequence)
    n = len(rows)
    for name, v in (("query", i), ("key", j)):
        if not 0 <= v < n:
            raise AtlasError(f"The {name} position {v} is out of range: sequence {sequence} has tokens 0..{n - 1}.")
    q = atlas.queries(model, layer, head)[rows].astype(np.float64)
    k = atlas.keys(model, layer, head)[rows].astype(np.float64)
    logits = attention_logits(atlas, model, layer, head, rows, q, k)[i]
    scaling = float((info.attrs.get("scaling") or [info.d_head ** -0.5] * info.n_layers)[layer])
    return HeadMath(layer, head, sequence, i, j, atlas.tokens(model).token.to_numpy()[rows].tolist(),
                    q[i], k[j], q[i] * k[j], float(q[i] @ k[j]), scaling, logits, softmax(logits))
