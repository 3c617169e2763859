"""Per-head attention metrics, from full attention recomputed exactly from the stored q and k.

Every head-level figure is a mean over the queries that have a choice, i.e. at least two keys they
may attend to (a causal model's first token, or any token of a one-token sequence, has none). A head
with no such query gets NaN metrics and a note, never an error.

Measures (per query, then averaged):
    entropy          -sum p log p, in nats; entropy_norm divides by log(number of allowed keys)
    distance         sum p |i - j| in tokens; for images the Euclidean patch-grid distance to patch keys
                     (renormalised over patch keys, patch queries only); distance_rel divides by the
                     largest distance that query could reach
    first_share      weight on the sequence's first token (the usual sink)
    special_share    weight on special tokens ([CLS], [SEP], BOS; cls/register tokens in ViTs)
    punct_share      weight on tokens made only of punctuation
    prev/next/self_share   weight on the token just before / just after / itself
    keys90           fewest keys that hold 90% of the weight (also stored per token); frac90 = keys90 / allowed keys
Layout measures (need a stored layout, else NaN and a note):
    layout_positional   leave-one-out 10-NN regression R^2 of relative position from the 2-D layout
    qk_separation       2 * (share of each point's 10 nearest neighbours of its own kind, query or key) - 1:
                        0 when queries and keys mix, 1 when they lie apart
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.attention import AttentionRecipe, recipe
from attnatlas.errors import StoreError

MASS = 0.9  # sparsity: keys needed to hold this share of the weight
KNN = 10
MAX_LAYOUT_POINTS = 6000  # per kind; layouts above this are sampled for the k-NN measures
HEAD_FIELDS = [
    "entropy_mean", "entropy_std", "entropy_norm_mean", "distance_mean", "distance_rel_mean",
    "first_share", "special_share", "punct_share", "prev_share", "next_share", "self_share",
    "keys90_mean", "frac90_mean", "layout_positional", "qk_separation",
]
_PUNCT = set(string.punctuation) | set("“”‘’–—…«»")
_MARKERS = ("Ġ", "▁", "Ċ", "##")


def is_punct(token: str) -> bool:
    """True for tokens made only of punctuation (after tokenizer space markers and spaces)."""
    t = str(token)
    for m in _MARKERS:
        t = t.replace(m, "")
    t = t.strip()
    return bool(t) and all(c in _PUNCT for c in t)


@dataclass
class Batch:
    """A model's tokens padded into (sequence, slot) arrays, slot = position in the sequence."""

    sequence: np.ndarray  # (seq,) sequence ids
    rows: np.ndarray  # (seq, slot) global token rows, -1 = padding
    special: np.ndarray  # (seq, slot) bool
    punct: np.ndarray  # (seq, slot) bool
    patch_rc: np.ndarray | None  # (seq, slot, 2) patch row/col, NaN for non-patch tokens; None for text

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0

    @property
    def lengths(self) -> np.ndarray:
        return self.valid.sum(1)

    def subset(self, keep: np.ndarray) -> Batch:
        rc = None if self.patch_rc is None else self.patch_rc[keep]
        return Batch(self.sequence[keep], self.rows[keep], self.special[keep], self.punct[keep], rc)


def make_batch(tokens: pd.DataFrame, image: bool = False) -> Batch:
    """Pad the token table by sequence; rows keep their global index in the table."""
    seq = tokens["sequence"].to_numpy()
    ids, inverse = np.unique(seq, return_inverse=True)
    # slot = rank within the sequence, in table order (the table is written sequence by sequence)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(len(seq), dtype=np.int64)
    slot[order] = np.arange(len(seq)) - np.repeat(starts, counts)
    S, N = len(ids), int(counts.max()) if len(ids) else 0
    rows = np.full((S, N), -1, dtype=np.int64)
    rows[inverse, slot] = np.arange(len(seq))
    special = np.zeros((S, N), dtype=bool)
    special[inverse, slot] = tokens["is_special"].to_numpy(dtype=bool)
    punct = np.zeros((S, N), dtype=bool)
    punct[inverse, slot] = [is_punct(t) for t in tokens["token"].to_numpy()]
    rc = None
    if image:
        rc = np.full((S, N, 2), np.nan)
        r = tokens["patch_row"].to_numpy(dtype=float)
        c = tokens["patch_col"].to_numpy(dtype=float)
        patch = (r >= 0) & (c >= 0)
        rc[inverse, slot, 0] = np.where(patch, r, np.nan)
        rc[inverse, slot, 1] = np.where(patch, c, np.nan)
    return Batch(ids, rows, special, punct, rc)


