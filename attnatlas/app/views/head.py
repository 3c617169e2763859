"""The single-head view: one head's query/key layout as a large scatter, with colour modes, search over the
corpus text, and a click that shows where the clicked token attends.

What it shows is meant to be read at face value:
- search matches are drawn on top (their own renderer, outlined, each point once) and every other point is
  greyed, so a stack of non-matches cannot pass for a match;
- the selection glyph and the match layer follow the current colour mapping;
- the tooltip is one entry, the nearest point, with how many points sit at its spot and how many others are
  under the pointer; it hides while a point is selected;
- attention lines are drawn from a stated weight up, and lines and shading use the weight itself (0-1).

The data path per head: `AppData.head` (coordinates, norms, stack counts) and `AppData.tokens` (per-point
columns, sent once per model and method) fill `src`; further per-point columns (e.g. a "your text" overlay)
go into `AppData.tokens` or into a renderer of their own, like `match_src`.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

import numpy as np
from bokeh.events import RangesUpdate
from bokeh.layouts import column, row
from bokeh.models import (
    Button,
    CheckboxGroup,
    ColumnDataSource,
    CustomJS,
    Div,
    HoverTool,
    LinearColorMapper,
    RadioButtonGroup,
    Range1d,
    Select,
    TapTool,
    TextInput,
)
from bokeh.plotting import figure
from bokeh.transform import transform

from attnatlas.app import colors, search
from attnatlas.app.data import AppData
from attnatlas.app.hover import nearest_hover
from attnatlas.app.similar import similar_heads_html
from attnatlas.app.top_sequences import TopSequences
from attnatlas.app.views.base import Host, Place, ViewSpec, guarded, layout_note_div, show_layout_note

BASE_ALPHA = 0.6
DIM_ALPHA = 0.06  # non-matches while searching: grey, so even a stack of 120 reads as grey, not as a match
DIM_COLOUR = "#9a9a9a"
MATCH_SIZE = 7.0
MAX_LIST = 20  # search results listed
MAX_THUMBS = 300  # image patches drawn as thumbnails when at most this many are in view
THUMB_SPAN = 25  # a thumbnail is 1/25 of the visible range wide and high
CUT_PREVIEW_CHARS = 200  # characters shown of the part of a truncated sequence the model did not see
LINE_MIN_WEIGHT = 0.05  # attention lines are drawn from this weight up; weaker ones would only add noise
SHADE = (217, 69, 142)
# The controls column and "Your text" beside a 720 px figure fit a 1600 px window; every Div has a width and
# wraps long words, so no text (a long match, an error) widens the column and pushes the page sideways.
PANEL_W = 410
WRAP = {"overflow-wrap": "anywhere"}  # the key colour, as the shading of weights in the sequence panel
DOWNLOAD_JS = """
const d = cb_obj.data
if (!d.html || d.html.length == 0) { return }
const blob = new Blob([d.html[0]], {type: 'text/html'})
const a = document.createElement('a')
a.href = URL.createObjectURL(blob)
a.download = d.name[0]
document.body.appendChild(a); a.click(); a.remove()
setTimeout(() => URL.revokeObjectURL(a.href), 1000)
cb_obj.data = {html: [], name: []}  // free the copy kept in the page
"""
LINE_FILTER_JS = """
const {vars} = cb_data
const gv = vars.glyph_view, i = vars.index
if (gv == null || gv.sx0 == null) { return true }
const dx = gv.sx0[i] - vars.sx, dy = gv.sy0[i] - vars.sy
return dx * dx + dy * dy > 14 * 14
"""
EMPTY_LINES = dict(x0=[], y0=[], x1=[], y1=[], alpha=[], width=[], weight=[], token=[])
EMPTY_HEAT = dict(left=[], right=[], bottom=[], top=[], alpha=[], line=[], lw=[])
EMPTY_THUMBS = dict(image=[], x=[], y=[], cx=[], cy=[], dw=[], dh=[], border=[])


def line_alpha(weight: np.ndarray) -> np.ndarray:
    """Opacity of an attention line on the absolute 0-1 weight scale (never relative to the strongest)."""
    return (0.25 + 0.75 * np.clip(np.asarray(weight, np.float64), 0.0, 1.0)).astype(np.float32)


def line_width(weight: np.ndarray) -> np.ndarray:
    return (1.0 + 3.0 * np.clip(np.asarray(weight, np.float64), 0.0, 1.0)).astype(np.float32)


def attention_legend_html() -> str:
    r, g, b = SHADE
    bar = (f'<span style="display:inline-block;width:90px;height:10px;vertical-align:middle;margin:0 4px;'
           f'border:1px solid #ccc;background:linear-gradient(to right, rgba({r},{g},{b},0), rgba({r},{g},{b},1))"></span>')
    return (f"<small><b>Attention</b> (stored top-k weights): lines for weights \u2265 {LINE_MIN_WEIGHT:g}, darker and "
            f"wider with the weight; shading on the absolute scale 0{bar}1. Hover a line or a token for its weight.</small>")


def sequence_html(data: Any, model: str, seq: int, row_: int, weights: dict[int, float]) -> str:
    """Escaped HTML of one sequence: each token shaded by its weight (0-1, absolute), the clicked one outlined.
    Byte-level pieces sharing one character's offsets show that character once; a truncated sequence's cut
    part is greyed, shortened and marked; a --chunk window says where it lies in its document."""
    toks = data.sequence_tokens(model, seq)
    info = data.sequence_info(model, seq)
    text = str(info.get("text", ""))
    r_, g_, b_ = SHADE
    out, cursor = [], 0
    has_offsets = "char_start" in toks
    for r, tok, special, a, b in zip(toks["row"], toks["token"], toks["is_special"],
                                     toks["char_start"] if has_offsets else [-1] * len(toks),
                                     toks["char_end"] if has_offsets else [-1] * len(toks)):
        w = min(max(weights.get(int(r), 0.0), 0.0), 1.0)
        plain_piece = has_offsets and a is not None and a >= 0 and b >= a and not special
        style = colors.token_style(f"{r_},{g_},{b_}", w, not plain_piece)
        if int(r) == row_:
            style += "outline:2px solid #000;"
        title = f' title="weight {weights[int(r)]:.3f}"' if int(r) in weights else ""
        if plain_piece:
            if a > cursor:
                out.append(html.escape(text[cursor:a]))
            # Byte-level pieces of one character share its offsets: show each character once.
            piece = text[max(a, cursor):b]
            cursor = max(cursor, b)
            if not piece:
                continue
        else:
            piece = str(tok)
            out.append(" ")
        out.append(f'<span style="{style}"{title}>{html.escape(piece)}</span>')
    rest = text[cursor:] if has_offsets else ""
    if rest and bool(info.get("truncated", False)):
        # The model never saw this part: marked, greyed and shortened, so a long line cannot stretch the page.
        shown = rest[:CUT_PREVIEW_CHARS]
        more = len(rest) - len(shown)
        dots = "\u2026" if more else ""
        out.append(f'<span style="color:#999;border-left:2px solid #c00;padding-left:3px" title="not seen by the model">'
                   f'\u2702 cut at the token limit: {html.escape(shown)}{dots}</span>'
                   + (f' <i style="color:#999">({more:,} more characters cut)</i>' if more else ""))
    elif rest:
        out.append(html.escape(rest))
    where = ""
    if int(info.get("n_windows", 1) or 1) > 1:
        a = int(info.get("doc_char_start", 0))
        where = (f'<div style="color:#555"><i>window {int(info["window"]) + 1} of {int(info["n_windows"])} of document '
                 f'{int(info["document"])}: its characters {a:,}\u2013{a + len(text):,}</i></div>')
    return where + '<div style="line-height:1.7;white-space:pre-wrap;overflow-wrap:anywhere">' + "".join(out) + "</div>"


def image_name_html(path: str) -> str:
    """An image's file as its name, the full path on hover: the same form wherever an image is named."""
    name = path.rstrip("/").rsplit("/", 1)[-1] or path  # "/" only: a backslash may be part of a file name
    return f'<span title="{html.escape(path)}">{html.escape(name)}</span>'


