"""The atlas reproduces the real pretrained models' attention (MiniLM, SmolLM2 with GQA + rotary, DINOv2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from test_extract import recomputed

from attnatlas.extract import ExtractOptions, extract, load_model
from attnatlas.inputs import load_images
from attnatlas.store import open_atlas

pytestmark = pytest.mark.slow

SENTENCES = [
    "The bank raised its rates, so Anna moved her savings to the river bank's credit union.",
    "Is 3.14 really pi? No: it's an approximation.",
    "def f(x): return x + 1",
]


def _eager(source: str, **inputs) -> np.ndarray:
    model = tf.AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions
    return np.stack([a[0].float().numpy() for a in att])  # (layer, head, query, key)


@pytest.mark.parametrize("short", ["minilm", "smollm2"])
def test_real_text_model_attention(tmp_path, short):
    loaded = load_model(short)
    extract(tmp_path / "a", loaded, texts=SENTENCES, options=ExtractOptions(dtype="float32", batch_size=2, progress=False))
    atlas = open_atlas(tmp_path / "a")
    info = atlas.info(short)
    if short == "smollm2":
        assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (30, 9, 3, 64)
    else:
        assert (info.n_layers, info.n_heads, info.d_head) == (6, 12, 32)
    for s, text in enumerate(SENTENCES):
        ref = _eager(loaded.source, **loaded.preprocessor(text, return_tensors="pt"))
        got = recomputed(atlas, short, s)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_real_dinov2_attention(tmp_path, repo_root):
    loaded = load_model("dinov2-small")
    paths = sorted((repo_root / "data" / "images").glob("*"))[:3]
    paths = [p for p in paths if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    extract(tmp_path / "a", loaded, images=paths, options=ExtractOptions(dtype="float32", progress=False))
    atlas = open_atlas(tmp_path / "a")
    tokens = atlas.tokens("dinov2-small")
    assert len(tokens) == len(paths) * 257  # [CLS] + 16 x 16 patches of 14 px at 224 px
    for s, rec in enumerate(load_images([str(p) for p in paths])):
        pv = loaded.preprocessor(images=[rec.image], return_tensors="pt")["pixel_values"]
        ref = _eager(loaded.source, pixel_values=pv)
        got = recomputed(atlas, "dinov2-small", s)
        assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
