"""attnatlas.show and `export --html`: the page, its size rule, tokens back in Python, and bad input."""

from __future__ import annotations

import contextlib

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
    # In IPython: the page as one output (HTML, so a reopened notebook draws it), the widget as a second one.
    shown = []
    mp = pytest.MonkeyPatch()
    mp.setattr("IPython.display.display", lambda *objs, **kw: shown.extend(objs))
    try:
        view._ipython_display_()
    finally:
        mp.undo()
    assert "<iframe" in shown[0]["text/html"] and shown[1] is view.widget
    assert "application/vnd.jupyter.widget-view+json" not in view._repr_mimebundle_()
    assert view.page.page_id in shown[0]["text/html"] and view.widget.page_id == view.page.page_id


@contextlib.contextmanager
def recorded_displays():
    """IPython's display replaced by a recorder for the block; yields the list of ("display", obj, kwargs), and
    ("update", obj, kwargs) for a display_id's handle."""
    shown: list = []

    class Handle:
        def update(self, obj, **kw):
            shown.append(("update", obj, kw))

    def display(*objs, **kw):
        shown.extend(("display", o, kw) for o in objs)
        return Handle() if kw.get("display_id") else None

    mp = pytest.MonkeyPatch()
    mp.setattr("IPython.display.display", display)
    try:
        yield shown
    finally:
        mp.undo()


def test_display_shows_the_still_grid_then_replaces_it_with_the_page(atlas_path):
    view = attnatlas.show(atlas_path, "synthetic", "pca")
    with recorded_displays() as shown:
        view._ipython_display_()
    (first, still, kw), (second, page, kw2) = shown[:2]
    # First the grid as a still image, in an output that can be updated; then that same output becomes the page.
    assert first == "display" and kw["display_id"] is True and "<iframe" not in still["text/html"]
    assert f'<img src="{view.page.still}"' in still["text/html"] and view.page.still.startswith("data:image/png;base64,")
    assert second == "update" and "<iframe" in page["text/html"] and view.page.page_id in page["text/html"]
    if view.widget is not None:  # the bridge is a second output, linked to the page by its id
        assert shown[2] == ("display", view.widget, {}) and view.widget.page_id == view.page.page_id
    # A head, or a page already built, is shown at once: nothing to wait for.
    for v in (attnatlas.show(atlas_path, "synthetic", "pca", layer=0, head=1), view):
        with recorded_displays() as shown:
            v._ipython_display_()
        assert shown[0][0] == "display" and "display_id" not in shown[0][2] and "<iframe" in shown[0][1]["text/html"]


