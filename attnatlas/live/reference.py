"""Each head's stored layout as a reference to place new points into (numpy only, no torch).

A head's reference is its laid-out (sampled) points, in the order of the stored coordinates, queries
first: their q and k normalised exactly as `project` did (its rule and settings, recorded with the
layout, computed on the same token rows), their stored 2-D positions, and the typical distance of those
points to their own nearest neighbours, against which a placed point's fit is measured.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.errors import StoreError
from attnatlas.project.normalize import DEFAULT_NORMALISE, apply_normalisation, joint_points, normalise_head
from attnatlas.project.placement import PLACE_K, place, typical_distance
from attnatlas.store import Atlas

# Placements of new input: the columns every table has, in this order (top-k attention and fit follow).
WARM_THREADS = max(1, min(4, os.cpu_count() or 1))
COLUMNS = ("text", "sequence", "token", "position", "kind", "layer", "head", "method", "x", "y")


@dataclass(frozen=True)
class HeadReference:
    points: np.ndarray  # (2 * m, d_head) float32 normalised queries, then keys, of the laid-out rows
    xy: np.ndarray  # (2 * m, 2) float32 their stored positions
    rows: np.ndarray  # (m,) int64 token rows of the corpus they belong to
    applied: dict[str, Any]  # {"scale": c, "shift": (d_head,)} as normalise_head found it
    metric: str
    typical: float  # median distance of a reference point to its PLACE_K nearest others


class References:
    """The references of one atlas, read once per head and kept (the live worker answers many requests)."""

    def __init__(self, atlas: Atlas):
        self.atlas = atlas
        self._heads: dict[tuple[str, str, int, int], HeadReference | None] = {}
        self._layouts: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, dict, str]] = {}
        self._lock = threading.Lock()

    def layout(self, model: str, method: str) -> tuple[np.ndarray, np.ndarray, dict, str]:
        """(stored rows, laid-out mask, normalisation settings, metric) of one method's layouts."""
        key = (model, method)
        if key not in self._layouts:
            params = self.atlas.layout_params(model, method)  # StoreError when the method is missing
            norm = {**DEFAULT_NORMALISE, **(params.get("normalise") or {})}
            self._layouts[key] = (self.atlas.layout_rows(model, method), self.atlas.layout_sampled(model, method),
                                  norm, str(params.get("metric", "cosine")))
        return self._layouts[key]

    def head(self, model: str, method: str, layer: int, head: int) -> HeadReference | None:
        """One head's reference, or None when that head has no layout yet."""
        key = (model, method, layer, head)
        if key not in self._heads:
            with self._lock:
                self.layout(model, method)  # read once, before threads read heads
            # Read outside the lock, so heads can be read in parallel; a head read twice gives the same.
            self._heads[key] = self._read(model, method, layer, head)
        return self._heads[key]

    def warm(self, model: str, method: str, heads: list[tuple[int, int]], threads: int = WARM_THREADS) -> None:
        """Read the references of `heads` not read yet, `threads` at a time (zarr, numpy and faiss release
        the GIL: the first request of a model reads every head)."""
        todo = [(L, h) for L, h in heads if (model, method, L, h) not in self._heads]
        if len(todo) < 2 * threads:
            return
        with self._lock:
            self.layout(model, method)
        with ThreadPoolExecutor(threads, thread_name_prefix="attnatlas-reference") as pool:
            list(pool.map(lambda lh: self.head(model, method, *lh), todo))

    def _read(self, model: str, method: str, layer: int, head: int) -> HeadReference | None:
        rows, sampled, norm, metric = self.layout(model, method)
        coords = self.atlas.layout_coords(model, method, layer, head)  # (2 * stored, 2)
        n = len(rows)
        xy = np.vstack([coords[:n][sampled], coords[n:][sampled]]).astype(np.float32)
        if not np.isfinite(xy).all():
            return None  # not projected yet
        laid = rows[sampled]
        q = self.atlas.queries(model, layer, head)[laid]
        k = self.atlas.keys(model, layer, head)[laid]
        qn, kn, applied = normalise_head(q, k, translate=bool(norm["translate"]), scale=bool(norm["scale"]),
                                         scale_rule=str(norm["scale_rule"]))
        points = joint_points(qn, kn)
        return HeadReference(points, xy, laid.astype(np.int64), applied, metric, typical_distance(points, metric, PLACE_K))