# Buckets of similar length: padding to the bucket's longest sequence wastes at most this share of cells,
# and one bucket's (sequence, query, key) attention stays near BUCKET_CELLS float32 cells.
BUCKET_WASTE = 1.3
BUCKET_CELLS = 4_000_000
WORK = {"cells": 0}  # (query, key) cells of attention computed: what compare's cost is counted in


def make_batches(tokens: pd.DataFrame, image: bool = False) -> list[Batch]:
    """The token table as Batches of similar-length sequences, so attention costs the sum of each
    sequence's length squared instead of (sequences x longest length squared)."""
    lengths = tokens.groupby("sequence", sort=True).size()
    order = lengths.sort_values(kind="stable")
    groups: list[list[int]] = []
    start_len, cells = 0, 0
    for seq, n in order.items():
        n = int(n)
        if groups and n <= BUCKET_WASTE * start_len and cells + n * n <= BUCKET_CELLS:
            groups[-1].append(seq)
            cells += n * n
        else:
            groups.append([seq])
            start_len, cells = n, n * n
    seq_col = tokens["sequence"].to_numpy()
    out = []
    for g in groups:
        rows = np.flatnonzero(np.isin(seq_col, g))
        b = make_batch(tokens.iloc[rows], image=image)
        b.rows = np.where(b.rows >= 0, rows[np.maximum(b.rows, 0)], -1)  # back to rows of the whole table
        out.append(b)
    return out


def allowed_keys(valid: np.ndarray, causal: bool, recipe: AttentionRecipe | None = None, layer: int = 0) -> np.ndarray:
    """(seq, query, key) bool: which keys each query may attend to (with a recipe: its layer's window too)."""
    allow = valid[:, :, None] & valid[:, None, :]
    if recipe is not None:
        return allow & recipe.allowed(layer, valid.shape[1])[None]
    if causal:
        allow &= np.tri(valid.shape[1], dtype=bool)[None]
    return allow


def attention(q: np.ndarray, k: np.ndarray, batch: Batch, scaling: float | AttentionRecipe, causal: bool = False,
              layer: int = 0, head: int = 0) -> np.ndarray:
    """(seq, query, key) attention within each sequence, exactly as the model computed it (the atlas's
    recipe: scaling, softcap, bias, causal mask, window; see attnatlas.attention); 0 outside the mask.

    q, k: (token, d_head) for the whole model; padding slots give all-zero rows. `scaling` is a recipe,
    or a plain scale with `causal` for plain softmax(q.k * scaling + mask).
    """
    rec = scaling if isinstance(scaling, AttentionRecipe) else AttentionRecipe(1, causal, [float(scaling)], [None], [None])
    if not isinstance(scaling, AttentionRecipe):
        layer = 0
    WORK["cells"] += int(batch.rows.shape[0]) * int(batch.rows.shape[1]) ** 2
    safe = np.where(batch.valid, batch.rows, 0)
    qs = q[safe].astype(np.float32)  # (seq, slot, d)
    ks = k[safe].astype(np.float32)
    return rec.probabilities(np.einsum("sqd,skd->sqk", qs, ks), layer, head, batch.valid, qs, ks).astype(np.float32)


def keys_for_mass(p: np.ndarray, mass: float = MASS) -> np.ndarray:
    """(...,) fewest keys whose weights sum to `mass` of each row of p (...., key)."""
    srt = -np.sort(-p, axis=-1)
    csum = np.cumsum(srt, axis=-1)
    # tolerance so exactly-reached mass (uniform over 10 keys: 9 keys = 0.9) is not missed by rounding
    return (csum < mass - 1e-5).sum(-1) + 1


