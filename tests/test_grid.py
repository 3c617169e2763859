"""The global grid (attnatlas/app/views/grid.py, drawn by attnatlas/render/raster.py) and `attnatlas export --grid`,
on tiny synthetic atlases."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pandas as pd
import pytest
from bokeh.events import ButtonClick, RangesUpdate
from PIL import Image

from attnatlas import testing
from attnatlas.app.data import AppData
from attnatlas.app.views import grid as grid_view
from attnatlas.cli import main as cli
from attnatlas.render import raster
from attnatlas.render.raster import robust_range

N_LAYERS, N_HEADS = 3, 4
BINS = 24  # histogram bins per axis for comparing a cell with its layout


def clustered_layout(rng: np.random.Generator, n: int, n_clusters: int, sink: bool = False) -> np.ndarray:
    """(2n, 2): queries then keys in separate, unequal clusters; optionally 10% of the points far away, as a
    decoder's first token of short sequences is (a sink)."""
    centres = rng.uniform(-10, 10, size=(n_clusters, 2))
    widths = rng.uniform(0.2, 1.2, size=n_clusters)
    lab = rng.integers(0, n_clusters, 2 * n)
    xy = centres[lab] + rng.normal(size=(2 * n, 2)) * widths[lab, None]
    if sink:
        far = rng.choice(2 * n, size=n // 5, replace=False)
        xy[far] = (5000.0, -5000.0) + rng.normal(size=(len(far), 2))
    return xy.astype(np.float32)


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    """3 x 4 heads, 600 tokens (1,200 points per head); tsne-like clustered layouts, L2H3 with a far sink, and
    a stored head_metrics table as `attnatlas compare` writes it."""
    path = tmp_path_factory.mktemp("grid") / "atlas"
    atlas = testing.synthetic_atlas(path, n_layers=N_LAYERS, n_heads=N_HEADS, n_seq=50, seq_len=12)
    rng = np.random.default_rng(3)
    rows = np.arange(len(atlas.tokens("synthetic")))
    writer = atlas.layout_writer("synthetic", "tsne", rows, {"method": "tsne", "fake": True})
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            xy = clustered_layout(rng, len(rows), 3 + layer * N_HEADS + head, sink=(layer, head) == (2, 3))
            writer.write_head(layer, head, xy, {"trustworthiness": 0.8 + 0.01 * head, "knn_kept": 0.3, "seconds": 0.0,
                                                "points": 2 * len(rows)})
    testing.random_layouts(atlas, "synthetic", "pca")
    layers, heads = np.repeat(np.arange(N_LAYERS), N_HEADS), np.tile(np.arange(N_HEADS), N_LAYERS)
    atlas.write_table("synthetic", "head_metrics", pd.DataFrame({
        "layer": layers, "head": heads, "entropy_mean": 1.0 + 0.1 * heads, "first_share": 0.1 * layers + 0.01 * heads,
        "prev_share": 0.05 * heads, "distance_mean": 2.0 + layers, "layout_method": "tsne", "note": ""}))
    return path


@pytest.fixture(scope="module")
def data(atlas_path):
    return AppData(atlas_path)


dash_for = testing.dashboard_for


def decode(url: str) -> np.ndarray:
    """Palette indices of a PNG data URL (the palette is lossless, so indices come back exactly)."""
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.mode == "P"
    return np.asarray(img)


def block_means(levels: np.ndarray, bins: int) -> np.ndarray:
    h, w = levels.shape
    ys, xs = np.linspace(0, h, bins + 1).astype(int), np.linspace(0, w, bins + 1).astype(int)
    return np.array([[levels[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean() for j in range(bins)] for i in range(bins)])


def layout_histogram(xy: np.ndarray, bins: int) -> np.ndarray:
    """log counts on a bins x bins grid over the cell's robust range, rows top-down like the image."""
    lo, hi = robust_range(xy)
    xy = np.clip(xy, lo, hi)
    h, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=bins, range=[[lo[1], hi[1]], [lo[0], hi[0]]])
    return np.log1p(h[::-1])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def cell_channels(dash, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(query levels, key levels) of one head's cell, cut from the base image the browser gets."""
    index = decode(dash.grid.base_src.data["url"][0])
    px = dash.grid._cell_px
    gap = max(1, int(round(raster.MARGIN * px)))
    col = int(dash.grid.columns[layer, head])
    cell = index[layer * px + gap:(layer + 1) * px - gap, col * px + gap:(col + 1) * px - gap]
    return cell // raster.LEVELS, cell % raster.LEVELS


# ---- faithfulness ---------------------------------------------------------------------------------------------
def test_each_cell_matches_its_own_heads_layout(data):
    """Every cell's query and key pixels correlate with a 2-D histogram of that head's own layout: more than
    with any other head's layout, and more than a 100-token sample of the head (the old grid) or a blank cell."""
    dash, _ = dash_for(data, method="tsne")
    g = data.atlas
    n = len(g.tokens("synthetic"))
    rng = np.random.default_rng(0)
    hists = {(a, b): g.layout_coords("synthetic", "tsne", a, b) for a in range(N_LAYERS) for b in range(N_HEADS)}
    for (layer, head), xy in hists.items():
        if (layer, head) == (2, 3):
            continue  # the sink head: its range is tested below
        q_lev, k_lev = cell_channels(dash, layer, head)
        own_q = correlation(block_means(q_lev, BINS), layout_histogram(xy[:n], BINS))
        own_k = correlation(block_means(k_lev, BINS), layout_histogram(xy[n:], BINS))
        assert own_q > 0.8 and own_k > 0.8, (layer, head, own_q, own_k)
        both = block_means(q_lev + k_lev, BINS)
        others = [correlation(both, layout_histogram(o, BINS)) for key, o in hists.items() if key != (layer, head)]
        assert correlation(both, layout_histogram(xy, BINS)) > max(others)
        # The same measure fails a cell drawn from 100 of the head's tokens, as the old grid drew them.
        take = rng.choice(n, 100, replace=False)
        sample = raster.cell_counts(np.concatenate([xy[take], xy[n + take]]), 100, *robust_range(xy),
                                q_lev.shape[1], q_lev.shape[0])
        sampled_q = correlation(block_means(raster.shade(sample) // raster.LEVELS, BINS), layout_histogram(xy[:n], BINS))
        assert sampled_q < own_q - 0.1, (layer, head, sampled_q, own_q)
    assert correlation(block_means(np.zeros_like(q_lev), BINS), layout_histogram(xy[:n], BINS)) == 0.0


def test_sink_outliers_are_clamped_to_the_edge_and_do_not_squash_the_cell(data):
    dash, _ = dash_for(data, method="tsne")
    q_lev, k_lev = cell_channels(dash, 2, 3)
    ink = (q_lev + k_lev) > 0
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    h, w = ink.shape
    # The clusters span the cell (a min-max range would put them all in one corner pixel block) ...
    assert rows[-1] - rows[0] > 0.8 * h and cols[-1] - cols[0] > 0.8 * w
    assert ink[h // 4:3 * h // 4, w // 4:3 * w // 4].mean() > 0.02
    # ... and the sink at (+5000, -5000) is drawn on the bottom-right corner, not dropped.
    assert ink[-3:, -3:].any()


def test_overlapping_queries_and_keys_blend():
    pal = raster.palette()
    top = raster.LEVELS - 1
    q, k, both = pal[top * raster.LEVELS, :3].astype(int), pal[top, :3].astype(int), pal[top * raster.LEVELS + top, :3].astype(int)
    assert pal[0, 3] == 0 and (pal[1:, 3] == 255).all()  # empty pixels are transparent
    assert both.sum() < min(q.sum(), k.sum())  # darker than either alone
    assert not np.array_equal(both, q) and not np.array_equal(both, k)
    # the mix keeps both hues: more green than the key colour, more red than the query colour
    assert both[1] - both[0] > k[1] - k[0] and both[0] - both[1] > q[0] - q[1]


def test_grid_fills_the_width_and_every_cell_is_drawn(data):
    dash, _ = dash_for(data, method="tsne")
    assert dash.root.sizing_mode == "stretch_width" and dash.tabs.sizing_mode == "stretch_width"
    assert dash.grid.panel.sizing_mode == "stretch_width" and dash.grid.fig.sizing_mode == "scale_width"
    index = decode(dash.grid.base_src.data["url"][0])
    px = dash.grid._cell_px
    assert index.shape == (N_LAYERS * px, N_HEADS * px) and px == raster.MAX_CELL_PX  # few heads: the largest cells
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            q, k = cell_channels(dash, layer, head)
            assert (q > 0).sum() > 500 and (k > 0).sum() > 500
    cells = dash.grid.cell_src.data
    assert len(cells["label"]) == N_LAYERS * N_HEADS and cells["label"][5] == "L1H1"
    assert "all 1,200 points" in dash.grid.info.text


def test_method_and_model_switches_redraw(data):
    dash, _ = dash_for(data, method="tsne")
    tsne = dash.grid.base_src.data["url"][0]
    dash.method_select.value = "pca"
    assert dash.grid.method == "pca" and dash.grid.base_src.data["url"][0] != tsne


# ---- zoom -----------------------------------------------------------------------------------------------------
def test_zooming_re_renders_the_visible_cells_sharper(data):
    dash, _ = dash_for(data, method="tsne")
    grid = dash.grid
    base = grid._cell_px
    grid.render_detail(0.0, 2.0, 1.0, 3.0, 1600)  # 2 x 2 cells across 1600 px: 800 px per cell
    urls = grid.detail_src.data["url"]
    assert len(urls) == 4
    img = decode(urls[0])
    assert img.shape[0] > 2 * base and img.shape == (img.shape[1], img.shape[1])
    # Sharper means the same picture at more pixels: the zoomed cell agrees with its base cell.
    q_base, _ = cell_channels(dash, 0, 0)
    assert correlation(block_means(img // raster.LEVELS, BINS), block_means(q_base, BINS)) > 0.8
    assert grid.detail_src.data["x"][0] == pytest.approx(raster.MARGIN) and grid.detail_src.data["y"][0] == pytest.approx(3 - raster.MARGIN)
    # A white square under each sharpened cell hides the blurred base pixels around its points.
    assert (grid.detail_src.data["cx"][0], grid.detail_src.data["cy"][0]) == pytest.approx((0.5, 2.5))
    grid.render_detail(0.0, N_HEADS, 0.0, N_LAYERS, N_HEADS * base)  # zoomed out, as wide as the base image
    assert grid.detail_src.data["url"] == []
    # Few heads in a wide window: the whole grid is shown larger than its capped base image, so it is sharpened.
    assert grid.render_detail(0.0, N_HEADS, 0.0, N_LAYERS, 1600) == N_LAYERS * N_HEADS


def test_zooming_into_one_cell_opens_its_head(data):
    dash, _ = dash_for(data, method="tsne")
    fig = dash.grid.fig
    fig._trigger_event(RangesUpdate(fig, x0=0.0, x1=2.5, y0=0.0, y1=2.0))  # still a grid
    assert dash.tabs.active == 0
    # layer 1 is the middle row (y 1..2), head 2 the third column
    fig._trigger_event(RangesUpdate(fig, x0=2.1, x1=2.9, y0=1.1, y1=1.9))
    assert dash.tabs.active == 1 and (dash.layer, dash.head) == (1, 2)
    assert (dash.grid.x_range.start, dash.grid.x_range.end) == (0, N_HEADS)  # back to the whole grid
    assert "L1H2" in dash.head_title.text


# ---- numbers per cell -----------------------------------------------------------------------------------------
def test_hover_shows_faithfulness_and_stored_metrics(data):
    dash, _ = dash_for(data, method="tsne")
    tips = dict(dash.grid.hover.tooltips)
    assert list(tips) == ["head", "trustworthiness", "10-NN kept", "entropy (nats)", "sink share (first token)",
                          "previous-token share", "mean distance (tokens)"]
    cells = dash.grid.cell_src.data
    i = 1 * N_HEADS + 2  # L1H2
    assert cells["label"][i] == "L1H2" and cells["m_trustworthiness"][i] == "0.820"
    assert cells["m_first_share"][i] == "0.120" and cells["m_distance_mean"][i] == "3.000"


def test_hover_without_compare_results_shows_faithfulness_only(tmp_path):
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=4, seq_len=6)
    testing.random_layouts(atlas, "synthetic", "pca")
    dash, _ = dash_for(AppData(tmp_path / "a"))
    assert [k for k, _ in dash.grid.hover.tooltips] == ["head", "trustworthiness", "10-NN kept"]
    assert [k for k, _ in dash.grid.metric_select.options] == ["none", "trustworthiness", "knn_kept"]


def test_frames_sort_and_filter_by_a_metric(data):
    dash, _ = dash_for(data, method="tsne")
    grid = dash.grid
    assert set(grid.cell_src.data["frame"]) == {raster.FRAME}
    grid.metric_select.value = "entropy_mean"  # grows with the head index
    frames = grid.cell_src.data["frame"]
    assert frames[0] != frames[N_HEADS - 1] and frames[0] == frames[N_HEADS]  # by value, same in every layer
    assert "entropy" in grid.legend.text
    before = grid.base_src.data["url"][0]
    grid.metric_opts.active = [0, 1]  # sort: highest first
    assert grid.columns[0].tolist() == [3, 2, 1, 0]
    assert grid.base_src.data["url"][0] != before
    assert grid.cell_at(0.5, N_LAYERS - 0.5) == (0, 3)  # the first column now holds head 3
    assert grid.label_src.data["text"][:N_HEADS] == ["H0", "H1", "H2", "H3"]
    q, _ = cell_channels(dash, 0, 3)  # cut at its new column: still head 3's picture
    xy = data.atlas.layout_coords("synthetic", "tsne", 0, 3)
    assert correlation(block_means(q, BINS), layout_histogram(xy[:len(xy) // 2], BINS)) > 0.8
    grid.cell_src.selected.indices = [3]  # a click opens the head the cell shows, wherever it stands
    assert (dash.layer, dash.head) == (0, 3)
    assert grid.metric_filter.visible
    grid.metric_filter.value = (1.15, 1.35)  # heads 2 and 3
    grid._on_filter("value_throttled", None, grid.metric_filter.value)
    fade = grid.cell_src.data["fade"]
    assert [fade[h] for h in range(N_HEADS)] == [0.85, 0.85, 0.0, 0.0]
    grid.metric_select.value = "none"
    assert not grid.metric_filter.visible and set(grid.cell_src.data["fade"]) == {0.0}
    assert grid.columns[0].tolist() == [0, 1, 2, 3]


def test_grid_view_never_imports_the_dashboard():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(grid_view))
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "attnatlas.app.dashboard" not in mods and "torch" not in names


# ---- export ---------------------------------------------------------------------------------------------------
def test_export_writes_the_grid_and_its_boxes(data, atlas_path, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli(["export", str(atlas_path), "--model", "synthetic", "--method", "tsne", "--grid", str(out), "--cell-px", "80"]) == 0
    meta = json.loads((tmp_path / "grid.json").read_text())
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (meta["width"], meta["height"]) == (img.shape[1], img.shape[0])
    heads = meta["heads"]
    assert len(heads) == N_LAYERS * N_HEADS and {h["layer"] for h in heads} == set(range(N_LAYERS))
    n = len(data.atlas.tokens("synthetic"))
    for h in heads:
        xy = data.atlas.layout_coords("synthetic", "tsne", h["layer"], h["head"])
        lo, hi = robust_range(xy)
        # the sink head's range leaves its far 10% out; a 0.5-99.5% range would reach them
        if (h["layer"], h["head"]) == (2, 3):
            assert hi[0] < 100 and np.quantile(xy[:, 0], 0.995) > 4000
        assert (h["x_min"], h["x_max"], h["y_min"], h["y_max"]) == pytest.approx((lo[0], hi[0], lo[1], hi[1]), rel=1e-5)
        box = img[h["y0"]:h["y1"], h["x0"]:h["x1"]]
        assert box.shape[:2] == (80 - 2 * 3, 80 - 2 * 3)
        # The box holds this head's picture: its ink correlates with the head's histogram.
        ink = 255 * 3 - box.sum(2)
        if (h["layer"], h["head"]) != (2, 3):
            assert correlation(block_means(ink, 8), layout_histogram(xy, 8)) > 0.7
        # A point at the box's data corner (x_max, y_max) is drawn at its top-right pixel.
        col, row_ = raster.pixel_xy(np.array([[h["x_max"] - 1e-6, h["y_max"] - 1e-6]]), np.array([h["x_min"], h["y_min"]]),
                                np.array([h["x_max"], h["y_max"]]), h["x1"] - h["x0"], h["y1"] - h["y0"])
        assert (int(col[0]), int(row_[0])) == (h["x1"] - h["x0"] - 1, 0)
    assert n and "wrote" in capsys.readouterr().out
    assert cli(["export", str(atlas_path), "--model", "synthetic", "--method", "pca", "--grid", str(tmp_path / "g.pdf")]) == 0
    assert (tmp_path / "g.pdf").read_bytes().startswith(b"%PDF") and (tmp_path / "g.json").is_file()


def _tree(path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope", "--method", "tsne"], "Model 'nope' has no layouts"),
    (["--model", "synthetic", "--method", "umap"], "no 'umap' layouts (has: pca, tsne)"),
    (["--model", "synthetic", "--method", "tsne", "--cell-px", "3"], "--cell-px 3"),
])
def test_export_bad_input_is_one_message_and_exit_2(atlas_path, tmp_path, capsys, argv, message):
    before = _tree(atlas_path)
    out = tmp_path / "g.png"
    assert cli(["export", str(atlas_path), *argv, "--grid", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("attnatlas export: error:")
    assert not out.exists() and _tree(atlas_path) == before


def test_export_refuses_other_bad_paths(atlas_path, tmp_path, capsys):
    before = _tree(atlas_path)
    args = ["--model", "synthetic", "--method", "tsne"]
    assert cli(["export", str(tmp_path / "none"), *args, "--grid", str(tmp_path / "g.png")]) == 2
    assert "No atlas at" in capsys.readouterr().err
    assert cli(["export", str(atlas_path), *args, "--grid", str(tmp_path / "missing" / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["export", str(atlas_path), *args, "--grid", str(tmp_path / "g.svg")]) == 2
    assert ".png or .pdf" in capsys.readouterr().err
    assert cli(["export", str(atlas_path), *args, "--grid", str(atlas_path / "g.png")]) == 2
    assert "inside the atlas" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    import os

    if os.geteuid() != 0:  # root may write anywhere
        assert cli(["export", str(atlas_path), *args, "--grid", str(locked / "g.png")]) == 2
        assert "not writable" in capsys.readouterr().err
    assert _tree(atlas_path) == before


def test_export_draws_a_model_projected_on_two_layers(tmp_path, capsys):
    """4 layers x 3 heads, layouts on layers 1 and 3 only: the grid is drawn with the other layers' cells empty and
    listed in the JSON; --layers / --heads pick rows and columns; a selection with no layout is refused."""
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=4, n_heads=3, n_seq=20, seq_len=10)
    rows = np.arange(len(atlas.tokens("synthetic")))
    writer = atlas.layout_writer("synthetic", "pca", rows, {"method": "pca", "fake": True})
    rng = np.random.default_rng(0)
    for layer in (1, 3):
        for head in range(3):
            writer.write_head(layer, head, clustered_layout(rng, len(rows), 3),
                              {"trustworthiness": 0.9, "knn_kept": 0.3, "seconds": 0.0, "points": 2 * len(rows)})
    before = _tree(tmp_path / "a")

    def export(*extra):
        out = tmp_path / "g.png"
        code = cli(["export", str(tmp_path / "a"), "--model", "synthetic", "--method", "pca", "--grid", str(out),
                    "--cell-px", "60", *extra])
        std = capsys.readouterr()
        if code:
            return code, std.err, None, None
        return code, std.out, json.loads((tmp_path / "g.json").read_text()), np.asarray(Image.open(out).convert("RGB"))

    code, said, meta, img = export()
    assert code == 0, said
    assert (meta["layers"], meta["head_columns"]) == ([0, 1, 2, 3], [0, 1, 2])
    assert {(h["layer"], h["head"]) for h in meta["heads"]} == {(l, h) for l in (1, 3) for h in range(3)}
    assert {(m["layer"], m["head"]) for m in meta["missing"]} == {(l, h) for l in (0, 2) for h in range(3)}
    assert img.shape[:2] == (meta["height"], meta["width"]) and meta["height"] == raster.LABEL_TOP + 4 * 60
    for box in meta["heads"]:  # drawn: ink in the box
        assert (img[box["y0"]:box["y1"], box["x0"]:box["x1"]] < 250).any()
    for box in meta["missing"]:  # empty: white inside its frame
        assert (img[box["y0"]:box["y1"], box["x0"]:box["x1"]] == 255).all()
    assert "6 heads, 6 without a 'pca' layout drawn empty" in said and "--layers 1,3 leaves them out" in said

    code, said, meta, img = export("--layers", "1,3")
    assert code == 0 and not meta["missing"] and meta["height"] == raster.LABEL_TOP + 2 * 60
    assert [h["layer"] for h in meta["heads"]] == [1, 1, 1, 3, 3, 3] and "leaves them out" not in said
    top = meta["heads"][0]
    assert (top["x0"], top["y0"]) == (raster.LABEL_LEFT + 2, raster.LABEL_TOP + 2)  # layer 1 drawn in the first row

    code, said, meta, img = export("--layers", "0-1", "--heads", "2")
    assert code == 0 and meta["width"] == raster.LABEL_LEFT + 60
    assert [(h["layer"], h["head"]) for h in meta["heads"]] == [(1, 2)]
    assert [(m["layer"], m["head"]) for m in meta["missing"]] == [(0, 2)]
    assert "layer 0 has no 'pca' layout; --layers 1 leaves it out" in said

    for extra, needle in ((["--layers", "0,2"], "None of the selected heads of 'synthetic' has a 'pca' layout "
                                                "(layers with layouts: 1,3)"),
                          (["--layers", "9"], "Layer 9 is out of range"), (["--heads", "x"], "Cannot read head 'x'")):
        (tmp_path / "g.png").unlink(missing_ok=True)
        code, err, _, _ = export(*extra)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "g.png").exists()
    assert _tree(tmp_path / "a") == before
    # the dashboard draws such a grid, with the missing heads marked
    dash, _ = dash_for(AppData(tmp_path / "a"))
    assert dash.grid.cell_src.data["label"][1] == "L0H1 (no layout)"


# ---- head map -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two models on one corpus, compared (`attnatlas compare`), each with layouts."""
    from attnatlas.compare.run import compare_models
    from attnatlas.store import Atlas

    path = tmp_path_factory.mktemp("map") / "atlas"
    atlas = Atlas.open(path, create=True)
    testing.write_synthetic_model(atlas, name="m1", n_layers=2, n_heads=3, n_seq=8, seed=3)
    testing.write_synthetic_model(atlas, name="m2", n_layers=2, n_heads=2, n_kv_heads=1, n_seq=8, seed=3)  # same corpus
    testing.random_layouts(atlas, "m1", "pca")
    testing.random_layouts(atlas, "m2", "pca", seed=1)
    compare_models(atlas, ["m1", "m2"])
    return path


def test_head_map_places_heads_by_attention_pattern_similarity(two_models):
    from attnatlas.app.views.head_map import classical_mds

    data = AppData(two_models)
    dash, _ = dash_for(data, model="m1")
    dash.grid.mode.active = 1
    hm = dash.grid.head_map
    assert dash.grid.panel.children[1] is hm.panel
    d = hm.src.data
    assert len(d["url"]) == 6 + 4 and d["model"][:6] == ["m1"] * 6 and d["model"][6:] == ["m2"] * 4
    assert "attention pattern" in hm.info.text
    labels, sim = data.head_similarity(("m1", "m2"), "pattern")
    assert sim.shape == (10, 10) and np.isfinite(sim).all()
    # Map distances follow the stored dissimilarity (classical MDS keeps the largest part of it).
    xy = np.c_[d["mx"], d["my"]]  # the placement (drawn snapped to a lattice: cx, cy)
    iu = np.triu_indices(10, 1)
    mapped = np.linalg.norm(xy[:, None] - xy[None], axis=2)[iu]
    assert correlation(mapped, (1 - sim)[iu]) > 0.6
    # MDS recovers exact points from their distances (up to rotation): the placement is not arbitrary.
    pts = np.random.default_rng(0).normal(size=(12, 2))
    back = classical_mds(np.linalg.norm(pts[:, None] - pts[None], axis=2))
    np.testing.assert_allclose(np.linalg.norm(back[:, None] - back[None], axis=2),
                               np.linalg.norm(pts[:, None] - pts[None], axis=2), atol=1e-8)
    # Each thumbnail is the head's own cell, drawn from all its points.
    thumb = decode(d["url"][7])  # m2 L0H1
    g = data.grid_layouts("m2", "pca")
    np.testing.assert_array_equal(thumb, raster.render_cell(g, 0, 1, thumb.shape[1], thumb.shape[0]))
    # Clicking a head of the other model opens it there.
    hm.src.selected.indices = [7]
    assert (dash.model, dash.layer, dash.head, dash.tabs.active) == ("m2", 0, 1, 1)


def test_head_map_by_metric_profile_and_without_a_comparison(two_models, data):
    dash, _ = dash_for(AppData(two_models), model="m1")
    dash.grid.mode.active = 1
    hm = dash.grid.head_map
    hm.with_models.active = []  # m1 alone
    assert len(hm.src.data["url"]) == 6
    hm.measure.active = 2
    assert "metric profile" in hm.info.text and len(set(zip(hm.src.data["cx"], hm.src.data["cy"]))) == 6
    # An atlas with metrics but no comparison between models: placed by metric profile, and it says so.
    dash, _ = dash_for(data, method="tsne")
    dash.grid.mode.active = 1
    assert "metric profile (no stored comparison: run `attnatlas compare`" in dash.grid.head_map.info.text
    assert not dash.grid.head_map.with_models.visible
    dash.grid.mode.active = 0
    assert dash.grid.panel.children[1] is dash.grid.grid_box


def test_head_map_of_indistinguishable_heads_is_the_grid_lattice(tmp_path):
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=2, n_heads=3, n_seq=4, seq_len=6)
    testing.random_layouts(atlas, "synthetic", "pca")  # the same faithfulness for every head
    dash, _ = dash_for(AppData(tmp_path / "a"))
    dash.grid.mode.active = 1
    d = dash.grid.head_map.src.data
    assert list(zip(d["mx"], d["my"])) == [(h, -layer) for layer in range(2) for h in range(3)]
    assert "do not tell these heads apart" in dash.grid.head_map.info.text


def test_head_map_of_270_heads_keeps_thumbnails_apart_and_frames_them_all(tmp_path):
    from attnatlas.app.views.head_map import lattice, snap

    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=30, n_heads=9, n_seq=3, seq_len=6)
    testing.random_layouts(atlas, "synthetic", "pca")
    dash, _ = dash_for(AppData(tmp_path / "a"))
    dash.grid.mode.active = 1
    hm = dash.grid.head_map
    d = hm.src.data
    x, y, w, h = (np.asarray(d[k], float) for k in ("x", "y", "w", "h"))
    assert len(x) == 270
    # No two thumbnails (x, y is the top-left corner) overlap ...
    dx = np.abs(x[:, None] - x[None]) < w[:, None]
    dy = np.abs(y[:, None] - y[None]) < h[:, None]
    np.fill_diagonal(dx, False)
    assert not (dx & dy).any()
    # ... and the first view (and reset) frames every one of them, in a figure about twice as wide as tall.
    xr, yr = hm.fig.x_range, hm.fig.y_range
    assert xr.start <= x.min() and (x + w).max() <= xr.end and yr.start <= (y - h).min() and y.max() <= yr.end
    assert (xr.reset_start, xr.reset_end, yr.reset_start, yr.reset_end) == (xr.start, xr.end, yr.start, yr.end)
    assert 1.5 < (xr.end - xr.start) / (yr.end - yr.start) < 3.5
    # A dense blob and a few outliers: each head its own cell, the blob spread out, the order along each axis
    # and most of each head's neighbours kept.
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    pts = np.r_[rng.normal(0, 0.05, (250, 2)), rng.normal(0, 3, (20, 2))]
    cols, rows = lattice(len(pts))
    cells = snap(pts, cols, rows)
    assert len({tuple(c) for c in cells}) == 270 and cols * rows >= 270
    assert spearmanr(cells[:, 0], pts[:, 0])[0] > 0.9 and spearmanr(cells[:, 1], pts[:, 1])[0] > 0.9
    near = lambda p, k: np.argsort(np.linalg.norm(p[:, None] - p[None], axis=2), 1)[:, 1:k + 1]  # noqa: E731
    kept = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(near(pts, 5), near(cells, 15))])
    assert kept > 0.5, kept


# ---- top sequences --------------------------------------------------------------------------------------------
def test_strongest_non_sink_attention_lists_the_right_sequences(data):
    from attnatlas.app.top_sequences import strongest

    tok = data.atlas.tokens("synthetic")
    idx, w = data.atlas.attention_topk("synthetic", 1, 2)
    sink = ((tok["position"] == 0) | tok["is_special"]).to_numpy()
    # Independently: every (query, key, weight) of the stored top-k, sinks dropped, best per sequence.
    q, slot = np.nonzero(idx >= 0)
    df = pd.DataFrame({"query": q, "key": idx[q, slot], "w": w[q, slot].astype(np.float32)})
    df = df[~sink[df["key"]]]
    df["sequence"] = tok["sequence"].to_numpy()[df["query"]]
    best = df.sort_values("w", ascending=False, kind="stable").drop_duplicates("sequence")
    entries = strongest(data, "synthetic", 1, 2, n=4)
    assert [e.sequence for e in entries] == best["sequence"].head(4).tolist()
    assert [e.score for e in entries] == pytest.approx(best["w"].head(4).tolist())
    e = entries[0]
    assert e.mark is not None and tok["sequence"].iloc[e.mark] == e.sequence
    assert max(e.shade.values()) == pytest.approx(1.0) and not any(sink[r] for r in e.shade)


def test_typical_sequences_of_each_cluster_and_escaping(tmp_path, monkeypatch):
    from attnatlas.app.top_sequences import top_sequences_html, typical

    xss = "<img src=x onerror=alert(1)>"
    monkeypatch.setattr(testing, "WORDS", [xss])  # every word of the corpus is hostile
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=1, n_seq=10, seq_len=8)
    monkeypatch.undo()
    tok = atlas.tokens("synthetic")
    rows = np.arange(len(tok))
    seq = tok["sequence"].to_numpy()
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(2 * len(rows), 2)).astype(np.float32)
    far = np.concatenate([seq == 7, np.zeros(len(rows), bool)])  # sequence 7's queries: a cluster of their own
    xy[far] += 50
    writer = atlas.layout_writer("synthetic", "tsne", rows, {"method": "tsne", "fake": True})
    writer.write_head(0, 0, xy, {"trustworthiness": 0.9, "knn_kept": 0.3, "seconds": 0.0, "points": 2 * len(rows)})
    data = AppData(tmp_path / "a")
    clusters = typical(data, "synthetic", "tsne", 0, 0, k=2)
    sizes = sorted(n for _, n, _ in clusters)
    assert sizes == [8, 2 * len(rows) - 8]
    small = [entries for _, n, entries in clusters if n == 8][0]
    assert small[0].sequence == 7 and small[0].score == pytest.approx(0.5)  # its 8 queries of its 16 points
    assert small[0].colour == ",".join(str(int(raster.QUERY[i:i + 2], 16)) for i in (1, 3, 5))
    page = top_sequences_html(data, "synthetic", "tsne", 0, 0)
    assert xss not in page and html.escape(xss) in page


def test_head_view_lists_top_sequences_on_demand(data):
    dash, _ = dash_for(data, method="tsne", layer=1, head=2)
    assert dash.top.div.text == ""  # a head switch costs nothing until asked
    dash.top.button._trigger_event(ButtonClick(dash.top.button))
    assert "Top sequences of L1H2" in dash.top.div.text and "cluster 1" in dash.top.div.text
    assert dash.top.div.disable_math
    dash._step("next_head")
    assert dash.top.div.text == ""


def test_grid_says_heads_above_and_offers_metric_options_only_with_a_metric(data):
    """Issue 26 item 8: head labels in the first view (above the grid); the metric options appear with a metric."""
    from bokeh.models import LinearAxis

    dash, _ = dash_for(data)
    grid = dash.grid
    assert any(isinstance(r, LinearAxis) for r in grid.fig.above) and not any(isinstance(r, LinearAxis) for r in grid.fig.below)
    assert grid.metric_select.value == "none" and not grid.metric_opts.visible
    grid.metric_select.value = "trustworthiness"
    assert grid.metric_opts.visible and grid.metric_filter.visible
    grid.metric_select.value = "none"
    assert not grid.metric_opts.visible
