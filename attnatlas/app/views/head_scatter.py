"""The head scatter (HeadVis's first view): every head of a model as one point, placed by any two of its scores
(`attnatlas analyze --head-types`, compare's metrics, layout faithfulness), coloured by its head type.
Hovering a point shows the head's grid thumbnail and scores; clicking it opens the head.

`HeadScatter(data, on_open, on_error)` builds the Bokeh models; the grid view places `.panel` and calls
`.show(model, method)`. Reads stored tables only (no torch).
"""

from __future__ import annotations

import html
from collections.abc import Callable

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, HoverTool, Select, TapTool
from bokeh.plotting import figure

from attnatlas.analyze.head_types import TYPE_COLOURS
from attnatlas.app.data import AppData
from attnatlas.app.views.base import HeadPanel
from attnatlas.app.views.head_map import thumbnails

UNTYPED = "#e4e4e4"  # lighter than the sink type's grey
DEFAULT_AXES = (("induction", "previous_token"), ("sink", "broad"), ("local", "positional"),
                ("colour", "brightness"), ("entropy_mean", "first_share"))
TOOLTIP = """
<div style="max-width:260px">
  <img src="@thumb" width="96" height="96" style="border:1px solid #ccc"><br>
  <b>@label</b> <span style="color:@colour">@type_text</span><br>
  @xname: @x{0.000}<br>@yname: @y{0.000}
</div>
"""


class HeadScatter(HeadPanel):
    """Bokeh models and callbacks of one session's head scatter. `on_open(model, layer, head)` opens a head."""

    def __init__(self, data: AppData, on_open: Callable[[str, int, int], None], on_error: Callable[[str], None]):
        super().__init__(data, on_open, on_error)
        self.src = ColumnDataSource(data=dict(x=[], y=[], layer=[], head=[], label=[], thumb=[], colour=[],
                                              type_text=[], xname=[], yname=[]), name="head_scatter_points")
        self.fig = figure(width=760, height=620, name="head_scatter_figure", tools="pan,wheel_zoom,box_zoom,reset,save",
                          toolbar_location="above")
        dots = self.fig.scatter("x", "y", source=self.src, size=11, fill_color="colour", line_color="#333333",
                                fill_alpha=0.85, name="head_scatter_dots")
        dots.nonselection_glyph = None
        dots.selection_glyph = None
        self.fig.add_tools(TapTool(renderers=[dots]), HoverTool(renderers=[dots], tooltips=TOOLTIP))
        self.src.selected.on_change("indices", self._on_tap)
        self.x_select = Select(title="x", width=220, name="head_scatter_x")
        self.y_select = Select(title="y", width=220, name="head_scatter_y")
        self.x_select.on_change("value", self._on_change)
        self.y_select.on_change("value", self._on_change)
        self.legend = Div(text="", disable_math=True, name="head_scatter_legend")
        self.info = Div(text="", disable_math=True, name="head_scatter_info")
        self.panel = column(self.info, row(self.x_select, self.y_select, self.legend), self.fig,
                            sizing_mode="stretch_width", name="head_scatter_panel")

    def show(self, model: str, method: str) -> None:
        self.model, self.method = model, method
        table = self.data.head_table(model, method)
        labels = self.data.head_metric_labels(model, method)
        usable = {k: v for k, v in labels.items() if np.isfinite(table[k].to_numpy(np.float64)).any()}
        options = list(usable.items())
        x, y = next(((a, b) for a, b in DEFAULT_AXES if a in usable and b in usable),
                    (options[0][0], options[min(1, len(options) - 1)][0]) if options else ("", ""))
        self._quiet = True
        try:
            self.x_select.options = options
            self.y_select.options = options
            if self.x_select.value not in usable:
                self.x_select.value = x
            if self.y_select.value not in usable:
                self.y_select.value = y
        finally:
            self._quiet = False
        self._draw()

    def _draw(self) -> None:
        model, method = self.model, self.method
        table = self.data.head_table(model, method)
        labels = self.data.head_metric_labels(model, method)
        xk, yk = self.x_select.value, self.y_select.value
        if xk not in labels or yk not in labels:
            self.src.data = {k: [] for k in self.src.data}
            self.info.text = (f"{html.escape(model)} has no head scores to plot; run <code>attnatlas analyze ATLAS "
                              f"--model {html.escape(model)} --head-types</code>.")
            return
        kinds = table["type"].astype(str).tolist() if "type" in table else [""] * len(table)
        texts = table["type_text"].astype(str).tolist() if "type_text" in table else [""] * len(table)
        x, y = table[xk].to_numpy(np.float64), table[yk].to_numpy(np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        thumbs = thumbnails(self.data, model, method)
        idx = np.flatnonzero(ok)
        self.src.data = dict(
            x=x[idx], y=y[idx], layer=table["layer"].to_numpy()[idx].tolist(), head=table["head"].to_numpy()[idx].tolist(),
            label=[f"L{int(table['layer'].iloc[i])}H{int(table['head'].iloc[i])}" for i in idx],
            thumb=[thumbs[i] for i in idx], colour=[TYPE_COLOURS.get(kinds[i], UNTYPED) for i in idx],
            type_text=[texts[i] or "no type" for i in idx], xname=[labels[xk]] * len(idx), yname=[labels[yk]] * len(idx))
        self.fig.xaxis.axis_label, self.fig.yaxis.axis_label = labels[xk], labels[yk]
        present = [k for k in TYPE_COLOURS if k in set(kinds)]
        self.legend.text = " ".join(f'<span style="color:{TYPE_COLOURS[k]}">\u25cf</span> {html.escape(k)}'
                                    for k in present) + (f' <span style="color:{UNTYPED}">\u25cf</span> no type'
                                                         if "" in kinds else "")
        missing = int((~ok).sum())
        self.info.text = (f"{html.escape(model)}: {len(idx)} heads by {html.escape(labels[xk])} and "
                          f"{html.escape(labels[yk])}, coloured by their most specific head type"
                          + (f" ({missing} heads without both scores left out)" if missing else "")
                          + ". Hover a point for the head's thumbnail, click it to open the head.")
