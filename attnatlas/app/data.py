"""Read-only view of an atlas for the dashboard, opened once per server process.

Every session reads through one `AppData`. It never writes to the atlas and never computes layouts;
it only reshapes stored arrays for plotting. Caches are bounded and guarded by a lock, because Bokeh
may run session callbacks from executor threads.
"""

from __future__ import annotations

import functools
import html
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.analyze import head_types
from attnatlas.errors import StoreError
from attnatlas.inputs.tokens import token_category
from attnatlas.render.labels import METRIC_LABELS
from attnatlas.render.raster import GridLayouts, robust_range
from attnatlas.store import Atlas

CONTEXT_CHARS = 30  # characters either side of a token in the hover context


class _LRU:
    """A small thread-safe least-recently-used cache keyed by tuples."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()  # outside the lock: reads of different heads may overlap
        with self._lock:
            self._d[key] = value
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return value


@dataclass(frozen=True)
class Tokens:
    """Per-point static columns of one (model, method): the layout rows, queries then keys."""

    rows: np.ndarray  # (n,) token rows of the layout
    columns: dict[str, np.ndarray]  # 2n entries each
    seq_of_row: np.ndarray  # (T,) sequence of every token row
    point_of_row: np.ndarray  # (T,) index into rows, -1 when a token row is not in the layout


# Per-head numbers shown and sortable in the grid, in menu order; compare's table adds its own.
HEAD_SCORES = head_types.TABLE
TYPE_COLUMNS = ["types", "type", "confidence", "type_text"]
QUALITY_LABELS = {"trustworthiness": "trustworthiness", "knn_kept": "10-NN kept"}


@dataclass(frozen=True)
class Head:
    x: np.ndarray  # 2n, queries then keys
    y: np.ndarray
    norm: np.ndarray
    trust: float
    knn: float
    placed_trust: float = float("nan")  # faithfulness of the tokens placed into this (capped) layout
    stack: np.ndarray | None = None  # 2n: how many points of this head sit at exactly this spot (1 = alone)


class AppData:
    """Opens the atlas read-only and serves validated, cached slices of it."""

    def __init__(self, path: str | Path, head_cache: int = 48, backend: str = "canvas"):
        self.path = str(path)
        self.backend = backend if backend in ("webgl", "canvas") else "canvas"  # Bokeh output_backend of the scatters
        self.atlas = Atlas.open(self.path)
        # The atlas as every message names it (the analyses' messages too): its resolved location.
        self.shown_path = str(self.atlas.path)
        self.models: tuple[str, ...] = tuple(m for m in self.atlas.models if self.atlas.layout_methods(m))
        if not self.models:
            raise StoreError(f"The atlas {self.path} has no projected model yet; run `attnatlas project {self.path}`.")
        self.infos = {m: self.atlas.info(m) for m in self.models}
        self.methods = {m: tuple(self.atlas.layout_methods(m)) for m in self.models}
        self._heads = _LRU(head_cache)
        self._topk = _LRU(head_cache)
        self._static = _LRU(16)
        self._grids = _LRU(4)  # full layouts of every head: tens of MB each for big models
        self._grid_images = _LRU(16)  # rendered grid images, shared by the sessions
        self._results = _LRU(32)  # stored comparison and nearest-head tables, read once
        self._lock = threading.Lock()

    # ---- validation: nothing from the browser is used unless it is one of these values ----------------
    def model(self, name: Any) -> str:
        return name if isinstance(name, str) and name in self.models else self.default_model

    @functools.cached_property
    def default_model(self) -> str:
        """The model with the most to show: a text model with a stored comparison, else a text model, else the first."""
        text = [m for m in self.models if self.infos[m].modality == "text"]
        compared = [m for m in text if self.compared_models(m)]
        return (compared or text or list(self.models))[0]

    def method(self, model: str, name: Any) -> str:
        have = self.methods[model]
        if isinstance(name, str) and name in have:
            return name
        for pref in ("umap", "tsne", "pca"):
            if pref in have:
                return pref
        return have[0]

    def clamp(self, model: str, layer: Any, head: Any) -> tuple[int, int]:
        info = self.infos[model]

        def num(v: Any, hi: int) -> int:
            try:
                return min(max(int(v), 0), hi - 1)
            except (TypeError, ValueError):
                return 0

        return num(layer, info.n_layers), num(head, info.n_heads)

    def modality(self, model: str) -> str:
        return self.infos[model].modality

    # ---- static per-point columns ---------------------------------------------------------------------------
    def tokens(self, model: str, method: str) -> Tokens:
        return self._static.get(("tokens", model, method), lambda: self._make_tokens(model, method))

    def _make_tokens(self, model: str, method: str) -> Tokens:
        tok = self.atlas.tokens(model)
        seqs = self.atlas.sequences(model).set_index("sequence")
        rows = np.asarray(self.atlas.layout_rows(model, method))
        placed = ~self.atlas.layout_sampled(model, method)  # placed into a capped layout, not laid out
        t = tok.iloc[rows].reset_index(drop=True)
        text = t["token"].astype(str).to_numpy()
        pos = t["position"].to_numpy().astype(np.int32)
        seq = t["sequence"].to_numpy().astype(np.int32)
        n_tok = seqs["n_tokens"].reindex(seq).to_numpy()
        pos_frac = (pos / np.maximum(n_tok - 1, 1)).astype(np.float32)
        special = t["is_special"].to_numpy().astype(bool)
        cont = _continues_word(tok)[rows]
        cat = np.array([token_category(s, sp, c) for s, sp, c in zip(text, special, cont)], dtype=np.int8)
        display = np.array([s.replace("\u0120", "\u2423").replace("\u2581", "\u2423") for s in text], dtype=object)
        decoded = _decoded_pieces(t, seqs)
        display = np.where(decoded != "", decoded, display)
        ctx = self._contexts(model, t, seqs)
        cols: dict[str, np.ndarray] = {
            "token": display,
            "ctx": ctx,
            "position": pos,
            "sequence": seq,
            "pos_frac": pos_frac,
            "category": cat,
            "length": np.array([len(s.lstrip("#").replace("\u0120", "").replace("\u2581", "")) for s in text], np.int32),
            "placed": np.where(placed, "placed from its neighbours", "laid out"),
        }
        if self.modality(model) == "image":
            for c in ("hue", "brightness", "mean_r", "mean_g", "mean_b"):
                cols[c] = t[c].to_numpy().astype(np.float32) if c in t else np.zeros(len(t), np.float32)
            rgb = np.clip(np.nan_to_num(np.stack([cols["mean_r"], cols["mean_g"], cols["mean_b"]], 1)) * 255, 0, 255).astype(int)
            cols["rgb"] = np.array(["#%02x%02x%02x" % tuple(c) for c in rgb], dtype=object)
        doubled = {k: np.concatenate([v, v]) for k, v in cols.items()}
        n = len(rows)
        doubled["kind"] = np.array(["query"] * n + ["key"] * n, dtype=object)
        doubled["kind_code"] = np.concatenate([np.zeros(n, np.int8), np.ones(n, np.int8)])
        point_of_row = np.full(len(tok), -1, dtype=np.int64)
        point_of_row[rows] = np.arange(n)
        return Tokens(rows, doubled, tok["sequence"].to_numpy(), point_of_row)

    # ---- text search ---------------------------------------------------------------------------------------------
    def uncased(self, model: str) -> bool:
        """Does the tokenizer fold case and accents (uncased WordPiece)? From the recorded config when it says,
        else from the tokens themselves: the folded text under them."""
        attrs = self.atlas.info(model).attrs
        for where in (attrs, attrs.get("config") or {}, attrs.get("tokenizer") or {}):
            if isinstance(where, dict) and isinstance(where.get("do_lower_case"), bool):
                return where["do_lower_case"]
        return self._static.get(("uncased", model), lambda: self._looks_uncased(model))

    def _looks_uncased(self, model: str) -> bool:
        from attnatlas.app.search import looks_uncased

        tok = self.atlas.tokens(model)
        if self.modality(model) != "text" or "char_start" not in tok:
            return False
        texts = self.atlas.sequences(model).set_index("sequence")["text"].astype(str)
        sample = tok[(~tok["is_special"].astype(bool)) & (tok["char_start"] >= 0)].head(5000)
        slices = [texts.get(s, "")[a:b] for s, a, b in zip(sample["sequence"], sample["char_start"], sample["char_end"])]
        return looks_uncased(sample["token"].astype(str).tolist(), slices)

    def text_index(self, model: str) -> Any:
        """search.TextIndex of a text model's corpus (built on the first search, then shared)."""
        from attnatlas.app.search import build_index

        def make() -> Any:
            tok = self.atlas.tokens(model)
            seqs = self.atlas.sequences(model)
            texts = dict(zip(seqs["sequence"].astype(int), seqs["text"].astype(str)))
            if self.modality(model) == "image":
                # Images have no text: each image's file name stands for it, every token of the image spans
                # the whole name, so a search finds the images by name (case folded).
                names = {s: image_name(t) for s, t in texts.items()}
                seq = tok["sequence"].to_numpy()
                ends = np.array([len(names.get(int(x), "")) for x in seq], np.int64)
                return build_index(names, seq, np.zeros(len(seq), np.int64), ends, True)
            has = "char_start" in tok
            return build_index(texts, tok["sequence"].to_numpy(),
                               tok["char_start"].to_numpy().astype(np.int64) if has else None,
                               tok["char_end"].to_numpy().astype(np.int64) if has else None, self.uncased(model))

        return self._static.get(("text_index", model), make)

    def _contexts(self, model: str, t: pd.DataFrame, seqs: pd.DataFrame) -> np.ndarray:
        """Escaped HTML: the sequence around each token with the token in bold."""
        if self.modality(model) == "image" or "char_start" not in t:
            return np.array([f"image {s}, {html.escape(str(tk))}" for s, tk in zip(t["sequence"], t["token"])], dtype=object)
        texts = seqs["text"].astype(str)
        out = []
        for s, a, b, tk in zip(t["sequence"], t["char_start"], t["char_end"], t["token"]):
            text = texts.get(s, "")
            if a is None or a < 0 or b < a:
                out.append("<b>" + html.escape(str(tk)) + "</b>")
                continue
            left, mid, right = text[max(0, a - CONTEXT_CHARS):a], text[a:b], text[b:b + CONTEXT_CHARS]
            out.append(
                ("\u2026" if a > CONTEXT_CHARS else "") + html.escape(left) + "<b>" + html.escape(mid) + "</b>"
                + html.escape(right) + ("\u2026" if b + CONTEXT_CHARS < len(text) else "")
            )
        return np.array(out, dtype=object)

    # ---- global grid ------------------------------------------------------------------------------------------
    def grid_layouts(self, model: str, method: str) -> GridLayouts:
        return self._grids.get(("layouts", model, method), lambda: self._make_grid_layouts(model, method))

    def _make_grid_layouts(self, model: str, method: str) -> GridLayouts:
        info = self.infos[model]
        grp = self.atlas.layout_group(model, method)
        coords = grp["coords"]
        done = self.atlas.layout_done(model, method)
        L, H, P, _ = coords.shape
        out = np.full((L, H, P, 2), np.nan, np.float32)
        lo = np.zeros((L, H, 2), np.float32)
        hi = np.ones((L, H, 2), np.float32)
        for layer in range(info.n_layers):
            if not done[layer].any():
                continue
            block = np.asarray(coords[layer], dtype=np.float32)  # (head, point, 2): one read per layer
            out[layer] = block
            for head in np.flatnonzero(done[layer]):
                xy = block[head]
                xy = xy[np.isfinite(xy).all(1)]
                if not len(xy):
                    done[layer, head] = False
                    continue
                lo[layer, head], hi[layer, head] = robust_range(xy)
        return GridLayouts(out, P // 2, done, lo, hi)

    def grid_image(self, key: tuple, make: Callable[[], Any]) -> Any:
        """A rendered grid image (made by render.raster from grid_layouts), cached for every session."""
        return self._grid_images.get(key, make)

    def head_table(self, model: str, method: str) -> pd.DataFrame:
        """One row per head (layer, head order): layout faithfulness, then `attnatlas compare`'s metrics where
        stored. Columns are the keys of `head_metric_labels`."""
        # Keyed by whether compare's table exists: metrics stored while the server runs show up on the next draw.
        stored = self.atlas.has_table(model, "head_metrics")
        typed = self.atlas.has_table(model, HEAD_SCORES)  # head types stored while serving show up too
        return self._static.get(("head_table", model, method, stored, typed), lambda: self._make_head_table(model, method))

    def _make_head_table(self, model: str, method: str) -> pd.DataFrame:
        info = self.infos[model]
        L, H = info.n_layers, info.n_heads
        df = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
        q = self.atlas.layout_quality(model, method)
        df = df.merge(q[["layer", "head", *QUALITY_LABELS]], on=["layer", "head"], how="left")
        if self.atlas.has_table(model, "head_metrics"):
            m = self.atlas.read_table(model, "head_metrics")
            cols = [c for c in METRIC_LABELS if c in m and pd.api.types.is_numeric_dtype(m[c])]
            df = df.merge(m[["layer", "head", *cols]].astype({"layer": int, "head": int}), on=["layer", "head"], how="left")
        typed = head_types.scores_with_types(self.atlas, model)
        if typed is not None:  # scores with any values, then the types (text columns, not in the metric menu)
            cols = [c for c in head_types.SCORE_LABELS if c in typed and typed[c].notna().any()]
            typed = typed[["layer", "head", *cols, *TYPE_COLUMNS]].astype({"layer": int, "head": int})
            df = df.merge(typed, on=["layer", "head"], how="left")
            for c in TYPE_COLUMNS:
                df[c] = df[c].fillna(0.0 if c == "confidence" else "")
        return df.sort_values(["layer", "head"]).reset_index(drop=True)

    def has_head_types(self, model: str, method: str) -> bool:
        return "types" in self.head_table(model, method).columns

    def head_type_of(self, model: str, method: str, layer: int, head: int) -> str:
        """"induction 0.93, previous-token 0.71" for one head; '' when untyped or not scored."""
        t = self.head_table(model, method)
        if "type_text" not in t:
            return ""
        row = t[(t["layer"] == layer) & (t["head"] == head)]
        return str(row["type_text"].iloc[0]) if len(row) else ""

    def head_metric_labels(self, model: str, method: str) -> dict[str, str]:
        """Column of head_table -> label, for the metrics this model has."""
        cols = self.head_table(model, method).columns
        return {k: v for k, v in {**QUALITY_LABELS, **METRIC_LABELS, **head_types.SCORE_LABELS, "confidence": "type confidence"}.items()
                if k in cols}

    # ---- head map: every head of one or more models as one point ------------------------------------------
    def compared_models(self, model: str) -> list[str]:
        """Models with layouts that `attnatlas compare` has measured against `model`."""
        return [m for m in self.models if m != model and self.atlas.has_table(model, f"similarity__{m}")
                and self.atlas.has_table(m, f"similarity__{model}")]

    def head_similarity(self, models: tuple[str, ...], measure: str) -> tuple[pd.DataFrame, np.ndarray] | None:
        """(labels: model, layer, head in model then (layer, head) order; (head, head) similarity) of the heads
        of `models` by compare's 'pattern' or 'profile' measure, where pattern is undefined the profile measure;
        None unless every pair of models (or, for one model, any pair with it) has a stored comparison."""
        def make() -> tuple[pd.DataFrame, np.ndarray] | None:
            pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
            if len(models) == 1:
                others = self.compared_models(models[0])
                pairs = [(models[0], others[0])] if others else []
            results = [self.compare_result(a, b) for a, b in pairs]
            if not results or any(r is None for r in results):
                return None
            labels = pd.concat([pd.DataFrame({"model": m, "layer": np.repeat(np.arange(self.infos[m].n_layers), self.infos[m].n_heads),
                                              "head": np.tile(np.arange(self.infos[m].n_heads), self.infos[m].n_layers)})
                                for m in models], ignore_index=True)
            start = dict(zip(models, np.cumsum([0] + [self.infos[m].n_layers * self.infos[m].n_heads for m in models])))
            sim = np.full((len(labels), len(labels)), np.nan)
            for res in results:
                mat = np.where(np.isfinite(res.pattern), res.pattern, res.profile) if measure == "pattern" else res.profile
                for a in res.models:
                    for b in res.models:
                        if a in start and b in start:
                            block = mat[np.ix_(np.flatnonzero(res.labels["model"] == a), np.flatnonzero(res.labels["model"] == b))]
                            sa, sb = start[a], start[b]
                            sim[sa:sa + len(block), sb:sb + block.shape[1]] = block
            return labels, sim

        key = ("head_similarity", tuple(models), measure)
        res = self._results.get(key, make)
        if res is None:  # comparisons stored while the server runs show up on the next try
            with self._results._lock:
                self._results._d.pop(key, None)
        return res

    # ---- one head --------------------------------------------------------------------------------------------
    def head(self, model: str, method: str, layer: int, head: int) -> Head:
        return self._heads.get((model, method, layer, head), lambda: self._make_head(model, method, layer, head))

    def _make_head(self, model: str, method: str, layer: int, head: int) -> Head:
        info = self.infos[model]
        grp = self.atlas.layout_group(model, method)
        xy = np.asarray(grp["coords"][layer, head], dtype=np.float32)
        q = np.asarray(grp["quality"][layer, head], dtype=np.float32)
        pq = np.asarray(grp["placed_quality"][layer, head], dtype=np.float32) if "placed_quality" in grp else [np.nan]
        rows = self.tokens(model, method).rows
        qn = np.linalg.norm(np.asarray(self.atlas.array(model, "queries")[layer, head], dtype=np.float32)[rows], axis=1)
        kn = np.linalg.norm(np.asarray(self.atlas.array(model, "keys")[layer, info.kv_head(head)], dtype=np.float32)[rows], axis=1)
        return Head(xy[:, 0].copy(), xy[:, 1].copy(), np.concatenate([qn, kn]).astype(np.float32), float(q[0]), float(q[1]),
                    float(pq[0]), _stack_counts(xy))

    def has_attention(self, model: str) -> bool:
        return self.atlas.has_array(model, "attn_topk_index") and self.atlas.has_array(model, "attn_topk_weight")

    def topk(self, model: str, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        return self._topk.get(("topk", model, layer, head), lambda: self.atlas.attention_topk(model, layer, head))

    def sequence_tokens(self, model: str, sequence: int) -> pd.DataFrame:
        tok = self.atlas.tokens(model)
        sel = tok[tok["sequence"] == sequence]
        return sel.assign(row=sel.index.to_numpy())

    def sequence_info(self, model: str, sequence: int) -> dict[str, Any]:
        seqs = self.atlas.sequences(model)
        row = seqs[seqs["sequence"] == sequence]
        return row.iloc[0].to_dict() if len(row) else {}

    def image(self, model: str, sequence: int) -> np.ndarray | None:
        if not self.atlas.has_array(model, "images"):
            return None
        arr = self.atlas.array(model, "images")
        if not 0 <= sequence < arr.shape[0]:
            return None
        return self._static.get(("image", model, sequence), lambda: np.asarray(arr[sequence], dtype=np.uint8))


    # ---- stored comparison results (`attnatlas compare`) -------------------------------------------------------
    def compare_result(self, a: str, b: str) -> Any:
        """The stored comparison of models a and b (CompareResult), or None when it was never run.

        Only found results are cached: a comparison stored while the server runs shows up on the next try."""
        from attnatlas.compare.run import load

        if a == b or a not in self.atlas.models or b not in self.atlas.models:
            return None
        key = ("compare", a, b)
        res = self._results.get(key, lambda: load(self.atlas, a, b))
        if res is None:
            with self._results._lock:
                self._results._d.pop(key, None)
        return res

    def similar_heads(self, model: str, layer: int, head: int, k: int = 5) -> pd.DataFrame | None:
        """Nearest heads of one head in its own and the other compared models (pattern measure, then profile
        where pattern is undefined); None when no comparison involving `model` is stored."""
        from attnatlas.compare.run import nearest_heads

        if not self.atlas.has_table(model, "head_metrics"):  # also: the analysis folder exists (no mkdir here)
            return None

        def make() -> pd.DataFrame:
            parts = [nearest_heads(self.atlas, model, layer, head, k, measure).assign(measure=measure)
                     for measure in ("pattern", "profile")]
            return pd.concat(parts, ignore_index=True)

        return self._results.get(("near", model, layer, head, k), make)


def image_name(path: str) -> str:
    """The file name of an image's path ("/" only: a backslash may be part of a file name)."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def _decoded_pieces(t: pd.DataFrame, seqs: pd.DataFrame) -> np.ndarray:
    """The text under each byte-level piece that decodes to U+FFFD alone (part of one character's bytes),
    from its character offsets; "" where the token is shown as it is."""
    out = np.full(len(t), "", dtype=object)
    if "char_start" not in t or "text" not in seqs:
        return out
    broken = t["token"].astype(str).str.contains("\ufffd", regex=False).to_numpy() & (t["char_start"].to_numpy() >= 0)
    texts = seqs["text"].astype(str)
    for i in np.flatnonzero(broken):
        text = texts.get(t["sequence"].iat[i], "")
        out[i] = text[int(t["char_start"].iat[i]):int(t["char_end"].iat[i])]
    return out


def _stack_counts(xy: np.ndarray) -> np.ndarray:
    """Points at exactly the same spot (e.g. every [CLS] key of a head): their count, for each point."""
    pts = np.ascontiguousarray(xy, dtype=np.float32)
    keys = pts.view(np.int64).ravel()  # the two float32 bits as one integer: a 1-D unique
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    out = np.minimum(counts[inverse], 65535).astype(np.uint16)  # 2 bytes a point sent per head switch, not 4
    out[~np.isfinite(pts).all(1)] = 1
    return out


stack_counts = _stack_counts  # public name, for the standalone page (app.page)


def _continues_word(tok: pd.DataFrame) -> np.ndarray:
    """True where a token is in the same word as the token before it (byte-level BPE word pieces)."""
    if "word" not in tok:
        return np.zeros(len(tok), bool)
    w, s = tok["word"].to_numpy(), tok["sequence"].to_numpy()
    out = np.zeros(len(tok), bool)
    out[1:] = (w[1:] == w[:-1]) & (s[1:] == s[:-1]) & (w[1:] >= 0)
    return out