@dataclass
class HeadResult:
    metrics: dict[str, float]  # HEAD_FIELDS without the layout ones, plus n_queries
    keys90: np.ndarray  # (seq, slot) per-token keys holding 90%; -1 = padding or undefined
    sums: dict[str, tuple[float, int]] | None = None  # metric -> (sum, count) over its queries, for merging


def merge_results(parts: list[HeadResult]) -> dict[str, float]:
    """One head's metrics over several buckets: every mean is the sum over all queries / their count."""
    if len(parts) == 1:
        return parts[0].metrics
    tot: dict[str, list[float]] = {}
    for r in parts:
        for k, (v, n) in (r.sums or {}).items():
            acc = tot.setdefault(k, [0.0, 0])
            acc[0] += v
            acc[1] += n
    mean = {k: (v / n if n else float("nan")) for k, (v, n) in tot.items()}
    out = {k: mean[k] for k in mean if k not in ("entropy_sq",)}
    n_q = sum(r.metrics["n_queries"] for r in parts)
    out["n_queries"] = n_q
    var = mean.get("entropy_sq", float("nan")) - mean.get("entropy_mean", float("nan")) ** 2
    out["entropy_std"] = float(np.sqrt(max(var, 0.0))) if n_q else float("nan")
    return out


def head_metrics(p: np.ndarray, batch: Batch, causal: bool, recipe: AttentionRecipe | None = None,
                 layer: int = 0) -> HeadResult:
    """Metrics of one head from its (seq, query, key) attention (see the module doc)."""
    valid = batch.valid
    S, N = valid.shape
    allow = allowed_keys(valid, causal, recipe, layer)
    n_keys = allow.sum(2)  # (seq, query)
    finite = np.isfinite(p).all(2)
    p = np.where(np.isfinite(p), p, 0)
    choice = valid & finite & (n_keys >= 2)
    k90 = np.where(valid & finite, keys_for_mass(p), -1)

    sums: dict[str, tuple[float, int]] = {}

    def mean(x: np.ndarray, where: np.ndarray | None = None, name: str | None = None) -> float:
        w = choice if where is None else choice & where
        if name is not None:
            sums[name] = (float(x[w].sum(dtype=np.float64)), int(w.sum()))
        return float(x[w].mean()) if w.any() else float("nan")

    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(2)
        ent_norm = ent / np.log(np.maximum(n_keys, 2))
    idx = np.arange(N)
    if batch.patch_rc is None:
        d = np.abs(idx[:, None] - idx[None, :]).astype(np.float32)[None]  # (1, query, key)
        dist = (p * d).sum(2)
        reach = np.where(allow, d, 0).max(2)
        dist_where = None
    else:
        rc = batch.patch_rc
        d = np.sqrt(((rc[:, :, None, :] - rc[:, None, :, :]) ** 2).sum(-1))  # NaN unless patch-patch
        is_patch = ~np.isnan(rc[..., 0])
        pm = np.where(allow & is_patch[:, None, :], p, 0)
        mass = pm.sum(2)
        with np.errstate(invalid="ignore", divide="ignore"):
            dist = np.nansum(pm * np.nan_to_num(d), 2) / mass
        reach = np.where(allow & is_patch[:, None, :], np.nan_to_num(d), 0).max(2)
        dist_where = is_patch & (mass > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist_rel = dist / reach
    diag = p[:, idx, idx]
    prev = np.zeros((S, N), dtype=p.dtype)
    prev[:, 1:] = p[:, idx[1:], idx[:-1]]
    nxt = np.zeros((S, N), dtype=p.dtype)
    nxt[:, :-1] = p[:, idx[:-1], idx[1:]]
    has_prev = np.zeros((S, N), dtype=bool)
    has_prev[:, 1:] = valid[:, :-1]
    has_next = np.zeros((S, N), dtype=bool)
    has_next[:, :-1] = valid[:, 1:]
    m = {
        "n_queries": int(choice.sum()),
        "entropy_mean": mean(ent, name="entropy_mean"),
        "entropy_std": float(ent[choice].std()) if choice.any() else float("nan"),
        "entropy_norm_mean": mean(ent_norm, name="entropy_norm_mean"),
        "distance_mean": mean(dist, dist_where, name="distance_mean"),
        "distance_rel_mean": mean(dist_rel, None if dist_where is None else dist_where & (reach > 0), name="distance_rel_mean"),
        "first_share": mean(p[:, :, 0], name="first_share"),
        "special_share": mean((p * batch.special[:, None, :]).sum(2), name="special_share"),
        "punct_share": mean((p * batch.punct[:, None, :]).sum(2), name="punct_share"),
        "prev_share": mean(prev, has_prev, name="prev_share"),
        "next_share": mean(nxt, has_next, name="next_share"),
        "self_share": mean(diag, name="self_share"),
        "keys90_mean": mean(k90.astype(float), name="keys90_mean"),
        "frac90_mean": mean(k90 / np.maximum(n_keys, 1), name="frac90_mean"),
    }
    mean(ent * ent, name="entropy_sq")
    return HeadResult(m, k90, sums)


def layout_metrics(xy: np.ndarray, rel_position: np.ndarray, k: int = KNN, seed: int = 0) -> dict[str, float]:
    """Positional-ness and query/key separation of one joint layout.

    xy: (2 * points, 2) queries first then keys; rel_position: (points,) position / (length - 1).
    """
    from sklearn.neighbors import NearestNeighbors

    n = len(rel_position)
    kind = np.repeat([0, 1], n)
    pos = np.concatenate([rel_position, rel_position])
    keep = np.isfinite(xy).all(1) & np.isfinite(pos)
    rng = np.random.default_rng(seed)
    pick = np.flatnonzero(keep)
    if len(pick) > 2 * MAX_LAYOUT_POINTS:
        pick = np.sort(rng.choice(pick, 2 * MAX_LAYOUT_POINTS, replace=False))
    if len(pick) <= k + 1:
        return {"layout_positional": float("nan"), "qk_separation": float("nan")}
    pts, pos, kind = xy[pick], pos[pick], kind[pick]
    nn = NearestNeighbors(n_neighbors=k + 1).fit(pts)
    _, nbr = nn.kneighbors(pts)
    nbr = nbr[:, 1:]  # leave the point itself out
    pred = pos[nbr].mean(1)
    var = ((pos - pos.mean()) ** 2).sum()
    r2 = 1 - ((pos - pred) ** 2).sum() / var if var > 0 else float("nan")
    same = (kind[nbr] == kind[:, None]).mean()
    return {"layout_positional": float(r2), "qk_separation": float(2 * same - 1)}


def pick_layout(atlas, model: str, method: str | None) -> str | None:
    """The layout method to measure: the one asked for, else pca, else any; None when there is none."""
    have = atlas.layout_methods(model)
    if method is not None:
        if method not in have:
            raise StoreError(f"Model {model!r} has no {method!r} layouts (has: {', '.join(have) or 'none'}); "
                             f"run `attnatlas project {atlas.path} --model {model} --method {method}`.")
        return method
    if "pca" in have:
        return "pca"
    return have[0] if have else None


def iter_attention(atlas, model: str, batch: Batch | list[Batch]) -> Iterator[tuple[int, int, Any]]:
    """(layer, head, attention) for every head, one layer read at a time: a (seq, query, key) array for one
    Batch, a list of them (one per bucket) for a list of Batches."""
    info = atlas.info(model)
    rec = recipe(atlas, model)
    qa, ka = atlas.array(model, "queries"), atlas.array(model, "keys")
    for layer in range(info.n_layers):
        qs = np.asarray(qa[layer], dtype=np.float32)  # (head, token, d)
        ks = np.asarray(ka[layer], dtype=np.float32)  # (kv_head, token, d)
        for head in range(info.n_heads):
            q, k = qs[head], ks[info.kv_head(head)]
            if isinstance(batch, Batch):
                yield layer, head, attention(q, k, batch, rec, layer=layer, head=head)
            else:
                yield layer, head, [attention(q, k, b, rec, layer=layer, head=head) for b in batch]


@dataclass
class ModelMetrics:
    heads: pd.DataFrame  # one row per head: layer, head, n_queries, HEAD_FIELDS, layout_method, note
    token_keys90: pd.DataFrame  # one row per token: token, then one int column per head "L{layer}H{head}"
    notes: list[str]


def collect(
    atlas,
    model: str,
    layout_method: str | None = None,
    on_head: Callable[[int, int, list[np.ndarray]], None] | None = None,
    batches: list[Batch] | None = None,
    progress: bool = False,
) -> ModelMetrics:
    """Metrics of every head of `model`, over length buckets of its sequences (see make_batches);
    `on_head(layer, head, attention per bucket)` sees each attention once (the similarity stage reuses
    it rather than recomputing)."""
    from tqdm.auto import tqdm

    info = atlas.info(model)
    tokens = atlas.tokens(model)
    batches = batches or make_batches(tokens, image=info.modality == "image")
    causal = bool(info.attrs.get("causal", False))
    rec = recipe(atlas, model)
    notes: list[str] = []
    method = pick_layout(atlas, model, layout_method)
    if method is None:
        notes.append(f"{model}: no layout stored, so layout_positional and qk_separation are skipped "
                     f"(run `attnatlas project {atlas.path} --model {model}`).")
    rows_out, k90 = [], {}
    bar = tqdm(total=info.n_layers * info.n_heads, desc=f"compare {model}", unit="head", disable=not progress)
    for layer, head, ps in iter_attention(atlas, model, batches):
        parts = [head_metrics(p, b, causal, rec, layer) for p, b in zip(ps, batches)]
        metrics = merge_results(parts)
        if on_head is not None:
            on_head(layer, head, ps)
        row = {"layer": layer, "head": head, **metrics, "layout_positional": np.nan, "qk_separation": np.nan,
               "layout_method": method or "", "note": ""}
        if metrics["n_queries"] == 0:
            row["note"] = "undefined: no query has two or more keys (one-token sequences)"
        k90[f"L{layer}H{head}"] = np.concatenate([r.keys90[b.valid] for r, b in zip(parts, batches)])
        rows_out.append(row)
        bar.update(1)
    bar.close()
    heads = pd.DataFrame(rows_out)
    if method is not None:
        _add_layout_metrics(atlas, model, method, tokens, heads, notes)
    if (heads["n_queries"] == 0).any():
        notes.append(f"{model}: {(heads['n_queries'] == 0).sum()} head(s) have undefined metrics "
                     "(no query with two or more keys, e.g. one-token sequences).")
    token_df = pd.DataFrame({"token": np.concatenate([b.rows[b.valid] for b in batches]),
                             **{c: v.astype(np.int32) for c, v in k90.items()}})
    cols = ["layer", "head", "n_queries", *HEAD_FIELDS, "layout_method", "note"]
    return ModelMetrics(heads[cols], token_df.sort_values("token", ignore_index=True), notes)


def _add_layout_metrics(atlas, model: str, method: str, tokens: pd.DataFrame, heads: pd.DataFrame, notes: list[str]) -> None:
    rows = atlas.layout_rows(model, method)
    length = tokens.groupby("sequence")["position"].transform("max").to_numpy()
    rel = tokens["position"].to_numpy() / np.maximum(length, 1)
    done = atlas.layout_done(model, method)
    missing = 0
    for i, (layer, head) in enumerate(zip(heads["layer"], heads["head"])):
        if not done[layer, head]:
            missing += 1
            continue
        lm = layout_metrics(atlas.layout_coords(model, method, layer, head), rel[rows])
        heads.loc[i, "layout_positional"] = lm["layout_positional"]
        heads.loc[i, "qk_separation"] = lm["qk_separation"]
    if missing:
        notes.append(f"{model}: {missing} head(s) have no {method} layout yet; their layout measures are NaN.")
