"""The "All heads" tab: every head of a model as one cell of a grid, each cell drawn from all of its head's
layout points, with the head map and the head scatter in the same tab.

Cells are rasterised on the server by `attnatlas.render.raster` (numpy only, never torch); the whole grid goes
to the browser as one palette PNG. Zooming re-renders the visible cells at the screen's resolution, and
zooming into about one cell opens that head.

`GridView(data, on_open, on_error)` builds the Bokeh models; `GridTab` places it for the dashboard and
calls `.show(model, method)`.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np
from bokeh.events import RangesUpdate
from bokeh.layouts import column, row
from bokeh.models import (
    BoxZoomTool,
    CheckboxGroup,
    ColumnDataSource,
    Div,
    FixedTicker,
    HoverTool,
    PanTool,
    RadioButtonGroup,
    Range1d,
    RangeSlider,
    ResetTool,
    SaveTool,
    Select,
    TapTool,
    WheelZoomTool,
)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from attnatlas.analyze.head_types import TYPE_BADGES, TYPE_COLOURS
from attnatlas.app import colors
from attnatlas.app.data import AppData
from attnatlas.app.views.base import Host, Place, ViewSpec, guarded
from attnatlas.app.views.head_map import HeadMap
from attnatlas.app.views.head_scatter import HeadScatter
from attnatlas.render.raster import (
    FRAME,
    MARGIN,
    MAX_CELL_PX,
    MIN_CELL_PX,
    TARGET_WIDTH,
    base_cell_px,
    data_url,
    render_cell,
    render_grid,
    slot_order,
)

MAX_DETAIL_CELL_PX = 1400  # a zoomed cell is never rendered larger than this
SHARPEN = 1.25  # re-render when cells are shown this much larger than rendered
HAND_OVER = 1.2  # open the head once the view spans fewer cells than this in both directions
# Numbers in a cell's hover: faithfulness, then compare's metrics where stored.
HOVER = ("trustworthiness", "knn_kept", "entropy_mean", "first_share", "prev_share", "distance_mean",
         "induction", "duplicate", "previous_token", "sink", "broad", "local", "positional", "colour", "brightness")
ANY_TYPE = "any type"


def warm(data: AppData, model: str, method: str) -> None:
    """Render a model's default grid into AppData's shared cache, so the first visitor does not wait for it."""
    g = data.grid_layouts(model, method)
    L, H = g.done.shape
    px, columns = base_cell_px(H), slot_order(L, H)
    cells = data.grid_image(("cells", model, method, px), dict)
    data.grid_image(("grid", model, method, px, columns.tobytes()), lambda: data_url(render_grid(g, px, columns, cells).index))


# ---- the Bokeh view -------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    return f"{float(v):.{digits}f}" if v is not None and np.isfinite(v) else "\u2013"


class GridView:
    """Bokeh models and callbacks of one session's grid. `on_open(layer, head)` opens a head's view of the
    current model, `on_open_model(model, layer, head)` one of any model (from the head map); `on_error(message)`
    reports a failed callback in the session's status line."""

    def __init__(self, data: AppData, on_open: Callable[[int, int], None], on_error: Callable[[str], None],
                 on_open_model: Callable[[str, int, int], None] | None = None,
                 make_head_map: Callable[..., Any] | None = None, make_head_scatter: Callable[..., Any] | None = None):
        self.data = data
        # The head map and scatter are handed in: a standalone page (page.py) goes without them.
        self.make_head_map = make_head_map
        self.on_open = on_open
        self.on_error = on_error
        self.on_open_model = on_open_model or (lambda model, layer, head: on_open(layer, head))
        self.head_map: Any = None  # HeadMap, built when first shown
        self.make_head_scatter = make_head_scatter
        self.head_scatter: Any = None  # HeadScatter (head_scatter.py), built when first shown
        self.model: str | None = None
        self.method: str | None = None
        self.columns: np.ndarray = np.zeros((0, 0), np.int64)  # (layer, head) -> column shown
        self._cells: dict[tuple[int, int], np.ndarray] = {}  # base-size cell images of the current model/method
        self._quiet = False  # set while show() resets widgets: their change callbacks must not redraw
        self._cell_px = MIN_CELL_PX
        self._detail_key: tuple | None = None
        self._pending: tuple[float, float, float, float] | None = None  # the last view range asked for
        self._scheduled = False  # a detail render is queued on the server loop
        self._build()

    def _build(self) -> None:
        self.base_src = ColumnDataSource(data=dict(url=[], x=[], y=[], w=[], h=[]), name="grid_base")
        self.detail_src = ColumnDataSource(data=dict(url=[], x=[], y=[], w=[], h=[], cx=[], cy=[]), name="grid_detail")
        self.cell_src = ColumnDataSource(data=dict(left=[], right=[], bottom=[], top=[], layer=[], head=[], label=[],
                                                   frame=[], frame_w=[], fade=[]), name="grid_cells")
        self.label_src = ColumnDataSource(data=dict(x=[], y=[], text=[]), name="grid_labels")
        self.x_range, self.y_range = Range1d(0, 1, name="grid_x"), Range1d(0, 1, name="grid_y")
        self.wheel = WheelZoomTool(name="grid_wheel")
        box = BoxZoomTool(match_aspect=True)
        self.fig = figure(width=900, height=900, sizing_mode="scale_width", x_range=self.x_range, y_range=self.y_range,
                          tools=[PanTool(), self.wheel, box, ResetTool(), SaveTool()], toolbar_location="above",
                          name="grid_figure", min_border=4, x_axis_location="above")  # head labels in the first view
        self.fig.grid.visible = False
        self.fig.outline_line_color = None
        # Images first, then the cell frames (and the fade of filtered heads) on top of them.
        self.fig.image_url(url="url", x="x", y="y", w="w", h="h", anchor="top_left", source=self.base_src,
                           name="grid_image")
        # A sharpened cell covers its blurred base pixels: blank pixels of the detail image are transparent.
        self.fig.rect(x="cx", y="cy", width="w", height="h", source=self.detail_src, fill_color="#ffffff", line_color=None,
                      name="grid_detail_under")
        self.fig.image_url(url="url", x="x", y="y", w="w", h="h", anchor="top_left", source=self.detail_src,
                           name="grid_detail_image")
        cells = self.fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.cell_src,
                              fill_color="#ffffff", fill_alpha="fade", line_color="frame", line_width="frame_w",
                              name="grid_cell_quads")
        cells.nonselection_glyph = None
        cells.selection_glyph = None
        self.fig.text("x", "y", text="text", source=self.label_src, text_font_size="9px", text_color="#444",
                      text_baseline="top", x_offset=3, y_offset=2, name="grid_head_labels")
        # Head types: the most specific type's badge (or the type picked) in each cell's top-right corner, in its colour.
        self.badge_src = ColumnDataSource(data=dict(x=[], y=[], text=[], colour=[]), name="grid_type_badges")
        self.fig.text("x", "y", text="text", source=self.badge_src, text_font_size="10px", text_color="colour",
                      text_font_style="bold", text_baseline="top", text_align="right", x_offset=-3, y_offset=2,
                      name="grid_type_badge_text")
        self.hover = HoverTool(renderers=[cells], tooltips=[("head", "@label")])
        self.fig.add_tools(TapTool(renderers=[cells]), self.hover)
        self.cell_src.selected.on_change("indices", self._on_cell)
        self.fig.on_event(RangesUpdate, self._on_ranges)
        self.fig.on_change("inner_width", self._on_width)  # the browser reports the real size once drawn

        self.metric_select = Select(title="Head metric", width=220, name="grid_metric")
        # Both options act on a metric: shown once one is chosen, not checked while they would do nothing.
        self.metric_opts = CheckboxGroup(labels=["colour frames by the metric", "sort heads in each layer"], active=[0],
                                         name="grid_metric_opts", visible=False)
        self.metric_filter = RangeSlider(title="show heads with the metric in", start=0, end=1, value=(0, 1), step=0.001,
                                         width=280, visible=False, name="grid_filter")
        self.metric_select.on_change("value", self._on_metric)
        self.metric_opts.on_change("active", self._on_metric)
        self.metric_filter.on_change("value_throttled", self._on_filter)
        self.legend = Div(text="", disable_math=True, name="grid_legend")
        self.info = Div(text="", disable_math=True, name="grid_info")
        self.type_select = Select(title="Head type", width=170, options=[ANY_TYPE], value=ANY_TYPE, visible=False,
                                  name="grid_type")
        self.type_select.on_change("value", self._on_type)
        controls = row(self.type_select, self.metric_select, self.metric_opts, self.metric_filter, self.legend)
        self.mode = RadioButtonGroup(labels=["grid", "head map", "head scatter"], active=0, name="grid_mode")
        self.mode.on_change("active", self._on_mode)
        self.grid_box = column(self.info, controls, self.fig, sizing_mode="stretch_width", name="grid_box")
        self.panel = column(self.mode, self.grid_box, sizing_mode="stretch_width", name="grid_panel")

    # ---- model and method ---------------------------------------------------------------------------------------
    def show(self, model: str, method: str, cell_px: int | None = None) -> None:
        """Draw the grid of `model`'s `method` layouts (both already validated by AppData); `cell_px` renders the
        base image at that cell size instead of the dashboard's (a standalone page draws a smaller grid)."""
        self.model, self.method = model, method
        info = self.data.infos[model]
        L, H = info.n_layers, info.n_heads
        self.g = self.data.grid_layouts(model, method)
        self.table = self.data.head_table(model, method)
        self._cell_px = int(np.clip(cell_px, MIN_CELL_PX // 2, MAX_CELL_PX)) if cell_px else base_cell_px(H)
        # Cell images at the base size, shared by the sessions: re-ordering the grid only re-composes them.
        self._cells = self.data.grid_image(("cells", model, method, self._cell_px), dict)
        self.columns = slot_order(L, H)
        labels = self.data.head_metric_labels(model, method)
        self._quiet = True
        try:
            self.metric_select.options = [("none", "none")] + list(labels.items())
            present = self._types_present()
            self.type_select.options = [ANY_TYPE] + present
            self.type_select.visible = bool(present)
            if self.type_select.value not in present:
                self.type_select.value = ANY_TYPE
            if self.metric_select.value not in labels:
                self.metric_select.value = "none"
                self.metric_filter.visible = False
                self.metric_opts.visible = False
                self.legend.text = ""
        finally:
            self._quiet = False
        # Scale with the window width; the height follows the aspect, so tall grids scroll with the page.
        self.fig.width, self.fig.height = H * 100 + 60, L * 100 + 40
        tall = L * 100 > 1.1 * H * 100
        # A tall grid fills more than the window: the mouse wheel must scroll the page, not zoom.
        self.fig.toolbar.active_scroll = None if tall else self.wheel
        # Bounds first (BokehJS clamps a new end to the old bounds), and the reset tool's target with them
        # (BokehJS resets to the first range it saw unless told): nothing of the last model's ranges survives.
        self.x_range.update(bounds=(0, H), start=0, end=H, reset_start=0, reset_end=H)
        self.y_range.update(bounds=(0, L), start=0, end=L, reset_start=0, reset_end=L)
        self.fig.xaxis.ticker = FixedTicker(ticks=[h + 0.5 for h in range(H)])
        self.fig.yaxis.ticker = FixedTicker(ticks=[L - 1 - i + 0.5 for i in range(L)])
        self.fig.yaxis.major_label_overrides = {L - 1 - i + 0.5: f"L{i}" for i in range(L)}
        self._draw_cells()
        self.detail_src.data = dict(url=[], x=[], y=[], w=[], h=[], cx=[], cy=[])
        self._detail_key = None
        n_done = int(self.g.done.sum())
        scroll = " Scroll the page for more layers; the toolbar's wheel zoom zooms with the mouse wheel." if tall else ""
        self.info.text = (
            f"{html.escape(model)}: {L} layers \u00d7 {H} heads, {html.escape(method)} layouts of {n_done} heads, "
            f"each cell drawn from all {2 * self.g.n_queries:,} points of its head as "
            f'<span style="color:{colors.QUERY}">queries</span> and <span style="color:{colors.KEY}">keys</span> '
            "(darker: denser; where both overlap the colours mix). Click a cell, or zoom into it, to open the head."
            + scroll + self._types_note())
        if self.mode.active == 1:
            self.head_map.show(model, method)
        if self.mode.active == 2:
            self.head_scatter.show(model, method)

    @guarded
    def _on_mode(self, attr: str, old: int, new: int) -> None:
        """Grid or head map in the same tab; the head map is built the first time it is asked for."""
        if new in (1, 2):  # the head map, or every head's scores against each other
            name = "head_map" if new == 1 else "head_scatter"
            panel = getattr(self, name)
            if panel is None:
                make = getattr(self, "make_" + name)
                if make is None:
                    self.on_error(f"the {name.replace('_', ' ')} is not available in this view")
                    self.mode.active = 0
                    return
                panel = make(self.data, on_open=self.on_open_model, on_error=self.on_error)
                setattr(self, name, panel)
            panel.show(self.model, self.method)
            self.panel.children = [self.mode, panel.panel]
        else:
            self.panel.children = [self.mode, self.grid_box]

    def _metric(self) -> str | None:
        v = self.metric_select.value
        return v if v in self.table.columns and v not in ("layer", "head") else None

    def _draw_cells(self) -> None:
        """Base image, frames, hover fields and labels for the current order and metric."""
        g, L, H = self.g, *self.g.done.shape
        metric = self._metric()
        sort = metric is not None and 1 in self.metric_opts.active
        values = self.table[metric].to_numpy(np.float64).reshape(L, H) if metric else None
        kind = self._type()
        type_sort = metric is None and kind is not None and 1 in self.metric_opts.active
        sort = sort or type_sort
        self.columns = slot_order(L, H, values if metric is not None and sort else
                                  (self._type_confidence(kind).reshape(L, H) if type_sort else None))
        key = ("grid", self.model, self.method, self._cell_px, self.columns.tobytes())
        url = self.data.grid_image(key, lambda: data_url(render_grid(g, self._cell_px, self.columns, self._cells).index))
        self.base_src.data = dict(url=[url], x=[0.0], y=[float(L)], w=[float(H)], h=[float(L)])
        layers, heads = np.repeat(np.arange(L), H), np.tile(np.arange(H), L)
        cols = self.columns.reshape(-1).astype(float)
        frame, frame_w = [FRAME] * (L * H), [1.0] * (L * H)
        if metric is not None and 0 in self.metric_opts.active:
            frame, frame_w = self._frame_colours(values.reshape(-1))
        labels = self.data.head_metric_labels(self.model, self.method)
        shown = {k: v for k, v in labels.items() if k in HOVER}  # the rest are in the metric menu
        hover = {k: [_fmt(v) for v in self.table[k]] for k in shown}
        self.cell_src.data = dict(
            left=cols, right=cols + 1, bottom=(L - 1 - layers).astype(float), top=(L - layers).astype(float),
            layer=layers, head=heads, label=[f"L{a}H{b}" + ("" if g.done[a, b] else " (no layout)") for a, b in zip(layers, heads)],
            frame=frame, frame_w=frame_w, fade=self._fade(values), **{f"m_{k}": v for k, v in hover.items()},
            **({"type_text": [t or "\u2013" for t in self.table["type_text"]]} if "type_text" in self.table else {}))
        self.hover.tooltips = ([("head", "@label")] + ([("types", "@type_text")] if "type_text" in self.table else [])
                               + [(lab, f"@m_{k}") for k, lab in shown.items()])
        self._draw_badges(cols, layers)
        if sort:  # columns no longer are head numbers: each cell says which head it is
            self.label_src.data = dict(x=cols, y=(L - layers).astype(float), text=[f"H{b}" for b in heads])
            self.fig.xaxis.major_label_overrides = {h + 0.5: f"#{h + 1}" for h in range(H)}
        else:
            self.label_src.data = dict(x=[], y=[], text=[])
            self.fig.xaxis.major_label_overrides = {h + 0.5: f"H{h}" for h in range(H)}

    def _frame_colours(self, values: np.ndarray) -> tuple[list[str], list[float]]:
        finite = values[np.isfinite(values)]
        if not len(finite):
            return [FRAME] * len(values), [1.0] * len(values)
        lo, hi = float(finite.min()), float(finite.max())
        t = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        pal = Viridis256
        frame = [pal[int(round(x * 255))] if np.isfinite(x) else FRAME for x in t]
        name = html.escape(self.data.head_metric_labels(self.model, self.method).get(self.metric_select.value, ""))
        swatch = lambda c, label: (f'<span style="display:inline-block;width:12px;height:12px;border:3px solid {c};'  # noqa: E731
                                   f'margin:0 4px 0 10px;vertical-align:middle"></span>{label}')
        self.legend.text = f"frames: {name}<br>" + swatch(pal[0], f"{lo:.3g}") + swatch(pal[-1], f"{hi:.3g}")
        return frame, [3.0 if np.isfinite(x) else 1.0 for x in t]

    def _fade(self, values: np.ndarray | None) -> list[float]:
        """0 for shown heads, 0.85 (a white veil) for heads outside the filter range or not of the chosen type."""
        n = self.g.done.size
        keep = np.ones(n, bool)
        kind = self._type()
        if kind is not None:
            keep &= self._type_confidence(kind) > 0
        if values is not None and self.metric_filter.visible:
            a, b = self.metric_filter.value
            v = values.reshape(-1)
            keep &= np.isfinite(v) & (v >= a - 1e-12) & (v <= b + 1e-12)
        return [0.0 if k else 0.85 for k in keep]

    # ---- head types (attnatlas analyze --head-types) ------------------------------------------------------------
    def _types_present(self) -> list[str]:
        if "types" not in self.table:
            return []
        have = {t for ts in self.table["types"] for t in str(ts).split(",") if t}
        return [t for t in TYPE_BADGES if t in have]

    def _types_note(self) -> str:
        present = self._types_present()
        if not present:
            return ""
        keys = " ".join(f'<b style="color:{TYPE_COLOURS[t]}">{TYPE_BADGES[t]}</b> {html.escape(t)}' for t in present)
        return (f"<br>Badges: each head's most specific type ({keys}); hover a cell for its scores, pick a type to show "
                "only its heads (with 'sort heads', strongest first).")

    def _type(self) -> str | None:
        v = self.type_select.value
        return v if v != ANY_TYPE and v in self._types_present() else None

    def _type_confidence(self, kind: str) -> np.ndarray:
        """(layer * head,) the confidence of type `kind` per head, 0 where the head is not of that type."""
        out = np.zeros(len(self.table))
        for i, text in enumerate(self.table["type_text"]):
            for part in str(text).split(", "):
                name, _, conf = part.rpartition(" ")
                if name == kind:
                    out[i] = float(conf)
        return out

    def _draw_badges(self, cols: np.ndarray, layers: np.ndarray) -> None:
        if "type" not in self.table:
            self.badge_src.data = dict(x=[], y=[], text=[], colour=[])
            return
        L = self.g.done.shape[0]
        kinds = self.table["type"].astype(str).to_numpy().copy()
        picked = self._type()
        if picked is not None:  # the picked type's badge on the heads that have it
            kinds[self._type_confidence(picked) > 0] = picked
        has = kinds != ""
        self.badge_src.data = dict(x=(cols + 1)[has], y=(L - layers).astype(float)[has],
                                   text=[TYPE_BADGES.get(k, k[:4].upper()) for k in kinds[has]],
                                   colour=[TYPE_COLOURS.get(k, "#333333") for k in kinds[has]])

    @guarded
    def _on_type(self, attr: str, old: Any, new: Any) -> None:
        if self.model is None or self._quiet:
            return
        self._draw_cells()
        self._detail_key = None
        self._refresh_detail()

    @guarded
    def _on_metric(self, attr: str, old: Any, new: Any) -> None:
        if self.model is None or self._quiet:
            return
        metric = self._metric()
        self.metric_opts.visible = metric is not None
        if metric is None:
            self.metric_filter.visible = False
            self.legend.text = ""
        else:
            v = self.table[metric].to_numpy(np.float64)
            v = v[np.isfinite(v)]
            lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
            hi = hi if hi > lo else lo + 1e-6
            self.metric_filter.update(start=lo, end=hi, value=(lo, hi), step=(hi - lo) / 200,
                                      title=f"show heads with {self.data.head_metric_labels(self.model, self.method)[metric]} in",
                                      visible=True)
            if 0 not in self.metric_opts.active:
                self.legend.text = ""
        self._draw_cells()
        self._detail_key = None
        self._refresh_detail()

    @guarded
    def _on_filter(self, attr: str, old: Any, new: Any) -> None:
        metric = self._metric()
        if metric is None:
            return
        L, H = self.g.done.shape
        self.cell_src.data.update(fade=self._fade(self.table[metric].to_numpy(np.float64).reshape(L, H)))

    @guarded
    def _on_cell(self, attr: str, old: list[int], new: list[int]) -> None:
        if not new:
            return
        i = int(new[0])
        self.cell_src.selected.indices = []  # so the same cell can be clicked again
        layer, head = int(self.cell_src.data["layer"][i]), int(self.cell_src.data["head"][i])
        self.on_open(layer, head)

    # ---- zoom --------------------------------------------------------------------------------------------------
    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(layer, head) of the cell under data point (x, y), in the current order."""
        L, H = self.g.done.shape
        c, r = int(np.floor(x)), L - 1 - int(np.floor(y))
        if not (0 <= c < H and 0 <= r < L):
            return None
        hits = np.flatnonzero(self.columns[r] == c)
        return (r, int(hits[0])) if len(hits) else None

    @guarded
    def _on_ranges(self, event: RangesUpdate) -> None:
        if self.model is None or None in (event.x0, event.x1, event.y0, event.y1):
            return
        x0, x1, y0, y1 = float(event.x0), float(event.x1), float(event.y0), float(event.y1)
        if x1 - x0 < HAND_OVER and y1 - y0 < HAND_OVER:
            cell = self.cell_at((x0 + x1) / 2, (y0 + y1) / 2)
            if cell is not None:
                self.reset_view()
                self.on_open(*cell)
                return
        self._pending = (x0, x1, y0, y1)
        doc = self.fig.document
        if doc is None or doc.session_context is None:
            self._refresh_detail()  # no server loop (tests, notebooks): render now
        elif not self._scheduled:
            self._scheduled = True  # wheel zooms send bursts of events: render the last one, once
            doc.add_timeout_callback(self._flush, 60)

    @guarded
    def _on_width(self, attr: str, old: Any, new: Any) -> None:
        """A window wider than the base image was made for: sharpen what is shown."""
        if self.model is None or not new:
            return
        self._pending = (self.x_range.start, self.x_range.end, self.y_range.start, self.y_range.end)
        self._refresh_detail()

    def _flush(self) -> None:
        self._scheduled = False
        self._refresh_detail()

    def reset_view(self) -> None:
        L, H = self.g.done.shape
        self.x_range.update(start=0, end=H)
        self.y_range.update(start=0, end=L)
        self._pending = (0.0, float(H), 0.0, float(L))
        self.detail_src.data = dict(url=[], x=[], y=[], w=[], h=[], cx=[], cy=[])
        self._detail_key = None

    @guarded
    def _refresh_detail(self) -> None:
        if self._pending is None:
            return
        x0, x1, y0, y1 = self._pending
        width = self.fig.inner_width or TARGET_WIDTH
        self.render_detail(x0, x1, y0, y1, int(width))

    def render_detail(self, x0: float, x1: float, y0: float, y1: float, px_width: int) -> int:
        """Re-render the cells visible in [x0, x1] x [y0, y1] at the size they are shown, when that is
        larger than the base image's; returns how many cells were rendered."""
        L, H = self.g.done.shape
        px_per_cell = px_width / max(x1 - x0, 1e-9)
        inner = int(min(round(px_per_cell * (1 - 2 * MARGIN)), MAX_DETAIL_CELL_PX))
        base_inner = self._cell_px - 2 * max(1, int(round(MARGIN * self._cell_px)))
        if inner < SHARPEN * base_inner:
            if self._detail_key is not None:
                self.detail_src.data = dict(url=[], x=[], y=[], w=[], h=[], cx=[], cy=[])
                self._detail_key = None
            return 0
        c0, c1 = max(0, int(np.floor(x0))), min(H, int(np.ceil(x1)))
        r0, r1 = max(0, L - int(np.ceil(y1))), min(L, L - int(np.floor(y0)))  # rows, layer 0 at the top
        key = (self.model, self.method, c0, c1, r0, r1, inner, self.columns.tobytes())
        if key == self._detail_key:
            return 0
        urls, xs, ys = [], [], []
        for r in range(r0, r1):
            for c in range(c0, c1):
                hits = np.flatnonzero(self.columns[r] == c)
                if not len(hits):
                    continue
                img = render_cell(self.g, r, int(hits[0]), inner, inner)
                if not img.any():
                    continue
                urls.append(data_url(img))
                xs.append(c + MARGIN)
                ys.append(L - r - MARGIN)
        n = len(urls)
        w = [1 - 2 * MARGIN] * n
        half = (1 - 2 * MARGIN) / 2
        self.detail_src.data = dict(url=urls, x=xs, y=ys, w=w, h=w, cx=[x + half for x in xs], cy=[y - half for y in ys])
        self._detail_key = key
        return n


class GridTab:
    """The grid with its head map and head scatter, following the session's model and projection."""

    def __init__(self, data: AppData, place: Place, on_open: Callable[[int, int], None],
                 on_open_model: Callable[[str, int, int], None], on_error: Callable[[str], None]):
        self.place = place
        self.grid = GridView(data, on_open=on_open, on_error=on_error, on_open_model=on_open_model, make_head_map=HeadMap,
                             make_head_scatter=HeadScatter)
        self.root = self.grid.panel
        self.update()

    def update(self) -> None:
        """Draw the place's model and projection."""
        self.grid.show(self.place.model, self.place.method)


def build(data: AppData, place: Place, host: Host) -> GridTab:
    return GridTab(data, place, on_open=host.open_head, on_open_model=host.open_model_head, on_error=host.report_error)


VIEW = ViewSpec("grid", "All heads", build, eager=True)
