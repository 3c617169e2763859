"""Capture per-head q, k, v and everything else that shapes attention, without forking model code.

Models that call transformers' attention interface are switched to the "attnatlas" implementation,
which records what the model passes to attention (q and k after any rotary embedding, the mask,
scaling, softcap, an additive `position_bias`) and then attends as the model would. Models that call
no interface (eager-only code) get their attention modules and projections hooked on the instance (see
adapters.WRAPPED), never a private method wrapped: the hooks record the module's arguments by name and what
its projections return, and the original code runs unchanged. DeBERTa's disentangled attention adds content-position terms,
recorded as the layer's position tables and relative positions.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnatlas.errors import ModelError

IMPLEMENTATION = "attnatlas"
# Additive float masks block with finfo.min or -inf; anything above this is a bias, not a block.
BLOCKED = -1e4
# Keyword arguments some families pass that change attention in a way the atlas cannot record yet.
UNRECORDABLE = ("s_aux", "sinks")


@dataclass
class Disentangled:
    """DeBERTa's content-position terms, added to q.k before scaling:
    c2p[i, j] = q_i . pos_key[clamp(rel[i, j] + span)], p2c[i, j] = k_j . pos_query[clamp(-rel[j, i] + span)],
    clamp to 0 .. 2 * span - 1 (disentangled_attention_bias, written out)."""

    relative: torch.Tensor  # (query, key) long: the model's (bucketed) relative position of query i to key j
    span: int
    pos_key: torch.Tensor | None  # (head, 2 * span, d_head) relative embeddings projected as keys, for c2p
    pos_query: torch.Tensor | None  # (head, 2 * span, d_head) projected as queries, for p2c


@dataclass
class LayerCapture:
    query: torch.Tensor  # (batch, head, token, d_head)
    key: torch.Tensor  # (batch, kv_head, token, d_head)
    value: torch.Tensor  # (batch, kv_head, token, d_head)
    mask: torch.Tensor | None  # (batch, 1|head, token, token) bool (True = may attend) or additive float
    scaling: float
    softcap: float | None = None  # logits -> softcap * tanh(logits / softcap), before bias and mask
    bias: torch.Tensor | None = None  # (batch|1, head|1, token|1, token) additive term that is not a mask
    sliding_window: int | None = None  # what the model passed, a hint for which layers are windowed
    is_causal: bool | None = None  # what the model passed for SDPA when the mask is None
    unrecordable: str | None = None  # a keyword the atlas cannot record (the extractor refuses)
    topk_weight: torch.Tensor | None = None  # (batch, head, query, k) strongest attention weights (see _Recorder.top)
    topk_key: torch.Tensor | None = None  # (batch, head, query, k) their key positions
    disentangled: Disentangled | None = None  # DeBERTa: content-position terms
    key_bias: bool = False  # bias is (batch, head, 1, key): a function of the key's position, stored by key
    # With the recorder's `rows` set: q, k (and v) of the real tokens only, (real_token, head * d_head) in the
    # storage dtype, and query/key/value dropped, so the padded float tensors are freed layer by layer.
    rows: dict[str, torch.Tensor] | None = None
    shape: tuple[int, ...] = ()  # (batch, head, token, d_head) of the query as captured


class _Recorder:
    """Where the active capture goes; one per `capturing` context, keyed by module identity.
    With `layer_of_module` None every attention call is kept in call order (discovery)."""

    def __init__(self, layer_of_module: dict[int, list[int]] | None, topk: int = 0, causal: bool = False,
                 values: bool = True):
        self.layer_of_module = layer_of_module  # id(module) -> its layers in call order (ALBERT shares one)
        self.topk, self.causal, self.values = topk, causal, values
        self.layers: dict[int, LayerCapture] = {}
        self.calls: list[tuple[torch.nn.Module, LayerCapture]] = []
        self._seen: dict[int, int] = {}
        self._masks: dict[tuple, tuple] = {}  # a mask tensor the model passes -> (it, split(it))
        self.real: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self._where: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def next_batch(self, real: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> None:
        """Start recording the next forward pass (one capture context serves a whole extraction). With `dtype`,
        each layer keeps only its q and k rows in that dtype: those of `real`, the flat (batch * token) indices of
        the real tokens, or all rows when `real` is None."""
        self.layers, self.calls, self._seen, self._masks = {}, [], {}, {}
        self.real, self.dtype, self._where = real, dtype, None

    def split(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """(mask, bias, by key) of what the model passes as the mask (_split_mask, then by_key), worked out once for
        a mask tensor that every layer is passed, so the layers share one mask and one bias. The tensor is kept
        alive until the next batch, so its address cannot be reused by another meanwhile."""
        if attention_mask is None:
            return None, None, False
        key = (attention_mask.data_ptr(), tuple(attention_mask.shape), attention_mask.stride(), attention_mask.dtype)
        if key not in self._masks:
            mask, bias = _split_mask(attention_mask)
            keyed = None if bias is None else by_key(bias, mask)
            self._masks[key] = (attention_mask, mask, bias if keyed is None else keyed, keyed is not None)
        return self._masks[key][1:]

    def _compact(self, cap: LayerCapture) -> None:
        # Models make q, k as (batch, token, head, d) and view them as (batch, head, token, d): viewed back, a
        # contiguous cast and then a pick of the real rows is the cheap order (measured 4x faster than picking
        # through the transposed view). Done as each layer runs, the padded tensors never pile up.
        cap.shape = tuple(cap.query.shape)
        named = {"queries": cap.query, "keys": cap.key, **({"values": cap.value} if self.values else {})}
        cap.rows = {}
        for name, t in named.items():
            B, H, T, D = t.shape
            rows = t.transpose(1, 2).reshape(B * T, H * D).to(self.dtype)
            cap.rows[name] = rows if self.real is None else rows.index_select(0, self.real)
        cap.query = cap.key = cap.value = None

    def top(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `topk` strongest keys of every query in probs (batch, head, query, key), weights and positions:
        (batch, head, query, k); with the recorder's `dtype` set, (row, head, k) for the rows it keeps, so the
        padded queries cost nothing (torch's topk on short rows costs several times a softmax)."""
        k = min(self.topk, probs.shape[-1])
        if self.dtype is None:
            return probs.topk(k, dim=-1)
        B, H, T, _ = probs.shape
        if self.real is None:
            return tuple(t.transpose(1, 2).reshape(B * T, H, k) for t in probs.topk(k, dim=-1))
        if self._where is None or self._where[0] != T:  # (sequence, position) of each kept row, once per batch
            self._where = (T, self.real // T, self.real % T)
        return probs.transpose(1, 2)[self._where[1], self._where[2]].topk(k, dim=-1)

    def layer(self, module: torch.nn.Module) -> int | None:
        if self.layer_of_module is None:
            return -1
        layers = self.layer_of_module.get(id(module))
        if layers is None:
            return None
        i = self._seen.get(id(module), 0)
        self._seen[id(module)] = i + 1
        return layers[i] if i < len(layers) else None

    def keep(self, module: torch.nn.Module, layer: int, cap: LayerCapture) -> None:
        """Keep a layer's capture (after anything that needs its full q and k, such as top-k)."""
        if layer < 0:
            self.calls.append((module, cap))
            return
        if self.dtype is not None:
            self._compact(cap)
        self.layers[layer] = cap


_active: list[_Recorder] = []


def _split_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask, bias): an additive float mask's finite part is a bias (BEiT passes its relative
    position bias as the mask); what stays is a bool mask (True = may attend) or None."""
    if mask is None or mask.dtype == torch.bool:
        return mask, None
    blocked = mask <= BLOCKED
    bias = mask.masked_fill(blocked, 0.0)
    if not bias.any():
        bias = None
    return (~blocked if blocked.any() else None), bias


def _attention(module: torch.nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if _active:
        rec = _active[-1]
        layer = rec.layer(module)
        if layer is not None:
            scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            mask, bias, key_bias = rec.split(attention_mask)  # a bias folded into the mask: by key if it is one
            extra = kwargs.get("position_bias")  # T5: added to the logits by the model's own attention
            if extra is not None:
                bias, key_bias = (extra if bias is None else bias + extra), False
            softcap = kwargs.get("softcap")
            cap = LayerCapture(query.detach(), key.detach(), value.detach(), mask, scale,
                               softcap=float(softcap) if softcap else None,
                               bias=None if bias is None else bias.detach(),
                               sliding_window=kwargs.get("sliding_window"), is_causal=kwargs.get("is_causal"),
                               unrecordable=next((k for k in UNRECORDABLE if kwargs.get(k) is not None), None),
                               key_bias=key_bias)
            # SDPA has no softcap and no separate bias: attend with the recomputed probabilities then
            # (the model's eager math), and also when they are needed for top-k anyway (dropout is off).
            out = None
            if (rec.topk or cap.softcap or cap.bias is not None) and not module.training:
                causal = rec.causal if cap.is_causal is None else bool(cap.is_causal)
                probs = attention_probs(cap, causal)  # (batch, head, query, key)
                if rec.topk:
                    cap.topk_weight, cap.topk_key = rec.top(probs)
                v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1) if value.shape[1] != query.shape[1] else value
                out = (probs.to(v.dtype) @ v).transpose(1, 2).contiguous(), None
            rec.keep(module, layer, cap)
            if out is not None:
                return out
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def by_key(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, head, 1, key) when an additive (batch, head, query, key) bias is the same for every query that may
    attend to a key (ALiBi folded into the mask, as Falcon does from transformers 5.25 on), else None. Stored by key
    position, it is exact, also where rounding (Falcon's bfloat16 ALiBi) makes it no exact function of the offset."""
    if bias.dim() != 4 or bias.shape[-2] == 1:
        return None
    allowed = torch.ones((), dtype=torch.bool, device=bias.device) if mask is None else mask
    hi = torch.where(allowed, bias, -torch.inf).amax(-2, keepdim=True)
    lo = torch.where(allowed, bias, torch.inf).amin(-2, keepdim=True)
    seen = torch.isfinite(hi)
    if not bool(((hi - lo).abs() <= 1e-6 * torch.clamp(hi.abs(), min=1.0))[seen].all()):
        return None
    return torch.where(seen, hi, 0.0)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _arguments(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a module's forward call by name, however they were passed (a forward pre-hook's
    positional `args` exclude the module itself)."""
    bound = _signature(type(module)).bind_partial(None, *args, **kwargs)
    bound.apply_defaults()
    got = dict(bound.arguments)
    for name, p in bound.signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            got.update(got.pop(name, {}))
    return got


# ---- eager-only families: hooks on their attention modules and projections ----------------------
# Only what a module exposes is read (its forward's arguments by name, its projection submodules' outputs, its
# attributes), never one of its private methods: those are renamed between transformers releases.

def _hooks(module: torch.nn.Module, projections: tuple[str, ...],
           record: Callable[[torch.nn.Module, dict[str, Any], _Recorder], LayerCapture]) -> list[Callable[[], None]]:
    """Hook an attention module: its forward's arguments by name and what each of its `projections` submodules
    returns (the first call of each) go into one dict, which `record` turns into the capture after the forward,
    given the active recorder (whose `split` works out once a mask that every layer is passed)."""
    state: dict[str, Any] = {}

    def pre(mod, args, kwargs):
        state.clear()
        state.update(_arguments(mod, args, kwargs))

    def projection(name):
        def hook(mod, inputs, out):
            state.setdefault(name, out.detach())
        return hook

    def post(mod, args, kwargs, out):
        if _active:
            _emit(mod, record(mod, state, _active[-1]))

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
               *(getattr(module, n).register_forward_hook(projection(n)) for n in projections),
               module.register_forward_hook(post, with_kwargs=True)]
    return [h.remove for h in handles]


def _heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(batch, token, H * d) -> (batch, H, token, d): a plain split of a projection's output into heads."""
    return x.view(*x.shape[:-1], H, -1).transpose(-2, -3)


