"""What each head does: scores in [0, 1] per head, and one shared rule that turns them into types.

Scores (table `head_scores`, one row per head, with the probe settings in column `settings`):

From the model run on repeated random tokens (causal text models only; `attention_of_token_ids`, extract's
loader and capture). Each probe sequence is [BOS] + R + R, R = `length` tokens drawn without replacement
from the vocabulary (special tokens excluded), seeded. For each query i in the second copy:
    induction        weight on the token just after the earlier occurrence of token i (key i - length + 1)
    duplicate        weight on the earlier occurrence itself (key i - length)
Encoders see the whole sequence, so the second copy's tokens are visible at once: there is no induction
to measure, and these scores are NaN (the CLI says so).

From the stored corpus, attention recomputed from the stored q and k (the recipe of
`attnatlas.attention.attention_from_atlas`: scaling, softcap, bias, mask, window), mean over queries with a
choice (two or more keys):
    previous_token, next_token, self    weight on key i - 1, i + 1, i
    sink             weight on the sequence's first token
    special          weight on special tokens ([CLS], [SEP], BOS; CLS and register tokens of a ViT)
    broad            normalised entropy: entropy / log(allowed keys); 1 = uniform
    local            weight within LOCAL_TOKENS tokens (|i - j| <= 3), over queries that can see farther keys;
                     images: on patches within LOCAL_PATCHES grid steps (the 8 neighbours and itself),
                     patch queries only
    positional       R^2 of the attention weights explained by the key-query offset alone (the mean
                     pattern per offset), over every allowed (query, key) cell; 1 = a fixed offset kernel
    logit_std, logit_margin, logit_z    pre-softmax logits (not in [0, 1]): std over the allowed keys,
                     top-1 minus top-2, and the top logit's z-score, means over queries
Images only, from the head's stored joint layout (the way compare's layout_positional scores token
position): leave-one-out 10-NN regression R^2 of
    colour           each patch's hue (as a point on the colour circle; patches with saturation >= 0.2)
    brightness       each patch's brightness (HSV value)
from its 2-D place in the head's layout (queries and keys both), each taken relative to its image's mean
(a layout that only keeps images apart tells nothing), as the share of the variance left unexplained by the
patch's grid neighbours in its image that the layout explains: (R2_layout - R2_grid) / (1 - R2_grid), clipped
to [0, 1] (colour is smooth across an image, so local heads would score otherwise).

Types (`head_types`, used by the CLI, `info`, the grid export and every dashboard view): a head gets
every type whose score reaches the threshold in TYPE_RULES (and whose extra condition holds), with
confidence 0.5 at the threshold rising linearly to 1 at a score of 1; its primary `type` is the first of
its types in TYPE_RULES order, the most specific (induction before sink: an induction head also sinks to the
first token wherever the text has no repeat to copy). How the thresholds were chosen: see THRESHOLDS_MEASURED below and README
"Head types".
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.errors import AtlasError, ModelError, StoreError

TABLE = "head_scores"
VERSION = 1  # of the score definitions: a new version recomputes stored scores
LOCAL_TOKENS = 3
LOCAL_PATCHES = 1.5  # grid steps: 8 neighbours and the patch itself
KNN = 10
MAX_LAYOUT_POINTS = 6000
MIN_SATURATION = 0.2

# Column -> label, in the order views list them.
SCORE_LABELS = {
    "induction": "induction", "duplicate": "duplicate token", "previous_token": "previous token",
    "next_token": "next token", "self": "self", "sink": "first token / sink", "special": "special tokens",
    "broad": "broad (normalised entropy)", "local": "local", "positional": "positional (offset R\u00b2)",
    "colour": "colour (hue from layout)", "brightness": "brightness from layout",
    "logit_std": "logit std", "logit_margin": "logit top-1 margin", "logit_z": "logit max z-score",
}
UNIT_SCORES = [k for k in SCORE_LABELS if not k.startswith("logit_")]

# type -> (score, threshold, extra condition on the row or None). Order = priority on ties.
THRESHOLDS_MEASURED = """\
Thresholds were set from measured score distributions: each is above every head of the same models with
random weights (the null: seeded random init of the demo configs, run through the same probes and corpus),
and at a gap of the real models' distribution (SmolLM2-135M, MiniLM, DINOv2-small on the demo atlas);
scripts/head_type_thresholds.py prints both."""
TYPE_RULES: dict[str, tuple[str, float, Callable[[pd.Series], bool] | None]] = {
    # most specific first: a head's primary type is the first it has (induction heads of SmolLM2 also sink to
    # the first token when the corpus has no repeat to copy; they are induction heads)
    "induction": ("induction", 0.3, None),
    "duplicate": ("duplicate", 0.3, None),
    "previous-token": ("previous_token", 0.5, None),
    "next-token": ("next_token", 0.5, None),
    "self": ("self", 0.5, None),
    "colour": ("colour", 0.5, None),
    "brightness": ("brightness", 0.8, None),
    "local": ("local", 0.7, lambda r: max(r.get("previous_token", 0), r.get("self", 0), r.get("next_token", 0)) < 0.5),
    "positional": ("positional", 0.6, lambda r: max(r.get("previous_token", 0), r.get("self", 0),
                                                      r.get("next_token", 0)) < 0.5),
    "special": ("special", 0.7, lambda r: not (r.get("sink", 0) >= 0.7)),  # a BOS sink is special too: say sink
    "sink": ("sink", 0.7, None),
    "broad": ("broad", 0.85, None),
}
TYPE_COLOURS = {
    "induction": "#d62728", "duplicate": "#ff7f0e", "previous-token": "#1f77b4", "next-token": "#17becf",
    "self": "#9467bd", "sink": "#7f7f7f", "special": "#8c564b", "local": "#2ca02c", "positional": "#bcbd22",
    "broad": "#e377c2", "colour": "#ff1493", "brightness": "#b8860b",
}
TYPE_BADGES = {
    "induction": "IND", "duplicate": "DUP", "previous-token": "PREV", "next-token": "NEXT", "self": "SELF",
    "sink": "SINK", "special": "SPEC", "local": "LOC", "positional": "POS", "broad": "BRD", "colour": "COL",
    "brightness": "BRI",
}


# ---- the rule -------------------------------------------------------------------------------------------------
def confidence(score: float, threshold: float) -> float:
    """0.5 at the threshold, 1 at a score of 1, linear between; 0 below the threshold."""
    if not np.isfinite(score) or score < threshold:
        return 0.0
    return float(min(1.0, 0.5 + 0.5 * (score - threshold) / max(1.0 - threshold, 1e-9)))


def head_types(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per head of `scores` (the stored table): layer, head, `types` (comma-separated, most specific
    first, '' for none), `type` (the most specific, '' for none), `confidence` (of `type`) and `type_text`
    ("induction 0.93, sink 0.99")."""
    out = []
    for _, r in scores.iterrows():
        found = []
        for name, (col, thr, cond) in TYPE_RULES.items():
            v = r.get(col, np.nan)
            if v is None or not np.isfinite(v) or v < thr or (cond is not None and not cond(r)):
                continue
            found.append((confidence(float(v), thr), name))
        # in TYPE_RULES order: the most specific type first
        out.append({"layer": int(r["layer"]), "head": int(r["head"]),
                    "types": ",".join(n for _, n in found), "type": found[0][1] if found else "",
                    "confidence": found[0][0] if found else 0.0,
                    "type_text": ", ".join(f"{n} {c:.2f}" for c, n in found)})
    return pd.DataFrame(out, columns=["layer", "head", "types", "type", "confidence", "type_text"])


