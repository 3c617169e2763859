"""One browser session of the dashboard: the header, the tabs and the URL, composing the views.

`Dashboard(data, args)` builds fresh Bokeh models for one document; nothing here is shared between
sessions except the read-only `AppData`. Every tab comes from `views.registry` (one `ViewSpec` each: key,
title, when it is built and rebuilt, which models it serves); the views share the session's `Place` and call
back here through `views.base.Host`, and no view imports this module. The grid and the single head are the
two views this module routes between by name (a click in one opens the other). Every value that arrives
from the browser (URL arguments, widget values) is checked against the atlas's own lists before use.
"""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import urlencode

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import CustomJS, Div, Select, TabPanel, Tabs

from attnatlas.app.data import AppData
from attnatlas.app.hover import TOOLTIPS  # noqa: F401 - importable from here
from attnatlas.app.views import registry
from attnatlas.app.views.base import Place, View, ViewSpec, guarded, guarded_build, message, placeholder
from attnatlas.app.views.head import CUT_PREVIEW_CHARS, sequence_html  # noqa: F401 - importable from here

log = logging.getLogger(__name__)

URL_JS = "if (cb_obj.text) { window.history.replaceState(null, '', cb_obj.text) }"
# Widgets of the head view that tests and scripts reach through the dashboard.
HEAD_PARTS = ("src", "line_src", "match_src", "thumb_src", "img_src", "heat_src", "export_src", "points", "match_points",
              "mapper", "fig", "img_fig", "search", "search_mode", "search_count", "search_results", "sequence",
              "colour_select", "size_norm", "legend", "head_title", "layout_note", "similar", "layer_select", "head_select", "top",
              "attention_legend", "export_btn")


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


