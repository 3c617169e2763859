"""The head map ("projection of projections"): every head of one or more models as its grid thumbnail, placed
in 2-D so similar heads lie close. Placement: classical MDS of 1 - similarity from `attnatlas compare`
(attention pattern, or compare's profile measure), or PCA of the heads' z-scored stored metrics. Clicking a
head opens it.

`HeadMap(data, on_open, on_error)` builds the Bokeh models; the grid view places `.panel` and calls
`.show(model, method)`. Thumbnails come from the grid's rasteriser (render.raster), from all of each head's points. Each
head is drawn in a lattice cell of its own nearest its placement (`snap`), so hundreds of heads never pile
up; the placement itself is kept in the source as mx, my.
"""

from __future__ import annotations

import html
from collections.abc import Callable

import numpy as np
import pandas as pd
from bokeh.layouts import column, row
from bokeh.models import CheckboxGroup, ColumnDataSource, Div, HoverTool, RadioButtonGroup, Range1d, TapTool
from bokeh.palettes import Category10
from bokeh.plotting import figure

from attnatlas.analyze.head_types import TYPE_COLOURS
from attnatlas.app.data import AppData
from attnatlas.app.views.base import HeadPanel
from attnatlas.render.raster import data_url, render_cell

THUMB_PX = 48
ASPECT = 2.6  # columns per row of the map's lattice: a wide map that fits one screen at 1280-1920 px
SPARE = 1.3  # lattice cells per head: room for the placement's shape
MAX_SNAP = 3000  # heads snapped onto the lattice (an assignment of n x 1.3 n); more keep their placement
FIG_W = 1000  # px the map is laid out for; it scales with the window width ...
MAX_W = 1400  # ... up to this, so its height stays within a 1920 x 1080 screen
MEASURES = (("pattern", "attention pattern (compare)"), ("profile", "compare's profile"), ("metrics", "metric profile"))


