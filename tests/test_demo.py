"""Integration: real offline models -> extract -> project -> app document, as `attnatlas demo` does it."""

from __future__ import annotations

import pytest
from bokeh.document import Document

from attnatlas.app.dashboard import build_document
from attnatlas.app.data import AppData
from attnatlas.cli import main as cli
from attnatlas.store import open_atlas

pytestmark = pytest.mark.slow


def test_demo_builds_all_three_models_then_reuses_them(tmp_path, capsys):
    args = ["demo", "--atlas", str(tmp_path / "demo"), "--sentences", "12", "--max-images", "2", "--methods", "pca",
            "--workers", "1", "--no-serve"]
    assert cli(args) == 0
    first = capsys.readouterr().out
    atlas = open_atlas(tmp_path / "demo")
    assert atlas.models == ["dinov2-small", "minilm", "smollm2"]
    for model in atlas.models:
        info = atlas.info(model)
        assert atlas.layout_done(model, "pca").all(), model
        assert len(atlas.layout_quality(model, "pca")) == info.n_layers * info.n_heads
    assert atlas.info("smollm2").n_kv_heads == 3
    assert len(atlas.sequences("dinov2-small")) == 2 and len(atlas.sequences("minilm")) == 12
    assert "extracting" in first
    # Head types for every model, so every view shows them out of the box; induction probed on the causal one.
    for model in atlas.models:
        assert atlas.has_table(model, "head_scores"), model
    assert atlas.read_table("smollm2", "head_scores")["induction"].notna().all()
    assert first.count("head types in") == 3
    # Second run: nothing extracted or projected again.
    assert cli(args) == 0
    second = capsys.readouterr().out
    assert "extracting" not in second and second.count("already extracted") == 3
    assert "0 layouts made" in second
    assert "head types in" not in second  # stored with the same settings: kept
    # The dashboard builds a document for the demo atlas, for each model.
    data = AppData(str(tmp_path / "demo"))
    for model in atlas.models:
        doc = Document()
        build_document(doc, data, {"model": [model.encode()], "layer": [b"1"], "head": [b"2"]})
        assert doc.roots
