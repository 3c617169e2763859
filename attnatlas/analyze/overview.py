"""Model overview (EL-VIT's model view) and the math of one head for one token pair (BertViz's neuron view).

Everything comes from the atlas: the config stored at extraction and the stored q and k, so the numbers
shown are exactly those that produced the model's attention (float16 storage rounds them to ~1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnatlas.analyze.common import attention_logits, check_layer, sequence_rows, softmax
from attnatlas.attention import AttentionRecipe, recipe
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
    rec = recipe(atlas, model)
    rows += [
        (f"blocks x {info.n_layers}", "each: LayerNorm -> attention -> add residual -> LayerNorm -> MLP -> add residual"
         if cfg.get("model_type") not in ("bert", "roberta") else
         "each: attention -> add & LayerNorm -> MLP -> add & LayerNorm", f"({n}, {d_model})"),
        ("q, k, v", f"x W_q, x W_k, x W_v (+ bias), split into {info.n_heads} heads of d_head {info.d_head}{gqa}",
         f"({info.n_heads}, {n}, {info.d_head}) each"),
        ("attention", attention_text(rec, info.d_head), f"({info.n_heads}, {n}, {n})"),
        ("mix", "attention @ v per head, heads concatenated, x W_o", f"({n}, {d_model})"),
        ("MLP", f"{d_model} -> {d_ff} ({cfg.get('hidden_act') or cfg.get('activation_function') or '?'}) -> {d_model}",
         f"({n}, {d_model})"),
    ]
    return pd.DataFrame(rows, columns=["stage", "what", "output"])


def scaling_text(scaling: float, d_head: int) -> str:
    """A recorded scaling as a number, named 1/sqrt(d_head) only when it is that (OPT and T5 record 1,
    Gemma 1/sqrt(query_pre_attn_scalar), Granite its attention_multiplier)."""
    return f"{scaling:.4g}" + (" = 1/sqrt(d_head)" if abs(scaling - d_head ** -0.5) <= 1e-6 * d_head ** -0.5 else "")


def _by_layer(values: list, show) -> str:
    """"0.125 in every layer", or runs of layers with their value: "layers 0-3: W = 4096, layer 5: W = 4096"."""
    if len(set(values)) == 1:
        return f"{show(values[0])} in every layer"
    runs: list[list] = []
    for layer, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, v])
    return ", ".join(f"layer {a}: {show(v)}" if a == b else f"layers {a}-{b}: {show(v)}" for a, b, v in runs
                     if v is not None)  # None: the layer has none (no softcap, no window)


def _bias_text(rec: AttentionRecipe) -> str:
    return "relative position bias" if rec.bias["kind"] == "relative" else "position-pair bias"


def attention_text(rec: AttentionRecipe, d_head: int) -> str:
    """What every layer's softmax sees, from the recorded recipe: scaling, softcap, bias, mask and window."""
    s = "q k^T * scaling"
    if getattr(rec, "disentangled", None) is not None:  # DeBERTa
        s = "(q k^T + content-position terms) * scaling"
    if any(rec.softcap):
        s = f"cap * tanh({s} / cap)"
    if rec.bias is not None:
        s += " + " + _bias_text(rec)
    parts = [f"softmax({s}) per head", f"scaling {_by_layer(rec.scaling, lambda v: scaling_text(v, d_head))}"]
    if any(rec.softcap):
        parts.append(f"logit softcap {_by_layer(rec.softcap, lambda v: f'cap = {v:g}')}")
    if rec.bias is not None:
        with_bias = [t is not None for t in rec.bias["layer_table"]]
        if not all(with_bias):
            parts.append(f"{_bias_text(rec)} in layers {', '.join(str(i) for i, b in enumerate(with_bias) if b)}")
    parts.append("causal mask" if rec.causal else "no mask")
    if any(w is not None for w in rec.window):
        rule = "0 <= i - j < W" if rec.window_rule == "causal" else "|i - j| <= W"
        parts.append(f"sliding window ({rule}): {_by_layer(rec.window, lambda v: f'W = {v}')}")
    return "; ".join(parts)


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
    scaling: float  # the layer's recorded scaling (not always 1/sqrt(d_head): see scaling_text)
    logits: np.ndarray  # (n,) what the softmax sees for every key m (scaled, capped, biased), -inf where masked
    softmax: np.ndarray  # (n,) attention row of query i
    softcap: float | None = None  # the layer's logit softcap
    bias: float | None = None  # the recorded additive bias of the pair (i, j)
    window: int | None = None  # the layer's sliding window
    masked: bool = False  # key j is hidden from query i (causal mask or window)
    position: float | None = None  # DeBERTa's content-position terms of (i, j), added to q.k before scaling

    @property
    def scaled(self) -> float:
        return (self.dot + (self.position or 0.0)) * self.scaling

    @property
    def capped(self) -> float:
        return float(np.tanh(self.scaled / self.softcap) * self.softcap) if self.softcap else self.scaled

    @property
    def logit(self) -> float:
        return float(self.logits[self.j])

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
    rec = recipe(atlas, model)
    b = rec.bias_of(layer, head, n)
    pos = rec.position_terms(q, k, layer, head)[i, j] if getattr(rec, "disentangled", None) is not None else None
    return HeadMath(layer, head, sequence, i, j, atlas.tokens(model).token.to_numpy()[rows].tolist(),
                    q[i], k[j], q[i] * k[j], float(q[i] @ k[j]), float(rec.scaling[layer]), logits, softmax(logits),
                    rec.softcap[layer] or None, None if b is None else float(b[i, j]), rec.window[layer],
                    not bool(rec.allowed(layer, n)[i, j]), None if pos is None else float(pos))
