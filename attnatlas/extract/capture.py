"""Capture per-head q, k, v through transformers' public attention interface.

The model is switched to the "attnatlas" implementation, which records what the model passes to
attention (q and k after any rotary embedding, the model's own mask and scaling) and then runs the
model's normal SDPA kernel, so outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "attnatlas"


@dataclass
class LayerCapture:
    query: torch.Tensor  # (batch, head, token, d_head)
    key: torch.Tensor  # (batch, kv_head, token, d_head)
    value: torch.Tensor  # (batch, kv_head, token, d_head)
    mask: torch.Tensor | None  # (batch, 1, token, token) bool (True = may attend) or additive float
    scaling: float
    topk_weight: torch.Tensor | None = None  # (batch, head, query, k) strongest attention weights
    topk_key: torch.Tensor | None = None  # (batch, head, query, k) their key positions


class _Recorder:
    """Where the active capture goes; one per `capturing` context, keyed by module identity."""

    def __init__(self, layer_of_module: dict[int, int], topk: int = 0, causal: bool = False):
        self.layer_of_module = layer_of_module
        self.topk, self.causal = topk, causal
        self.layers: dict[int, LayerCapture] = {}


_active: list[_Recorder] = []


def _attention(module: torch.nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _active:
        rec = _active[-1]
        layer = rec.layer_of_module.get(id(module))
        if layer is not None:
            scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            cap = LayerCapture(query.detach(), key.detach(), value.detach(), attention_mask, scale)
            rec.layers[layer] = cap
            if rec.topk and not module.training:
                # The probabilities are needed for top-k anyway: attend with them instead of a second
                # SDPA pass (same math; dropout is off in eval).
                probs = attention_probs(cap, rec.causal)  # (batch, head, query, key)
                cap.topk_weight, cap.topk_key = probs.topk(min(rec.topk, probs.shape[-1]), dim=-1)
                v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1) if value.shape[1] != query.shape[1] else value
                return (probs.to(v.dtype) @ v).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def capturing(model: torch.nn.Module, layer_of_module: dict[int, int], topk: int = 0,
              causal: bool = False) -> Iterator[_Recorder]:
    """Route `model`'s attention through the recorder; restores the previous implementation on exit.
    With `topk`, each layer's strongest `topk` keys per query are kept too."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    rec = _Recorder(layer_of_module, topk, causal)
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)
        model.set_attn_implementation(previous)


def attention_probs(cap: LayerCapture, causal: bool) -> torch.Tensor:
    """(batch, head, query, key) softmax(q.k * scaling + mask), recomputed from captured q and k."""
    q, k = cap.query.float(), cap.key.float()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)) * cap.scaling
    return torch.softmax(apply_mask(logits, cap.mask, causal), dim=-1)


def apply_mask(logits: torch.Tensor, mask: Any, causal: bool) -> torch.Tensor:
    """Apply the model's own mask; SDPA passes None when it is plain causal or absent."""
    if mask is None:
        if causal:
            t_q, t_k = logits.shape[-2:]
            allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=logits.device).tril(t_k - t_q)
            return logits.masked_fill(~allowed, float("-inf"))
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill_(mask.logical_not(), float("-inf"))
    return logits.add_(mask.float())
