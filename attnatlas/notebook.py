"""The grid and any head inline in a notebook: `attnatlas.show(atlas, model)` and
`attnatlas.show(atlas, model, layer=2, head=3)`.

The view is the dashboard's own grid and head view on a standalone page (attnatlas.app.page), shown in a
sandboxed iframe: it needs no server and no kernel once drawn. In Jupyter a grid shows first as its still image
(attnatlas.app.still: no Bokeh), replaced in place by the page once built. With anywidget installed (`.[notebook]`)
a second, empty output (a widget) links the iframe with Python, so the points selected in the head view
come back as `view.selection`, a DataFrame of tokens; without it the page still works, and
`view.tokens(points)` reads any points by index.
"""

from __future__ import annotations

import base64
import html
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.errors import InputError

MAX_SELECTION = 200_000  # indices accepted from the page at once (a head has at most 2 x MAX_ROWS points)
MAX_FINGERPRINT_FILES = 50_000  # a bigger atlas is opened afresh on every show (its walk would cost more than it saves)
_OPENED: dict[str, tuple[Any, Any]] = {}  # the last atlas shown: path -> (fingerprint, AppData with its caches)

# The view is the cell's HTML output (AtlasView._iframe), so a reopened notebook still draws it; the widget is
# a second, empty output that only links that page's iframes (found by data-page) with Python: a widget output
# reopened without its kernel says "model not found", and the view beside it is not lost with it.
ESM = """
function render({ model, el }) {
  const page = model.get('page_id')
  const frames = () => Array.from(document.querySelectorAll('iframe[data-page]')).filter((f) => f.dataset.page === page)
  const onmsg = (e) => {
    if (!e.data || e.data.attnatlas !== page || !frames().some((f) => e.source === f.contentWindow)) { return }
    const d = e.data
    model.set('selection', {layer: d.layer | 0, head: d.head | 0, indices: Array.from(d.indices || [], Number)})
    model.save_changes()
  }
  const push = () => {
    const s = model.get('request')
    for (const f of s ? frames() : []) { f.contentWindow.postMessage(Object.assign({attnatlas_select: page}, s), '*') }
  }
  window.addEventListener('message', onmsg)
  model.on('change:request', push)
  return () => { window.removeEventListener('message', onmsg); model.off('change:request', push) }
}
export default { render }
"""


def _widget_class() -> Any:
    """The anywidget bridge class, or None when anywidget is not installed."""
    try:
        import anywidget
        import traitlets
    except ImportError:
        return None

    class AtlasWidget(anywidget.AnyWidget):
        _esm = ESM
        page_id = traitlets.Unicode("").tag(sync=True)  # the page whose iframe it links
        selection = traitlets.Dict({}).tag(sync=True)  # from the page: {layer, head, indices}
        request = traitlets.Dict({}).tag(sync=True)  # to the page: select these points

        def __repr__(self) -> str:  # the text/plain of its output: what a viewer with no widget renderer shows
            return "(attnatlas: links the view above with Python while its kernel runs)"

    return AtlasWidget


def _in_notebook() -> bool:
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")  # Jupyter, Colab


