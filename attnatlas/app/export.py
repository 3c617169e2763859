"""Standalone HTML of one head: fresh Bokeh models rendered with inlined BokehJS, so the file opens offline."""

from __future__ import annotations

import html

import numpy as np
from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div, LinearColorMapper
from bokeh.plotting import figure
from bokeh.resources import INLINE
from bokeh.transform import transform

from attnatlas.app import colors
from attnatlas.app.data import AppData
from attnatlas.app.hover import nearest_hover
from attnatlas.attention import layout_note
from attnatlas.render.safe import plain, seal


def head_layout(data: AppData, model: str, method: str, layer: int, head: int, mode: str = "kind"):
    """Fresh Bokeh models of one head (scatter with escaped hover and a caption): for export and notebooks."""
    model = data.model(model)
    method = data.method(model, method)
    layer, head = data.clamp(model, layer, head)
    t = data.tokens(model, method)
    h = data.head(model, method, layer, head)
    index, palette, legend = colors.indexed(mode, t.columns, h.norm)  # patch colours too, as the dashboard shows them
    values = index.astype(np.float32) + 0.5
    cols = {k: t.columns[k] for k in ("token", "ctx", "position", "kind", "sequence", "placed") if k in t.columns}
    src = ColumnDataSource(data=dict(x=h.x, y=h.y, norm=h.norm, c=values, stack=h.stack, **cols))
    fig = figure(width=800, height=760, output_backend="webgl", tools="pan,wheel_zoom,box_zoom,reset,save",
                 match_aspect=True)
    fig.title.text = plain(f"{model} L{layer}H{head} ({method})")
    mapper = LinearColorMapper(palette=list(palette), low=0, high=len(palette))
    r = fig.scatter("x", "y", source=src, size=4, fill_alpha=0.6, line_color=None, fill_color=transform("c", mapper))
    fig.add_tools(nearest_hover(r, hide_when_selected=False))
    qk_only = layout_note(data.atlas, model)
    note = Div(disable_math=True, text=f"<b>{html.escape(model)}</b> layer {layer}, head {head}, {html.escape(method)}; "
                    f"trustworthiness {h.trust:.3f}<br>{legend}" + (f"<br><i>{html.escape(qk_only)}</i>" if qk_only else ""))
    return column(note, fig)


def head_html(data: AppData, model: str, method: str, layer: int, head: int, mode: str = "kind") -> str:
    """A standalone page of one head with BokehJS inlined, so it opens offline."""
    model = data.model(model)
    layer, head = data.clamp(model, layer, head)
    layout = head_layout(data, model, method, layer, head, mode)
    seal(layout)  # a saved page is opened later, by anyone: nothing in it may typeset or run
    return file_html(layout, INLINE, title=f"attnatlas {model} L{layer}H{head}")
