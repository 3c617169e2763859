"""Head-to-head similarity, within one model and across two, by two documented measures.

pattern   Pearson correlation of two heads' attention over the same inputs. Attention is first
          pooled onto units both models share: words for text (spans of the sequence text matched
          through each token's character offsets, so different tokenizers line up; a query word is the
          mean of its tokens' rows, a key word sums its tokens' weight), cells of the coarser patch grid
          for images. Special and whitespace-only tokens belong to no unit; each unit row is then
          renormalised to sum to 1, so the measure compares where a head looks among the content.
          Correlations run over every (sequence, query unit, key unit) cell of the shared sequences.
profile   exp(-d), d = root-mean-square difference of the two heads' metric profiles (PROFILE_FIELDS,
          each z-scored over the heads of both models; a metric undefined for a head counts as average).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnatlas.errors import InputError

PROFILE_FIELDS = [
    "entropy_norm_mean", "distance_rel_mean", "first_share", "special_share", "punct_share",
    "prev_share", "next_share", "self_share", "frac90_mean",
]
_WORD = re.compile(r"\w+|[^\w\s]")


def common_inputs(atlas, model_a: str, model_b: str) -> list[tuple[int, int]]:
    """(sequence in a, sequence in b) pairs holding the same text or image; an error when there are none."""
    ia, ib = atlas.info(model_a), atlas.info(model_b)
    if ia.modality != ib.modality:
        art = {m: "an" if m[:1] in "aeiou" else "a" for m in (ia.modality, ib.modality)}
        raise InputError(f"{model_a!r} is {art[ia.modality]} {ia.modality} model and {model_b!r} is "
                         f"{art[ib.modality]} {ib.modality} model: "
                         "they share no inputs, so their heads cannot be compared.")
    sa, sb = atlas.sequences(model_a), atlas.sequences(model_b)
    first_b: dict[str, int] = {}
    for s, t in zip(sb["sequence"], sb["text"]):
        first_b.setdefault(str(t), int(s))
    pairs, seen = [], set()
    for s, t in zip(sa["sequence"], sa["text"]):
        t = str(t)
        if t in first_b and t not in seen:
            seen.add(t)
            pairs.append((int(s), first_b[t]))
    if not pairs:
        ha, hb = ia.attrs.get("input_hash"), ib.attrs.get("input_hash")
        detail = f" (input sha256 {str(ha)[:12]} vs {str(hb)[:12]})" if ha and hb else ""
        raise InputError(f"{model_a!r} and {model_b!r} were extracted from different inputs{detail}: no sequence "
                         "text is shared. Extract both from the same --texts or --images.")
    return pairs


def _text_units(text: str) -> np.ndarray:
    """(unit, 2) character spans of the words and punctuation marks of `text`."""
    return np.array([m.span() for m in _WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)


def text_membership(tok: pd.DataFrame, text: str) -> np.ndarray:
    """(token, unit) characters each token shares with each unit of `text` (0 for special tokens)."""
    units = _text_units(text)
    cs, ce = tok["char_start"].to_numpy(), tok["char_end"].to_numpy()
    ov = np.minimum(ce[:, None], units[None, :, 1]) - np.maximum(cs[:, None], units[None, :, 0])
    ov = np.clip(ov, 0, None).astype(np.float64)
    ov[(cs < 0) | tok["is_special"].to_numpy(dtype=bool)] = 0
    return ov


def grid_membership(tok: pd.DataFrame, grid: tuple[int, int], common: tuple[int, int]) -> np.ndarray:
    """(token, cell) 1 where a patch's centre falls in a cell of the common (coarser) grid."""
    r, c = tok["patch_row"].to_numpy(), tok["patch_col"].to_numpy()
    out = np.zeros((len(tok), common[0] * common[1]))
    patch = (r >= 0) & (c >= 0)
    cr = np.floor((r[patch] + 0.5) * common[0] / grid[0]).astype(int)
    cc = np.floor((c[patch] + 0.5) * common[1] / grid[1]).astype(int)
    out[np.flatnonzero(patch), cr * common[1] + cc] = 1
    return out


def _grid(atlas, model: str, seq_row: pd.Series, tok: pd.DataFrame) -> tuple[int, int]:
    if "grid_rows" in seq_row and pd.notna(seq_row.get("grid_rows")):
        return int(seq_row["grid_rows"]), int(seq_row["grid_cols"])
    g = atlas.info(model).attrs.get("grid")
    if g:
        return int(g[0]), int(g[1])
    return int(tok["patch_row"].max()) + 1, int(tok["patch_col"].max()) + 1


@dataclass
class Pooling:
    """How one model's attention is pooled onto the shared units of the chosen sequences, sequence by
    sequence (each sits in one length bucket of the model's Batches)."""

    bucket: np.ndarray  # (n,) which Batch holds each chosen sequence, in shared order
    take: np.ndarray  # (n,) its index among that Batch's sequences
    qmat: list[np.ndarray]  # n x (tokens, unit) query pooling: columns sum to 1 over a unit's tokens
    kmat: list[np.ndarray]  # n x (tokens, unit) key pooling: a token's weight spread over its units


