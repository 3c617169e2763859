"""A head's attention recomputed exactly from the atlas alone (numpy only: the app uses this, never torch).

    p = softmax(cap((q.k + c2p + p2c) * scaling) + bias + mask)

cap is the layer's logit softcap (Gemma 2), bias an additive term recorded at extraction (relative
position bias of T5, ALiBi of Bloom as a function of the key-query offset, Falcon's as a function of the
key's position; BEiT's position-pair bias), mask the causal mask and the layer's sliding window. c2p and
p2c are DeBERTa's content-position terms, c2p[i, j] = q_i . Kr[c(i, j)] and p2c[i, j] = k_j . Qr[p(i, j)]:
Kr, Qr are the layer's relative embeddings projected as keys and queries (stored arrays), c and p the
model's relative position of i to j (of j to i for p2c, negated) shifted by the span and clamped to it.
Everything comes from the model's attrs (`attention`, written by the extractor); atlases written before
it fall back to `scaling` and `causal`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnatlas.errors import AtlasError


def unpack(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["base64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"])


@dataclass
class AttentionRecipe:
    """What the atlas records about one model's attention besides q and k."""

    n_layers: int
    causal: bool
    scaling: list[float]
    softcap: list[float | None]
    window: list[int | None]
    window_rule: str = "causal"  # causal: 0 <= i - j < window; bidirectional: |i - j| <= window
    bias: dict[str, Any] | None = None
    disentangled: dict[str, Any] | None = None  # DeBERTa: terms, span, relative positions, arrays
    read_layer: Callable[[str, int], np.ndarray] | None = None  # (array key, layer) -> that layer of a model array
    _tables: dict[int, Any] = field(default_factory=dict, repr=False)
    _positions: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    _rel: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], n_layers: int, d_head: int,
                   read_layer: Callable[[str, int], np.ndarray] | None = None) -> AttentionRecipe:
        a = attrs.get("attention") or {}
        scaling = a.get("scaling") or attrs.get("scaling") or [d_head ** -0.5] * n_layers
        scaling = [float(s) if s is not None else d_head ** -0.5 for s in scaling]
        return cls(n_layers, bool(a.get("causal", attrs.get("causal", False))), scaling,
                   list(a.get("softcap") or [None] * n_layers), list(a.get("window") or [None] * n_layers),
                   a.get("window_rule", "causal"), a.get("bias"), a.get("disentangled"), read_layer)

    @property
    def additive(self) -> bool:
        """Whether a term other than q.k (a bias, content-position terms) shapes attention: the joint layout then
        shows q.k only."""
        return self.bias is not None or self.disentangled is not None

    def _table(self, layer: int):
        if self.bias is None:
            return None
        t = self.bias["layer_table"][layer]
        if t is None:
            return None
        if t not in self._tables:
            entry = self.bias["tables"][t]
            if self.bias["kind"] != "relative":
                self._tables[t] = (unpack(entry["values"]), unpack(entry["index"]))
            else:
                self._tables[t] = (unpack(entry["offsets"]),) if "offsets" in entry else (unpack(entry["keys"]), "keys")
        return self._tables[t]

    def allowed(self, layer: int, n: int) -> np.ndarray:
        """(query, key) bool: which keys each query may attend to in a sequence of n tokens."""
        d = np.arange(n)[:, None] - np.arange(n)[None, :]  # i - j
        ok = np.ones((n, n), dtype=bool)
        if self.causal:
            ok &= d >= 0
        w = self.window[layer]
        if w is not None:
            ok &= (d < w) if self.window_rule == "causal" else (np.abs(d) <= w)
        return ok

    def bias_of(self, layer: int, head: int, n: int) -> np.ndarray | None:
        """(query, key) float64 additive bias of one head, or None."""
        t = self._table(layer)
        if t is None:
            return None
        if self.bias["kind"] == "relative" and len(t) == 2:
            table = t[0]  # (head, key): a function of the key's position (Falcon's bfloat16 ALiBi)
            if n > table.shape[1]:
                raise AtlasError(f"The recorded attention bias covers sequences of up to {table.shape[1]} tokens, "
                                 f"not {n}.")
            row = table[head if table.shape[0] > 1 else 0, :n].astype(np.float64)
            return np.broadcast_to(row, (n, n))
        if self.bias["kind"] == "relative":
            table = t[0]  # (head, 2 * span - 1)
            span = table.shape[1] // 2 + 1
            if n > span:
                raise AtlasError(f"The recorded attention bias covers sequences of up to {span} tokens, not {n}.")
            off = np.arange(n)[None, :] - np.arange(n)[:, None] + span - 1
            return table[head if table.shape[0] > 1 else 0, off].astype(np.float64)  # 1 row: shared by all heads
        values, index = t  # (unique, head), (n, n)
        if index.shape[0] != n:
            raise AtlasError(f"The recorded attention bias is for {index.shape[0]} tokens, not {n}.")
        return values[index, head if values.shape[1] > 1 else 0].astype(np.float64)

    def position_terms(self, q: np.ndarray, k: np.ndarray, layer: int, head: int) -> np.ndarray:
        """(..., query, key) DeBERTa's c2p + p2c of one head before scaling, from q (..., query, d_head) and
        k (..., key, d_head) of sequences whose slot is the position."""
        d = self.disentangled
        n = q.shape[-2]
        rel = self._relative()
        if n > len(rel) // 2 + 1:
            raise AtlasError(f"The recorded relative positions cover sequences of up to {len(rel) // 2 + 1} tokens, "
                             f"not {n}.")
        span = int(d["span"])
        i = np.arange(n)
        r = rel[i[:, None] - i[None, :] + len(rel) // 2]  # (query, key): the model's relative position of i to j
        out = np.zeros((*np.broadcast_shapes(q.shape[:-2], k.shape[:-2]), n, n))
        if "c2p" in d["terms"]:
            c2p = q @ self._position("c2p", layer)[head].T  # (..., query, 2 * span)
            out = out + np.take_along_axis(c2p, np.clip(r + span, 0, 2 * span - 1)[(None,) * (c2p.ndim - 2)], -1)
        if "p2c" in d["terms"]:
            p2c = k @ self._position("p2c", layer)[head].T  # (..., key, 2 * span)
            # p2c[i, j] = k_j . Qr[clamp(-rel(j, i) + span)]: gathered along the key's row, then transposed
            idx = np.clip(-r + span, 0, 2 * span - 1)[(None,) * (p2c.ndim - 2)]
            out = out + np.swapaxes(np.take_along_axis(p2c, idx, -1), -1, -2)
        return out

    def _relative(self) -> np.ndarray:
        """(2 * n - 1,) the model's relative position of query i to key j, at index i - j + n - 1."""
        if self._rel is None:
            self._rel = unpack(self.disentangled["relative"]).astype(np.int64)
        return self._rel

    def _position(self, term: str, layer: int) -> np.ndarray:
        """(head, 2 * span, d_head) float64 position table of one layer (Kr for c2p, Qr for p2c)."""
        if (term, layer) not in self._positions:
            if self.read_layer is None:
                raise AtlasError("This model's attention has content-position terms whose tables are stored in the "
                                 "atlas; build the recipe with attnatlas.attention.recipe(atlas, model).")
            self._positions[term, layer] = np.asarray(self.read_layer(self.disentangled["arrays"][term], layer),
                                                      dtype=np.float64)
        return self._positions[term, layer]

    def logits(self, qk: np.ndarray, layer: int, head: int, valid: np.ndarray | None = None,
               q: np.ndarray | None = None, k: np.ndarray | None = None) -> np.ndarray:
        """What the model's softmax sees, from raw q.k `qk` (..., query, key) of sequences whose slot is the
        position: cap((q.k + c2p + p2c) * scaling) + bias, -inf where a key is masked; valid: (..., slot) bool
        when padded. q (..., query, d_head) and k (..., key, d_head), the vectors of `qk`, are needed for a
        model with content-position terms (DeBERTa: `disentangled`)."""
        n = qk.shape[-1]
        if self.disentangled is not None:
            if q is None or k is None:
                raise AtlasError("This model's attention adds content-position terms: pass q and k, not only q.k.")
            qk = qk + self.position_terms(q, k, layer, head).astype(qk.dtype)
        x = qk * self.scaling[layer]
        cap = self.softcap[layer]
        if cap:
            x = np.tanh(x / cap) * cap
        b = self.bias_of(layer, head, n)
        allow = self.allowed(layer, n)
        if valid is not None:
            allow = allow & valid[..., :, None] & valid[..., None, :]
        if b is not None:
            if (np.isnan(b) & self.allowed(layer, n)).any():
                raise AtlasError("The recorded attention bias lacks a key-query offset this sequence needs.")
            x = x + np.nan_to_num(b).astype(x.dtype)
        return np.where(allow, x, -np.inf)

    def probabilities(self, qk: np.ndarray, layer: int, head: int, valid: np.ndarray | None = None,
                      q: np.ndarray | None = None, k: np.ndarray | None = None) -> np.ndarray:
        """softmax over keys of `logits(qk, ...)`; 0 where a key is masked (a row with no key is all 0)."""
        x = self.logits(qk, layer, head, valid, q, k)
        allow = x != -np.inf  # NaN logits (broken vectors) stay NaN rather than looking masked
        top = x.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            p = np.exp(x - top)
            p /= np.maximum(p.sum(-1, keepdims=True), np.finfo(p.dtype).tiny)
        return np.where(allow, p, 0).astype(p.dtype)


def layout_note(atlas, model: str) -> str | None:
    """One plain sentence for views of the joint layout of a model whose attention is not only q.k, else None."""
    rec = recipe(atlas, model)
    parts = []
    if rec.disentangled is not None:
        parts.append("disentangled content-position terms (each query against relative-position keys, each key "
                     "against relative-position queries)")
    if rec.bias is not None:
        parts.append("a relative position bias" if rec.bias["kind"] == "relative" else "a position-pair bias")
    if any(rec.softcap):
        parts.append("a logit softcap")
    if any(w is not None for w in rec.window):
        parts.append("a sliding window")
    if not parts:
        return None
    return (f"The joint layout shows the q·k part only: this model's attention also applies {' and '.join(parts)}, "
            "which attention lines, compare and analyze include.")


def recipe(atlas, model: str) -> AttentionRecipe:
    info = atlas.info(model)
    return AttentionRecipe.from_attrs(info.attrs, info.n_layers, info.d_head,
                                      lambda key, layer: atlas.array(model, key)[layer])


def attention_from_atlas(atlas, model: str, layer: int, head: int, sequence: int) -> np.ndarray:
    """(query, key) float64 attention probabilities of one head over one sequence, in position order,
    recomputed from the stored q and k and the recorded scaling, softcap, window and bias.

    atlas: what `attnatlas.open_atlas` returns, or a path; sequence: its id in the token table."""
    if isinstance(atlas, (str, os.PathLike)):
        from attnatlas.store import open_atlas

        atlas = open_atlas(atlas)
    info = atlas.info(model)
    if not 0 <= layer < info.n_layers:
        raise AtlasError(f"Layer {layer} is out of range for {model!r} (0..{info.n_layers - 1}).")
    if not 0 <= head < info.n_heads:
        raise AtlasError(f"Head {head} is out of range for {model!r} (0..{info.n_heads - 1}).")
    tokens = atlas.tokens(model)
    rows = np.flatnonzero(tokens.sequence.to_numpy() == sequence)
    if len(rows) == 0:
        raise AtlasError(f"{model!r} has no sequence {sequence}.")
    rows = rows[np.argsort(tokens.position.to_numpy()[rows], kind="stable")]
    q = atlas.queries(model, layer, head)[rows].astype(np.float64)
    k = atlas.keys(model, layer, head)[rows].astype(np.float64)
    return recipe(atlas, model).probabilities(q @ k.T, layer, head, q=q, k=k)
