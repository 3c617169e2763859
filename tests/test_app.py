"""The dashboard's documents, callbacks, URL arguments and escaping, on synthetic atlases (no browser)."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import numpy as np
import pytest
from bokeh.application import Application
from bokeh.application.handlers import DirectoryHandler
from bokeh.document.events import ColumnDataChangedEvent
from bokeh.events import RangesUpdate
from bokeh.models import Div

from attnatlas import testing
from attnatlas.app import APP_DIR
from attnatlas.app.dashboard import TOOLTIPS
from attnatlas.app.data import AppData
from attnatlas.app.views.head import LINE_MIN_WEIGHT
from attnatlas.errors import AtlasError
from attnatlas.inputs.tokens import token_category, token_class

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "atlas"
    mp = pytest.MonkeyPatch()
    mp.setattr(testing, "WORDS", [*testing.WORDS, XSS])  # the corpus carries a hostile line
    try:
        atlas = testing.synthetic_atlas(path, n_layers=3, n_heads=4, n_seq=12, seq_len=10)
    finally:
        mp.undo()
    testing.random_layouts(atlas, "synthetic", "pca")
    testing.random_layouts(atlas, "synthetic", "umap", seed=1)
    testing.write_synthetic_image_model(atlas, n_images=2, grid=4)
    testing.random_layouts(atlas, "synthetic-vit", "pca")
    return path


@pytest.fixture(scope="module")
def data(atlas_path):
    return AppData(atlas_path)


dash_for = testing.dashboard_for


def all_divs(doc):
    return [m for m in doc.models if isinstance(m, Div)]


def test_directory_app_builds_a_document(atlas_path):
    handler = DirectoryHandler(filename=str(APP_DIR), argv=[str(atlas_path)])
    assert not handler.failed, handler.error
    doc = Application(handler).create_document()
    names = {m.name for m in doc.models if m.name}
    assert {"grid_image", "grid_cells", "tabs"} <= names
    assert "head_scatter" not in names  # joins the document when a head is opened
    assert not any("could not open" in d.text for d in all_divs(doc))


def test_url_arguments_select_the_view(data):
    dash, _ = dash_for(data, model="synthetic", method="umap", layer=2, head=3)
    assert (dash.model, dash.method, dash.layer, dash.head, dash.tabs.active) == ("synthetic", "umap", 2, 3, 1)
    assert dash.url.text == "?model=synthetic&method=umap&layer=2&head=3"
    xy = data.atlas.layout("synthetic", 2, 3, "umap")
    np.testing.assert_allclose(dash.src.data["x"], xy["x"].to_numpy())


def test_bad_url_arguments_fall_back_without_touching_paths(data):
    dash, _ = dash_for(data, model="../../etc/passwd", method="/tmp/x", layer="abc", head=99)
    assert dash.model == "synthetic" and dash.method in ("pca", "umap")
    assert (dash.layer, dash.head) == (0, 3)
    assert "Unknown model" in dash.status.text
    assert data.model("synthetic-vit") == "synthetic-vit" and data.model(None) == "synthetic"


def test_head_switch_sends_only_per_head_columns(data):
    dash, doc = dash_for(data, layer=0, head=0)
    events = []
    doc.on_change(lambda e: events.append(e))
    dash._step("next_head")
    assert (dash.layer, dash.head) == (0, 1)
    changed = {c for e in events if isinstance(e, ColumnDataChangedEvent) and e.model is dash.src for c in e.cols}
    assert changed == {"x", "y", "norm", "stack"}  # query/key colours and fixed sizes do not change with the head
    np.testing.assert_allclose(dash.src.data["x"], data.atlas.layout("synthetic", 0, 1, dash.method)["x"].to_numpy())
    dash._step("prev_head")
    dash._step("prev_head")
    assert (dash.layer, dash.head) == (2, 3)  # wraps to the last head of the last layer
    dash._step("next_layer")
    assert (dash.layer, dash.head) == (0, 3)


def test_head_switch_in_norm_mode_recolours(data):
    dash, _ = dash_for(data, layer=0, head=0)
    dash.colour_select.value = "norm"
    dash.size_norm.active = [0]
    before = np.asarray(dash.src.data["size"]).copy()
    c_before = np.asarray(dash.src.data["c"]).copy()
    dash._step("next_head")
    assert_follows(dash.src.data["c"], dash.src.data["norm"])
    assert not np.allclose(before, dash.src.data["size"]) and not np.array_equal(c_before, dash.src.data["c"])


def assert_follows(c, values):
    """Palette indices in the order of the values (a colour ramp over them), and not all one colour."""
    c, values = np.asarray(c), np.asarray(values)
    order = np.argsort(values, kind="stable")
    assert (np.diff(c[order]) >= 0).all() and len(set(c)) > 10


def test_clicking_a_grid_cell_opens_that_head(data):
    dash, _ = dash_for(data)
    dash.grid.cell_src.selected.indices = [6]  # L1H2
    assert dash.tabs.active == 1 and (dash.layer, dash.head) == (1, 2)
    assert dash.tabs.tabs[1].child is dash.head_panel and dash.src.document is dash.root.document
    assert dash.grid.cell_src.selected.indices == []  # cleared, so the same cell can be clicked again
    assert "L1H2" in dash.head_title.text and "trustworthiness 0.900" in dash.head_title.text


def test_method_switch_replaces_grid_and_head(data):
    dash, _ = dash_for(data, layer=1, head=1)
    before = dash.grid.base_src.data["url"][0]
    dash.method_select.value = "umap" if dash.method == "pca" else "pca"
    assert dash.grid.method == dash.method and dash.grid.base_src.data["url"][0] != before
    np.testing.assert_allclose(dash.src.data["x"], data.atlas.layout("synthetic", 1, 1, dash.method)["x"].to_numpy())
    assert f"method={dash.method}" in dash.url.text


def test_tapping_a_query_draws_its_topk_keys(data):
    dash, _ = dash_for(data, layer=1, head=2)
    t = data.tokens("synthetic", dash.method)
    n = len(t.rows)
    p = 25
    dash.src.selected.indices = [p]
    idx, w = data.atlas.attention_topk("synthetic", 1, 2)
    want = [(int(r), float(v)) for r, v in zip(idx[t.rows[p]], w[t.rows[p]]) if r >= 0 and v >= LINE_MIN_WEIGHT]
    lines = dash.line_src.data
    assert len(lines["x1"]) == len(want) > 0
    assert any(0 < v < LINE_MIN_WEIGHT for v in w[t.rows[p]])  # some weak keys are left out
    x = np.asarray(dash.src.data["x"])
    assert {round(float(v), 5) for v in lines["x1"]} == {round(float(x[n + t.point_of_row[r]]), 5) for r, _ in want}
    strongest = int(np.argmax(lines["alpha"]))
    assert lines["x1"][strongest] == pytest.approx(x[n + t.point_of_row[want[0][0]]])
    assert "keys it attends to" in dash.sequence.text and "outline" in dash.sequence.text


def test_tapping_a_key_draws_the_queries_that_attend_to_it(data):
    dash, _ = dash_for(data, layer=0, head=0)
    t = data.tokens("synthetic", dash.method)
    n = len(t.rows)
    idx, w = data.atlas.attention_topk("synthetic", 0, 0)
    key_row = int(idx[t.rows[30], 0])  # a key some query attends to most
    p = n + int(t.point_of_row[key_row])
    dash.src.selected.indices = [p]
    expected = int(((idx == key_row) & (w >= LINE_MIN_WEIGHT)).sum())
    assert len(dash.line_src.data["x0"]) == expected >= 1
    assert all(v == pytest.approx(float(dash.src.data["x"][p])) for v in dash.line_src.data["x0"])
    assert "queries that attend to it" in dash.sequence.text
    dash.src.selected.indices = []
    assert dash.line_src.data["x0"] == []


def test_search_counts_highlights_and_dims(data):
    dash, _ = dash_for(data, layer=0, head=0)
    tok = data.tokens("synthetic", dash.method).columns["token"]
    n = len(tok) // 2
    dash.search.value = "cat"
    alpha = np.asarray(dash.src.data["alpha"])
    hits = np.array(["cat" in s.lower() for s in tok[:n]])
    assert f"{hits.sum()} matching tokens" in dash.search_count.text
    assert (alpha[:n][hits] == 1.0).all() and (alpha[:n][~hits] < 0.1).all()
    dash.search_mode.active = 1  # whole word
    dash.search.value = "a"
    assert f"{int((tok[:n] == 'a').sum())} matching tokens" in dash.search_count.text
    dash.search.value = ""
    assert np.allclose(dash.src.data["alpha"], 0.6) and dash.search_count.text == ""


def test_colour_modes_and_size_by_norm(data):
    dash, _ = dash_for(data, layer=0, head=0)
    cols = data.tokens("synthetic", dash.method).columns
    n = len(cols["token"]) // 2
    fill = dash.points.glyph.fill_color  # one mapping of the column "c" in every mode (palette indices)
    dash.colour_select.value = "position"
    c = np.asarray(dash.src.data["c"])
    assert (c[:n] < 128).all() and (c[n:] >= 128).all()  # separate ramps for queries and keys
    assert len(dash.mapper.palette) == 256 + 1  # and the grey of non-matches while searching
    dash.colour_select.value = "mod5"
    np.testing.assert_array_equal(np.asarray(dash.src.data["c"]) - 0.5, cols["position"] % 5)
    dash.colour_select.value = "category"
    specials = np.asarray(cols["token"]) == "[CLS]"
    assert (np.asarray(dash.src.data["c"])[specials] == 1.5).all()
    dash.colour_select.value = "norm"
    assert_follows(dash.src.data["c"], dash.src.data["norm"])
    assert dash.points.glyph.fill_color == fill and dash.points.selection_glyph.fill_color == fill
    dash.size_norm.active = [0]
    size, norm = np.asarray(dash.src.data["size"]), np.asarray(dash.src.data["norm"])
    assert size[np.argmax(norm)] > size[np.argmin(norm)]


def test_token_categories():
    assert [token_category(t, s) for t, s in [(",", False), ("[CLS]", True), ("##ing", False), ("42", False), ("cat", False)]] == [0, 1, 2, 3, 4]
    assert token_category("\u0120the", False) == 4 and token_category("ing", False, continues_word=True) == 2
    # The analyses label by the finer class of the same classifier; the dashboard folds them into five.
    assert [token_class(t, False) for t in ("\u0120The", "the", "\u0120", "##s", "3.5", "!")] == [
        "capitalised", "word", "space", "subword", "number", "punctuation"]


def test_token_text_is_escaped_everywhere(data):
    assert ("token", "@token") in TOOLTIPS  # Bokeh escapes plain fields; only ctx is {safe}, escaped by us
    dash, doc = dash_for(data, layer=0, head=0)
    cols = data.tokens("synthetic", dash.method).columns
    where = [i for i, t in enumerate(cols["token"]) if "onerror" in t]
    assert where, "the fixture must contain the hostile token"
    assert XSS not in "".join(cols["ctx"]) and html.escape(XSS) in "".join(cols["ctx"])
    dash.search.value = "onerror"
    assert "matching tokens" in dash.search_count.text and html.escape(XSS) in dash.search_results.text
    dash.src.selected.indices = [where[0]]
    assert html.escape(XSS) in dash.sequence.text
    for div in all_divs(doc):
        assert "<img" not in div.text, div.name
    from attnatlas.app.export import head_html

    page = head_html(data, "synthetic", dash.method, 0, 0)
    assert XSS not in page and "attnatlas synthetic L0H0" in page


def test_image_model_click_heat_map_and_thumbnails(data):
    dash, _ = dash_for(data, model="synthetic-vit", layer=1, head=0)
    assert dash.img_fig.visible
    assert [k for k in dash.colour_select.options if k[0] == "patch"]
    dash.colour_select.value = "patch"
    cols = data.tokens("synthetic-vit", dash.method).columns
    shown = [dash.mapper.palette[int(v)] for v in dash.src.data["c"]]
    rgb = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in cols["rgb"]])
    got = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in shown])
    assert np.abs(got - rgb).max() <= 9  # each patch's mean colour, quantised to 16 levels a channel
    t = data.tokens("synthetic-vit", dash.method)
    p = int(np.flatnonzero(np.asarray(t.columns["token"]) == "patch 1,2")[0])
    dash.src.selected.indices = [p]
    heat = dash.heat_src.data
    assert len(heat["alpha"]) == 16 and max(heat["alpha"]) > 0
    assert heat["line"].count("#000000") == 1
    assert np.asarray(dash.img_src.data["image"][0]).shape == (16, 16)
    x, y = np.asarray(dash.src.data["x"]), np.asarray(dash.src.data["y"])
    dash.head_view._on_ranges(RangesUpdate(dash.fig, x0=float(x.min()), x1=float(x.max()), y0=float(y.min()), y1=float(y.max())))
    n_patch_points = 2 * sum(tok.startswith("patch") for tok in t.columns["token"][: len(t.rows)])
    assert len(dash.thumb_src.data["image"]) == n_patch_points
    assert np.asarray(dash.thumb_src.data["image"][0]).shape == (4, 4)


def test_sessions_are_isolated(data, monkeypatch):
    a, doc_a = dash_for(data, layer=0, head=0)
    b, doc_b = dash_for(data, layer=0, head=0)
    assert not {m.id for m in doc_a.models} & {m.id for m in doc_b.models}
    a.search.value = "cat"
    assert b.search_count.text == "" and np.allclose(b.src.data["alpha"], 0.6)

    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(a.head_view, "data", type("Broken", (), {"infos": data.infos, "clamp": data.clamp, "head": broken,
                                                       "tokens": data.tokens, "model": data.model})())
    a._step("next_head")  # fails inside the callback
    assert "disk gone" in a.status.text
    b._step("next_head")
    assert b.status.text == "" and b.head == 1


def test_export_is_standalone_html(data):
    from attnatlas.app.export import head_html

    page = head_html(data, "synthetic", "pca", 1, 1, "position")
    assert page.startswith("<!DOCTYPE html>") and "cdn.bokeh.org" not in page and len(page) > 100_000


def test_export_button_fills_the_download_source(data):
    dash, doc = dash_for(data, model="synthetic", method="pca", layer=1, head=2)
    assert doc.get_model_by_id(dash.export_src.id) is dash.export_src  # reachable, though no root holds it
    dash.head_view._on_export()
    assert dash.export_src.data["name"] == ["attnatlas-synthetic-L1H2-pca.html"]
    assert dash.export_src.data["html"][0].startswith("<!DOCTYPE html>")


def test_serve_rejects_a_missing_atlas(tmp_path):
    from attnatlas.cli.serve import make_server

    with pytest.raises(AtlasError):
        make_server(str(tmp_path / "nope"), port=0)


def _torch_imported_after(app_argv: str, steps: str, timeout: int) -> bool:
    """Build the directory app's document in a fresh interpreter, run `steps`, report whether torch was imported."""
    code = (
        "import sys\n"
        "from bokeh.application import Application\n"
        "from bokeh.application.handlers import DirectoryHandler\n"
        "import attnatlas.cli.serve, attnatlas.app.export\n"
        f"h = DirectoryHandler(filename={str(APP_DIR)!r}, argv=[{app_argv!r}])\n"
        "doc = Application(h).create_document()\n"
        f"{steps}"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_app_never_imports_torch(atlas_path):
    assert not _torch_imported_after(str(atlas_path), "assert len(doc.roots) == 1\n", 120)


def test_app_with_every_tab_open_never_imports_torch(vit_path):
    steps = (
        "tabs = doc.get_model_by_name('tabs')\n"
        "for i in range(len(tabs.tabs)): tabs.active = i\n"
        "names = {m.name for m in doc.models}\n"
        "assert {'patch_similarity', 'rollout', 'layer_embeddings', 'neurons', 'overview'} <= names, names\n"
    )
    assert not _torch_imported_after(str(vit_path), steps, 180)


def test_grid_of_270_heads_fits(tmp_path):
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=30, n_heads=9, n_kv_heads=3, n_seq=4, seq_len=8, topk=2)
    testing.random_layouts(atlas, "synthetic", "pca")
    dash, _ = dash_for(AppData(tmp_path / "a"))
    assert len(dash.grid.cell_src.data["label"]) == 270 and dash.grid.cell_src.data["label"][-1] == "L29H8"
    # Full window width: 9 columns of 173 px cells in a 1600 px window, the rows scroll with the page.
    assert dash.grid.fig.sizing_mode == "scale_width" and dash.grid._cell_px >= 150
    assert dash.grid.fig.toolbar.active_scroll is None  # the wheel scrolls the page over a tall grid