def scores_with_types(atlas: Any, model: str) -> pd.DataFrame | None:
    """The stored scores of `model` joined with their types (None when none are stored). Reads tables only:
    the dashboard uses it."""
    if not atlas.has_table(model, TABLE):
        return None
    s = atlas.read_table(model, TABLE)
    return s.merge(head_types(s), on=["layer", "head"], how="left")


def types_by_head(atlas: Any, models: tuple[str, ...]) -> tuple[list[str], ...] | None:
    """Each model's head types ("," joined, "" for none) in (layer, head) order, for compare's layout; None
    unless every model has stored scores."""
    typed = [scores_with_types(atlas, m) for m in models]
    if any(t is None for t in typed):
        return None
    return tuple(t.sort_values(["layer", "head"])["types"].fillna("").tolist() for t in typed)


def type_summary(typed: pd.DataFrame, limit: int = 8) -> list[str]:
    """Lines for `attnatlas info`: per type, how many heads and the strongest few."""
    lines = []
    for name in TYPE_RULES:
        has = typed[typed["types"].str.split(",").apply(lambda ts, name=name: name in ts)]
        if not len(has):
            continue
        col = TYPE_RULES[name][0]
        has = has.sort_values(col, ascending=False)
        top = ", ".join(f"L{int(r['layer'])}H{int(r['head'])} {float(r[col]):.2f}" for _, r in has.head(limit).iterrows())
        more = f", +{len(has) - limit} more" if len(has) > limit else ""
        lines.append(f"{name} ({len(has)}): {top}{more}")
    return lines