def _record_gpt_neo(module, got: dict[str, Any], rec: _Recorder) -> LayerCapture:
    # GPTNeoSelfAttention: q.k unscaled, masked by its own causal / local buffer, plus an additive padding mask;
    # both are combined here into one bool mask (True = may attend).
    q, k, v = (_heads(got[n], module.num_heads) for n in ("q_proj", "k_proj", "v_proj"))
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = module.bias[:, :, t_k - t_q : t_k, :t_k]
    attention_mask = got.get("attention_mask")
    if attention_mask is not None:
        mask = mask & (attention_mask > BLOCKED)
    return LayerCapture(q, k, v, mask, 1.0)


def _record_bloom(module, got: dict[str, Any], rec: _Recorder) -> LayerCapture:
    # BloomAttention: its fused projection holds q, k, v interleaved per head (the checkpoints' layout);
    # scores are baddbmm(beta * alibi + inv_norm_factor * q.k) + mask.
    fused = got["query_key_value"]
    B, T = fused.shape[:2]
    H = module.num_heads
    q, k, v = (x.transpose(1, 2) for x in fused.view(B, T, H, 3, -1).unbind(3))
    alibi, mask = got["alibi"], got.get("attention_mask")
    bias = alibi.view(B, H, 1, -1) * float(module.beta)
    allowed = None if mask is None else (mask > BLOCKED if mask.dtype != torch.bool else mask)
    return LayerCapture(q, k, v, allowed, float(module.inv_norm_factor), bias=bias.detach())


