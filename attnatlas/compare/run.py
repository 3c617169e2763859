"""One comparison of two models: metrics of every head, similarity of every head pair, stored in the atlas.

Stored per model under analysis/ (Atlas.write_table):
    head_metrics             one row per head (metrics.HEAD_FIELDS)
    token_sparsity           one row per token, one column per head: keys holding 90% of the weight
    similarity__<other>      every ordered head pair of both models, pattern and profile measures
    nearest__<other>         each head's nearest heads in its own and the other model
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from attnatlas.compare import metrics as M
from attnatlas.compare import similarity as S
from attnatlas.errors import InputError, StoreError

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    models: tuple[str, str]
    metrics: dict[str, M.ModelMetrics]
    labels: pd.DataFrame  # (head of both models) model, layer, head: row order of the matrices
    pattern: np.ndarray  # (head, head) pattern correlation
    profile: np.ndarray  # (head, head) profile similarity
    pairs: pd.DataFrame
    nearest: pd.DataFrame
    n_sequences: int  # common sequences the pattern measure used
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def block(self, measure: str, a: str, b: str) -> np.ndarray:
        """(heads of a, heads of b) similarity, rows in (layer, head) order."""
        mat = self.pattern if measure == "pattern" else self.profile
        ia = np.flatnonzero(self.labels["model"].to_numpy() == a)
        ib = np.flatnonzero(self.labels["model"].to_numpy() == b)
        return mat[np.ix_(ia, ib)]


def check_models(atlas, models: list[str]) -> tuple[str, str]:
    if len(models) != 2:
        raise InputError(f"Give exactly two models to compare (got {len(models)}).")
    a, b = models
    if a == b:
        raise InputError(f"Give two different models (got {a!r} twice); a model's heads are compared with each other anyway.")
    for m in (a, b):
        atlas.require_model(m)
        for key in ("queries", "keys"):
            if not atlas.has_array(m, key):
                raise StoreError(f"Model {m!r} has no stored {key}; it cannot be measured.")
    return a, b


def compare_models(
    atlas,
    models: list[str],
    layout_method: str | None = None,
    max_sequences: int | None = 200,
    top_k: int = 5,
    store: bool = True,
    progress: bool = False,
) -> CompareResult:
    started = time.perf_counter()
    a, b = check_models(atlas, models)
    S.common_inputs(atlas, a, b)  # fail fast, before minutes of work
    batches = {m: M.make_batches(atlas.tokens(m), image=atlas.info(m).modality == "image") for m in (a, b)}
    pool_a, pool_b = S.poolings(atlas, a, b, batches[a], batches[b], max_sequences)
    pools = {a: pool_a, b: pool_b}
    features: dict[str, list[np.ndarray]] = {a: [], b: []}
    results: dict[str, M.ModelMetrics] = {}
    for m in (a, b):
        t = time.perf_counter()
        results[m] = M.collect(atlas, m, layout_method, batches=batches[m], progress=progress,
                               on_head=lambda L, h, ps, m=m: features[m].append(S.pooled_pattern(ps, pools[m])))
        log.info("%s: metrics and patterns of %d heads in %.1f s", m, len(results[m].heads), time.perf_counter() - t)
    labels = pd.concat([results[m].heads[["layer", "head"]].assign(model=m) for m in (a, b)], ignore_index=True)
    labels = labels[["model", "layer", "head"]]
    feats = np.stack(features[a] + features[b]) if features[a] and len(features[a][0]) else np.zeros((len(labels), 0))
    pattern = S.correlation(feats) if feats.shape[1] > 1 else np.full((len(labels), len(labels)), np.nan)
    prof = np.concatenate([results[m].heads[S.PROFILE_FIELDS].to_numpy(float) for m in (a, b)])
    profile = S.profile_similarity(prof)
    pairs = S.pair_table(labels, pattern, profile)
    near = S.nearest(pairs, top_k)
    notes = results[a].notes + results[b].notes
    n_seq = len(pool_a.take)
    if feats.shape[1] <= 1:
        notes.append("No shared words or patches in the common inputs: the pattern measure is undefined (NaN).")
    res = CompareResult((a, b), results, labels, pattern, profile, pairs, near, n_seq, notes,
                        time.perf_counter() - started)
    if store:
        save(atlas, res)
    return res


def save(atlas, res: CompareResult) -> None:
    a, b = res.models
    for m, other in ((a, b), (b, a)):
        atlas.write_table(m, "head_metrics", res.metrics[m].heads)
        atlas.write_table(m, "token_sparsity", res.metrics[m].token_keys90)
        atlas.write_table(m, f"similarity__{other}", res.pairs[res.pairs["model"] == m].reset_index(drop=True))
        atlas.write_table(m, f"nearest__{other}", res.nearest[res.nearest["model"] == m].reset_index(drop=True))


def load(atlas, a: str, b: str) -> CompareResult | None:
    """A stored comparison of a and b rebuilt from the atlas tables; None when it was never run."""
    for m, other in ((a, b), (b, a)):
        atlas.require_model(m)
        if not (atlas.has_table(m, "head_metrics") and atlas.has_table(m, f"similarity__{other}")):
            return None
    heads = {m: atlas.read_table(m, "head_metrics") for m in (a, b)}
    labels = pd.concat([heads[m][["layer", "head"]].assign(model=m) for m in (a, b)], ignore_index=True)[["model", "layer", "head"]]
    pairs = pd.concat([atlas.read_table(a, f"similarity__{b}"), atlas.read_table(b, f"similarity__{a}")], ignore_index=True)
    index = {(m, int(L), int(h)): i for i, (m, L, h) in enumerate(labels.itertuples(index=False))}
    n = len(labels)
    mats = {k: np.eye(n) for k in ("pattern", "profile")}
    ii = np.array([index[t] for t in zip(pairs["model"], pairs["layer"].astype(int), pairs["head"].astype(int))])
    jj = np.array([index[t] for t in zip(pairs["other_model"], pairs["other_layer"].astype(int), pairs["other_head"].astype(int))])
    for k in mats:
        mats[k][ii, jj] = pairs[k].to_numpy(float)
    near = pd.concat([atlas.read_table(m, f"nearest__{o}") for m, o in ((a, b), (b, a))], ignore_index=True)
    metrics = {m: M.ModelMetrics(heads[m], pd.DataFrame(), []) for m in (a, b)}
    return CompareResult((a, b), metrics, labels, mats["pattern"], mats["profile"], pairs, near, 0)


def nearest_heads(atlas, model: str, layer: int, head: int, k: int = 5, measure: str = "pattern") -> pd.DataFrame:
    """Stored nearest heads of one head, in its own model and every model it was compared with
    (for the single-head view); empty when `attnatlas compare` has not been run."""
    atlas.require_model(model)
    d = atlas.path / "models" / model / "analysis"  # not analysis_dir(): a read-only server must not mkdir
    parts = [atlas.read_table(model, f.stem) for f in sorted(d.glob("nearest__*.parquet"))] if d.is_dir() else []
    if not parts:
        return pd.DataFrame(columns=["scope", "rank", "other_model", "other_layer", "other_head", "score"])
    near = pd.concat(parts, ignore_index=True)
    near = near[(near["layer"] == layer) & (near["head"] == head) & (near["measure"] == measure) & (near["rank"] <= k)]
    # the "same" rows repeat once per comparison: keep one copy
    return near.drop_duplicates(["scope", "other_model", "other_layer", "other_head"]).reset_index(drop=True)
