"""Layer-wise embedding layouts and cluster quality ("What Neurons Tell and How Neurons Behave?").

Per layer (0 = embeddings), the hidden states of a fixed token sample are laid out in 2-D by a reducer
of the projection stage, and clustered with scikit-learn KMeans on unit vectors (cosine geometry):
- silhouette: of the KMeans clusters (k = number of classes of the label), cosine distance;
- label_silhouette: of the labels themselves, i.e. how well the hidden states separate the classes;
- purity: share of tokens whose cluster's majority label is their own label.
Labels, for images: `image` (which image a patch came from) and `colour` (the patch's mean-colour class:
dark / light / grey or one of 6 hue sectors). For text: `sequence` and `category` (token category).
Tables: `embedding_layout` (layer, token, x, y) and `embedding_quality` (layer, label, scores).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score, silhouette_score
from tqdm.auto import tqdm

from attnatlas.analyze.common import require_hidden
from attnatlas.errors import AtlasError, StoreError
from attnatlas.inputs.tokens import token_class
from attnatlas.store import Atlas

log = logging.getLogger(__name__)
LAYOUT_TABLE = "embedding_layout"
QUALITY_TABLE = "embedding_quality"
HUE_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def colour_class(hue: np.ndarray, saturation: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """Mean-colour class names of patches: dark, light, grey (unsaturated) or a 60-degree hue sector."""
    sector = np.floor(((np.nan_to_num(hue) * 360 + 30) % 360) / 60).astype(int)
    out = np.array(HUE_NAMES, dtype=object)[sector]
    grey = saturation < 0.2
    out = np.where(grey & (brightness >= 0.75), "light", out)
    out = np.where(grey & (brightness < 0.75), "grey", out)
    out = np.where(brightness < 0.2, "dark", out)
    return out.astype(str)


def token_labels(atlas: Atlas, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    tok = atlas.tokens(model).iloc[rows]
    if atlas.info(model).modality == "image":
        col = colour_class(tok.hue.to_numpy(float), tok.saturation.to_numpy(float), tok.brightness.to_numpy(float))
        return {"image": tok.sequence.to_numpy().astype(str), "colour": col}
    cats = [token_class(t, bool(s)) for t, s in zip(tok.token, tok.is_special)]
    return {"sequence": tok.sequence.to_numpy().astype(str), "category": np.array(cats)}


def sample_rows(atlas: Atlas, model: str, max_points: int, seed: int = 0) -> np.ndarray:
    """Token rows used at every layer (same sample across depth). Image models: patches only, since
    [CLS] and register tokens are few and sit apart, which would dominate the scores."""
    tok = atlas.tokens(model)
    if atlas.info(model).modality == "image":
        rows = np.flatnonzero((tok.token_kind == "patch").to_numpy())
    else:
        rows = np.arange(len(tok))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    return rows


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    total = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        total += counts.max()
    return total / len(labels)


def cluster_quality(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Scores of one layer's (n, d) hidden states against one labelling."""
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    classes = np.unique(labels)
    k = int(min(max(len(classes), 2), len(x) - 1))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(u)
    n_s = min(len(x), 2000)  # silhouette is O(n^2)
    kw: dict[str, Any] = dict(metric="cosine", sample_size=n_s, random_state=seed)
    sil = float(silhouette_score(u, km.labels_, **kw)) if len(np.unique(km.labels_)) > 1 else float("nan")
    lab_sil = float(silhouette_score(u, labels, **kw)) if len(classes) > 1 else float("nan")
    return dict(k=k, silhouette=sil, label_silhouette=lab_sil, purity=purity(km.labels_, labels),
                nmi=float(normalized_mutual_info_score(labels, km.labels_)))


def reduce_2d(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2) with the projection stage's reducer registry (cosine metric, as its head layouts)."""
    from attnatlas.project import get_reducer

    reducer = get_reducer(method, metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)[:, :2]


def compute_embeddings(atlas: Atlas, model: str, method: str = "pca", max_points: int = 3000,
                       layers: list[int] | None = None, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Layouts and cluster scores of every hidden-state layer; writes both tables, returns the scores."""
    require_hidden(atlas, model, "Layer-wise embedding layouts")
    hidden = atlas.array(model, "hidden")
    n_hidden = hidden.shape[0]
    layers = list(range(n_hidden)) if layers is None else layers
    for layer in layers:
        if not 0 <= layer < n_hidden:
            raise AtlasError(f"Hidden-state layer {layer} is out of range (0..{n_hidden - 1}; 0 = embeddings).")
    rows = sample_rows(atlas, model, max_points, seed)
    if len(rows) < 3:
        raise AtlasError(f"{model!r} has only {len(rows)} tokens to lay out; extract more inputs.")
    labels = token_labels(atlas, model, rows)
    quality, layouts = [], []
    for layer in tqdm(layers, desc=f"embeddings {model}", unit="layer", disable=not progress):
        t0 = time.perf_counter()
        x = np.asarray(hidden[layer], dtype=np.float32)[rows]
        xy = reduce_2d(x, method, seed)
        layouts.append(pd.DataFrame({"layer": layer, "token": rows, "x": xy[:, 0], "y": xy[:, 1]}))
        for name, lab in labels.items():
            quality.append(dict(layer=layer, label=name, classes=len(np.unique(lab)), **cluster_quality(x, lab, seed)))
        log.info("embeddings layer %d: %.1f s", layer, time.perf_counter() - t0)
    q = pd.DataFrame(quality)
    q["method"] = method
    atlas.write_table(model, LAYOUT_TABLE, pd.concat(layouts, ignore_index=True))
    atlas.write_table(model, QUALITY_TABLE, q)
    return q


def read_embeddings(atlas: Atlas, model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not atlas.has_table(model, QUALITY_TABLE):
        raise StoreError(f"{model!r} has no embedding layouts yet; run `attnatlas analyze {atlas.path} --model {model} --embeddings`.")
    return atlas.read_table(model, LAYOUT_TABLE), atlas.read_table(model, QUALITY_TABLE)