class AtlasView:
    """One inline view of an atlas (the grid of a model, or one head). Display it in a notebook cell;
    `.save(path)` writes the same page as one HTML file; `.selection` is what is selected in the head view."""

    def __init__(self, data: Any, model: str, method: str, layer: int | None = None, head: int | None = None,
                 budget: int | None = None):
        self._data = data
        self.model, self.method = model, method
        self._args = dict(layer=layer, head=head, budget=budget)
        self._page_id = uuid.uuid4().hex
        self._page: Any = None
        self._widget: Any = False  # False: not made yet

    # The page and the widget are made when first used, so a notebook can show the grid's still image before
    # importing Bokeh (~0.9 s) and anywidget (~0.25 s) to build them.
    @property
    def page(self) -> Any:
        """The standalone page (attnatlas.app.page.Page), built on first use."""
        if self._page is None:
            from attnatlas.app import page as page_mod

            a = self._args
            kw = {} if a["budget"] is None else {"budget": a["budget"]}
            self._page = page_mod.build(self._data, self.model, self.method, a["layer"], a["head"], page_id=self._page_id, **kw)
        return self._page

    @property
    def widget(self) -> Any:
        """The anywidget bridge of the page (None without anywidget)."""
        if self._widget is False:
            cls = _widget_class()
            self._widget = cls(page_id=self._page_id) if cls is not None else None
        return self._widget

    # ---- display ---------------------------------------------------------------------------------------------
    def _iframe(self) -> str:
        """The page as HTML for any notebook viewer, loaded into a sandboxed iframe as a Blob URL by a few lines of
        script. The page's heads block is base64 already and goes in as it is, posted into the page once it has
        loaded; the rest of the page is base64 encoded (only [A-Za-z0-9+/=], nothing to escape).
        A viewer that runs no scripts (GitHub's preview) shows a note instead, and the grid as a still image."""
        pid = self.page.page_id
        text, (a, b) = self.page.html, self.page.block
        parts = [base64.b64encode(text[:a].encode("utf-8")).decode("ascii"), text[a:b],
                 base64.b64encode(text[b:].encode("utf-8")).decode("ascii")]
        kind = "head" if self.page.single else "grid"
        what = html.escape(f"{self.model} {self._what()} ({self.method})")
        img = (f'<br><img src="{self.page.still}" alt="grid of {what}" width="{self.page.still_px}" style="max-width:100%">'
               if self.page.still else "")
        # Element ids are per output (the same view shown twice is two outputs); the page id stays the page's.
        out = f"{pid}-{uuid.uuid4().hex[:8]}"
        still = (f'<div id="attnatlas-still-{out}" style="font:13px sans-serif;color:#555;background:#fff">'
                 f"<span>attnatlas view of {what}: this viewer does not run the notebook's scripts, so the interactive view is "
                 "not drawn (the grid below is a still image). Open the notebook in Jupyter, or the page written by "
                 f"<code>view.save(...)</code> in a browser.</span><span hidden>{html.escape(self._busy_note())}</span>{img}</div>")
        # The iframe gets its height from the script: a viewer without scripts shows the note, not an empty box.
        # With scripts, a grid's still image stays over the iframe (clicks pass through) until the page says it is
        # drawn, laid out as the still output shown first (_still_bundle): no blank box while BokehJS draws.
        # A white frame: the page is drawn for white, and a dark theme (VS Code's) would show through a transparent one.
        return ('<div style="position:relative">' + still
                + f'<iframe id="attnatlas-{out}" data-page="{pid}" data-view="{kind}" sandbox="allow-scripts allow-downloads" '
                'style="width:100%;height:0;border:0;background:#fff"></iframe></div>'
                + "".join(f'<script type="text/plain" id="attnatlas-page-{out}-{i}">{p}</script>' for i, p in enumerate(parts))
                + f"<script>(() => {{ const still = document.getElementById('attnatlas-still-{out}');"
                f"const f = document.getElementById('attnatlas-{out}'); f.style.height = '{self.page.height}px';"
                "if (!still.querySelector('img')) { still.remove() } else {"
                "still.firstChild.remove(); still.firstChild.hidden = false;"
                "still.style.cssText += ';position:absolute;top:0;left:0;right:0;pointer-events:none';"
                "const done = (e) => { if (e && (e.source !== f.contentWindow || !e.data || e.data.attnatlas_ready !== "
                f"'{pid}')) {{ return }} still.remove(); window.removeEventListener('message', done) }};"
                "window.addEventListener('message', done); setTimeout(done, 20000) }"
                "const bytes = (s) => { s = atob(s); const b = new Uint8Array(s.length);"
                "for (let i = 0; i < s.length; i++) { b[i] = s.charCodeAt(i) } return b };"
                "window.addEventListener('message', (e) => { const d = e.data; if (e.source === f.contentWindow && d && "
                f"d.attnatlas_height === '{pid}' && d.h > 0 && d.h < 20000) {{ f.style.height = (d.h | 0) + 'px' }} }});"
                f"const part = (i) => document.getElementById('attnatlas-page-{out}-' + i).textContent;"
                f"f.addEventListener('load', () => f.contentWindow.postMessage({{attnatlas_block: '{pid}', text: part(1)}}, '*'));"
                "f.src = URL.createObjectURL(new Blob([bytes(part(0)), bytes(part(2))], {type: 'text/html'})) })()</script>")

    def _busy_note(self) -> str:
        return f"attnatlas view of {self.model} {self._what()} ({self.method}): drawing the interactive view\u2026"

    def _what(self) -> str:
        a = self._args
        return "grid" if a["layer"] is None else f"L{int(a['layer'])}H{int(a['head'])}"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """The page as HTML: any viewer that runs the output's scripts draws it, with or without a kernel."""
        return {"text/html": self._iframe(), "text/plain": repr(self)}

    def _ipython_display_(self) -> None:
        """In IPython: the page, then (anywidget installed) the widget that links it with Python, as two outputs.
        A grid not built yet first shows its still image, replaced in place by the page once built: the grid is on
        screen before Bokeh is even imported."""
        from IPython.display import display

        if self._page is None and self._args["layer"] is None:
            handle = display(self._still_bundle(), raw=True, display_id=True)
            if handle is not None:  # None outside a running IPython: nothing to update there
                self.page  # noqa: B018 (builds it)
                handle.update(self._repr_mimebundle_(), raw=True)
            else:
                display(self._repr_mimebundle_(), raw=True)
        else:
            display(self._repr_mimebundle_(), raw=True)
        if self.widget is not None:
            display(self.widget)

    def _still_bundle(self) -> dict[str, Any]:
        """The grid's still image, laid out as _iframe lays it out over the page until the page is drawn."""
        from attnatlas.app.still import grid_still

        url, px = grid_still(self._data, self.model, self.method)
        what = html.escape(f"{self.model} grid ({self.method})")
        return {"text/html": f'<div style="font:13px sans-serif;color:#555;background:#fff"><span>{html.escape(self._busy_note())}'
                             f'</span><br><img src="{url}" alt="grid of {what}" width="{px}" style="max-width:100%"></div>',
                "text/plain": repr(self)}

    def __repr__(self) -> str:
        return (f"<attnatlas view of {self.model} {self._what()} ({self.method}): display it in a notebook cell, or "
                f"view.save('page.html') and open that file in a browser>")

    def save(self, path: str | Path) -> Path:
        """Write the page as one HTML file that any browser opens offline."""
        p = Path(path).expanduser()
        p.write_text(self.page.html, encoding="utf-8")
        return p

    # ---- Python in the loop ----------------------------------------------------------------------------------
    def tokens(self, points: Any, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
        """The tokens of point indices of the head view (queries 0..R-1, then keys R..2R-1, as the page
        numbers them): sequence, position, token, kind, and the token's row in the atlas."""
        pts = np.asarray(points, dtype=np.int64).reshape(-1)
        R = len(self.page.rows)
        if len(pts) > MAX_SELECTION or (len(pts) and (pts.min() < 0 or pts.max() >= 2 * R)):
            raise InputError(f"Point indices must lie in 0-{2 * R - 1} (this view has {R:,} tokens, a query and a key each).")
        rows = self.page.rows[pts % R] if R else np.zeros(0, np.int64)
        tok = self._data.atlas.tokens(self.model)
        t = self._data.tokens(self.model, self.method)
        kind = np.where(pts < R, "query", "key")
        out = pd.DataFrame({
            "sequence": tok["sequence"].to_numpy()[rows].astype(np.int64),
            "position": tok["position"].to_numpy()[rows].astype(np.int64),
            "token": np.asarray(t.columns["token"])[t.point_of_row[rows]] if len(rows) else np.zeros(0, object),
            "kind": kind,
            "row": rows.astype(np.int64),
            "point": pts,
        })
        if layer is not None:
            out.insert(0, "head", head)
            out.insert(0, "layer", layer)
        return out

    @property
    def points(self) -> pd.DataFrame:
        """Every point of the head view as `tokens` describes it; its index is the point's number."""
        return self.tokens(np.arange(2 * len(self.page.rows))).set_index("point", drop=False).rename_axis(None)

    @property
    def selection(self) -> pd.DataFrame:
        """The points selected (lasso, box or click) in the head view, as a DataFrame of tokens with the head
        they were selected in. Needs the widget (anywidget installed); empty until something is selected."""
        if self.widget is None:
            raise InputError("Selections come back to Python through anywidget: `pip install attnatlas[notebook]` "
                             "(or `pip install anywidget`), then show the view again.")
        s = self.widget.selection or {}
        layer, head = int(s.get("layer", -1)), int(s.get("head", -1))
        if (layer, head) not in self.page.heads:
            return self.tokens([], layer=-1, head=-1)  # nothing selected yet
        return self.tokens(list(s.get("indices", []))[:MAX_SELECTION], layer=layer, head=head)

    def select(self, points: Any, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
        """Select points of a head in the page from Python (shown there as if lassoed); returns their tokens."""
        if layer is None or head is None:
            layer, head = self.page.heads[0] if len(self.page.heads) == 1 else (None, None)
            if layer is None:
                raise InputError("Say which head: view.select(points, layer=L, head=H).")
        if (int(layer), int(head)) not in self.page.heads:
            raise InputError(f"L{layer}H{head} is not in this view; it holds {len(self.page.heads)} heads, "
                             f"e.g. L{self.page.heads[0][0]}H{self.page.heads[0][1]}.")
        df = self.tokens(points, layer=int(layer), head=int(head))
        if self.widget is not None:
            sel = dict(layer=int(layer), head=int(head), indices=[int(i) for i in df["point"]])
            self.widget.request = sel
            self.widget.selection = sel
        return df


def _fingerprint(path: str) -> tuple | None:
    """Every file of a local atlas with its size and mtime: any write to the atlas changes it. None for a remote
    atlas or a very big one."""
    if "://" in path or not os.path.isdir(path):
        return None
    seen = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            seen.append((root, f, st.st_size, st.st_mtime_ns))
        if len(seen) > MAX_FINGERPRINT_FILES:
            return None
    return tuple(seen)


def _app_data(path: str) -> Any:
    """The atlas opened for the app, reused from the last show while no file of it changed: its layouts, grid
    image and head table are then read once per kernel (a grid, then a head of the same model, costs one read)."""
    from attnatlas.app.data import AppData

    fp = _fingerprint(path)
    hit = _OPENED.get(path)
    if fp is not None and hit is not None and hit[0] == fp:
        return hit[1]
    data = AppData(path)
    _OPENED.clear()
    if fp is not None:
        _OPENED[path] = (fp, data)
    return data


def show(atlas: Any, model: str | None = None, method: str | None = None, layer: int | None = None,
         head: int | None = None, *, budget_mb: float | None = None) -> AtlasView:
    """Show `model`'s grid of heads (click or zoom into a cell to open a head), or one head with layer= and
    head=. `atlas` is a path or an opened Atlas; `method` a projection (default: umap, then t-SNE, then PCA).
    `budget_mb` bounds the point data the page holds (default 4 MB; see attnatlas.app.page for the rule).
    Returns an AtlasView; outside a notebook it says how to look at it."""
    from attnatlas.app import still

    path = getattr(atlas, "path", atlas)
    data = _app_data(str(path))
    budget = None if budget_mb is None else int(float(budget_mb) * (1 << 20))
    if budget is not None and not 1 << 20 <= budget <= 1 << 30:
        raise InputError(f"budget_mb={budget_mb}: choose 1 to 1024.")
    model, method = still.check(data, model, method, layer, head)  # bad input fails here, not when displayed
    if layer is None:
        still.check_grid(data, model, method)
    view = AtlasView(data, model, method, layer, head, budget)
    if not _in_notebook():
        print(f"attnatlas.show: not in a notebook, so nothing is drawn here. Save the view with "
              f"view.save('atlas.html') and open that file in a browser, or run `attnatlas serve {data.shown_path}`.",
              file=sys.stderr)
    return view