def test_still_grid_is_shown_before_bokeh_is_imported(atlas_path):
    import json
    import subprocess
    import sys

    # In a fresh process: other tests have imported Bokeh already.
    code = f"""
import json, sys
import IPython.display
import attnatlas
seen = []
class Handle:
    def update(self, obj, **kw):
        seen.append(["update", "bokeh" in sys.modules, "<iframe" in obj["text/html"]])
def display(*objs, **kw):
    for o in objs:
        seen.append(["display", "bokeh" in sys.modules or "anywidget" in sys.modules,
                     "<img" in o["text/html"] if isinstance(o, dict) else type(o).__name__])
    return Handle() if kw.get("display_id") else None
IPython.display.display = display
attnatlas.show({str(atlas_path)!r}, "synthetic", "pca")._ipython_display_()
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    seen = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr
    assert seen[:2] == [["display", False, True], ["update", True, True]], seen


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


def test_cell_output_without_scripts_shows_a_note_and_the_still_grid(atlas_path):
    grid, head = attnatlas.show(atlas_path, "synthetic"), attnatlas.show(atlas_path, "synthetic", layer=0, head=1)
    out = grid._iframe()
    # Before the iframe (which is 0 px high until the script sizes it): a note, and the grid image for a grid.
    assert out.index("attnatlas-still-") < out.index("<iframe") and "height:0" in out
    assert '<img src="data:image/png;base64,' in out and "does not run the notebook's scripts" in out
    assert "<img" not in head._iframe() and "attnatlas-still-" in head._iframe()
    a, b = grid.page.block
    assert grid.page.html[a:b] in out  # the block as it is, posted into the page once it has loaded


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


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nbvit") / "atlas"
    atlas = testing.synthetic_atlas(path, n_layers=1, n_heads=2, n_seq=4, seq_len=6)
    testing.random_layouts(atlas, "synthetic", "pca")
    testing.write_synthetic_image_model(atlas, name="vit", n_images=2, grid=4, patch=4)
    testing.random_layouts(atlas, "vit", "pca")
    return path


def test_image_head_embeds_the_apps_patch_thumbnails(vit_path):
    from attnatlas.app.data import AppData
    from attnatlas.app.views.head import patch_thumbnail

    view = attnatlas.show(vit_path, "vit", "pca", layer=1, head=0)
    assert "page_thumbnails" in view.page.html
    data = AppData(vit_path)
    tok = data.atlas.tokens("vit")
    got = [patch_thumbnail(data, "vit", tok, int(r)) for r in view.page.rows]
    assert sum(g is not None for g in got) == 2 * 16 and got[1].shape == (4, 4)  # 16 patches an image; [CLS] has none
    assert "page_thumbnails" not in attnatlas.show(vit_path, "synthetic", "pca").page.html  # text: nothing to crop


@pytest.mark.browser
def test_image_head_draws_thumbnails_when_zoomed_in(vit_path, tmp_path):
    import os

    from test_browser import CHROMEDRIVER, CHROMIUM, make_driver, wait_js

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    page = attnatlas.show(vit_path, "vit", "pca", layer=1, head=0).save(tmp_path / "vit.html")
    fig = "Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('head_figure'))"
    driver = make_driver(1400, 1000)
    try:
        driver.get(page.as_uri())
        wait_js(driver, f"Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle && {fig} != null", 60)
        assert wait_js(driver, "Bokeh.documents[0].get_model_by_name('head_points').data.x.length", 20) == 2 * 34
        # Zoom out over every point (68, under MAX_THUMBS): each patch point gets its thumbnail, as in the app.
        driver.execute_script(f"""const v = {fig}, d = Bokeh.documents[0].get_model_by_name('head_points').data;
            const x = Array.from(d.x), y = Array.from(d.y);
            v.model.x_range.setv({{start: Math.min(...x) - 1, end: Math.max(...x) + 1}});
            v.model.y_range.setv({{start: Math.min(...y) - 1, end: Math.max(...y) + 1}});
            v.trigger_ranges_update_event()""")
        drawn = wait_js(driver, f"""(() => {{ const r = [...{fig}.renderer_views.values()].find((r) => r.model.name == 'thumbnails');
            const imgs = r.model.data_source.data.image, got = r.glyph.image_data;
            return imgs.length && got && got.filter((i) => i != null).length == imgs.length
                   ? [imgs.length, Array.from(imgs[0].shape)] : null }})()""", 20)
        assert drawn == [2 * 2 * 16, [4, 4]]  # queries and keys of 32 patches, 4 x 4 pixels each
    finally:
        driver.quit()


@contextlib.contextmanager
def output_in_column(view, tmp_path, width: int):
    """Headless Chromium on a page holding `view`'s cell output in a column `width` px wide (skips without
    Debian's chromium); yields the driver."""
    import os

    from test_browser import CHROMEDRIVER, CHROMIUM, make_driver

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    page = tmp_path / f"column-{width}.html"
    cell = view._repr_mimebundle_()["text/html"]
    page.write_text(f'<!doctype html><html><body><div style="width:{width}px">{cell}</div></body></html>', encoding="utf-8")
    driver = make_driver(width + 300, 900)
    try:
        driver.get(page.as_uri())
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
def test_head_output_in_a_narrow_column_puts_its_controls_below_and_grows(atlas_path, tmp_path):
    import time

    from selenium.webdriver.common.by import By
    from test_browser import wait_js

    view = attnatlas.show(atlas_path, "synthetic", layer=0, head=1)
    # 600 px: narrower than the head view's plot (720 px) and its controls beside it.
    with output_in_column(view, tmp_path, 600) as driver:
        frame = "document.querySelector('iframe[data-page]')"
        # The page tells the output its height: the controls wrapped below the plot make it taller than the first guess.
        height = wait_js(driver, f"(() => {{ const h = parseInt({frame}.style.height); return h > {view.page.height} ? h : null }})()", 60)
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[data-page]"))
        box = "(n) => Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name(n)).el.getBoundingClientRect()"
        fig, search, width, inner, bottom = driver.execute_script(
            f"const b = {box}; return [b('head_figure').bottom, b('search').top, document.documentElement.scrollWidth,"
            " window.innerWidth, b('page_head').bottom]")
        plot_right = driver.execute_script(f"return ({box})('head_figure').right")
        assert plot_right <= inner  # the plot itself fits the column
        assert search >= fig  # the controls are below the plot, not cut off to its right
        assert width <= inner  # nothing wider than the column: no sideways scrolling
        driver.switch_to.default_content()
        # The whole page is inside the output (no inner scroll bar), and the output does not keep growing: it
        # follows the page's content, not the frame's body, which is as tall as the frame itself.
        time.sleep(1.5)
        settled = driver.execute_script(f"return parseInt({frame}.style.height)")
        assert bottom <= settled <= bottom + 40, (bottom, settled, height)
        time.sleep(1.5)
        assert driver.execute_script(f"return parseInt({frame}.style.height)") == settled