def falcon_heads(module: torch.nn.Module, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (batch, head, token, d_head), k and v (batch, kv_head, token, d_head) from FalconAttention's fused
    query_key_value output, split as its weights are laid out (fixed by the checkpoints, whatever the modeling code):
    new architecture: per key/value group its queries, then its key and value; multi-query: all queries, then the one
    key and value; otherwise query, key and value interleaved per head."""
    B, T = fused.shape[:2]
    H, D = module.num_heads, module.head_dim
    if module.new_decoder_architecture:
        grouped = fused.view(B, T, module.num_kv_heads, -1, D)
        q, k, v = grouped[..., :-2, :].flatten(2, 3), grouped[..., -2, :], grouped[..., -1, :]
    elif module.multi_query:
        q, k, v = fused.view(B, T, H + 2, D).split([H, 1, 1], dim=2)
    else:
        q, k, v = fused.view(B, T, H, 3, D).unbind(3)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _record_falcon(module, got: dict[str, Any], rec: _Recorder) -> LayerCapture:
    # FalconAttention of a transformers release where it calls no attention interface (up to 5.24): its fused
    # projection split as its weights are laid out; rotary unless ALiBi (with the model's own apply_rotary_pos_emb),
    # then SDPA's or its eager math, whichever branch it takes.
    q, k, v = falcon_heads(module, got["query_key_value"])
    B, H, T, D = q.shape
    alibi, mask = got.get("alibi"), got.get("attention_mask")
    if alibi is None:
        cos, sin = got["position_embeddings"]
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    sdpa = module.config._attn_implementation == "sdpa" and not got.get("output_attentions")
    # FalconModel folds alibi / sqrt(d_head), a function of the key's position, into the mask (by_key finds it)
    allowed, bias, keyed = rec.split(mask)
    if alibi is not None and not sdpa:  # eager: (q.k + alibi) * inv_norm_factor + mask, so ALiBi counts twice
        extra = alibi.view(B, H, 1, -1).float() * module.inv_norm_factor
        bias = extra if bias is None else bias + extra
        keyed = bias.shape[-2] == 1
    is_causal = (module.is_causal and T > 1) if sdpa and mask is None else None
    return LayerCapture(q.detach(), k.detach(), v.detach(), allowed, 1.0 / math.sqrt(D),
                        bias=None if bias is None else bias.detach(), is_causal=is_causal, key_bias=keyed)


def _deberta_projections(module: torch.nn.Module) -> tuple[str, ...]:
    return ("in_proj",) if hasattr(module, "in_proj") else ("query_proj", "key_proj", "value_proj")


def _record_deberta(mod, state: dict[str, Any], rec: _Recorder) -> LayerCapture:
    """DisentangledSelfAttention of DeBERTa (fused in_proj + q_bias/v_bias) and DeBERTa-v2 (query/key/value_proj):
    its content projections (the first call of each: shared keys project the relative embeddings too), the mask,
    relative positions and relative embeddings it is passed, those embeddings projected with the layer's own
    position projections (weights only, as the model does)."""
    v1 = hasattr(mod, "in_proj")
    H = mod.num_attention_heads
    if v1:
        q, k, v = _heads(state["in_proj"], H).chunk(3, dim=-1)
        q, v = q + _heads(mod.q_bias[None, None, :], H), v + _heads(mod.v_bias[None, None, :], H)
        factor = 1 + len(mod.pos_att_type)
    else:
        q, k, v = (_heads(state[n], H) for n in _deberta_projections(mod))
        factor = 1 + sum(t in mod.pos_att_type for t in ("c2p", "p2c"))
    D, T = q.shape[-1], q.shape[-2]
    scaling = 1.0 / float(torch.sqrt(torch.tensor(D, dtype=torch.float) * factor))  # scaled_size_sqrt
    emb, rel = state.get("rel_embeddings"), state.get("relative_pos")
    dis = None
    if mod.relative_attention and emb is not None and (rel is not None or not v1):
        if rel is None:  # v2 builds it itself then
            rel = sys.modules[type(mod).__module__].build_relative_position(
                q, k, bucket_size=mod.position_buckets, max_position=mod.max_relative_positions)
        rel = rel.reshape(-1, T, T)
        if rel.shape[0] > 1 and not bool((rel == rel[:1]).all()):
            raise ModelError(f"Model type {mod.config.model_type!r} passes relative positions that differ "
                             "between sequences, which the atlas does not record.")
        # v1 slices its table to the sequence; indexing the whole one with span max_relative_positions is the same
        span = mod.max_relative_positions if v1 else mod.pos_ebd_size
        table = emb[: 2 * span]
        c2p, p2c = "c2p" in mod.pos_att_type, "p2c" in mod.pos_att_type
        if v1:
            pos_key = mod.pos_proj(table) if c2p else None
            pos_query = mod.pos_q_proj(table) if p2c else None
        else:
            pos_key = (mod.key_proj if mod.share_att_key else mod.pos_key_proj)(table) if c2p else None
            pos_query = (mod.query_proj if mod.share_att_key else mod.pos_query_proj)(table) if p2c else None
        dis = Disentangled(rel[0].long(), int(span), None if pos_key is None else _heads(pos_key, H).detach(),
                           None if pos_query is None else _heads(pos_query, H).detach())
    mask = state["attention_mask"]
    return LayerCapture(q.detach(), k.detach(), v.detach(), None if mask is None else mask.bool(), scaling,
                        disentangled=dis)


def _emit(module: torch.nn.Module, cap: LayerCapture) -> None:
    """Hand a capture from a hook to the active recorder (with top-k if it wants it)."""
    if not _active:
        return
    rec = _active[-1]
    layer = rec.layer(module)
    if layer is None:
        return
    if rec.topk:  # the model attends itself: top-k needs its own recomputation
        probs = attention_probs(cap, rec.causal)
        cap.topk_weight, cap.topk_key = rec.top(probs)
    rec.keep(module, layer, cap)


def _record_mpnet(module, got: dict[str, Any], rec: _Recorder) -> LayerCapture:
    # MPNetSelfAttention: no rotary, heads are a plain split; the encoder passes the additive mask and the relative
    # position bias.
    q, k, v = (_heads(got[n], module.num_attention_heads) for n in ("q", "k", "v"))
    mask, bias = got.get("attention_mask"), got.get("position_bias")
    allowed = None if mask is None else (mask if mask.dtype == torch.bool else mask > BLOCKED)
    return LayerCapture(q, k, v, allowed, module.attention_head_size ** -0.5, bias=None if bias is None else bias.detach())


# model_type -> how its attention modules are instrumented (returns what undoes it)
WRAPPERS: dict[str, Callable[[torch.nn.Module], list[Callable[[], None]]]] = {
    "gpt_neo": lambda m: _hooks(m, ("q_proj", "k_proj", "v_proj"), _record_gpt_neo),
    "bloom": lambda m: _hooks(m, ("query_key_value",), _record_bloom),
    "mpnet": lambda m: _hooks(m, ("q", "k", "v"), _record_mpnet),
    # FalconAttention where it calls no attention interface (up to transformers 5.24)
    "falcon": lambda m: _hooks(m, ("query_key_value",), _record_falcon),
    "deberta-v2": lambda m: _hooks(m, _deberta_projections(m), _record_deberta),
    "deberta": lambda m: _hooks(m, _deberta_projections(m), _record_deberta),
}


@contextmanager
def capturing(model: torch.nn.Module, layer_of_module: dict[int, list[int]] | None, topk: int = 0,
              causal: bool = False, wrapped: list[torch.nn.Module] | None = None,
              model_type: str | None = None, values: bool = True) -> Iterator[_Recorder]:
    """Route `model`'s attention through the recorder; restores everything on exit.
    With `topk`, each layer's strongest `topk` keys per query are kept too. `wrapped` are the
    attention modules of an eager-only family (`model_type` in WRAPPERS) to hook instead."""
    rec = _Recorder(layer_of_module, topk, causal, values)
    with ExitStack() as stack:
        if wrapped:
            for module in wrapped:
                for undo in WRAPPERS[model_type](module):
                    stack.callback(undo)
        else:
            previous = model.config._attn_implementation
            model.set_attn_implementation(IMPLEMENTATION)
            stack.callback(model.set_attn_implementation, previous)
        _active.append(rec)
        stack.callback(_active.remove, rec)
        yield rec


def attention_probs(cap: LayerCapture, causal: bool) -> torch.Tensor:
    """(batch, head, query, key) softmax(cap((q.k + c2p + p2c) * scaling) + bias + mask), recomputed from
    captured q and k (c2p, p2c: DeBERTa's content-position terms)."""
    q, k = cap.query.float(), cap.key.float()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    logits = q @ k.transpose(-1, -2)
    if cap.disentangled is not None:
        logits = logits + disentangled_terms(q, k, cap.disentangled)
    logits = logits * cap.scaling
    if cap.softcap:
        logits = torch.tanh(logits / cap.softcap) * cap.softcap
    if cap.bias is not None:
        logits = logits + cap.bias.float()
    return torch.softmax(apply_mask(logits, cap.mask, causal), dim=-1)


def disentangled_terms(q: torch.Tensor, k: torch.Tensor, d: Disentangled) -> torch.Tensor:
    """(batch, head, query, key) c2p + p2c before scaling, gathered as DeBERTa's disentangled_attention_bias does.
    q, k: (batch, head, token, d_head)."""
    T, S = q.shape[-2], d.span
    rel = d.relative[:T, :T].to(q.device)
    shape = (*q.shape[:-1], T)
    out = torch.zeros(shape, dtype=q.dtype, device=q.device)
    if d.pos_key is not None:
        c2p = q @ d.pos_key.float().transpose(-1, -2)  # (batch, head, query, 2 * span)
        out = out + c2p.gather(-1, torch.clamp(rel + S, 0, 2 * S - 1).expand(shape))
    if d.pos_query is not None:
        p2c = k @ d.pos_query.float().transpose(-1, -2)  # (batch, head, key, 2 * span)
        out = out + p2c.gather(-1, torch.clamp(-rel + S, 0, 2 * S - 1).expand(shape)).transpose(-1, -2)
    return out


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