class Dashboard:
    """The views of one session and the routing between them."""

    def __init__(self, data: AppData, args: dict[str, Any] | None = None):
        args = args or {}
        self.data = data
        model = data.model(arg(args, "model"))
        layer, head = data.clamp(model, arg(args, "layer"), arg(args, "head"))
        self.place = Place(model, data.method(model, arg(args, "method")), layer, head)
        self.notice = "" if arg(args, "model") in (None, model) else f"Unknown model in the URL; showing {model}."
        self._busy = False
        self.specs: dict[str, ViewSpec] = {v.key: v for v in registry.shown(data)}  # in tab order
        self.views: dict[str, View] = {}  # the eager views, built with the page
        self.tab_views: dict[str, View] = {}  # lazy tabs built so far
        self._stale: set[str] = set()  # built tabs to bring up to the place when next shown
        self._build()
        view = arg(args, "view")
        if arg(args, "layer") is not None or arg(args, "head") is not None or view == "head":
            self.open_head(self.layer, self.head)
        if view in self.view_boxes:
            self.tabs.active = self.view_keys.index(view)
            self._open_view(view)
        self._sync_url()

    # ---- the session's place, as the views share it -------------------------------------------------------
    model = property(lambda self: self.place.model)
    method = property(lambda self: self.place.method)
    layer = property(lambda self: self.place.layer)
    head = property(lambda self: self.place.head)
    selected = property(lambda self: self.place.selected)

    @property
    def compare_panel(self) -> Any:
        return self.tab_views.get("compare")

    @property
    def math_panel(self) -> Any:
        return self.tab_views.get("math")

    @property
    def view_built(self) -> set[str]:
        return set(self.tab_views)

    def __getattr__(self, name: str) -> Any:
        if name in HEAD_PARTS and "head_view" in self.__dict__:
            return getattr(self.__dict__["head_view"], name)
        raise AttributeError(name)

    # ---- construction -------------------------------------------------------------------------------------
    def _build(self) -> None:
        d = self.data
        self.status = Div(text=html.escape(self.notice), styles={"color": "#555"}, disable_math=True)
        self.model_select = Select(title="Model", options=list(d.models), value=self.model, visible=len(d.models) > 1,
                                   width=180, name="model_select")
        self.method_select = Select(title="Projection", options=list(d.methods[self.model]), value=self.method, width=130,
                                    name="method_select")
        self.model_select.on_change("value", self._on_model)
        self.method_select.on_change("value", self._on_method)
        self.url = Div(text="", visible=False, render_as_text=True, name="url_state", disable_math=True)
        self.url.js_on_change("text", CustomJS(code=URL_JS))

        self.view_keys = list(self.specs)
        self.view_boxes: dict[str, Any] = {}  # the lazy tabs' boxes, holding a placeholder until first opened
        panels = []
        for key, spec in self.specs.items():
            if spec.eager:
                self.views[key] = spec.build(d, self.place, self)
                # A waiting view joins the document when first opened: a smaller first page that draws sooner.
                child = self.views[key].root if spec.waiting is None else Div(text=spec.waiting, disable_math=True)
            else:
                child = self.view_boxes[key] = column(placeholder(spec.title), name=f"view_box_{key}")
            panels.append(TabPanel(child=child, title=spec.title))
        self.grid_tab, self.head_view = self.views["grid"], self.views["head"]
        self.grid, self.grid_panel = self.grid_tab.grid, self.grid_tab.root
        self.head_panel = self.head_view.root
        self.tabs = Tabs(tabs=panels, name="tabs", sizing_mode="stretch_width")  # the grid fills the window width
        self.tabs.on_change("active", self._on_tab)
        header = row(Div(text="<b>attnatlas</b>", styles={"font-size": "18px", "margin-top": "24px"}, disable_math=True),
                     self.model_select, self.method_select, self.status, self.url)
        self.root = column(header, self.tabs, name="root", sizing_mode="stretch_width")

    def report_error(self, message: str) -> None:
        self.status.text = f'<span style="color:#b00">Error: {html.escape(message)}</span>'

    # ---- the head view ------------------------------------------------------------------------------------
    @property
    def _head_tab(self) -> int:
        return self.view_keys.index("head")

    def open_head(self, layer: int, head: int) -> None:
        self.tabs.active = self._head_tab
        self.show_head(layer, head)
        self._mount_head()

    def show_head(self, layer: Any, head: Any) -> None:
        self.head_view.show(layer, head)

    def open_model_head(self, model: str, layer: int, head: int) -> None:
        """Open a head of any model (the head map shows several): switch models first when needed."""
        model = self.data.model(model)
        if model != self.model:
            self.model_select.value = model  # _on_model: widgets, grid and views of the new model
        self.open_head(layer, head)

    def _mount_head(self) -> None:
        i = self._head_tab
        if self.tabs.tabs[i].child is not self.head_panel:
            # A new tabs list, not a new child: BokehJS redraws Tabs on `tabs` changes only.
            panel = TabPanel(child=self.head_panel, title=self.specs["head"].title)
            self.tabs.tabs = [*self.tabs.tabs[:i], panel, *self.tabs.tabs[i + 1:]]

    def _step(self, which: str) -> None:
        self.head_view.step(which)

    def head_changed(self, what: str) -> None:
        """The head ("head") or the clicked point ("selection") changed: the tabs that follow the head follow,
        now if shown, else when next opened."""
        if what == "head":
            self._sync_url()
        active = self._active_key()
        for key, view in self.tab_views.items():
            if self.specs[key].follows_head:
                if key == active:
                    view.update()
                else:
                    self._stale.add(key)

    # ---- tabs ---------------------------------------------------------------------------------------------
    def _active_key(self) -> str:
        return self.view_keys[self.tabs.active] if 0 <= self.tabs.active < len(self.view_keys) else "grid"

    @guarded
    def _on_tab(self, attr: str, old: int, new: int) -> None:
        if new == self._head_tab and not self.head_view.loaded:
            self.show_head(self.layer, self.head)
        if new == self._head_tab:
            self._mount_head()
        key = self._active_key()
        if key in self.view_boxes:
            self._open_view(key)
        self._sync_url()

    def _open_view(self, key: str) -> None:
        """Build a lazy tab on first open; bring a built one up to the place when it fell behind. A model the
        view does not serve gets the reason in its place."""
        if key not in self.tab_views:
            self._stale.discard(key)
            spec = self.specs[key]
            refusal = spec.refusal(self.data, self.model)
            view = message(refusal) if refusal else guarded_build(key, spec.build, self.data, self.place, self)
            if hasattr(view, "update"):
                self.tab_views[key] = view
            self.view_boxes[key].children = [getattr(view, "root", view)]
        elif key in self._stale:
            self._stale.discard(key)
            self.tab_views[key].update()

    def _reset_views(self) -> None:
        """After a model change the per-model tabs are built again when next opened (now, if one is shown)."""
        per_model = [k for k, spec in self.specs.items() if spec.per_model and not spec.eager]
        for key in per_model:
            if key in self.tab_views:
                del self.tab_views[key]
                self.view_boxes[key].children = [placeholder(self.specs[key].title)]
        active = self._active_key()
        if active in per_model:
            self._open_view(active)

    @guarded
    def _on_model(self, attr: str, old: str, new: str) -> None:
        p = self.place
        p.model = self.data.model(new)
        p.method = self.data.method(p.model, p.method)
        self._busy = True
        try:
            self.method_select.options = list(self.data.methods[p.model])
            self.method_select.value = p.method
        finally:
            self._busy = False
        self.head_view.set_model()
        self.grid_tab.update()
        p.layer, p.head = 0, 0
        if self.tabs.active == self._head_tab:
            self.show_head(0, 0)
        self._reset_views()
        self._sync_url()

    @guarded
    def _on_method(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        p = self.place
        p.method = self.data.method(p.model, new)
        p.selected = None
        self.head_view.src.selected.indices = []
        self.grid_tab.update()
        if self.tabs.active == self._head_tab or self.head_view.loaded:
            self.show_head(p.layer, p.head)
        self._sync_url()

    # ---- URL ----------------------------------------------------------------------------------------------
    def _sync_url(self) -> None:
        if "tabs" not in self.__dict__:
            return  # still building
        q: dict[str, Any] = {"model": self.model, "method": self.method}
        spec = self.specs[self._active_key()]
        if spec.follows_head:
            q.update(layer=self.layer, head=self.head)
        if not spec.eager:  # the grid is the default; the head view is named by layer and head
            q["view"] = spec.key
        self.url.text = "?" + urlencode(q)

    def attach(self, doc: Document) -> None:
        doc.add_root(self.root)
        doc.title = f"attnatlas \u2013 {self.model}"


def build_document(doc: Document, data: AppData, args: dict[str, Any] | None = None) -> Dashboard:
    """Fill `doc` with a fresh dashboard; used by main.py and by tests."""
    dash = Dashboard(data, args)
    for add_on in registry.ADD_ONS:  # e.g. the "Your text" box and its markers in the head view (serve --live)
        add_on(dash, doc)
    dash.attach(doc)
    return dash