def poolings(atlas, model_a: str, model_b: str, batches_a, batches_b,
             max_sequences: int | None = 200) -> tuple[Pooling, Pooling]:
    """Shared units of both models for up to `max_sequences` common sequences (evenly spread)."""
    pairs = common_inputs(atlas, model_a, model_b)
    if max_sequences and len(pairs) > max_sequences:
        pick = np.unique(np.linspace(0, len(pairs) - 1, max_sequences).round().astype(int))
        pairs = [pairs[i] for i in pick]
    image = atlas.info(model_a).modality == "image"
    out = []
    members: dict[str, list[np.ndarray]] = {model_a: [], model_b: []}
    ta, tb = atlas.tokens(model_a), atlas.tokens(model_b)
    sa = atlas.sequences(model_a).set_index("sequence")
    sb = atlas.sequences(model_b).set_index("sequence")
    ga = {s: g for s, g in ta.groupby("sequence")}
    gb = {s: g for s, g in tb.groupby("sequence")}
    for s_a, s_b in pairs:
        toks_a, toks_b = ga[s_a], gb[s_b]
        if image:
            grid_a = _grid(atlas, model_a, sa.loc[s_a], toks_a)
            grid_b = _grid(atlas, model_b, sb.loc[s_b], toks_b)
            common = (min(grid_a[0], grid_b[0]), min(grid_a[1], grid_b[1]))
            ma, mb = grid_membership(toks_a, grid_a, common), grid_membership(toks_b, grid_b, common)
        else:
            text = str(sa.loc[s_a, "text"])
            ma, mb = text_membership(toks_a, text), text_membership(toks_b, text)
        members[model_a].append(ma)
        members[model_b].append(mb)
    # units covered by both models (a truncated sequence covers fewer words)
    shared = [(ma.sum(0) > 0) & (mb.sum(0) > 0) for ma, mb in zip(members[model_a], members[model_b])]
    for model, batches, col in ((model_a, batches_a, 0), (model_b, batches_b, 1)):
        where = {int(s): (bi, i) for bi, b in enumerate(batches) for i, s in enumerate(b.sequence)}
        loc = np.array([where[p[col]] for p in pairs], dtype=np.int64).reshape(-1, 2)
        qmats, kmats = [], []
        for m, keep in zip(members[model], shared):
            row_sum = m.sum(1, keepdims=True)
            kmats.append(np.divide(m, row_sum, out=np.zeros_like(m), where=row_sum > 0)[:, keep].astype(np.float32))
            mq = m[:, keep]
            with np.errstate(invalid="ignore", divide="ignore"):
                qmats.append(np.nan_to_num(mq / mq.sum(0, keepdims=True)).astype(np.float32))
        out.append(Pooling(loc[:, 0], loc[:, 1], qmats, kmats))
    return out[0], out[1]


def pooled_pattern(ps: list[np.ndarray], pool: Pooling) -> np.ndarray:
    """(cells,) one head's attention (one (seq, query, key) array per bucket) pooled onto the shared units of
    each chosen sequence, unit rows renormalised, sequences in shared order."""
    parts = []
    for b, i, qm, km in zip(pool.bucket, pool.take, pool.qmat, pool.kmat):
        n = qm.shape[0]
        w = qm.T @ ps[b][i, :n, :n] @ km  # (unit, unit)
        tot = w.sum(1, keepdims=True)
        parts.append(np.divide(w, tot, out=np.zeros_like(w), where=tot > 1e-9).ravel())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def correlation(features: np.ndarray) -> np.ndarray:
    """(head, head) Pearson correlation of the rows of (head, feature); NaN for constant rows."""
    f = features.astype(np.float64)
    f -= f.mean(1, keepdims=True)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = f / norm
    return np.clip(z @ z.T, -1, 1)


def profile_similarity(profiles: np.ndarray) -> np.ndarray:
    """(head, head) exp(-RMS difference) of z-scored metric profiles (head, metric)."""
    x = profiles.astype(np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        mu, sd = np.nanmean(x, 0), np.nanstd(x, 0)
    sd = np.where(sd > 0, sd, 1)
    z = np.nan_to_num((x - mu) / sd)  # an undefined metric counts as average
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).mean(2)
    sim = np.exp(-np.sqrt(d2))
    undefined = np.isnan(x).all(1)  # a head with no defined metric has no profile to compare
    sim[undefined, :] = np.nan
    sim[:, undefined] = np.nan
    return sim


def pair_table(labels: pd.DataFrame, pattern: np.ndarray, profile: np.ndarray) -> pd.DataFrame:
    """Long table of every ordered head pair (a != b): model/layer/head of both, both measures."""
    n = len(labels)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    keep = (i != j).ravel()
    i, j = i.ravel()[keep], j.ravel()[keep]
    return pd.DataFrame({
        "model": labels["model"].to_numpy()[i], "layer": labels["layer"].to_numpy()[i], "head": labels["head"].to_numpy()[i],
        "other_model": labels["model"].to_numpy()[j], "other_layer": labels["layer"].to_numpy()[j],
        "other_head": labels["head"].to_numpy()[j],
        "pattern": pattern[i, j].astype(np.float32), "profile": profile[i, j].astype(np.float32),
    })


def nearest(pairs: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """For every head, its k nearest heads by each measure, in its own model ("same") and the other."""
    out = []
    scope = np.where(pairs["model"] == pairs["other_model"], "same", "other")
    for measure in ("pattern", "profile"):
        d = pairs.assign(scope=scope, measure=measure, score=pairs[measure]).dropna(subset=["score"])
        d = d.sort_values(["model", "layer", "head", "scope", "score"], ascending=[True, True, True, True, False])
        d["rank"] = d.groupby(["model", "layer", "head", "scope"]).cumcount() + 1
        out.append(d[d["rank"] <= k])
    cols = ["model", "layer", "head", "measure", "scope", "rank", "other_model", "other_layer", "other_head", "score"]
    return pd.concat(out, ignore_index=True)[cols]