def attention_of(data: AppData, model: str, layer: int, head: int, row_: int, is_query: bool) -> dict[int, float]:
    """Token row -> stored top-k weight, of the keys a query attends to or the queries that attend to a key."""
    if not data.has_attention(model):
        return {}
    idx, w = data.topk(model, layer, head)
    if is_query:
        return {int(r): float(v) for r, v in zip(idx[row_], w[row_]) if r >= 0 and v > 0}
    qs, ks = np.nonzero(idx == row_)
    return {int(r): float(v) for r, v in zip(qs, w[qs, ks]) if v > 0}


class HeadView:
    """The single-head tab of one session. `place` is shared with the dashboard; `on_change(what)` tells it
    that the head ("head") or the clicked point ("selection") changed; `on_error` reports a failure."""

    def __init__(self, data: AppData, place: Place, on_change: Callable[[str], None], on_error: Callable[[str], None]):
        self.data = data
        self.place = place
        self.on_change = on_change
        self.report_error = on_error
        self._busy = False
        self._loaded_static: tuple[str, str] | None = None  # (model, method) whose token columns are in self.src
        self._colour_index = np.zeros(0, np.int32)  # palette index of every point in the current colour mode
        self._palette: tuple = (colors.QUERY, colors.KEY)
        self._matches = np.zeros(0, np.int64)  # point indices of the current search matches
        self._search_failed = False  # the search box holds a query that cannot run: nothing is greyed
        self._build()

    # ---- construction ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        empty = {k: [] for k in ("x", "y", "norm", "c", "size", "alpha", "token", "ctx", "position", "kind", "sequence",
                                 "stack", "placed")}
        self.src = ColumnDataSource(data=empty, name="head_points")
        self.line_src = ColumnDataSource(data=dict(EMPTY_LINES), name="attention_line_data")
        self.match_src = ColumnDataSource(data=dict(x=[], y=[], c=[], token=[]), name="search_match_points")
        self.thumb_src = ColumnDataSource(data=dict(EMPTY_THUMBS), name="thumbnails")
        self.xr, self.yr = Range1d(0, 1), Range1d(0, 1)
        self.fig = figure(width=720, height=680, output_backend=self.data.backend, x_range=self.xr, y_range=self.yr,
                          tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above", name="head_figure")
        self.mapper = LinearColorMapper(palette=[colors.QUERY, colors.KEY], low=0, high=1)
        # One fill mapping for good: colour modes and search greying change the column "c" and the palette only.
        fill = transform("c", self.mapper)
        self.points = self.fig.scatter("x", "y", source=self.src, size="size", fill_alpha="alpha", line_color=None,
                                       fill_color=fill, name="head_scatter")
        self.points.selection_glyph = self.points.glyph.clone(line_color="black", line_width=2, fill_alpha=1.0)
        self.points.nonselection_glyph = None
        self.lines = self.fig.segment("x0", "y0", "x1", "y1", source=self.line_src, line_color="#333", line_alpha="alpha",
                                      line_width="width", name="attention_lines")
        # Matches on top of everything, one point each, outlined: their count is what the eye sees.
        self.match_points = self.fig.scatter("x", "y", source=self.match_src, size=MATCH_SIZE, fill_alpha=1.0,
                                             line_color="#000", line_width=1.2, fill_color=fill, name="search_matches")
        self.fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.thumb_src, name="thumbnails")
        self.fig.rect(x="cx", y="cy", width="dw", height="dh", source=self.thumb_src, fill_color=None, line_color="border",
                      line_width=2, name="thumbnail_borders")
        # One line's weight at a time, and none at the clicked point itself, where every line starts.
        line_hover = HoverTool(renderers=[self.lines], tooltips=[("weight", "@weight{0.000}"), ("to", "@token")],
                               name="line_hover", limit=1, filters={"x0": CustomJS(code=LINE_FILTER_JS)})
        self.fig.add_tools(nearest_hover(self.points), line_hover, TapTool(renderers=[self.points]))
        self.src.selected.on_change("indices", self._on_tap)
        self.fig.on_event(RangesUpdate, self._on_ranges)

        self.head_title = Div(text="", width=PANEL_W, name="head_title", disable_math=True)  # long notes wrap
        self.layout_note = layout_note_div("layout_note", PANEL_W)  # the layout is of q.k: said where attention is more
        self.similar = Div(text="", width=PANEL_W, name="similar_heads", disable_math=True, styles=WRAP)
        self.layer_select = Select(title="Layer", width=80, name="layer_select")
        self.head_select = Select(title="Head", width=80, name="head_select")
        self.layer_select.on_change("value", self._on_layer_head)
        self.head_select.on_change("value", self._on_layer_head)
        nav = {}
        for name, label in (("prev_layer", "\u25b2 layer"), ("next_layer", "\u25bc layer"), ("prev_head", "\u25c0 head"), ("next_head", "head \u25b6")):
            b = Button(label=label, width=80, name=name)
            b.on_click(functools.partial(self.step, name))
            nav[name] = b
        self.colour_select = Select(title="Colour", width=150, name="colour_select")
        self.colour_select.on_change("value", self._on_colour)
        self.size_norm = CheckboxGroup(labels=["size by norm"], active=[])
        self.size_norm.on_change("active", self._on_colour)
        self.legend = Div(text="", width=PANEL_W, name="colour_legend", disable_math=True)
        self.search = TextInput(title="Search the text", placeholder="word or pattern, Enter", width=190, name="search")
        self.search_mode = RadioButtonGroup(labels=list(search.MODES), active=0, name="search_mode")
        self.search.on_change("value", self._on_search)
        self.search_mode.on_change("active", self._on_search)
        self.search_count = Div(text="", width=PANEL_W, name="search_count", disable_math=True, styles=WRAP)
        self.search_results = Div(text="", width=PANEL_W, name="search_results", disable_math=True, styles=WRAP)
        self.attention_legend = Div(text=attention_legend_html(), width=PANEL_W, name="attention_legend", disable_math=True)
        self.sequence = Div(text="Click a point to see its sequence and where it attends.", width=PANEL_W, name="sequence_panel",
                            disable_math=True, styles=WRAP)
        self.img_src = ColumnDataSource(data=dict(image=[], x=[], y=[], dw=[], dh=[]))
        self.heat_src = ColumnDataSource(data=dict(EMPTY_HEAT), name="heat_map")
        self.img_fig = figure(width=320, height=320, tools="save", toolbar_location="above", x_range=Range1d(0, 1),
                              y_range=Range1d(0, 1), visible=False, name="image_figure")
        self.img_fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.img_src)
        self.img_fig.quad(left="left", right="right", bottom="bottom", top="top", source=self.heat_src, fill_color="#ff2020",
                          fill_alpha="alpha", line_color="line", line_width="lw", line_alpha=0.9)
        self.img_fig.axis.visible = False
        self.img_fig.grid.visible = False
        # A data source, not a Div: the page is never rendered into this page's DOM, only handed to a download.
        # It rides in the button's tags so it is part of the document without being a root.
        self.export_src = ColumnDataSource(data=dict(html=[], name=[]), name="export_payload")
        self.export_btn = Button(label="Download standalone HTML", width=200, name="export_html", tags=[self.export_src])
        self.export_src.js_on_change("data", CustomJS(code=DOWNLOAD_JS))
        self.export_btn.on_click(self._on_export)
        self.top = TopSequences(self.data)  # listed on demand: a head switch only clears it
        controls = column(
            self.head_title,
            self.layout_note,
            self.similar,
            row(self.layer_select, self.head_select),
            row(nav["prev_layer"], nav["next_layer"], nav["prev_head"], nav["next_head"]),
            row(self.colour_select, self.size_norm),
            self.legend,
            row(self.search, self.search_mode),
            self.search_count,
            self.search_results,
            self.attention_legend,
            self.sequence,
            self.img_fig,
            self.export_btn,
            self.top.panel,
        )
        # Wraps: "Your text" (live_view) goes below when the window is too narrow for three columns.
        self.root = row(self.fig, controls, styles={"flex-wrap": "wrap"}, name="head_panel")
        self.set_model()

    def set_model(self) -> None:
        """Widgets for the place's model (after a model switch): head lists, colour modes, the image box."""
        self._loaded_static = None
        self.place.selected = None
        self.src.selected.indices = []
        info = self.data.infos[self.place.model]
        self.layer_select.options = [str(i) for i in range(info.n_layers)]
        self.head_select.options = [str(i) for i in range(info.n_heads)]
        modes = colors.modes(self.data.modality(self.place.model))
        self.colour_select.options = list(modes)
        if self.colour_select.value not in [k for k, _ in modes]:
            self.colour_select.value = "kind"
        image = self.data.modality(self.place.model) == "image"
        self.img_fig.visible = image
        # Images have no text to search: their file names are searched instead, and the box says so.
        self.search.title = "Search image names" if image else "Search the text"
        self.search.placeholder = "file name or part, Enter" if image else "word or pattern, Enter"
        show_layout_note(self.layout_note, self.data.atlas, self.place.model)

    def update(self) -> None:
        """Follow the place (model, method, head): a fresh draw of the head."""
        self.show(self.place.layer, self.place.head)

    @property
    def loaded(self) -> bool:
        return self._loaded_static is not None

    # ---- one head -------------------------------------------------------------------------------------------
    def show(self, layer: Any, head: Any) -> None:
        p = self.place
        p.layer, p.head = self.data.clamp(p.model, layer, head)
        self._busy = True  # widget echoes of this change must not re-enter
        try:
            self.layer_select.value, self.head_select.value = str(p.layer), str(p.head)
        finally:
            self._busy = False
        t = self.data.tokens(p.model, p.method)
        h = self.data.head(p.model, p.method, p.layer, p.head)
        ok = np.isfinite(h.x) & np.isfinite(h.y)
        x, y = np.where(ok, h.x, np.nan).astype(np.float32), np.where(ok, h.y, np.nan).astype(np.float32)
        update: dict[str, Any] = dict(x=x, y=y, norm=h.norm, stack=h.stack)
        fresh = self._loaded_static != (p.model, p.method)
        if fresh:
            self._matches = np.zeros(0, np.int64)  # of other points; apply_search below finds them again
            update.update(t.columns)  # token text and categories: sent once per model and method
            self._loaded_static = (p.model, p.method)
            update["alpha"] = np.full(len(h.x), BASE_ALPHA, np.float32)
        # Colour and size only depend on the head through the norm: skip them otherwise (fewer bytes per switch).
        cs = self._colour_columns(t.columns, h.norm)
        if fresh or self.colour_select.value == "norm":
            update["c"] = cs["c"]
        if fresh or 0 in self.size_norm.active:
            update["size"] = cs["size"]
        if len(self.src.data.get("x", [])) != len(h.x):
            self.src.data = update  # column lengths change: replace in one go
        else:
            self.src.data.update(update)
        if self.search.value and fresh:
            self.apply_search()
        elif len(self._matches):
            m = self._matches
            self.match_src.data.update(x=x[m], y=y[m], c=self._match_colours())
        if ok.any():
            for rng, v in ((self.xr, h.x[ok]), (self.yr, h.y[ok])):
                lo, hi = np.percentile(v, [0.5, 99.5])
                pad = 0.05 * (hi - lo or 1.0)
                rng.start, rng.end = float(lo - pad), float(hi + pad)
        self.fig.xaxis.axis_label = f"{p.method} layout of this head's queries and keys: axis 1"
        self.fig.yaxis.axis_label = "axis 2"
        self.head_title.text = self._title(h, ok, t)
        self.similar.text = similar_heads_html(self.data, p.model, p.layer, p.head, p.method)
        self.top.show(p.model, p.method, p.layer, p.head)
        self.thumb_src.data = dict(EMPTY_THUMBS)
        self.refresh_attention()
        self.on_change("head")

    def _title(self, h: Any, ok: np.ndarray, toks: Any) -> str:
        p = self.place
        info = self.data.infos[p.model]
        faith = ("not projected yet" if not ok.any() else
                 f"trustworthiness {h.trust:.3f}, kNN kept {h.knn:.2f}" if np.isfinite(h.trust) else "faithfulness not recorded")
        shown, total = len(toks.rows), len(self.data.atlas.tokens(p.model))
        n_placed = int((toks.columns["placed"] != "laid out").sum()) // 2 if "placed" in toks.columns else 0
        if shown < total:  # heads over the point cap are projected from a seeded token sample
            faith += f"<br>layout of a seeded sample: {shown:,} of {total:,} tokens"
        elif n_placed:  # ... and the other tokens placed into it from their nearest neighbours
            faith += (f"<br>layout of a seeded sample of {total - n_placed:,} of {total:,} tokens; the other {n_placed:,} "
                      f"were placed into it from their nearest neighbours (their trustworthiness {h.placed_trust:.3f})")
        stacked = int((h.stack > 1).sum()) if h.stack is not None else 0
        if stacked:
            faith += f"<br>{stacked:,} points share their spot with others (the tooltip counts them)"
        kind = self.data.head_type_of(p.model, p.method, p.layer, p.head)  # attnatlas analyze --head-types
        kind = (f" \u2014 type: <b>{html.escape(kind)}</b>" if kind else
                " \u2014 no head type" if self.data.has_head_types(p.model, p.method) else "")
        return (f"<b>{html.escape(p.model)} L{p.layer}H{p.head}</b>{kind} ({html.escape(p.method)}, "
                f"{info.n_layers}\u00d7{info.n_heads} heads)<br>{faith}")

    def _colour_columns(self, cols: dict[str, np.ndarray], norm: np.ndarray) -> dict[str, Any]:
        index, palette, legend = colors.indexed(self.colour_select.value, cols, norm)
        self._colour_index, self._palette = index, palette
        # The palette's last entry is the grey of non-matches while searching.
        self.mapper.update(palette=[*palette, DIM_COLOUR], low=0, high=len(palette) + 1)
        self.legend.text = legend
        if 0 in self.size_norm.active and len(norm):
            finite = norm[np.isfinite(norm)]
            lo_n, hi_n = (np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0))
            size = 2.5 + 7.0 * np.clip((np.nan_to_num(norm) - lo_n) / max(hi_n - lo_n, 1e-6), 0, 1)
        else:
            size = np.full(len(norm), 4.0)
        return dict(c=self._shown_colours(), size=size.astype(np.float32))

    def _shown_colours(self) -> np.ndarray:
        """The "c" column: each point's palette index (+0.5: the middle of its colour's band), non-matches grey
        while a search is on (the clicked point, drawn by the selection glyph, keeps the same mapping)."""
        c = self._colour_index.astype(np.float32) + 0.5
        if (self.search.value or "").strip() and not self._search_failed and len(c):
            keep = np.zeros(len(c), bool)
            keep[self._matches] = True
            c[~keep] = len(self._palette) + 0.5
        return c

    def _match_colours(self) -> np.ndarray:
        return self._colour_index[self._matches].astype(np.float32) + 0.5 if len(self._colour_index) else np.zeros(0, np.float32)

    @guarded
    def _on_layer_head(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        self.show(self.layer_select.value, self.head_select.value)

    @guarded
    def step(self, which: str) -> None:
        p = self.place
        info = self.data.infos[p.model]
        layer, head = p.layer, p.head
        if which == "next_head":
            layer, head = (layer + (head + 1) // info.n_heads) % info.n_layers, (head + 1) % info.n_heads
        elif which == "prev_head":
            layer, head = (layer - (1 if head == 0 else 0)) % info.n_layers, (head - 1) % info.n_heads
        elif which == "next_layer":
            layer = (layer + 1) % info.n_layers
        elif which == "prev_layer":
            layer = (layer - 1) % info.n_layers
        self.show(layer, head)

    @guarded
    def _on_colour(self, attr: str, old: Any, new: Any) -> None:
        if self._loaded_static != (self.place.model, self.place.method):
            return  # the next show colours the new points
        t = self.data.tokens(self.place.model, self.place.method)
        cs = self._colour_columns(t.columns, np.asarray(self.src.data["norm"]))
        self.src.data.update(cs)
        if len(self._matches):
            self.match_src.data.update(c=self._match_colours())

    # ---- search ---------------------------------------------------------------------------------------------
    @guarded
    def _on_search(self, attr: str, old: Any, new: Any) -> None:
        if self._loaded_static is None:
            self.show(self.place.layer, self.place.head)
        self.apply_search()

    def _matching_points(self, query: str) -> tuple[np.ndarray | None, str]:
        """Point indices (queries then keys) of the tokens overlapping a match, and the counting sentence;
        None and the reason when the query cannot run."""
        p = self.place
        t = self.data.tokens(p.model, p.method)
        n = len(t.rows)
        mode = search.MODES[self.search_mode.active] if 0 <= (self.search_mode.active or 0) < len(search.MODES) else "substring"
        q = html.escape(query)
        found = search.find(self.data.text_index(p.model), query, mode)
        if found.error and not len(found.rows):
            return None, f'<span style="color:#b00">{html.escape(found.error)}</span>'
        pts = t.point_of_row[found.rows]
        pts = pts[pts >= 0]  # rows outside this (sampled) layout have no point
        if self.data.modality(p.model) == "image":
            n_img = len(np.unique(t.seq_of_row[found.rows]))
            msg = (f"{len(pts)} matching patches for \u201c{q}\u201d: {n_img} image{'s' if n_img != 1 else ''} "
                   "whose file name matches (case folded)")
        else:
            fold = " (case and accents folded, as the tokenizer does)" if self.data.text_index(p.model).uncased else ""
            msg = (f"{len(pts)} matching tokens for \u201c{q}\u201d: {found.n_matches:,} "
                   f"match{'es' if found.n_matches != 1 else ''} in the text{fold}")
        if found.error or found.capped:
            msg += f'<br><span style="color:#b00">{html.escape(found.error or "stopped at the match limit")}</span>'
        return np.concatenate([pts, pts + n]), msg

    def apply_search(self) -> None:
        query = (self.search.value or "").strip()
        cols = self.data.tokens(self.place.model, self.place.method).columns
        n2 = len(cols["token"])
        if not query:
            self._matches = np.zeros(0, np.int64)
            self._search_failed = False
            self.src.data.update(alpha=np.full(n2, BASE_ALPHA, np.float32))
            self.match_src.data = dict(x=[], y=[], c=[], token=[])
            self.src.data.update(c=self._shown_colours())
            self.search_count.text = ""
            self.search_results.text = ""
            return
        pts, msg = self._matching_points(query)
        self._search_failed = pts is None
        if pts is None:
            # A query that cannot run (a bad pattern, too long): the message only, nothing greyed, since
            # every point greyed reads as "no matches".
            self._matches = np.zeros(0, np.int64)
            self.src.data.update(alpha=np.full(n2, BASE_ALPHA, np.float32), c=self._shown_colours())
            self.match_src.data = dict(x=[], y=[], c=[], token=[])
            self.search_count.text = msg
            self.search_results.text = ""
            return
        self._matches = pts
        alpha = np.full(n2, DIM_ALPHA, np.float32)
        alpha[pts] = 1.0
        self.src.data.update(alpha=alpha, c=self._shown_colours())
        x, y = (np.asarray(self.src.data[k]) for k in ("x", "y"))
        self.match_src.data = dict(x=x[pts], y=y[pts], c=self._match_colours(), token=cols["token"][pts])
        self.search_count.text = msg
        half = pts[: len(pts) // 2]
        items = [f"<li>{cols['ctx'][i]} <small>(seq {int(cols['sequence'][i])}, pos {int(cols['position'][i])})</small></li>"
                 for i in half[:MAX_LIST]]
        self.search_results.text = "<ul style='margin:0;padding-left:18px'>" + "".join(items) + "</ul>" if items else ""

    # ---- clicking a point -----------------------------------------------------------------------------------
    @guarded
    def _on_tap(self, attr: str, old: list[int], new: list[int]) -> None:
        self.place.selected = int(new[0]) if new else None
        self.refresh_attention()

    def refresh_attention(self) -> None:
        """Lines and sequence panel for the selected point, in the current head."""
        p = self.place
        t = self.data.tokens(p.model, p.method)
        n = len(t.rows)
        image = self.data.modality(p.model) == "image"
        if p.selected is None or not 0 <= p.selected < 2 * n:
            self.line_src.data = dict(EMPTY_LINES)
            if image:
                self._first_image()
            self.on_change("selection")
            return
        self.on_change("selection")
        sel = p.selected
        is_query = sel < n
        row_ = int(t.rows[sel % n])
        weights = attention_of(self.data, p.model, p.layer, p.head, row_, is_query)
        note = "" if self.data.has_attention(p.model) else \
            "<br><i>This atlas has no stored attention; extract with --attention-topk K.</i>"
        x, y = np.asarray(self.src.data["x"]), np.asarray(self.src.data["y"])
        tok_text = t.columns["token"]
        strong = [(r, v) for r, v in weights.items() if v >= LINE_MIN_WEIGHT and 0 <= r < len(t.point_of_row)
                  and t.point_of_row[r] >= 0]  # only tokens in this (sampled) layout have a point
        others = np.array([n + int(t.point_of_row[r]) if is_query else int(t.point_of_row[r]) for r, _ in strong], np.int64)
        w = np.array([v for _, v in strong], np.float32)
        self.line_src.data = dict(x0=np.full(len(w), x[sel], np.float32), y0=np.full(len(w), y[sel], np.float32),
                                  x1=x[others] if len(w) else [], y1=y[others] if len(w) else [],
                                  alpha=line_alpha(w), width=line_width(w), weight=w,
                                  token=tok_text[others] if len(w) else [])
        seq = int(t.seq_of_row[row_])
        what = "query" if is_query else "key"
        other = "keys it attends to" if is_query else "queries that attend to it"
        hidden = len(weights) - len(strong)
        below = f"; {hidden} weaker than {LINE_MIN_WEIGHT:g} (or outside the layout) are shaded only" if hidden else ""
        head = (f"<b>{what}</b> in sequence {seq}; shading: {other} (top-k, L{p.layer}H{p.head}){below}{note}. "
                f"<small>Click an empty spot to clear; the tooltip is off until then.</small><br>")
        if image:
            self.sequence.text = head + image_name_html(str(self.data.sequence_info(p.model, seq).get("text", "")))
            self._draw_image(seq, row_, weights)
        else:
            self.sequence.text = head + sequence_html(self.data, p.model, seq, row_, weights)

    def _first_image(self) -> None:
        """Before any click, the image box shows the first image, so it is never an empty frame."""
        seqs = self.data.atlas.sequences(self.place.model)
        if len(seqs):
            seq = int(seqs["sequence"].iat[0])
            self._draw_image(seq, -1, {})
            self.sequence.text = (f"Image {seq} ({image_name_html(str(seqs['text'].iat[0]))}) is shown until you click a "
                                  "point; a click shows its image and where it attends.")

    def _draw_image(self, seq: int, row_: int, weights: dict[int, float]) -> None:
        img = self.data.image(self.place.model, seq)
        info = self.data.sequence_info(self.place.model, seq)
        if img is None:
            self.img_src.data = dict(image=[], x=[], y=[], dw=[], dh=[])
            self.heat_src.data = dict(EMPTY_HEAT)
            return
        H, W = img.shape[:2]
        self.img_src.data = dict(image=[_rgba(img[::-1])], x=[0], y=[0], dw=[W], dh=[H])
        gr, gc = int(info.get("grid_rows", 1) or 1), int(info.get("grid_cols", 1) or 1)
        ph, pw = H / gr, W / gc
        toks = self.data.sequence_tokens(self.place.model, seq)
        patches = toks[toks["patch_row"] >= 0] if "patch_row" in toks else toks.iloc[0:0]
        left, right, bottom, topc, alpha, line, lw = [], [], [], [], [], [], []
        for r, pr, pc in zip(patches["row"], patches["patch_row"], patches["patch_col"]):
            left.append(pc * pw), right.append((pc + 1) * pw)
            bottom.append(H - (pr + 1) * ph), topc.append(H - pr * ph)
            alpha.append(0.9 * min(weights.get(int(r), 0.0), 1.0))  # absolute: a weight of 0.02 stays faint
            line.append("#000000" if int(r) == row_ else "#ffffff")
            lw.append(3.0 if int(r) == row_ else 0.5)
        self.heat_src.data = dict(left=left, right=right, bottom=bottom, top=topc, alpha=alpha, line=line, lw=lw)
        self.img_fig.x_range.start, self.img_fig.x_range.end = 0, W
        self.img_fig.y_range.start, self.img_fig.y_range.end = 0, H

    # ---- image thumbnails when zoomed in --------------------------------------------------------------------
    @guarded
    def _on_ranges(self, event: RangesUpdate) -> None:
        p = self.place
        if self.data.modality(p.model) != "image" or self._loaded_static is None:
            return
        x, y = np.asarray(self.src.data["x"]), np.asarray(self.src.data["y"])
        x0, x1, y0, y1 = event.x0, event.x1, event.y0, event.y1
        if None in (x0, x1, y0, y1):
            return
        vis = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        if len(vis) > MAX_THUMBS or not len(vis):
            self.thumb_src.data = dict(EMPTY_THUMBS)
            return
        t = self.data.tokens(p.model, p.method)
        tok = self.data.atlas.tokens(p.model)
        n = len(t.rows)
        dw, dh = (x1 - x0) / THUMB_SPAN, (y1 - y0) / THUMB_SPAN
        imgs, xs, ys, cx, cy, border = [], [], [], [], [], []
        for pt in vis:
            thumb = patch_thumbnail(self.data, p.model, tok, int(t.rows[pt % n]))
            if thumb is None:
                continue
            imgs.append(thumb)
            xs.append(float(x[pt] - dw / 2)), ys.append(float(y[pt] - dh / 2))  # image_rgba anchors at a corner
            cx.append(float(x[pt])), cy.append(float(y[pt]))
            border.append(colors.QUERY if pt < n else colors.KEY)
        self.thumb_src.data = dict(image=imgs, x=xs, y=ys, cx=cx, cy=cy, dw=[dw] * len(xs), dh=[dh] * len(xs), border=border)

    # ---- export ---------------------------------------------------------------------------------------------
    @guarded
    def _on_export(self) -> None:
        from attnatlas.app.export import head_html

        p = self.place
        name = f"attnatlas-{_slug(p.model)}-L{p.layer}H{p.head}-{_slug(p.method)}.html"
        page = head_html(self.data, p.model, p.method, p.layer, p.head, self.colour_select.value)
        self.export_src.data = dict(html=[page], name=[name])


def patch_thumbnail(data: AppData, model: str, tok: Any, row: int) -> np.ndarray | None:
    """The image patch of token `row` (tok: the atlas's token table) as image_rgba draws it, or None when the
    token is no patch or its image is not stored. The standalone page (app.page) embeds these too."""
    info = tok.iloc[row]
    if int(info.get("patch_row", -1)) < 0:
        return None
    seq = int(info["sequence"])
    img = data.image(model, seq)
    if img is None:
        return None
    s = data.sequence_info(model, seq)
    gr, gc = int(s.get("grid_rows", 1) or 1), int(s.get("grid_cols", 1) or 1)
    ph, pw = img.shape[0] // gr, img.shape[1] // gc
    pr, pc = int(info["patch_row"]), int(info["patch_col"])
    return _rgba(img[pr * ph:(pr + 1) * ph, pc * pw:(pc + 1) * pw][::-1])


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _rgba(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) uint32 RGBA as Bokeh's image_rgba wants it."""
    h, w = img.shape[:2]
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = img[..., :3]
    out[..., 3] = 255
    return out.view(np.uint32).reshape(h, w)


def build(data: AppData, place: Place, host: Host) -> HeadView:
    return HeadView(data, place, on_change=host.head_changed, on_error=host.report_error)


VIEW = ViewSpec("head", "Single head", build, eager=True, follows_head=True,
                waiting="Click a cell of the grid to open a head.")
