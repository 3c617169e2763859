"""One browser session of the dashboard: the global head grid and the single-head view.

`Dashboard(data, args)` builds fresh Bokeh models for one document; nothing here is shared between
sessions except the read-only `AppData`. Every value that arrives from the browser (URL arguments,
widget values) is checked against the atlas's own lists before use, and every piece of token text is
HTML-escaped before it is put into markup (Bokeh escapes plain tooltip fields itself).
"""

from __future__ import annotations

import functools
import html
import logging
from typing import Any, Callable
from urllib.parse import urlencode

import numpy as np
from bokeh.document import Document
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
    Range1d,
    RadioButtonGroup,
    Select,
    TabPanel,
    Tabs,
    TapTool,
    TextInput,
)
from bokeh.plotting import figure
from bokeh.transform import transform

from attnatlas.app import colors, views
from attnatlas.app.data import AppData
from attnatlas.app.grid_view import GridView
from attnatlas.app.top_sequences import TopSequences

log = logging.getLogger(__name__)

BASE_ALPHA = 0.6
DIM_ALPHA = 0.06
MAX_LIST = 20  # search results listed
MAX_THUMBS = 300  # image patches drawn as thumbnails when at most this many are in view
TOOLTIPS = [
    ("token", "@token"),  # Bokeh escapes plain fields
    ("context", "@ctx{safe}"),  # escaped server-side (data._contexts), only <b> is markup
    ("position", "@position"),
    ("type", "@kind"),
    ("norm", "@norm{0.00}"),
    ("sequence", "@sequence"),
    ("coordinates", "@placed"),  # laid out, or placed into a capped layout from its neighbours
]
URL_JS = "if (cb_obj.text) { window.history.replaceState(null, '', cb_obj.text) }"
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


def arg(args: dict[str, Any], name: str) -> str | None:
    """One URL argument as text (Bokeh gives lists of bytes); None when absent or undecodable."""
    v = args.get(name)
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return v if isinstance(v, str) else None


def guarded(fn: Callable) -> Callable:
    """A failing callback reports in its own session's status line and leaves the others alone."""

    @functools.wraps(fn)
    def wrapper(self: "Dashboard", *a: Any, **kw: Any) -> Any:
        try:
            return fn(self, *a, **kw)
        except Exception as exc:  # noqa: BLE001 - shown to this session only
            log.exception("dashboard callback %s failed", fn.__name__)
            self.status.text = f'<span style="color:#b00">Error: {html.escape(str(exc))}</span>'
            return None

    return wrapper


CUT_PREVIEW_CHARS = 200  # characters shown of the part of a truncated sequence the model did not see


