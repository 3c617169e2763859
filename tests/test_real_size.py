"""The real-size tier: real MiniLM heads of 20,000 laid-out points (10,000 sampled tokens of a corpus of 400
paragraphs that are not the demo's), every default method, the placement of every other token, and a new
text placed live into those layouts. `make test-scale` runs the same tests over 131k tokens
(ATTNATLAS_SCALE_CORPUS=data/corpus/scale-100k.txt)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from attnatlas.cli import main
from attnatlas.store import Atlas

pytestmark = pytest.mark.slow
HEADS = [(3, 8), (0, 0)]  # L3H8: the head scikit-learn-intelex's t-SNE crashed on in the first real corpus


@pytest.fixture(scope="module")
def projected(tmp_path_factory, repo_root):
    corpus = os.environ.get("ATTNATLAS_SCALE_CORPUS", str(repo_root / "data" / "corpus" / "scale.txt"))
    path = tmp_path_factory.mktemp("scale") / "atlas"
    assert main(["extract", "--model", "minilm", "--texts", corpus, "--out", str(path), "--no-progress"]) == 0
    heads = ",".join(str(h) for h in sorted({h for _, h in HEADS}))
    layers = ",".join(str(L) for L in sorted({L for L, _ in HEADS}))
    assert main(["project", str(path), "--layers", layers, "--heads", heads, "--workers", "2", "--quiet"]) == 0
    return Atlas.open(path)


def test_heads_of_20000_points_laid_out_by_every_default_method(projected):
    n_tokens = len(projected.tokens("minilm"))
    assert n_tokens > 10_000  # so the layout is capped and the rest is placed
    for method in ("tsne", "umap", "pca"):
        assert projected.layout_params("minilm", method)["max_points"] == 20_000
        assert projected.layout_sampled("minilm", method).sum() == 10_000  # 20,000 points: queries + keys
        q = projected.layout_quality("minilm", method).set_index(["layer", "head"])
        placed = projected.layout_placed_quality("minilm", method).set_index(["layer", "head"])
        for L, h in HEADS:
            assert q.loc[(L, h), "points"] == 20_000
            xy = projected.layout_coords("minilm", method, L, h)
            assert xy.shape == (2 * n_tokens, 2) and np.isfinite(xy).all()
            assert placed.loc[(L, h), "points"] == 2 * (n_tokens - 10_000)
            assert np.isfinite(placed.loc[(L, h), "trustworthiness"])
    tsne = projected.layout_quality("minilm", "tsne").set_index(["layer", "head"])
    pca = projected.layout_quality("minilm", "pca").set_index(["layer", "head"])
    for L, h in HEADS:  # t-SNE keeps neighbourhoods far better than PCA on every real head
        assert tsne.loc[(L, h), "trustworthiness"] > pca.loc[(L, h), "trustworthiness"] + 0.02
        assert tsne.loc[(L, h), "trustworthiness"] > 0.8


def test_new_text_placed_into_the_real_size_layouts(projected):
    from attnatlas.live.place import place

    text = "The garbage collector frees memory that no object refers to any more, in cycles too."
    table = place(projected, "minilm", texts=[text], methods="tsne", warn=False)
    mine = table[[(L, h) in HEADS for L, h in zip(table["layer"], table["head"])]]
    assert len(mine) > 0 and np.isfinite(mine[["x", "y"]].to_numpy()).all()
    for L, h in HEADS:  # a weighted mean of corpus points' positions: inside the head's own layout
        xy = projected.layout_coords("minilm", "tsne", L, h)
        new = mine[(mine["layer"] == L) & (mine["head"] == h)][["x", "y"]].to_numpy()
        assert len(new) and ((new >= xy.min(0)) & (new <= xy.max(0))).all()