@pytest.mark.browser
def test_grid_output_in_a_narrow_column_scales_to_fit(tmp_path):
    from selenium.webdriver.common.by import By
    from test_browser import wait_js

    path = tmp_path / "wide"
    atlas = testing.synthetic_atlas(path, n_layers=2, n_heads=16, n_seq=6, seq_len=8)  # a grid wider than the column
    testing.random_layouts(atlas, "synthetic", "pca")
    # 600 px: narrower than the grid's own size and than the head view's plot (720 px).
    with output_in_column(attnatlas.show(path, "synthetic"), tmp_path, 600) as driver:
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[data-page]"))
        fig = "Bokeh.index.find_one(Bokeh.documents[0].get_model_by_name('grid_figure'))"
        wait_js(driver, f"typeof Bokeh != 'undefined' && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle && {fig} != null", 60)
        right, inner, natural, wide = driver.execute_script(
            f"const f = {fig}; return [f.el.getBoundingClientRect().right, window.innerWidth, f.model.width,"
            " document.documentElement.scrollWidth]")
        assert natural > inner  # the grid's own size would not fit ...
        assert right <= inner and wide <= inner  # ... so it is scaled down: every head in view, none cut off
        # The output is as tall as the grid tab, not as its tallest tab; opening the head tab makes it taller.
        driver.switch_to.default_content()
        frame = "parseInt(document.querySelector('iframe[data-page]').style.height)"
        grid_h = wait_js(driver, f"{frame} < 700 ? {frame} : null", 20)
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[data-page]"))
        driver.execute_script("Bokeh.documents[0].get_model_by_name('page_tabs').active = 1")
        driver.switch_to.default_content()
        assert wait_js(driver, f"{frame} > {grid_h} + 300 ? {frame} : null", 20)


@pytest.mark.browser
def test_output_in_a_wide_column_settles_at_the_pages_height(atlas_path, tmp_path):
    import time

    from test_browser import wait_js

    view = attnatlas.show(atlas_path, "synthetic")  # the grid: its page is shorter than the output's first height
    with output_in_column(view, tmp_path, 1300) as driver:
        frame = "document.querySelector('iframe[data-page]')"
        wait_js(driver, f"(() => {{ const h = parseInt({frame}.style.height); return h !== {view.page.height} ? h : null }})()", 60)
        # Bokeh's page is 100% of its frame's height: a page that told that height grew its frame 8 px a round, without end.
        time.sleep(2)
        settled = driver.execute_script(f"return parseInt({frame}.style.height)")
        time.sleep(2)
        assert driver.execute_script(f"return parseInt({frame}.style.height)") == settled <= view.page.height