# ---- the further tabs: compare, similar heads, ViT analyses, head math ------------------------------------------

def tab(dash, key):
    """Open a tab as a click would; returns what its box holds."""
    dash.tabs.active = dash.view_keys.index(key)
    return dash.view_boxes[key].children[0]


def named(layout, name):
    return [m for m in layout.references() if getattr(m, "name", None) == name]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two text models over the same corpus, compared by `compare_models` and stored in the atlas."""
    from attnatlas.compare.run import compare_models

    path = tmp_path_factory.mktemp("cmp") / "atlas"
    mp = pytest.MonkeyPatch()
    mp.setattr(testing, "WORDS", [*testing.WORDS, XSS])
    try:  # same seed and sizes of the corpus: the same sentences; other layer/head counts: other q and k
        atlas = testing.synthetic_atlas(path, n_layers=3, n_heads=4, n_seq=12, seq_len=10)
        testing.write_synthetic_model(atlas, name="synthetic-b", n_layers=2, n_heads=2, n_seq=12, seq_len=10)
    finally:
        mp.undo()
    testing.random_layouts(atlas, "synthetic", "pca")
    testing.random_layouts(atlas, "synthetic-b", "pca")
    compare_models(atlas, ["synthetic", "synthetic-b"])
    return AppData(path)


@pytest.fixture(scope="module")
def vit_path(tmp_path_factory):
    """A tiny random ViT extracted with hidden states, with every ViT analysis stored (torch only here)."""
    pytest.importorskip("torch")
    from tiny_models import save_image_model, write_images

    from attnatlas.analyze import embeddings, neurons, rollout
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.store import open_atlas

    tmp = tmp_path_factory.mktemp("vit")
    folder = save_image_model("vit", tmp / "vit")
    images = write_images(tmp / "imgs", n=4)
    name = extract(tmp / "atlas", str(folder), images=str(images),
                   options=ExtractOptions(dtype="float32", hidden_states=True, progress=False))
    atlas = open_atlas(tmp / "atlas")
    testing.random_layouts(atlas, name, "pca")
    rollout.compute_rollout(atlas, name)
    embeddings.compute_embeddings(atlas, name, "pca", max_points=40)
    neurons.compute_neurons(atlas, name, top=4)
    return tmp / "atlas"


def test_tabs_are_built_on_first_open_only(data):
    dash, doc = dash_for(data)
    assert [t.title for t in dash.tabs.tabs] == ["All heads", "Single head", "Compare", "Patch similarity", "Rollout",
                                                 "Layer embeddings", "Neurons", "Model & head math"]
    assert not dash.view_built and "overview" not in {m.name for m in doc.models}
    tab(dash, "math")
    assert dash.view_built == {"math"} and "overview" in {m.name for m in doc.models}


def test_every_tab_comes_from_the_registry(data, monkeypatch):
    from attnatlas.app.views import registry
    from attnatlas.app.views.base import ViewSpec

    keys = [v.key for v in registry.VIEWS]
    assert len(set(keys)) == len(keys)  # each is a URL's view=
    dash, _ = dash_for(data)
    assert dash.view_keys == [v.key for v in registry.shown(data)] == keys  # two models: compare too
    assert [t.title for t in dash.tabs.tabs] == [v.title for v in registry.shown(data)]

    class Note:  # a view added by one entry: a tab, a URL key, rebuilt for each model
        def __init__(self, data, place):
            self.root = Div(text=place.model, name="note_view")

        def update(self) -> None:
            """Per model only."""

    note = ViewSpec("note", "Note", lambda data, place, host: Note(data, place), per_model=True, modality="text")
    monkeypatch.setattr(registry, "VIEWS", (*registry.VIEWS, note))
    dash, _ = dash_for(data, view="note")
    assert dash.tabs.tabs[-1].title == "Note" and dash.url.text.endswith("&view=note")
    assert dash.view_boxes["note"].children[0].text == "synthetic" and "note" in dash.view_built
    dash.model_select.value = "synthetic-vit"  # shown, so built again at once: an image model gets the reason
    assert "text models only" in dash.view_boxes["note"].children[0].text


def test_compare_tab_without_stored_results_names_the_command(data):
    dash, doc = dash_for(data, view="compare")
    assert dash.view_keys[dash.tabs.active] == "compare" and dash.url.text.endswith("&view=compare")
    body = dash.compare_panel.body.children[0]
    # the only other model is an image model: no command is suggested, since compare would refuse it
    assert isinstance(body, Div) and "no other text model" in body.text and "--models" not in body.text
    dash.compare_panel.sel_b.value = "synthetic-vit"
    body = dash.compare_panel.body.children[0]
    assert "cannot be compared" in body.text and "--models" not in body.text
    assert "similar heads" in views_similar(data, "synthetic").lower() and "attnatlas compare" in views_similar(data, "synthetic")


def views_similar(data, model):
    from attnatlas.app.similar import similar_heads_html

    return similar_heads_html(data, model, 0, 0)


def test_compare_tab_shows_stored_comparison_and_model_selects(compared):
    dash, doc = dash_for(compared)
    view = tab(dash, "compare")
    assert (dash.compare_panel.sel_a.value, dash.compare_panel.sel_b.value) == ("synthetic", "synthetic-b")
    assert view.name == "view_compare"
    body = dash.compare_panel.body.children[0]
    assert body.name == "attnatlas-compare"
    grid_a = named(body, "compare-grid-a")[0]
    assert grid_a.title.text == "synthetic"
    heat = named(body, "compare-heat")[0].renderers[0].data_source
    assert len(heat.data["sim"]) == 12 * 4  # every (head of a, head of b) pair
    dash.compare_panel.sel_a.value = "synthetic-b"
    dash.compare_panel.sel_b.value = "synthetic"
    assert named(dash.compare_panel.body.children[0], "compare-grid-a")[0].title.text == "synthetic-b"
    dash.compare_panel.sel_b.value = "synthetic-b"
    assert "two different models" in dash.compare_panel.body.children[0].text
    dash.compare_panel.sel_b.value = "../../etc"  # not an atlas model: refused, never a path
    assert "Unknown model" in dash.compare_panel.body.children[0].text


def test_similar_heads_follow_the_head_view(compared):
    from attnatlas.compare.run import nearest_heads

    dash, _ = dash_for(compared, layer=1, head=2)
    text = re.sub(r"<[^>]+>", "", dash.similar.text)
    assert 'href="?model=synthetic-b&amp;layer=' in dash.similar.text  # a link opens that head
    want = nearest_heads(compared.atlas, "synthetic", 1, 2)
    other = want[want["scope"] == "other"].sort_values("rank").iloc[0]
    assert f"L{int(other.other_layer)}H{int(other.other_head)} {other.score:.2f}" in text
    assert "synthetic-b" in text and "same model" in text
    dash._step("next_head")
    want = nearest_heads(compared.atlas, "synthetic", 1, 3)
    same = want[want["scope"] == "same"].sort_values("rank").iloc[0]
    assert f"L{int(same.other_layer)}H{int(same.other_head)} {same.score:.2f}" in re.sub(r"<[^>]+>", "", dash.similar.text)


def test_vit_tabs_draw_stored_results(vit_path):
    from bokeh.models import ColumnDataSource

    from attnatlas.analyze import rollout

    data = AppData(vit_path)
    dash, doc = dash_for(data)
    model = dash.model
    for key, name in (("patches", "patch_similarity"), ("rollout", "rollout"), ("embeddings", "layer_embeddings"),
                      ("neurons", "neurons"), ("math", "view_math")):
        assert tab(dash, key).name == name, key
        assert f"view={key}" in dash.url.text
    # the rollout tab shows the stored rollout of image 0 at the last layer
    ro = dash.view_boxes["rollout"].children[0]
    shown = sorted(tuple(np.round(s.data["value"], 6)) for s in ro.select({"type": ColumnDataSource}) if "value" in s.data)
    atlas, last = data.atlas, data.infos[model].n_layers - 1
    df = rollout.read_rollout(atlas, model)
    want = sorted(tuple(np.round(rollout.rollout_grid(df, atlas, model, 0, last, c).reshape(-1), 6))
                  for c in ("rollout", "cls_attention"))
    assert shown == want and want[0] != want[1]


def test_math_panel_follows_head_and_clicked_token(vit_path):
    from bokeh.models import ColumnDataSource

    from attnatlas.analyze import overview

    data = AppData(vit_path)
    dash, _ = dash_for(data, layer=1, head=2)
    t = data.tokens(dash.model, dash.method)
    p = int(np.flatnonzero(np.asarray(t.columns["token"][: len(t.rows)]) != "[CLS]")[3])  # a patch, as a query
    dash.src.selected.indices = [p]
    tab(dash, "math")
    assert "L1H2" in dash.math_panel.note.text and "query clicked" in dash.math_panel.note.text
    row_ = int(t.rows[p])
    tok = data.atlas.tokens(dash.model)
    seq, pos = int(tok.sequence.iat[row_]), int(tok.position.iat[row_])
    assert (dash.math_panel.seq, dash.math_panel.sel_i.value) == (seq, str(pos))
    srow = [s for s in dash.math_panel.body.children[0].select({"type": ColumnDataSource}) if "p" in s.data][0]
    from bokeh.models import Legend
    from bokeh.plotting import figure as Figure

    figs = [f for f in dash.math_panel.body.children[0].select({"type": Figure}) if f.select({"type": Legend})]
    assert figs and all(isinstance(r, Legend) for f in figs for r in f.right if r in f.select({"type": Legend}))
    assert not [r for f in figs for r in f.center if isinstance(r, Legend)]  # no legend over the bars and lines
    np.testing.assert_allclose(srow.data["p"], overview.head_math(data.atlas, dash.model, 1, 2, seq, pos, 0).softmax)
    j = int(dash.math_panel.sel_j.value)
    assert srow.data["p"][j] == pytest.approx(max(srow.data["p"]), rel=1e-3)  # the key of the top-k line
    dash.show_head(0, 1)  # while the math tab is shown, it follows at once
    assert "L0H1" in dash.math_panel.note.text and "layer=0&head=1&view=math" in dash.url.text
    dash.math_panel.sel_j.value = "0"
    assert "key 0" in dash.math_panel.body.children[0].children[-1].text


def test_image_tabs_on_a_text_model_and_missing_results_say_so(data):
    dash, doc = dash_for(data)  # text model first
    for key in ("patches", "rollout"):
        msg = tab(dash, key)
        assert isinstance(msg, Div) and "needs an image model" in msg.text
        assert "&#x27;synthetic&#x27;" in msg.text  # escaped: the message quotes the model name
    for key, what in (("embeddings", "attnatlas analyze"), ("neurons", "attnatlas analyze")):
        assert what in tab(dash, key).text
    dash.model_select.value = "synthetic-vit"  # the per-model tabs are built again for the new model
    msg = dash.view_boxes["rollout"].children[0]
    assert "loading" in msg.text
    msg = tab(dash, "rollout")
    assert "has no rollout yet" in msg.text and "attnatlas analyze" in msg.text and "--rollout" in msg.text
    assert "--hidden-states" in tab(dash, "patches").text


def test_a_failing_tab_stays_in_its_session(data, monkeypatch):
    from attnatlas.analyze import neurons

    a, _ = dash_for(data)
    b, _ = dash_for(data)

    def boom(*args, **kwargs):
        raise RuntimeError(XSS)

    monkeypatch.setattr(neurons, "read_neurons", boom)  # the neurons tab's first step fails
    msg = tab(a, "neurons")
    assert "could not be built" in msg.text and XSS not in msg.text and html.escape(XSS) in msg.text
    monkeypatch.undo()
    assert "attnatlas analyze" in tab(b, "neurons").text and a.status.text == ""


def test_head_view_says_when_its_layout_is_a_sample(tmp_path):
    from attnatlas.project import project_model

    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=10, seq_len=12)
    project_model(atlas, "synthetic", methods="pca", max_points=100, progress=False)  # 120 tokens -> 50 sampled
    dash, _ = dash_for(AppData(tmp_path / "a"), layer=0, head=1)
    dash.grid.cell_src.selected.indices = [1]
    assert "seeded sample of 50 of 120 tokens; the other 70 were placed" in dash.head_title.text
    assert len(dash.src.data["x"]) == 240 and list(dash.src.data["placed"]).count("laid out") == 100


def test_similar_heads_hint_never_suggests_comparing_across_modalities(tmp_path):
    from attnatlas.app.similar import similar_heads_html

    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2)
    testing.write_synthetic_image_model(atlas, name="vit")
    testing.random_layouts(atlas, "synthetic")
    text = similar_heads_html(AppData(tmp_path / "a"), "vit", 0, 0)
    assert "another image model" in text and "synthetic" not in text