# ---- corpus scores --------------------------------------------------------------------------------------------
@dataclass
class _Acc:
    """Sums of one head over every bucket."""

    local: list[float]
    off_s1: np.ndarray  # (offsets,) sum of p per offset
    off_s2: np.ndarray  # (offsets,) sum of p^2
    off_n: np.ndarray  # (offsets,) cells
    logit: np.ndarray  # (3,) sums of std, margin, z
    logit_n: int


def _offset_index(n: int) -> np.ndarray:
    i = np.arange(n)
    return i[:, None] - i[None, :] + n - 1  # (query, key) in 0 .. 2n - 2


def _extra_sums(p: np.ndarray, logits: np.ndarray, batch: Any, allow: np.ndarray, choice: np.ndarray,
                n_max: int, acc: _Acc) -> None:
    """Local, positional and logit sums of one head over one bucket. p, logits, allow: (seq, query, key);
    choice: (seq, query) queries with two or more keys."""
    S, N, _ = p.shape
    cells = allow & choice[:, :, None]
    if batch.patch_rc is None:
        d = np.abs(np.arange(N)[:, None] - np.arange(N)[None, :])[None]
        near = d <= LOCAL_TOKENS
        # only queries that could attend farther than the window say anything about locality
        far = (cells & ~near).any(2)
        w = (p * near).sum(2)
        acc.local[0] += float(w[far].sum())
        acc.local[1] += int(far.sum())
    else:
        rc = batch.patch_rc
        with np.errstate(invalid="ignore"):
            d = np.sqrt(((rc[:, :, None, :] - rc[:, None, :, :]) ** 2).sum(-1))  # NaN unless patch-patch
        near = np.nan_to_num(d, nan=np.inf) <= LOCAL_PATCHES
        is_patch = ~np.isnan(rc[..., 0]) & choice
        w = (p * near).sum(2)
        acc.local[0] += float(w[is_patch].sum())
        acc.local[1] += int(is_patch.sum())
    off = np.broadcast_to(_offset_index(N) - (N - 1) + (n_max - 1), p.shape)[cells]
    v = p[cells].astype(np.float64)
    acc.off_s1 += np.bincount(off, weights=v, minlength=2 * n_max - 1)
    acc.off_s2 += np.bincount(off, weights=v * v, minlength=2 * n_max - 1)
    acc.off_n += np.bincount(off, minlength=2 * n_max - 1)
    # logit statistics over the allowed keys of each query with a choice
    x = np.where(allow, logits, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # padding rows have no key: NaN, dropped below
        mu = np.nanmean(x, 2)
        sd = np.nanstd(x, 2)
        top2 = -np.sort(-np.where(allow, logits, -np.inf), 2)[:, :, :2]
        margin = top2[..., 0] - top2[..., 1]
        z = (top2[..., 0] - mu) / sd
    ok = choice & np.isfinite(sd) & np.isfinite(margin) & np.isfinite(z)
    acc.logit += [float(sd[ok].sum()), float(margin[ok].sum()), float(z[ok & (sd > 0)].sum())]
    acc.logit_n += int(ok.sum())


def corpus_scores(atlas: Any, model: str, layout_method: str | None = None,
                  progress: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """(one row per head: layer, head and the corpus scores, notes). Numpy only: needs no model."""
    from tqdm.auto import tqdm

    from attnatlas.attention import recipe
    from attnatlas.compare import metrics as M

    info = atlas.info(model)
    image = info.modality == "image"
    tokens = atlas.tokens(model)
    batches = M.make_batches(tokens, image=image)
    rec = recipe(atlas, model)
    causal = rec.causal
    n_max = max(b.rows.shape[1] for b in batches)
    qa, ka = atlas.array(model, "queries"), atlas.array(model, "keys")
    rows, notes = [], []
    bar = tqdm(total=info.n_layers * info.n_heads, desc=f"head types {model}", unit="head", disable=not progress)
    for layer in range(info.n_layers):
        qs = np.asarray(qa[layer], dtype=np.float32)  # (head, token, d)
        ks = np.asarray(ka[layer], dtype=np.float32)  # (kv_head, token, d)
        for head in range(info.n_heads):
            q, k = qs[head], ks[info.kv_head(head)]
            parts = []
            acc = _Acc([0.0, 0], np.zeros(2 * n_max - 1), np.zeros(2 * n_max - 1), np.zeros(2 * n_max - 1),
                       np.zeros(3), 0)
            for b in batches:
                safe = np.where(b.valid, b.rows, 0)
                qb, kb = q[safe], k[safe]  # (seq, slot, d)
                qk = np.einsum("sqd,skd->sqk", qb, kb)
                logits = rec.logits(qk, layer, head, b.valid, qb, kb)
                p = rec.probabilities(qk, layer, head, b.valid, qb, kb).astype(np.float32)
                parts.append(M.head_metrics(p, b, causal, rec, layer))
                allow = M.allowed_keys(b.valid, causal, rec, layer)
                choice = b.valid & (allow.sum(2) >= 2) & np.isfinite(p).all(2)
                _extra_sums(np.nan_to_num(p), logits, b, allow, choice, n_max, acc)
            m = M.merge_results(parts)
            n = acc.off_n
            s1, s2 = acc.off_s1, acc.off_s2
            tot_n = n.sum()
            with np.errstate(invalid="ignore", divide="ignore"):
                ss_res = float(np.where(n > 0, s2 - s1 ** 2 / np.maximum(n, 1), 0).sum())
                ss_tot = float(s2.sum() - s1.sum() ** 2 / tot_n) if tot_n else np.nan
                positional = 1 - ss_res / ss_tot if ss_tot and ss_tot > 1e-12 else np.nan
            ln = acc.logit_n
            rows.append({
                "layer": layer, "head": head,
                "previous_token": m["prev_share"], "next_token": m["next_share"], "self": m["self_share"],
                "sink": m["first_share"], "special": m["special_share"], "broad": m["entropy_norm_mean"],
                "local": acc.local[0] / acc.local[1] if acc.local[1] else np.nan,
                "positional": float(np.clip(positional, 0, 1)) if np.isfinite(positional) else np.nan,
                "logit_std": acc.logit[0] / ln if ln else np.nan, "logit_margin": acc.logit[1] / ln if ln else np.nan,
                "logit_z": acc.logit[2] / ln if ln else np.nan,
            })
            bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    if causal:  # a causal model's first token is the only key of its first query; next_token is undefined
        df["next_token"] = np.nan
    if image:
        df["previous_token"] = df["next_token"] = df["sink"] = np.nan  # no order among patches
        colour, method = _layout_colour_scores(atlas, model, layout_method, info, tokens)
        if method is None:
            notes.append(f"{model}: no layout stored, so the colour and brightness scores are skipped "
                         f"(run `attnatlas project {atlas.path} --model {model}`).")
        df = df.merge(colour, on=["layer", "head"], how="left")
    return df, notes


def _knn_r2(xy: np.ndarray, target: np.ndarray) -> float:
    """Leave-one-out k-NN regression R^2 of `target` (points, dims) from the 2-D places `xy`."""
    from sklearn.neighbors import NearestNeighbors

    if len(xy) <= KNN + 1:
        return np.nan
    _, nbr = NearestNeighbors(n_neighbors=KNN + 1).fit(xy).kneighbors(xy)
    pred = target[nbr[:, 1:]].mean(1)
    var = ((target - target.mean(0)) ** 2).sum()
    return float(1 - ((target - pred) ** 2).sum() / var) if var > 0 else np.nan


def pick_colour_layout(atlas: Any, model: str, method: str | None) -> str | None:
    """The layout the colour scores read: the one asked for, else a neighbour-keeping one (tsne, umap) before
    pca, since colour heads are seen as clusters; None when there is none."""
    have = atlas.layout_methods(model)
    if method is not None:
        if method not in have:
            raise StoreError(f"Model {model!r} has no {method!r} layouts (has: {', '.join(have) or 'none'}).")
        return method
    for m in ("tsne", "umap", "pca"):
        if m in have:
            return m
    return have[0] if have else None


def _image_relative(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(n, dims) values minus their image's mean: what tells patches of one image apart."""
    out = values.copy()
    for s in np.unique(image):
        m = image == s
        out[m] -= values[m].mean(0)
    return out


def _grid_r2(target: np.ndarray, image: np.ndarray, rc: np.ndarray) -> float:
    """R^2 of `target` (n, dims) predicted by the mean over each patch's grid neighbours (<= LOCAL_PATCHES steps,
    itself excluded) in its own image: how much nearby patches alone already tell."""
    pred = np.full_like(target, np.nan)
    for s in np.unique(image):
        idx = np.flatnonzero(image == s)
        d = np.sqrt(((rc[idx, None, :] - rc[None, idx, :]) ** 2).sum(-1))
        w = (d <= LOCAL_PATCHES) & (d > 0)
        cnt = w.sum(1, keepdims=True)
        pred[idx] = np.where(cnt > 0, (w @ target[idx]) / np.maximum(cnt, 1), np.nan)
    ok = np.isfinite(pred).all(1)
    t, p = target[ok], pred[ok]
    var = ((t - t.mean(0)) ** 2).sum()
    return float(1 - ((t - p) ** 2).sum() / var) if var > 0 else np.nan


def _layout_colour_scores(atlas: Any, model: str, method: str | None, info: Any,
                          tokens: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """Colour and brightness scores of every head. The target is each patch's hue (on the colour circle) or
    brightness minus its image's mean, so a layout that only keeps images apart scores nothing; the score is the
    k-NN R^2 of that target from the head's layout beyond the R^2 its grid neighbours in the image already give,
    as a share of what they leave: (R2_layout - R2_grid) / (1 - R2_grid), clipped to [0, 1] (colour varies
    smoothly across an image, so a merely local or positional head would score high otherwise)."""
    method = pick_colour_layout(atlas, model, method)
    heads = [(a, b) for a in range(info.n_layers) for b in range(info.n_heads)]
    out_df = pd.DataFrame({"layer": [a for a, _ in heads], "head": [b for _, b in heads],
                           "colour": np.nan, "brightness": np.nan})
    if method is None:
        return out_df, None
    rows = atlas.layout_rows(model, method)
    done = atlas.layout_done(model, method)
    t = tokens.iloc[rows]
    patch = np.isfinite(t["brightness"].to_numpy(np.float64))
    image = t["sequence"].to_numpy()
    rc = t[["patch_row", "patch_col"]].to_numpy(np.float64)
    hue = t["hue"].to_numpy(np.float64)
    sat = t["saturation"].to_numpy(np.float64)
    targets = {
        "brightness": (patch, t["brightness"].to_numpy(np.float64)[:, None]),
        "colour": (patch & (sat >= MIN_SATURATION), np.stack([np.cos(2 * np.pi * hue), np.sin(2 * np.pi * hue)], 1)),
    }
    n = len(rows)
    rng = np.random.default_rng(0)
    prepared = {}
    for name, (keep, values) in targets.items():
        idx = np.flatnonzero(keep)
        if len(idx) <= KNN + 1:
            continue
        rel = _image_relative(values[idx], image[idx])
        base = _grid_r2(rel, image[idx], rc[idx])
        both = np.concatenate([idx, idx + n])  # each patch as query and as key
        tgt = np.concatenate([rel, rel])
        if len(both) > 2 * MAX_LAYOUT_POINTS:
            pick = np.sort(rng.choice(len(both), 2 * MAX_LAYOUT_POINTS, replace=False))
            both, tgt = both[pick], tgt[pick]
        prepared[name] = (both, tgt, base if np.isfinite(base) else 0.0)
    for i, (layer, head) in enumerate(heads):
        if not done[layer, head]:
            continue
        xy = atlas.layout_coords(model, method, layer, head)
        for name, (both, tgt, base) in prepared.items():
            ok = np.isfinite(xy[both]).all(1)
            r2 = _knn_r2(xy[both][ok], tgt[ok])
            # the share of what grid neighbours leave unexplained that the layout explains
            out_df.loc[i, name] = float(np.clip((r2 - base) / max(1 - base, 1e-9), 0, 1)) if np.isfinite(r2) else np.nan
    return out_df, method


# ---- probe scores ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSettings:
    seed: int = 0
    length: int = 32  # tokens of each copy
    count: int = 8  # sequences (8 x 32 second-copy queries per head; the forward pass is most of the cost)

    def to_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "length": self.length, "count": self.count}


def probe_tokens(tokenizer: Any, config: Any, settings: ProbeSettings) -> tuple[np.ndarray, int, int]:
    """(ids (count, bos + 2 * length), bos 0 or 1, the length used): [BOS] + R + R per sequence, R drawn
    without replacement from the non-special vocabulary, seeded. The length shrinks to fit the model's
    position limit and the vocabulary."""
    vocab = min(len(tokenizer), int(getattr(config, "vocab_size", None) or len(tokenizer)))
    special = set(int(i) for i in tokenizer.all_special_ids)
    pool = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    bos = [int(bos_id)] if bos_id is not None and 0 <= int(bos_id) < vocab else []
    limit = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
    length = int(min(settings.length, (int(limit) - len(bos)) // 2, len(pool)))
    if length < 2:
        raise ModelError("The model's vocabulary or position limit leaves no room for a repeated-token probe.")
    rng = np.random.default_rng(settings.seed)
    reps = np.stack([rng.choice(pool, length, replace=False) for _ in range(settings.count)])
    ids = np.concatenate([np.full((settings.count, len(bos)), bos[0] if bos else 0, np.int64), reps, reps], 1)
    return ids, len(bos), length


def probe_scores(loaded: Any, settings: ProbeSettings, batch_size: int = 16,
                 device: str = "cpu") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Induction and duplicate-token scores of every head of a loaded causal text model (see the module doc);
    returns (one row per head, what was run: bos, length used)."""
    from attnatlas.extract import attention_of_token_ids

    a = loaded.adapter
    if a.modality != "text" or not a.causal:
        kind = "an image model" if a.modality != "text" else "an encoder (it sees every token at once)"
        raise ModelError(f"Induction and duplicate-token scores need a causal text model; {loaded.model_id!r} is "
                         f"{kind}.")
    ids, bos, L = probe_tokens(loaded.preprocessor, loaded.config, settings)
    second = np.arange(bos + L, bos + 2 * L)  # queries of the second copy
    ind = np.zeros((a.n_layers, a.n_heads))
    dup = np.zeros((a.n_layers, a.n_heads))
    for _, att in attention_of_token_ids(loaded, ids, batch_size=batch_size, device=device):
        for layer, p in att.items():  # (batch, head, query, key)
            ind[layer] += p[:, :, second, second - L + 1].sum((0, 2))
            dup[layer] += p[:, :, second, second - L].sum((0, 2))
    n = len(ids) * len(second)
    df = pd.DataFrame({"layer": np.repeat(np.arange(a.n_layers), a.n_heads),
                       "head": np.tile(np.arange(a.n_heads), a.n_layers),
                       "induction": (ind / n).reshape(-1), "duplicate": (dup / n).reshape(-1)})
    return df, {"bos": bool(bos), "length_used": L}


# ---- the analysis ---------------------------------------------------------------------------------------------
@dataclass
class HeadScoresResult:
    scores: pd.DataFrame
    notes: list[str]
    skipped: bool = False
    seconds: dict[str, float] | None = None


def compute_head_scores(atlas: Any, model: str, probe: bool | None = None, settings: ProbeSettings = ProbeSettings(),
                        layout_method: str | None = None, force: bool = False, device: str = "cpu",
                        progress: bool = False, loaded: Any = None) -> HeadScoresResult:
    """Score every head of `model` and store the table `head_scores` (see the module doc).

    probe: None = run the repeated-token probe where it applies (causal text models), True = require it
    (refused for image models and encoders), False = corpus scores only (no model loaded). A stored table
    with the same settings is kept unless `force`. Everything that can fail (the model's kind, loading it)
    fails before anything is written."""
    info = atlas.info(model)
    causal = bool((info.attrs.get("attention") or {}).get("causal", info.attrs.get("causal", False)))
    text = info.modality == "text"
    if probe is True and not (text and causal):
        kind = "an image model" if not text else "an encoder (bidirectional: it sees every token at once)"
        raise AtlasError(f"Induction and duplicate-token scores need a causal text model, but {model!r} is {kind}; "
                         f"run --head-types without --induction for the scores that apply.")
    run_probe = (text and causal) if probe is None else probe
    notes: list[str] = []
    if text and not causal:
        notes.append(f"{model}: an encoder sees every token at once, so induction and duplicate-token scores do not "
                     f"apply (NaN).")
    method = pick_colour_layout(atlas, model, layout_method) if not text else None
    want = {"version": VERSION, "probe": settings.to_dict() if run_probe else None, "local_tokens": LOCAL_TOKENS,
            "local_patches": LOCAL_PATCHES, "layout": method, "n_tokens": int(info.attrs.get("n_tokens") or
                                                                             len(atlas.tokens(model)))}
    if not force and atlas.has_table(model, TABLE):
        old = atlas.read_table(model, TABLE)
        have = json.loads(old["settings"].iloc[0]) if len(old) and "settings" in old else None
        if have is not None and {k: have.get(k) for k in want} == want:
            return HeadScoresResult(old, [f"{model}: head scores with these settings already stored, kept "
                                          "(--force recomputes them)"], skipped=True)
        same_corpus = have is not None and all(have.get(k) == v for k, v in want.items() if k != "probe")
        if same_corpus and probe is False and have.get("probe") is not None:  # corpus-only: never drop probe scores
            return HeadScoresResult(old, [f"{model}: head scores of the same corpus, with the probe's, already "
                                          "stored, kept (--force recomputes them without the probe)"], skipped=True)
    seconds: dict[str, float] = {}
    probe_df, ran = None, {}
    if run_probe:
        t0 = time.perf_counter()
        if loaded is None:
            from attnatlas.live.encode import load_atlas_model

            loaded = load_atlas_model(atlas, model, device,
                                      purpose="the induction probe cannot run (--corpus-only scores the stored "
                                              "corpus alone)")
        seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probe_df, ran = probe_scores(loaded, settings, device=device)
        seconds["probe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    df, more = corpus_scores(atlas, model, method, progress=progress)
    seconds["corpus"] = time.perf_counter() - t0
    notes += more
    if probe_df is not None:
        df = df.merge(probe_df, on=["layer", "head"], how="left")
        notes.append(f"{model}: probe of {settings.count} sequences of {'[BOS] + ' if ran['bos'] else ''}"
                     f"2 x {ran['length_used']} repeated random tokens (seed {settings.seed})")
    else:
        df["induction"] = df["duplicate"] = np.nan
    for c in SCORE_LABELS:
        if c not in df:
            df[c] = np.nan
    df = df[["layer", "head", *SCORE_LABELS]]
    df["settings"] = json.dumps({**want, **({"ran": ran} if ran else {})}, sort_keys=True)
    atlas.write_table(model, TABLE, df)
    return HeadScoresResult(df, notes, seconds=seconds)
