"""attnatlas.show and `export --html`: the page, its size rule, tokens back in Python, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import attnatlas
from attnatlas import testing
from attnatlas.errors import InputError


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nbview") / "atlas"
    atlas = testing.synthetic_atlas(path, n_layers=3, n_heads=4, n_seq=20, seq_len=10)
    testing.random_layouts(atlas, "synthetic", "pca")
    testing.write_synthetic_model(atlas, name="bare", n_layers=1, n_heads=2, n_seq=3, seq_len=6)  # no layouts
    return path


def test_select_returns_the_tokens_of_the_points(atlas_path):
    view = attnatlas.show(atlas_path, "synthetic", "pca", layer=1, head=2)
    tok = attnatlas.open_atlas(atlas_path).tokens("synthetic")
    R = len(view.page.rows)
    assert R == len(tok)  # a small model keeps every token
    pts = [0, 5, R + 5, 2 * R - 1]
    got = view.select(pts, layer=1, head=2)
    rows = [0, 5, 5, R - 1]
    assert got["token"].tolist() == tok["token"].to_numpy()[rows].tolist()
    assert got["sequence"].tolist() == tok["sequence"].to_numpy()[rows].tolist()
    assert got["position"].tolist() == tok["position"].to_numpy()[rows].tolist()
    assert got["kind"].tolist() == ["query", "query", "key", "key"]
    assert (got["layer"] == 1).all() and (got["head"] == 2).all()
    with pytest.raises(InputError, match="0-"):
        view.tokens([2 * R])
    with pytest.raises(InputError, match="not in this view"):
        view.select([0], layer=0, head=0)


def test_selection_from_the_page_comes_back_as_tokens(atlas_path):
    pytest.importorskip("anywidget")
    view = attnatlas.show(atlas_path, "synthetic", "pca")
    assert view.selection.empty
    R = len(view.page.rows)
    # What the widget's JS sets when the page posts a lasso selection (tests/test_notebook.py drives the page).
    view.widget.set_state({"selection": {"layer": 2, "head": 3, "indices": [3, R + 7]}})
    sel = view.selection
    tok = attnatlas.open_atlas(atlas_path).tokens("synthetic")
    assert sel[["layer", "head", "kind"]].values.tolist() == [[2, 3, "query"], [2, 3, "key"]]
    assert sel["token"].tolist() == [tok["token"].iat[3], tok["token"].iat[7]]
    view.widget.set_state({"selection": {"layer": 9, "head": 9, "indices": [1]}})  # no such head: nothing
    assert view.selection.empty
    bundle = view._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "<iframe" in bundle["text/html"]


def test_page_holds_every_head_under_the_size_rule(atlas_path):
    from attnatlas.app import page as page_mod
    from attnatlas.app.data import AppData

    data = AppData(atlas_path)
    full = page_mod.build(data, "synthetic", "pca")
    assert len(full.heads) == 12 and len(full.rows) == full.total_rows == 200
    k = data.infos["synthetic"].attrs["attention_topk"]
    per_row = 12 * (2 * page_mod.POINT_BYTES + k * page_mod.WEIGHT_BYTES) + page_mod.STATIC_ROW_BYTES
    assert full.data_bytes == 12 * 200 * (2 * page_mod.POINT_BYTES + k * page_mod.WEIGHT_BYTES)
    # A budget of 45 rows: whole sequences of 10 tokens (40 rows), the same for every head.
    mp = pytest.MonkeyPatch()
    mp.setattr(page_mod, "MIN_ROWS", 20)
    try:
        small = page_mod.build(data, "synthetic", "pca", budget=45 * per_row)
    finally:
        mp.undo()
    assert len(small.heads) == 12 and len(small.rows) == 40
    seqs = data.atlas.tokens("synthetic")["sequence"].to_numpy()[small.rows]
    assert all((seqs == s).sum() == 10 for s in np.unique(seqs))  # whole sequences only
    # Under MIN_ROWS rows a head is not worth drawing: MIN_ROWS (here all 200) rows, fewer heads.
    few = page_mod.build(data, "synthetic", "pca", budget=3 * 200 * (per_row - page_mod.STATIC_ROW_BYTES) // 12 + 200 * page_mod.STATIC_ROW_BYTES)
    assert len(few.rows) == 200 and len(few.heads) == 3
    assert few.heads == [(0, 0), (0, 1), (0, 2)] and "embeds 3 of 12 heads" in few.html


def test_bad_input_names_what_exists(atlas_path, capsys):
    with pytest.raises(InputError, match="models with layouts: synthetic"):
        attnatlas.show(atlas_path, "nope")
    with pytest.raises(InputError, match="attnatlas project .* --model bare"):
        attnatlas.show(atlas_path, "bare")
    with pytest.raises(InputError, match="it has: pca"):
        attnatlas.show(atlas_path, "synthetic", "umap")
    with pytest.raises(InputError, match="layers 0-2"):
        attnatlas.show(atlas_path, "synthetic", layer=3, head=0)
    with pytest.raises(InputError, match="heads 0-3"):
        attnatlas.show(atlas_path, "synthetic", layer=0, head=-1)
    with pytest.raises(InputError, match="both layer= and head="):
        attnatlas.show(atlas_path, "synthetic", layer=0)
    view = attnatlas.show(atlas_path, "synthetic")  # not in a notebook: says how to look at it
    assert "view.save(" in capsys.readouterr().err
    assert "view.save(" in repr(view)


def test_page_text_is_escaped(tmp_path):
    mp = pytest.MonkeyPatch()
    mp.setattr(testing, "WORDS", [*testing.WORDS, "<img src=x onerror=alert(1)>"])
    try:
        atlas = testing.synthetic_atlas(tmp_path / "a", name="m", n_layers=1, n_heads=2, n_seq=10, seq_len=8)
    finally:
        mp.undo()
    testing.random_layouts(atlas, "m", "pca")
    view = attnatlas.show(tmp_path / "a", "m")
    assert "onerror=alert(1)" in view.page.html and "<img src=x" not in view.page.html  # in the JSON, as data only
    assert "<img src=x" not in view._iframe() and "onerror" not in view._iframe()  # base64 only
    assert 'sandbox="allow-scripts allow-downloads"' in view._iframe()


def test_export_html(atlas_path, tmp_path, capsys):
    from attnatlas.cli import main

    out = tmp_path / "atlas.html"
    assert main(["export", str(atlas_path), "--model", "synthetic", "--html", str(out)]) == 0
    text = out.read_text()
    assert "page_heads" in text and "grid_image" in text and "cdn.bokeh.org" not in text
    assert "12 of 12 heads with all 200 tokens" in capsys.readouterr().out
    for args, msg in ((["--model", "nope", "--html", str(out)], "models with layouts"),
                      (["--model", "synthetic", "--html", str(tmp_path / "x.png")], ".html file name"),
                      (["--model", "synthetic"], "--grid OUT.png"),
                      (["--model", "synthetic", "--html", str(out), "--budget-mb", "0"], "budget-mb"),
                      (["--model", "synthetic", "--grid", str(tmp_path / "g.png")], "--grid needs --method")):
        assert main(["export", str(atlas_path), *args]) == 2
        assert msg in capsys.readouterr().err


def test_show_never_imports_torch(atlas_path):
    import subprocess
    import sys

    code = (f"import sys, attnatlas; v = attnatlas.show({str(atlas_path)!r}, 'synthetic'); v._repr_mimebundle_(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