def place_heads(refs: References, model: str, method: str, queries: np.ndarray, keys: np.ndarray,
                heads: list[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Place new tokens' queries (layer, head, token, d) and keys (layer, kv_head, token, d) into each
    head's `method` layout. Returns flat columns, per head: queries then keys, tokens in order:
    layer, head, kind (0 query, 1 key), token (index into the new tokens), x, y, distance, fit, far and
    nearest (the corpus point nearest to it: index into the reference, -1 none) with nearest_row."""
    info = refs.atlas.info(model)
    todo = heads if heads is not None else [(L, h) for L in range(info.n_layers) for h in range(info.n_heads)]
    refs.warm(model, method, todo)
    T = queries.shape[2]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("layer", "head", "kind", "token", "x", "y", "distance",
                                                           "fit", "far", "nearest_row", "nearest_kind")}
    skipped = 0
    for L, h in todo:
        ref = refs.head(model, method, L, h)
        if ref is None:
            skipped += 1
            continue
        qn, kn = apply_normalisation(queries[L, h], keys[L, info.kv_head(h)], ref.applied)
        p = place(joint_points(qn, kn), ref.points, ref.xy, ref.metric, typical=ref.typical)
        m = len(ref.rows)
        first = p.neighbours[:, 0]
        parts["layer"].append(np.full(2 * T, L, np.int16))
        parts["head"].append(np.full(2 * T, h, np.int16))
        parts["kind"].append(np.repeat(np.array([0, 1], np.int8), T))
        parts["token"].append(np.tile(np.arange(T, dtype=np.int32), 2))
        parts["x"].append(p.xy[:, 0])
        parts["y"].append(p.xy[:, 1])
        parts["distance"].append(p.distance)
        parts["fit"].append(p.fit)
        parts["far"].append(p.far)
        parts["nearest_row"].append(ref.rows[first % m])
        parts["nearest_kind"].append((first >= m).astype(np.int8))
    if not parts["x"]:
        raise StoreError(f"No head of {model!r} has a {method} layout yet; run `attnatlas project`.")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["skipped_heads"] = np.array(skipped)
    return out


def placement_table(cols: dict[str, np.ndarray], method: str, tokens: pd.DataFrame, texts: list[str],
                    corpus_tokens: pd.Series, topk_index: np.ndarray | None, topk_weight: np.ndarray | None) -> pd.DataFrame:
    """`place_heads`' columns as the user-facing table: text, token, position, kind, layer, head, method,
    x, y, the new input's top-k attention (for queries: the positions of the keys it attends to most and
    their weights) and the fit: distance to the nearest corpus points over the corpus's own typical
    distance, `far` when well outside the corpus, and the nearest corpus token."""
    t = cols["token"]
    seq = tokens["sequence"].to_numpy()[t]
    first_seq = int(tokens["sequence"].min()) if len(tokens) else 0
    positions = tokens["position"].to_numpy()
    df = pd.DataFrame({
        # One copy of each text and a code per row: a long text repeated per row made a 14.7 GB table.
        "text": pd.Categorical.from_codes(seq - first_seq, categories=pd.Index(texts).unique())
        if len(set(texts)) == len(texts) else pd.Categorical(np.asarray(texts, dtype=object)[seq - first_seq]),
        "sequence": seq - first_seq,
        "token": tokens["token"].to_numpy()[t],
        "position": positions[t],
        "kind": np.where(cols["kind"] == 0, "query", "key"),
        "layer": cols["layer"].astype(np.int64),
        "head": cols["head"].astype(np.int64),
        "method": method,
        "x": cols["x"],
        "y": cols["y"],
    })
    if topk_index is not None:
        idx = topk_index[cols["layer"], cols["head"], t]  # (rows, k) token rows of the new input, -1 none
        w = topk_weight[cols["layer"], cols["head"], t]
        is_query = (cols["kind"] == 0).tolist()
        valid = idx >= 0
        # Whole arrays to lists once (per-row numpy calls took 7 s for 147,456 rows); -1 slots dropped per row.
        pos = np.where(valid, positions[np.maximum(idx, 0)], -1).tolist()
        wts = np.round(w.astype(np.float64), 4).tolist()
        full = valid.all(axis=1).tolist()
        ok = valid.tolist()
        df["top_keys"] = [(p if f else [x for x, v in zip(p, o) if v]) if q else []
                          for p, o, f, q in zip(pos, ok, full, is_query)]
        df["top_weights"] = [(ww if f else [x for x, v in zip(ww, o) if v]) if q else []
                             for ww, o, f, q in zip(wts, ok, full, is_query)]
    df["distance"] = cols["distance"]
    df["fit"] = cols["fit"]
    df["far"] = cols["far"]
    df["nearest_token"] = corpus_tokens.to_numpy()[cols["nearest_row"]]
    df["nearest_kind"] = np.where(cols["nearest_kind"] == 0, "query", "key")
    df["nearest_row"] = cols["nearest_row"]
    return df
