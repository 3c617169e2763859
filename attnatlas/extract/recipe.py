"""What besides q.k shapes a model's attention, learnt from what it passes to attention, batch by batch.

For every layer this records the scaling, the softcap, the window (from the model's own mask, checked
on every batch) and any additive bias (relative position bias, ALiBi), which is stored as a function of
the key-query offset for text (checked to depend on nothing else; Falcon's bfloat16 ALiBi as a function
of the key's position) or as a fixed position-pair table for images. DeBERTa's content-position terms
are recorded as the relative position of each key-query offset and the layer's position tables.
`to_attrs()` and `arrays()` give what attnatlas.attention needs to recompute the model's attention exactly.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from attnatlas.errors import ModelError
from attnatlas.extract.capture import Disentangled, LayerCapture

RECIPE_VERSION = 1
BIAS_TOL = 1e-4  # relative: a bias that varies more than this for one offset is not positional
TABLE_TOL = 1e-5  # relative: DeBERTa's position tables are weights only, the same every batch
# Zarr arrays of the model folder that hold DeBERTa's position tables, (layer, head, 2 * span, d_head) float32.
POSITION_ARRAYS = {"c2p": "attention_c2p_keys", "p2c": "attention_p2c_queries"}


def pack(a: np.ndarray) -> dict[str, Any]:
    """A numpy array as JSON-safe attrs (base64 of little-endian bytes)."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