class Dashboard:
    """All models and callbacks of one session."""

    def __init__(self, data: AppData, args: dict[str, Any] | None = None):
        args = args or {}
        self.data = data
        self.model = data.model(arg(args, "model"))
        self.method = data.method(self.model, arg(args, "method"))
        self.layer, self.head = data.clamp(self.model, arg(args, "layer"), arg(args, "head"))
        self.selected: int | None = None  # point index in the head source
        self.notice = "" if arg(args, "model") in (None, self.model) else "Unknown model in the URL; showing the first one."
        self._busy = False
        self._loaded_static: tuple[str, str] | None = None  # (model, method) whose token columns are in self.src
        self.compare_panel: views.ComparePanel | None = None
        self.math_panel: views.MathPanel | None = None
        self._math_stale = False
        self._build()
        view = arg(args, "view")
        if arg(args, "layer") is not None or arg(args, "head") is not None or view == "head":
            self.open_head(self.layer, self.head)
        if view in self.view_keys and view not in ("grid", "head"):
            self.tabs.active = self.view_keys.index(view)
            self._open_view(view)
        self._sync_url()

    # ---- construction ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        d = self.data
        self.status = Div(text=html.escape(self.notice), styles={"color": "#555"})
        self.model_select = Select(title="Model", options=list(d.models), value=self.model, visible=len(d.models) > 1, width=180)
        self.method_select = Select(title="Projection", options=list(d.methods[self.model]), value=self.method, width=130)
        self.model_select.on_change("value", self._on_model)
        self.method_select.on_change("value", self._on_method)
        self.url = Div(text="", visible=False, render_as_text=True, name="url_state")
        self.url.js_on_change("text", CustomJS(code=URL_JS))

        self._build_grid()
        self._build_head()
        # The head view joins the document when first opened: a smaller first page that draws sooner.
        placeholder = Div(text="Click a cell of the grid to open a head.")
        # Further tabs are empty columns until first opened (views.build_view fills them): a small first page.
        many = len(d.atlas.models) >= 2
        self.view_keys = [k for k, _ in views.VIEWS if k != "compare" or many]
        titles = dict(views.VIEWS)
        self.view_boxes = {k: column(views.placeholder(titles[k]), name=f"view_box_{k}") for k in self.view_keys[2:]}
        self.view_built: set[str] = set()
        panels = [TabPanel(child=self.grid_panel, title="All heads"), TabPanel(child=placeholder, title="Single head")]
        panels += [TabPanel(child=self.view_boxes[k], title=titles[k]) for k in self.view_keys[2:]]
        self.tabs = Tabs(tabs=panels, name="tabs", sizing_mode="stretch_width")  # the grid fills the window width
        self.tabs.on_change("active", self._on_tab)
        header = row(Div(text="<b>attnatlas</b>", styles={"font-size": "18px", "margin-top": "24px"}),
                     self.model_select, self.method_select, self.status, self.url)
        self.root = column(header, self.tabs, name="root", sizing_mode="stretch_width")

    def _build_grid(self) -> None:
        self.grid = GridView(self.data, on_open=self.open_head, on_error=self._report_error, on_open_model=self.open_model_head)
        self.grid_panel = self.grid.panel
        self.grid.show(self.model, self.method)

    def _report_error(self, message: str) -> None:
        self.status.text = f'<span style="color:#b00">Error: {html.escape(message)}</span>'

    def _build_head(self) -> None:
        empty = {k: [] for k in ("x", "y", "norm", "c", "size", "alpha", "token", "ctx", "position", "kind", "sequence")}
        self.src = ColumnDataSource(data=empty, name="head_points")
        self.line_src = ColumnDataSource(data=dict(x0=[], y0=[], x1=[], y1=[], alpha=[], width=[]), name="attention_lines")
        self.thumb_src = ColumnDataSource(data=dict(image=[], x=[], y=[], cx=[], cy=[], dw=[], dh=[], border=[]), name="thumbnails")
        self.xr, self.yr = Range1d(0, 1), Range1d(0, 1)
        self.fig = figure(width=720, height=680, output_backend=self.data.backend, x_range=self.xr, y_range=self.yr,
                          tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="above", name="head_figure")
        self.mapper = LinearColorMapper(palette=[colors.QUERY, colors.KEY], low=0, high=1)
        self.points = self.fig.scatter("x", "y", source=self.src, size="size", fill_alpha="alpha", line_color=None,
                                       fill_color=transform("c", self.mapper), name="head_scatter")
        self.points.selection_glyph = self.points.glyph.clone(line_color="black", line_width=2, fill_alpha=1.0)
        self.points.nonselection_glyph = None
        self.fig.segment("x0", "y0", "x1", "y1", source=self.line_src, line_color="#333", line_alpha="alpha",
                         line_width="width", name="attention_lines")
        self.fig.image_rgba(image="image", x="x", y="y", dw="dw", dh="dh", source=self.thumb_src, name="thumbnails")
        self.fig.rect(x="cx", y="cy", width="dw", height="dh", source=self.thumb_src, fill_color=None, line_color="border",
                      line_width=2, name="thumbnail_borders")
        self.fig.add_tools(HoverTool(renderers=[self.points], tooltips=TOOLTIPS), TapTool(renderers=[self.points]))
        self.src.selected.on_change("indices", self._on_tap)
        self.fig.on_event(RangesUpdate, self._on_ranges)

        self.head_title = Div(text="", name="head_title")
        self.similar = Div(text="", width=420, name="similar_heads")
        self.layer_select = Select(title="Layer", width=80, name="layer_select")
        self.head_select = Select(title="Head", width=80, name="head_select")
        self.layer_select.on_change("value", self._on_layer_head)
        self.head_select.on_change("value", self._on_layer_head)
        nav = {}
        for name, label in (("prev_layer", "\u25b2 layer"), ("next_layer", "\u25bc layer"), ("prev_head", "\u25c0 head"), ("next_head", "head \u25b6")):
            b = Button(label=label, width=80, name=name)
            b.on_click(functools.partial(self._step, name))
            nav[name] = b
        self.colour_select = Select(title="Colour", width=150)
        self.colour_select.on_change("value", self._on_colour)
        self.size_norm = CheckboxGroup(labels=["size by norm"], active=[])
        self.size_norm.on_change("active", self._on_colour)
        self.legend = Div(text="")
        self.search = TextInput(title="Search tokens", placeholder="token text, then Enter", width=200, name="search")
        self.search_mode = RadioButtonGroup(labels=["substring", "exact"], active=0)
        self.search.on_change("value", self._on_search)
        self.search_mode.on_change("active", self._on_search)
        self.search_count = Div(text="", name="search_count")
        self.search_results = Div(text="", width=420, name="search_results")
        self.sequence = Div(text="Click a point to see its sequence and where it attends.", width=420, name="sequence_panel")
        self.img_src = ColumnDataSource(data=dict(image=[], x=[], y=[], dw=[], dh=[]))
        self.heat_src = ColumnDataSource(data=dict(left=[], right=[], bottom=[], top=[], alpha=[], line=[], lw=[]), name="heat_map")
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
            self.similar,
            row(self.layer_select, self.head_select),
            row(nav["prev_layer"], nav["next_layer"], nav["prev_head"], nav["next_head"]),
            row(self.colour_select, self.size_norm),
            self.legend,
            row(self.search, self.search_mode),
            self.search_count,
            self.search_results,
            self.sequence,
            self.img_fig,
            self.export_btn,
            self.top.panel,
        )
        self.head_panel = row(self.fig, controls)
        self._configure_model_widgets()

    def _configure_model_widgets(self) -> None:
        self._loaded_static = None
        info = self.data.infos[self.model]
        self.layer_select.options = [str(i) for i in range(info.n_layers)]
        self.head_select.options = [str(i) for i in range(info.n_heads)]
        modes = colors.modes(self.data.modality(self.model))
        self.colour_select.options = [m for m in modes]
        if self.colour_select.value not in [k for k, _ in modes]:
            self.colour_select.value = "kind"
        self.img_fig.visible = self.data.modality(self.model) == "image"

    # ---- single head ----------------------------------------------------------------------------------------------
    def open_head(self, layer: int, head: int) -> None:
        self.tabs.active = 1
        self.show_head(layer, head)
        self._mount_head()

    def open_model_head(self, model: str, layer: int, head: int) -> None:
        """Open a head of any model (the head map shows several): switch models first when needed."""
        model = self.data.model(model)
        if model != self.model:
            self.model_select.value = model  # _on_model: widgets, grid and views of the new model
        self.open_head(layer, head)

    def _mount_head(self) -> None:
        if self.tabs.tabs[1].child is not self.head_panel:
            # A new tabs list, not a new child: BokehJS redraws Tabs on `tabs` changes only.
            self.tabs.tabs = [self.tabs.tabs[0], TabPanel(child=self.head_panel, title="Single head"), *self.tabs.tabs[2:]]

    def show_head(self, layer: int, head: int) -> None:
        self.layer, self.head = self.data.clamp(self.model, layer, head)
        self._busy = True  # widget echoes of this change must not re-enter
        try:
            self.layer_select.value, self.head_select.value = str(self.layer), str(self.head)
        finally:
            self._busy = False
        t = self.data.tokens(self.model, self.method)
        h = self.data.head(self.model, self.method, self.layer, self.head)
        ok = np.isfinite(h.x) & np.isfinite(h.y)
        update: dict[str, Any] = dict(x=np.where(ok, h.x, np.nan).astype(np.float32), y=np.where(ok, h.y, np.nan).astype(np.float32),
                                      norm=h.norm)
        if self._loaded_static != (self.model, self.method):
            update.update(t.columns)  # token text and categories: sent once per model and method
            self._loaded_static = (self.model, self.method)
            self.search_alpha = np.full(len(h.x), BASE_ALPHA, np.float32)
            update["alpha"] = self.search_alpha
        fresh = "alpha" in update
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
        if ok.any():
            for rng, v in ((self.xr, h.x[ok]), (self.yr, h.y[ok])):
                lo, hi = np.percentile(v, [0.5, 99.5])
                pad = 0.05 * (hi - lo or 1.0)
                rng.start, rng.end = float(lo - pad), float(hi + pad)
        info = self.data.infos[self.model]
        faith = ("not projected yet" if not ok.any() else
                 f"trustworthiness {h.trust:.3f}, kNN kept {h.knn:.2f}" if np.isfinite(h.trust) else "faithfulness not recorded")
        toks = self.data.tokens(self.model, self.method)
        shown, total = len(toks.rows), len(self.data.atlas.tokens(self.model))
        n_placed = int((toks.columns["placed"] != "laid out").sum()) // 2
        if shown < total:  # heads over the point cap are projected from a seeded token sample
            faith += f"<br>layout of a seeded sample: {shown:,} of {total:,} tokens"
        elif n_placed:  # ... and the other tokens placed into it from their nearest neighbours
            faith += (f"<br>layout of a seeded sample of {total - n_placed:,} of {total:,} tokens; the other {n_placed:,} "
                      f"were placed into it from their nearest neighbours (their trustworthiness {h.placed_trust:.3f})")
        self.head_title.text = (f"<b>{html.escape(self.model)} L{self.layer}H{self.head}</b> ({html.escape(self.method)}, "
                                f"{info.n_layers}\u00d7{info.n_heads} heads)<br>{faith}")
        self.similar.text = views.similar_heads_html(self.data, self.model, self.layer, self.head)
        self.top.show(self.model, self.method, self.layer, self.head)
        self.thumb_src.data = dict(image=[], x=[], y=[], cx=[], cy=[], dw=[], dh=[], border=[])
        self._refresh_attention()
        self._sync_url()

    def _colour_columns(self, cols: dict[str, np.ndarray], norm: np.ndarray) -> dict[str, Any]:
        values, palette, lo, hi, legend = colors.colour(self.colour_select.value, cols, norm)
        if values is None:
            self.points.glyph.fill_color = "rgb"
            values = cols["kind_code"].astype(np.float32)
        else:
            self.points.glyph.fill_color = transform("c", self.mapper)
        self.mapper.update(palette=list(palette), low=lo, high=hi)
        self.legend.text = legend
        if 0 in self.size_norm.active and len(norm):
            finite = norm[np.isfinite(norm)]
            lo_n, hi_n = (np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0))
            size = 2.5 + 7.0 * np.clip((np.nan_to_num(norm) - lo_n) / max(hi_n - lo_n, 1e-6), 0, 1)
        else:
            size = np.full(len(norm), 4.0)
        return dict(c=values, size=size.astype(np.float32))

    @guarded
    def _on_layer_head(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        self.show_head(self.layer_select.value, self.head_select.value)

    @guarded
    def _step(self, which: str) -> None:
        info = self.data.infos[self.model]
        layer, head = self.layer, self.head
        if which == "next_head":
            layer, head = (layer + (head + 1) // info.n_heads) % info.n_layers, (head + 1) % info.n_heads
        elif which == "prev_head":
            layer, head = (layer - (1 if head == 0 else 0)) % info.n_layers, (head - 1) % info.n_heads
        elif which == "next_layer":
            layer = (layer + 1) % info.n_layers
        elif which == "prev_layer":
            layer = (layer - 1) % info.n_layers
        self.show_head(layer, head)

    @guarded
    def _on_colour(self, attr: str, old: Any, new: Any) -> None:
        if self._loaded_static != (self.model, self.method):
            return  # the next show_head colours the new points
        t = self.data.tokens(self.model, self.method)
        self.src.data.update(self._colour_columns(t.columns, np.asarray(self.src.data["norm"])))

    @guarded
    def _on_tab(self, attr: str, old: int, new: int) -> None:
        if new == 1 and self._loaded_static is None:
            self.show_head(self.layer, self.head)
        if new == 1:
            self._mount_head()
        key = self.view_keys[new] if 0 <= new < len(self.view_keys) else "grid"
        if key in self.view_boxes:
            self._open_view(key)
        self._sync_url()

    def _open_view(self, key: str) -> None:
        """Build a lazy tab on first open; bring the math panel up to the current head and token."""
        if key not in self.view_built:
            self.view_built.add(key)
            if key == "math":
                self._math_stale = False
            self.view_boxes[key].children = [views.build_view(key, self)]
        elif key == "math" and self._math_stale and self.math_panel is not None:
            self._math_stale = False
            self.math_panel.refresh()

    def _head_changed(self) -> None:
        """The head or the clicked token changed: the math panel follows, now if shown, else when next opened."""
        if self.math_panel is None:
            return
        if self.view_keys[self.tabs.active] == "math":
            self.math_panel.refresh()
        else:
            self._math_stale = True

    def _reset_views(self) -> None:
        """After a model change the per-model tabs are built again when next opened (now, if one is shown)."""
        titles = dict(views.VIEWS)
        for key in views.PER_MODEL:
            if key in self.view_built:
                self.view_built.discard(key)
                self.view_boxes[key].children = [views.placeholder(titles[key])]
        self.math_panel = None
        active = self.view_keys[self.tabs.active]
        if active in views.PER_MODEL:
            self._open_view(active)

    @guarded
    def _on_model(self, attr: str, old: str, new: str) -> None:
        self.model = self.data.model(new)
        self.method = self.data.method(self.model, self.method)
        self._busy = True
        try:
            self.method_select.options = list(self.data.methods[self.model])
            self.method_select.value = self.method
        finally:
            self._busy = False
        self.selected = None
        self.src.selected.indices = []
        self._configure_model_widgets()
        self.grid.show(self.model, self.method)
        self.layer, self.head = 0, 0
        if self.tabs.active == 1:
            self.show_head(0, 0)
        self._reset_views()
        self._sync_url()

    @guarded
    def _on_method(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        self.method = self.data.method(self.model, new)
        self.selected = None
        self.src.selected.indices = []
        self.grid.show(self.model, self.method)
        if self.tabs.active == 1 or self._loaded_static is not None:
            self.show_head(self.layer, self.head)
        self._sync_url()

    # ---- search ---------------------------------------------------------------------------------------------------
    @guarded
    def _on_search(self, attr: str, old: Any, new: Any) -> None:
        if self._loaded_static is None:
            self.show_head(self.layer, self.head)
        self.apply_search()

    def apply_search(self) -> None:
        query = (self.search.value or "").strip()
        cols = self.data.tokens(self.model, self.method).columns
        n = len(cols["token"])
        if not query:
            self.src.data.update(alpha=np.full(n, BASE_ALPHA, np.float32))
            self.search_count.text = ""
            self.search_results.text = ""
            return
        toks = np.array([_bare(s) for s in cols["token"]], dtype=object)
        if self.search_mode.active == 1:
            match = toks == query
        else:
            q = query.lower()
            match = np.array([q in s.lower() for s in toks], dtype=bool)
        self.src.data.update(alpha=np.where(match, 1.0, DIM_ALPHA).astype(np.float32))
        half = n // 2
        n_tok = int(match[:half].sum())
        self.search_count.text = f"{n_tok} matching tokens for \u201c{html.escape(query)}\u201d"
        items = [f"<li>{cols['ctx'][i]} <small>(seq {int(cols['sequence'][i])}, pos {int(cols['position'][i])})</small></li>"
                 for i in np.flatnonzero(match[:half])[:MAX_LIST]]
        self.search_results.text = "<ul style='margin:0;padding-left:18px'>" + "".join(items) + "</ul>" if items else ""

    # ---- clicking a point ----------------------------------------------------------------------------------------
    @guarded
    def _on_tap(self, attr: str, old: list[int], new: list[int]) -> None:
        self.selected = int(new[0]) if new else None
        self._refresh_attention()

    def _refresh_attention(self) -> None:
        """Lines and sequence panel for the selected point, in the current head."""
        empty_lines = dict(x0=[], y0=[], x1=[], y1=[], alpha=[], width=[])
        t = self.data.tokens(self.model, self.method)
        n = len(t.rows)
        if self.selected is None or not 0 <= self.selected < 2 * n:
            self.line_src.data = empty_lines
            self.heat_src.data = dict(left=[], right=[], bottom=[], top=[], alpha=[], line=[], lw=[])
            self._head_changed()
            return
        self._head_changed()
        p = self.selected
        is_query = p < n
        row_ = int(t.rows[p % n])
        weights: dict[int, float] = {}  # token row -> weight, of the opposite kind
        note = ""
        if self.data.has_attention(self.model):
            idx, w = self.data.topk(self.model, self.layer, self.head)
            if is_query:
                for r, v in zip(idx[row_], w[row_]):
                    if r >= 0 and v > 0:
                        weights[int(r)] = float(v)
            else:
                qs, ks = np.nonzero(idx == row_)
                for r, v in zip(qs, w[qs, ks]):
                    weights[int(r)] = float(v)
        else:
            note = "<br><i>This atlas has no stored attention; extract with --attention-topk K.</i>"
        x, y = np.asarray(self.src.data["x"]), np.asarray(self.src.data["y"])
        x0, y0, x1, y1, al, wd = [], [], [], [], [], []
        top = max(weights.values(), default=1.0) or 1.0
        for r, v in weights.items():
            pt = int(t.point_of_row[r]) if r < len(t.point_of_row) else -1
            if pt < 0:
                continue  # that token is not in this (sampled) layout
            other = n + pt if is_query else pt
            x0.append(float(x[p])), y0.append(float(y[p])), x1.append(float(x[other])), y1.append(float(y[other]))
            al.append(0.15 + 0.85 * v / top), wd.append(1.0 + 3.0 * v / top)
        self.line_src.data = dict(x0=x0, y0=y0, x1=x1, y1=y1, alpha=al, width=wd)
        seq = int(t.seq_of_row[row_])
        what = "query" if is_query else "key"
        other = "keys it attends to" if is_query else "queries that attend to it"
        head = f"<b>{what}</b> in sequence {seq}; shading: {other} (top-k, L{self.layer}H{self.head}){note}<br>"
        if self.data.modality(self.model) == "image":
            self.sequence.text = head + html.escape(str(self.data.sequence_info(self.model, seq).get("text", "")))
            self._draw_image(seq, row_, weights)
        else:
            self.sequence.text = head + self._sequence_html(seq, row_, weights)

    def _sequence_html(self, seq: int, row_: int, weights: dict[int, float]) -> str:
        toks = self.data.sequence_tokens(self.model, seq)
        info = self.data.sequence_info(self.model, seq)
        text = str(info.get("text", ""))
        top = max(weights.values(), default=1.0) or 1.0
        out, cursor = [], 0
        has_offsets = "char_start" in toks
        for r, tok, special, a, b in zip(toks["row"], toks["token"], toks["is_special"],
                                         toks["char_start"] if has_offsets else [-1] * len(toks),
                                         toks["char_end"] if has_offsets else [-1] * len(toks)):
            w = weights.get(int(r), 0.0) / top
            style = f"background:rgba(217,69,142,{w:.2f});" if w > 0 else ""
            if int(r) == row_:
                style += "outline:2px solid #000;"
            title = f' title="weight {weights[int(r)]:.3f}"' if int(r) in weights else ""
            if has_offsets and a is not None and a >= 0 and b >= a and not special:
                if a > cursor:
                    out.append(html.escape(text[cursor:a]))
                # Byte-level pieces of one character share its offsets: show each character once.
                piece = text[max(a, cursor):b]
                cursor = max(cursor, b)
                if not piece:
                    continue
            else:
                piece = str(tok)
                style += "color:#888;font-size:smaller;"
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
        return where + '<div style="line-height:1.7;white-space:pre-wrap">' + "".join(out) + "</div>"

    def _draw_image(self, seq: int, row_: int, weights: dict[int, float]) -> None:
        img = self.data.image(self.model, seq)
        info = self.data.sequence_info(self.model, seq)
        if img is None:
            self.img_src.data = dict(image=[], x=[], y=[], dw=[], dh=[])
            self.heat_src.data = dict(left=[], right=[], bottom=[], top=[], alpha=[], line=[], lw=[])
            return
        H, W = img.shape[:2]
        self.img_src.data = dict(image=[_rgba(img[::-1])], x=[0], y=[0], dw=[W], dh=[H])
        gr, gc = int(info.get("grid_rows", 1) or 1), int(info.get("grid_cols", 1) or 1)
        ph, pw = H / gr, W / gc
        toks = self.data.sequence_tokens(self.model, seq)
        patches = toks[toks["patch_row"] >= 0] if "patch_row" in toks else toks.iloc[0:0]
        top = max(weights.values(), default=1.0) or 1.0
        left, right, bottom, topc, alpha, line, lw = [], [], [], [], [], [], []
        for r, pr, pc in zip(patches["row"], patches["patch_row"], patches["patch_col"]):
            left.append(pc * pw), right.append((pc + 1) * pw)
            bottom.append(H - (pr + 1) * ph), topc.append(H - pr * ph)
            alpha.append(0.75 * weights.get(int(r), 0.0) / top)
            line.append("#000000" if int(r) == row_ else "#ffffff")
            lw.append(3.0 if int(r) == row_ else 0.5)
        self.heat_src.data = dict(left=left, right=right, bottom=bottom, top=topc, alpha=alpha, line=line, lw=lw)
        self.img_fig.x_range.start, self.img_fig.x_range.end = 0, W
        self.img_fig.y_range.start, self.img_fig.y_range.end = 0, H

    # ---- image thumbnails when zoomed in -------------------------------------------------------------------------
    @guarded
    def _on_ranges(self, event: RangesUpdate) -> None:
        if self.data.modality(self.model) != "image" or self._loaded_static is None:
            return
        x, y = np.asarray(self.src.data["x"]), np.asarray(self.src.data["y"])
        x0, x1, y0, y1 = event.x0, event.x1, event.y0, event.y1
        if None in (x0, x1, y0, y1):
            return
        vis = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        if len(vis) > MAX_THUMBS or not len(vis):
            self.thumb_src.data = dict(image=[], x=[], y=[], cx=[], cy=[], dw=[], dh=[], border=[])
            return
        t = self.data.tokens(self.model, self.method)
        tok = self.data.atlas.tokens(self.model)
        n = len(t.rows)
        dw, dh = (x1 - x0) / 25, (y1 - y0) / 25
        imgs, xs, ys, cx, cy, border = [], [], [], [], [], []
        for p in vis:
            r = int(t.rows[p % n])
            info = tok.iloc[r]
            if int(info.get("patch_row", -1)) < 0:
                continue
            seq = int(info["sequence"])
            img = self.data.image(self.model, seq)
            if img is None:
                continue
            s = self.data.sequence_info(self.model, seq)
            gr, gc = int(s.get("grid_rows", 1) or 1), int(s.get("grid_cols", 1) or 1)
            ph, pw = img.shape[0] // gr, img.shape[1] // gc
            pr, pc = int(info["patch_row"]), int(info["patch_col"])
            imgs.append(_rgba(img[pr * ph:(pr + 1) * ph, pc * pw:(pc + 1) * pw][::-1]))
            xs.append(float(x[p] - dw / 2)), ys.append(float(y[p] - dh / 2))  # image_rgba anchors at a corner
            cx.append(float(x[p])), cy.append(float(y[p]))
            border.append(colors.QUERY if p < n else colors.KEY)
        self.thumb_src.data = dict(image=imgs, x=xs, y=ys, cx=cx, cy=cy, dw=[dw] * len(xs), dh=[dh] * len(xs), border=border)

    # ---- export and URL -----------------------------------------------------------------------------------------
    @guarded
    def _on_export(self) -> None:
        from attnatlas.app.export import head_html

        name = f"attnatlas-{_slug(self.model)}-L{self.layer}H{self.head}-{_slug(self.method)}.html"
        page = head_html(self.data, self.model, self.method, self.layer, self.head, self.colour_select.value)
        self.export_src.data = dict(html=[page], name=[name])

    def _sync_url(self) -> None:
        q: dict[str, Any] = {"model": self.model, "method": self.method}
        key = self.view_keys[self.tabs.active] if 0 <= self.tabs.active < len(self.view_keys) else "grid"
        if key in ("head", "math"):
            q.update(layer=self.layer, head=self.head)
        if key not in ("grid", "head"):
            q["view"] = key
        self.url.text = "?" + urlencode(q)

    def attach(self, doc: Document) -> None:
        doc.add_root(self.root)
        doc.title = f"attnatlas \u2013 {self.model}"


def _bare(tok: str) -> str:
    """A token without tokeniser markers, as users type it."""
    return tok.replace("\u2423", " ").lstrip("#").strip()


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _rgba(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) uint32 RGBA as Bokeh's image_rgba wants it."""
    h, w = img.shape[:2]
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = img[..., :3]
    out[..., 3] = 255
    return out.view(np.uint32).reshape(h, w)


def build_document(doc: Document, data: AppData, args: dict[str, Any] | None = None) -> Dashboard:
    """Fill `doc` with a fresh dashboard; used by main.py and by tests."""
    dash = Dashboard(data, args)
    dash.attach(doc)
    return dash