def classical_mds(dist: np.ndarray) -> np.ndarray:
    """(n, n) distances -> (n, 2) coordinates (Torgerson). NaN distances take the mean distance; the sign of
    each axis is fixed so its largest coordinate is positive (the same map every time)."""
    d = np.array(dist, dtype=np.float64)
    d = np.where(np.isfinite(d), d, np.nanmean(d) if np.isfinite(d).any() else 1.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    n = len(d)
    j = np.eye(n) - 1.0 / n
    b = -0.5 * j @ (d ** 2) @ j
    w, v = np.linalg.eigh(b)
    top = np.argsort(w)[::-1][:2]
    xy = v[:, top] * np.sqrt(np.maximum(w[top], 0))
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    flip = np.sign(xy[np.abs(xy).argmax(0), np.arange(2)])
    return xy * np.where(flip == 0, 1, flip)


def metric_pca(table: pd.DataFrame) -> np.ndarray:
    """(head, 2) PCA of z-scored metric columns (columns with a NaN or no spread left out)."""
    x = table.to_numpy(np.float64)
    keep = np.isfinite(x).all(0) & (np.nanstd(x, 0) > 0)
    x = x[:, keep]
    if x.shape[1] == 0:
        return np.zeros((len(table), 2))
    x = (x - x.mean(0)) / x.std(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    xy = u[:, :2] * s[:2]
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    flip = np.sign(xy[np.abs(xy).argmax(0), np.arange(2)])
    return xy * np.where(flip == 0, 1, flip)


def lattice(n: int, aspect: float = ASPECT) -> tuple[int, int]:
    """(columns, rows) of a lattice with about SPARE * n cells, `aspect` times as wide as tall."""
    cells = max(int(np.ceil(SPARE * n)), 1)
    rows = max(int(np.ceil(np.sqrt(cells / aspect))), 1)
    return int(np.ceil(cells / rows)), rows


def snap(xy: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """(n, 2) placement -> (n, 2) centres of distinct lattice cells, as close to the placement as an optimal
    assignment gets: no two thumbnails overlap. Each axis goes onto the lattice by rank, so a dense cluster
    spreads over the cells instead of crowding into a few, and the order along each axis is kept."""
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import rankdata

    n = len(xy)
    ranks = np.c_[rankdata(xy[:, 0]), rankdata(xy[:, 1])] - 1  # ties share a rank: equal heads stay together
    u = ranks / max(n - 1, 1) * [cols - 1, rows - 1] + 0.5  # (n, 2) in lattice units
    cx, cy = np.meshgrid(np.arange(cols) + 0.5, np.arange(rows) + 0.5)
    centres = np.c_[cx.ravel(), cy.ravel()]  # (cells, 2)
    if n > MAX_SNAP or n > len(centres):
        return u
    cost = ((u[:, None, :] - centres[None]) ** 2).sum(-1)  # (n, cells)
    head, cell = linear_sum_assignment(cost)
    out = np.empty_like(u)
    out[head] = centres[cell]
    return out


def thumbnails(data: AppData, model: str, method: str) -> list[str]:
    """A PNG data URL per head of `model`, (layer, head) order, cached for every session."""
    def make() -> list[str]:
        g = data.grid_layouts(model, method)
        L, H = g.done.shape
        return [data_url(render_cell(g, a, b, THUMB_PX, THUMB_PX)) for a in range(L) for b in range(H)]

    return data.grid_image(("thumbs", model, method, THUMB_PX), make)


def warm(data: AppData, model: str, method: str) -> None:
    """Thumbnails and similarities of the default head map (a model and those compared with it), cached."""
    models = (model, *data.compared_models(model))
    for m in models:
        thumbnails(data, m, data.method(m, method))
    data.head_similarity(models, "pattern")


class HeadMap(HeadPanel):
    """Bokeh models and callbacks of one session's head map. `on_open(model, layer, head)` opens a head."""

    def __init__(self, data: AppData, on_open: Callable[[str, int, int], None], on_error: Callable[[str], None]):
        super().__init__(data, on_open, on_error)
        self.src = ColumnDataSource(data=dict(url=[], x=[], y=[], w=[], h=[], cx=[], cy=[], mx=[], my=[], model=[],
                                              label=[], layer=[], head=[], colour=[], type=[]), name="head_map_points")
        # Explicit ranges: the first view frames every head, and reset returns to that.
        self.x_range, self.y_range = Range1d(0, 1, name="head_map_x"), Range1d(0, 1, name="head_map_y")
        self.fig = figure(width=FIG_W, height=500, sizing_mode="scale_width", max_width=MAX_W, name="head_map_figure", min_border=0,
                          x_range=self.x_range, y_range=self.y_range,
                          tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above")
        self.fig.grid.visible = False
        self.fig.axis.visible = False
        self.fig.image_url(url="url", x="x", y="y", w="w", h="h", anchor="top_left", source=self.src, name="head_map_thumbs")
        frames = self.fig.rect(x="cx", y="cy", width="w", height="h", source=self.src, fill_color="#ffffff", fill_alpha=0.0,
                               line_color="colour", line_width=1.5, name="head_map_frames")
        frames.nonselection_glyph = None
        frames.selection_glyph = None
        self.fig.add_tools(TapTool(renderers=[frames]), HoverTool(renderers=[frames], tooltips=[("head", "@model @label"), ("type", "@type")]))
        self.src.selected.on_change("indices", self._on_tap)
        self.measure = RadioButtonGroup(labels=[label for _, label in MEASURES], active=0, name="head_map_measure")
        self.measure.on_change("active", self._on_change)
        self.with_models = CheckboxGroup(labels=[], active=[], name="head_map_models")
        self.with_models.on_change("active", self._on_change)
        self.info = Div(text="", disable_math=True, name="head_map_info")
        # Frames by model, or by each head's most specific type (attnatlas analyze --head-types).
        self.colour_by = RadioButtonGroup(labels=["frames by model", "frames by head type"], active=0,
                                          name="head_map_colour_by")
        self.colour_by.on_change("active", self._on_change)
        self.panel = column(self.info, row(self.measure, self.with_models, self.colour_by), self.fig,
                            sizing_mode="stretch_width", name="head_map_panel")

    def show(self, model: str, method: str) -> None:
        self.model, self.method = model, method
        others = self.data.compared_models(model)
        self._quiet = True
        try:
            self.with_models.labels = [f"with {m}" for m in others]
            self.with_models.active = list(range(len(others)))  # all compared models at first
            self.with_models.visible = bool(others)
            self._others = others
        finally:
            self._quiet = False
        self._draw()

    def models(self) -> tuple[str, ...]:
        return (self.model, *[self._others[i] for i in self.with_models.active if i < len(self._others)])

    def _placement(self, models: tuple[str, ...]) -> tuple[pd.DataFrame, np.ndarray, str]:
        """(labels, (head, 2) coordinates, what placed them)."""
        key = MEASURES[self.measure.active][0] if 0 <= self.measure.active < len(MEASURES) else "pattern"
        if key in ("pattern", "profile"):
            res = self.data.head_similarity(models, key)
            if res is not None:
                labels, sim = res
                return labels, classical_mds(1 - np.clip(sim, -1, 1)), MEASURES[[k for k, _ in MEASURES].index(key)][1]
        # Metric profile: every model's heads on the metric columns they all have.
        tables = [self.data.head_table(m, self.data.method(m, self.method)).assign(model=m) for m in models]
        common = [c for c in tables[0].columns if all(c in t for t in tables) and c not in ("layer", "head", "model")
                  and pd.api.types.is_numeric_dtype(tables[0][c])]  # head types are text
        table = pd.concat(tables, ignore_index=True)
        note = "metric profile" + ("" if key == "metrics" else
                                   " (no stored comparison: run `attnatlas compare` for the attention-pattern map)")
        xy = metric_pca(table[common])
        if not np.ptp(xy, 0).any():  # every head has the same numbers: lay them out as the grid does
            offset = np.cumsum([0] + [self.data.infos[m].n_layers + 1 for m in models])
            row_of = dict(zip(models, offset))
            xy = np.c_[table["head"].to_numpy(float), -(table["layer"].to_numpy(float) + table["model"].map(row_of).to_numpy(float))]
            note = "layer and head (the stored metrics do not tell these heads apart)"
        return table[["model", "layer", "head"]], xy, note

    def _draw(self) -> None:
        models = self.models()
        labels, xy, how = self._placement(models)
        # Each head in a lattice cell of its own, near its placement: thumbnails never pile up, and the map,
        # as wide as the window, frames them all.
        cols, rows = lattice(len(xy))
        mx, my = (xy[:, 0], xy[:, 1]) if len(xy) else (np.zeros(0), np.zeros(0))
        xy = snap(xy, cols, rows) if len(xy) else xy
        size = 0.9
        self.fig.height = int(round(FIG_W * rows / cols)) + 30  # the toolbar's 30 px above the frame
        self.x_range.update(bounds=None, start=0, end=cols, reset_start=0, reset_end=cols)
        self.y_range.update(bounds=None, start=0, end=rows, reset_start=0, reset_end=rows)
        urls: list[str] = []
        for m in models:
            urls += thumbnails(self.data, m, self.data.method(m, self.method))
        palette = Category10[10]
        colour = {m: palette[i % 10] for i, m in enumerate(models)}
        kinds = self._kinds(models, labels)
        cx, cy = xy[:, 0], xy[:, 1]
        self.src.data = dict(url=urls, x=cx - size / 2, y=cy + size / 2, w=[size] * len(cx), h=[size] * len(cx),
                             cx=cx, cy=cy, mx=mx, my=my, model=labels["model"].tolist(),
                             label=[f"L{a}H{b}" for a, b in zip(labels["layer"], labels["head"])],
                             layer=labels["layer"].astype(int).tolist(), head=labels["head"].astype(int).tolist(),
                             colour=[colour[m] for m in labels["model"]] if kinds is None else
                             [TYPE_COLOURS.get(k, "#dddddd") for k in kinds], type=kinds or [""] * len(labels))
        legend = " ".join(f'<span style="border:2px solid {colour[m]};padding:0 4px">{html.escape(m)}</span>' for m in models)
        if kinds is not None:
            legend = " ".join(f'<span style="border:2px solid {TYPE_COLOURS[k]};padding:0 4px">{html.escape(k)}</span>'
                              for k in TYPE_COLOURS if k in set(kinds)) + " (grey: no type)"
        self.info.text = (f"{len(labels)} heads placed by {html.escape(how)}: nearby heads behave alike. "
                          f"Each is drawn from all its layout points. Click a head to open it. {legend}")

    def _kinds(self, models: tuple[str, ...], labels: pd.DataFrame) -> list[str] | None:
        """Each placed head's most specific type when frames are by type, else None."""
        if self.colour_by.active != 1:
            return None
        out = {}
        for m in models:
            t = self.data.head_table(m, self.data.method(m, self.method))
            if "type" in t:
                out.update({(m, int(a), int(b)): str(k) for a, b, k in zip(t["layer"], t["head"], t["type"])})
        return [out.get((m, int(a), int(b)), "") for m, a, b in zip(labels["model"], labels["layer"], labels["head"])]