class Recipe:
    """Accumulates per-layer attention facts over the batches of one extraction."""

    def __init__(self, model_type: str, n_layers: int, causal: bool, window_hint: list[int | None],
                 window_rule: str, check_masks: bool = True, defer: bool = False):
        self.model_type, self.n_layers, self.causal = model_type, n_layers, causal
        self.window_rule = window_rule  # "causal": 0 <= i - j < W; "bidirectional": |i - j| <= W
        self.window: list[int | None] = list(window_hint)
        self.check_masks = check_masks
        # With `defer`, a mask no longer than one already read is checked on its device without waiting for it
        # (nothing new can be learnt from it, only a mismatch), and `finish` reads every such check at once.
        self.defer = defer
        self._read: dict[int, int] = {}  # layer -> longest mask read on the host so far
        self._deferred: dict[int, torch.Tensor] = {}  # layer -> device bool: every deferred check held
        self.scaling: list[float | None] = [None] * n_layers
        self.softcap: list[float | None] = [None] * n_layers
        self.rel: dict[int, torch.Tensor] = {}  # layer -> (head, 2 * span - 1) bias by offset j - i, NaN = unseen
        self.pairs: dict[int, torch.Tensor] = {}  # layer -> (head, n, n) fixed bias (images)
        self.keyed: dict[int, torch.Tensor] = {}  # layer -> (head, n) bias by key position, NaN = unseen
        self.relative: torch.Tensor | None = None  # DeBERTa: (2 * n - 1,) relative position by offset i - j
        self.span: int | None = None
        self.positions: dict[int, dict[str, torch.Tensor]] = {}  # layer -> "c2p"/"p2c" -> (head, 2 * span, d_head)

    def _refuse(self, layer: int, what: str) -> ModelError:
        return ModelError(f"Model type {self.model_type!r}: layer {layer} {what}; attnatlas cannot record it "
                          f"exactly, so this model is not supported.")

    def observe(self, caps: dict[int, LayerCapture], valid: torch.Tensor, image: bool) -> None:
        """valid: (batch, token) bool, True for real tokens (right padding)."""
        seen: dict[tuple, Any] = {}  # layers often share one mask / bias tensor: check each once
        for layer, cap in caps.items():
            if cap.unrecordable:
                raise self._refuse(layer, f"passes {cap.unrecordable!r} (attention sinks) to attention")
            for name, value in (("scaling", cap.scaling), ("softcap", cap.softcap)):
                old = getattr(self, name)[layer]
                if old is not None and value is not None and abs(old - value) > 1e-9 * max(1.0, abs(old)):
                    raise self._refuse(layer, f"changes its {name} between batches ({old} then {value})")
                getattr(self, name)[layer] = value if value is not None else old
            if cap.mask is not None and self.check_masks:
                key = ("mask", cap.mask.data_ptr(), tuple(cap.mask.shape), self.window[layer])
                if key not in seen:
                    seen[key] = self._check_mask(layer, cap.mask, valid)
                else:
                    self.window[layer] = seen[key]
            if cap.disentangled is not None:
                self._observe_disentangled(layer, cap.disentangled, seen)
            if cap.bias is not None:
                key = ("bias", cap.bias.data_ptr(), tuple(cap.bias.shape), cap.key_bias)
                store = self.pairs if image else self.keyed if cap.key_bias else self.rel
                if key in seen:  # the same tensor as an earlier layer's (T5, Bloom): one table
                    store[layer] = store[seen[key]]
                    continue
                seen[key] = layer
                observe = self._observe_pairs if image else self._observe_keys if cap.key_bias else \
                    self._observe_relative
                observe(layer, cap.bias, valid)

    def finish(self) -> None:
        """Read the deferred mask checks (one wait for the device, at the end of an extraction)."""
        for layer, ok in sorted(self._deferred.items()):
            if not bool(ok):
                raise self._refuse(layer, "uses an attention mask that is not padding, causal and a sliding window")
        self._deferred.clear()

    # ---- masks and windows ---------------------------------------------------------------------------

    def _expected(self, n: int, window: int | None, device) -> torch.Tensor:
        i = torch.arange(n, device=device)
        d = i[:, None] - i[None, :]  # (query, key) i - j
        ok = torch.ones(n, n, dtype=torch.bool, device=device)
        if self.causal:
            ok &= d >= 0
        if window is not None:
            ok &= (d < window) if self.window_rule == "causal" else (d.abs() <= window)
        return ok

    def _check_mask(self, layer: int, mask: torch.Tensor, valid: torch.Tensor) -> int | None:
        """The model's bool mask (batch, 1|head, query, key) on real query rows must be padding + causal +
        this layer's window; a window the hint missed is read off the mask. Returns the window."""
        every_head = mask.all(1)
        B, T = valid.shape
        allowed = every_head[:, -T:, -T:]
        rows = valid[:, :, None].expand(B, T, T)

        def held(window) -> torch.Tensor:  # a bool on the mask's device
            exp = self._expected(T, window, mask.device)[None] & valid[:, None, :]
            return ((exp == allowed) | ~rows).all()

        if self.defer and T <= self._read.get(layer, 0):
            ok = held(self.window[layer])
            if mask.shape[1] > 1:
                ok = ok & (every_head == mask.any(1)).all()
            self._deferred[layer] = ok if layer not in self._deferred else self._deferred[layer] & ok
            return self.window[layer]
        self._read[layer] = max(T, self._read.get(layer, 0))
        if mask.shape[1] > 1 and not torch.equal(every_head, mask.any(1)):
            raise self._refuse(layer, "masks heads differently")

        def matches(window):
            return bool(held(window))

        if matches(self.window[layer]):
            return self.window[layer]
        # Read the window off the mask: the smallest blocked distance between two real tokens.
        i = torch.arange(T, device=mask.device)
        d = i[:, None] - i[None, :]
        real = rows & valid[:, None, :] & ~allowed
        if self.causal:
            real &= d[None] >= 0
        if real.any():
            dist = d.abs()[None].expand(B, T, T)[real].min().item()
            guess = int(dist) if self.window_rule == "causal" else int(dist) - 1
            if (self.window[layer] is None or guess < self.window[layer]) and matches(guess):
                self.window[layer] = guess
                return guess
        raise self._refuse(layer, "uses an attention mask that is not padding, causal and a sliding window")

    # ---- additive bias ---------------------------------------------------------------------------------

    def _observe_relative(self, layer: int, bias: torch.Tensor, valid: torch.Tensor) -> None:
        if bias.shape[0] == 1:  # one bias for the whole batch (T5): right padding, so the longest row covers all
            self._observe_one(layer, bias, valid.any(0, keepdim=True))
        else:  # per sequence (ALiBi from the mask): one at a time, so memory stays (head, token, token)
            for b in range(bias.shape[0]):
                self._observe_one(layer, bias[b : b + 1], valid[b : b + 1])

    def _observe_one(self, layer: int, bias: torch.Tensor, valid: torch.Tensor) -> None:
        B, T = valid.shape
        b = bias.float()[..., -T:, -T:]
        H = b.shape[1]
        b = b.expand(B, H, T, T) if b.shape[2] == T else b.expand(B, H, 1, T).expand(B, H, T, T)
        norm = b - b.diagonal(dim1=-2, dim2=-1)[..., None]  # softmax ignores a per-row constant
        i = torch.arange(T, device=b.device)
        off = (i[None, :] - i[:, None] + T - 1)  # (query, key) j - i + T - 1
        allow = valid[:, :, None] & valid[:, None, :]
        if self.causal:
            allow &= (i[None, :] <= i[:, None])[None]
        m = allow.reshape(-1)
        vals = norm.permute(1, 0, 2, 3).reshape(H, -1)[:, m]
        idx = off.expand(B, T, T).reshape(-1)[m][None].expand(H, -1)
        hi = torch.full((H, 2 * T - 1), -torch.inf, device=b.device).scatter_reduce(1, idx, vals, "amax")
        lo = torch.full((H, 2 * T - 1), torch.inf, device=b.device).scatter_reduce(1, idx, vals, "amin")
        seen = torch.isfinite(hi)
        scale = torch.clamp(hi.abs(), min=1.0)
        if ((hi - lo)[seen] > BIAS_TOL * scale[seen]).any():
            raise self._refuse(layer, "adds an attention bias that depends on more than the key-query offset")
        table = torch.where(seen, hi, torch.nan).cpu()
        old = self.rel.get(layer)
        if old is not None:
            span = max(old.shape[1], table.shape[1]) // 2 + 1
            table, old = _widen(table, span), _widen(old, span)
            both = ~torch.isnan(old) & ~torch.isnan(table)
            if (old[both] - table[both]).abs().gt(BIAS_TOL * torch.clamp(old[both].abs(), min=1.0)).any():
                raise self._refuse(layer, "adds an attention bias that changes between batches")
            table = torch.where(torch.isnan(old), table, old)
        self.rel[layer] = table

    def _observe_keys(self, layer: int, bias: torch.Tensor, valid: torch.Tensor) -> None:
        """A bias of (batch|1, head, query|1, key) that must be a function of the key's position alone (per row
        up to a constant, which softmax ignores): stored as (head, key) relative to key 0."""
        T = valid.shape[1]
        b = bias.float()[..., -T:, -T:]
        for s in range(valid.shape[0]):
            n = int(valid[s].sum())  # right padding: the real tokens are 0 .. n - 1
            if n == 0:
                continue
            x = b[s if b.shape[0] > 1 else 0][:, :n, :n]
            x = x.expand(x.shape[0], n, n) - x[:, :, :1]
            allow = torch.ones(n, n, dtype=torch.bool, device=x.device)
            if self.causal:
                allow = allow.tril()
            hi = torch.where(allow, x, -torch.inf).amax(1)  # (head, key)
            lo = torch.where(allow, x, torch.inf).amin(1)
            if ((hi - lo) > BIAS_TOL * torch.clamp(hi.abs(), min=1.0)).any():
                raise self._refuse(layer, "adds an attention bias that depends on more than the key's position")
            self.keyed[layer] = self._merge(layer, self.keyed.get(layer), hi.cpu())

    def _merge(self, layer: int, old: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
        """Two (head, key) tables by key position, NaN = unseen: they must agree where both were seen."""
        if old is None:
            return table
        n = max(old.shape[1], table.shape[1])
        old, table = (torch.nn.functional.pad(t, (0, n - t.shape[1]), value=float("nan")) for t in (old, table))
        both = ~torch.isnan(old) & ~torch.isnan(table)
        if (old[both] - table[both]).abs().gt(BIAS_TOL * torch.clamp(old[both].abs(), min=1.0)).any():
            raise self._refuse(layer, "adds an attention bias that changes between batches")
        return torch.where(torch.isnan(old), table, old)

    # ---- DeBERTa's content-position terms -----------------------------------------------------------------

    def _observe_disentangled(self, layer: int, d: Disentangled, seen: dict[tuple, Any]) -> None:
        key = ("relative", d.relative.data_ptr(), tuple(d.relative.shape))
        if key not in seen:  # one tensor for every layer: check it once
            seen[key] = layer
            rel = d.relative.cpu()
            T = rel.shape[-1]
            table = torch.cat([rel[0].flip(0), rel[1:, 0]])  # offset i - j at index i - j + T - 1
            i = torch.arange(T)
            if not torch.equal(rel, table[i[:, None] - i[None, :] + T - 1]):
                raise self._refuse(layer, "uses relative positions that are not a function of the key-query offset")
            if self.relative is not None:
                short, long_ = sorted((self.relative, table), key=len)
                pad = (len(long_) - len(short)) // 2
                if not torch.equal(long_[pad : pad + len(short)], short):
                    raise self._refuse(layer, "changes its relative positions between batches")
                table = long_
            self.relative = table
        if self.span is not None and self.span != d.span:
            raise self._refuse(layer, f"changes its attention span between batches ({self.span} then {d.span})")
        self.span = d.span
        now = {t: x.float().cpu() for t, x in (("c2p", d.pos_key), ("p2c", d.pos_query)) if x is not None}
        old = self.positions.get(layer)
        if old is None:
            self.positions[layer] = now
            return
        if old.keys() != now.keys() or any(not torch.allclose(old[t], now[t], rtol=TABLE_TOL,
                                                              atol=TABLE_TOL * float(old[t].abs().max())) for t in now):
            raise self._refuse(layer, "changes its relative position tables between batches")

    def _observe_pairs(self, layer: int, bias: torch.Tensor, valid: torch.Tensor) -> None:
        b = bias.float()
        if b.shape[-2] == 1:  # by key position (capture.by_key): the same row for every query
            b = b.expand(*b.shape[:2], b.shape[-1], b.shape[-1])
        if b.shape[0] > 1 and not torch.allclose(b, b[:1].expand_as(b), atol=1e-6):
            raise self._refuse(layer, "adds an attention bias that differs between images")
        b = b[0].cpu()
        old = self.pairs.get(layer)
        if old is not None and not torch.allclose(old, b, atol=1e-6):
            raise self._refuse(layer, "adds an attention bias that changes between batches")
        self.pairs[layer] = b

    # ---- what the atlas stores ---------------------------------------------------------------------------

    def to_attrs(self) -> dict[str, Any]:
        bias = None
        if self.rel or self.keyed or self.pairs:
            kind = "pairs" if self.pairs else "relative"
            store = {l: ("pairs", t) for l, t in self.pairs.items()} if self.pairs else \
                {**{l: ("offsets", t) for l, t in self.rel.items()}, **{l: ("keys", t) for l, t in self.keyed.items()}}
            tables, layer_table, distinct = [], [], []
            for layer in range(self.n_layers):
                if layer not in store:
                    layer_table.append(None)
                    continue
                by, t = store[layer]
                # Layers with the same bias (T5, Bloom's ALiBi, BEiT's shared table) store it once.
                same = next((i for i, (b, d) in enumerate(distinct) if b == by and d.shape == t.shape
                             and torch.equal(d.nan_to_num(), t.nan_to_num())), None)
                if same is None:
                    same = len(distinct)
                    distinct.append((by, t))
                    tables.append(_pack_bias(t, by))
                layer_table.append(same)
            bias = {"kind": kind, "tables": tables, "layer_table": layer_table}
        disentangled = None
        if self.positions:
            if len(self.positions) != self.n_layers:
                raise ModelError(f"Model type {self.model_type!r}: only {len(self.positions)} of {self.n_layers} "
                                 "layers have content-position terms; attnatlas cannot record that exactly.")
            terms = [t for t in POSITION_ARRAYS if t in self.positions[0]]
            disentangled = {"terms": terms, "span": self.span, "arrays": {t: POSITION_ARRAYS[t] for t in terms},
                            # relative position of query i to key j at index i - j + len // 2
                            "relative": pack(self.relative.numpy().astype(np.int32))}
        return {
            "version": RECIPE_VERSION,
            "causal": self.causal,
            "scaling": self.scaling,
            "softcap": self.softcap,
            "window": self.window,
            "window_rule": self.window_rule,
            "bias": bias,
            "disentangled": disentangled,
            "additive": bias is not None or disentangled is not None,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays the recipe points to, for the model folder: DeBERTa's (layer, head, 2 * span, d_head) position
        tables."""
        if not self.positions:
            return {}
        return {POSITION_ARRAYS[t]: np.stack([self.positions[i][t].numpy() for i in range(self.n_layers)]).astype(np.float32)
                for t in POSITION_ARRAYS if t in self.positions[0]}


def _widen(table: torch.Tensor, span: int) -> torch.Tensor:
    """(head, 2 * s - 1) -> (head, 2 * span - 1), NaN for the new offsets."""
    s = table.shape[1] // 2 + 1
    if s == span:
        return table
    pad = span - s
    return torch.nn.functional.pad(table, (pad, pad), value=float("nan"))


def _pack_bias(t: torch.Tensor, by: str) -> dict[str, Any]:
    a = t.numpy().astype(np.float32)
    if by == "offsets":
        return {"offsets": pack(a)}  # (head, 2 * span - 1), offset j - i at column j - i + span - 1
    if by == "keys":
        return {"keys": pack(a)}  # (head, n), key position j at column j
    H, n, _ = a.shape
    # Position-pair biases come from small tables (BEiT: (2w - 1)^2 + 3 rows): store those and an index.
    values, index = np.unique(a.reshape(H, n * n).T, axis=0, return_inverse=True)
    return {"values": pack(values.astype(np.float32)), "index": pack(index.reshape(n, n).astype(np.int32))}
