"""The grid and any head inline in a notebook: `attnatlas.show(atlas, model)` and
`attnatlas.show(atlas, model, layer=2, head=3)`.

The view is the dashboard's own grid and head view on a standalone page (attnatlas.app.page), shown in a
sandboxed iframe: it needs no server and no kernel once drawn. With anywidget installed (`.[notebook]`)
the iframe sits in a widget, so the points selected in the head view come back to Python as
`view.selection`, a DataFrame of tokens; without it the page still works, and `view.tokens(points)`
reads any points by index.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnatlas.errors import InputError

MAX_SELECTION = 200_000  # indices accepted from the page at once (a head has at most 2 x MAX_ROWS points)

# The page goes into the iframe as a Blob URL, not srcdoc: Chromium took 12 s to load a 10 MB srcdoc that a
# Blob URL loads in 3 s (the 270-head SmolLM2 grid, 2 busy cores).
ESM = """
function render({ model, el }) {
  const f = document.createElement('iframe')
  f.setAttribute('sandbox', 'allow-scripts allow-downloads')
  f.style.width = '100%'; f.style.border = '0'; f.style.height = model.get('height') + 'px'
  const url = URL.createObjectURL(new Blob([model.get('page')], {type: 'text/html'}))
  f.src = url
  const page = model.get('page_id')
  const onmsg = (e) => {
    if (e.source !== f.contentWindow || !e.data || e.data.attnatlas !== page) { return }
    const d = e.data
    model.set('selection', {layer: d.layer | 0, head: d.head | 0, indices: Array.from(d.indices || [], Number)})
    model.save_changes()
  }
  const push = () => {
    const s = model.get('request')
    if (s && f.contentWindow) { f.contentWindow.postMessage(Object.assign({attnatlas_select: page}, s), '*') }
  }
  window.addEventListener('message', onmsg)
  model.on('change:request', push)
  el.appendChild(f)
  return () => { window.removeEventListener('message', onmsg); model.off('change:request', push); URL.revokeObjectURL(url) }
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
        page = traitlets.Unicode("").tag(sync=True)
        page_id = traitlets.Unicode("").tag(sync=True)
        height = traitlets.Int(800).tag(sync=True)
        selection = traitlets.Dict({}).tag(sync=True)  # from the page: {layer, head, indices}
        request = traitlets.Dict({}).tag(sync=True)  # to the page: select these points

    return AtlasWidget


def _in_notebook() -> bool:
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and type(shell).__name__ in ("ZMQInteractiveShell", "Shell")  # Jupyter, Colab


class AtlasView:
    """One inline view of an atlas (the grid of a model, or one head). Display it in a notebook cell;
    `.save(path)` writes the same page as one HTML file; `.selection` is what is selected in the head view."""

    def __init__(self, data: Any, page: Any):
        self._data = data
        self.page = page
        self.model, self.method = page.model, page.method
        cls = _widget_class()
        self.widget = cls(page=page.html, page_id=page.page_id, height=page.height) if cls is not None else None

    # ---- display ---------------------------------------------------------------------------------------------
    def _iframe(self) -> str:
        """The page as HTML for any notebook viewer: base64 in a script tag (only [A-Za-z0-9+/=], nothing to escape),
        loaded into a sandboxed iframe as a Blob URL by a few lines of script."""
        pid = self.page.page_id
        b64 = base64.b64encode(self.page.html.encode("utf-8")).decode("ascii")
        kind = "head" if self.page.single else "grid"
        return (f'<iframe id="attnatlas-{pid}" data-view="{kind}" sandbox="allow-scripts allow-downloads" '
                f'style="width:100%;height:{self.page.height}px;border:0"></iframe>'
                f'<script type="text/plain" id="attnatlas-page-{pid}">{b64}</script>'
                f"<script>(() => {{ const s = atob(document.getElementById('attnatlas-page-{pid}').textContent);"
                "const b = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) { b[i] = s.charCodeAt(i) }"
                f"document.getElementById('attnatlas-{pid}').src = URL.createObjectURL(new Blob([b], {{type: 'text/html'}}))"
                "})()</script>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """The widget where a kernel and the widget manager are there; the same page as HTML everywhere else
        (saved notebooks, nbconvert), so nothing but the Python link is lost without a kernel."""
        bundle: dict[str, Any] = {}
        if self.widget is not None:
            got = self.widget._repr_mimebundle_(include=include, exclude=exclude)
            bundle.update(got[0] if isinstance(got, tuple) else (got or {}))
        bundle["text/html"] = self._iframe()
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        what = f"L{self.page.heads[0][0]}H{self.page.heads[0][1]}" if self.page.single else "grid"
        return (f"<attnatlas view of {self.model} {what} ({self.method}): display it in a notebook cell, or "
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


def show(atlas: Any, model: str | None = None, method: str | None = None, layer: int | None = None,
         head: int | None = None, *, budget_mb: float | None = None) -> AtlasView:
    """Show `model`'s grid of heads (click or zoom into a cell to open a head), or one head with layer= and
    head=. `atlas` is a path or an opened Atlas; `method` a projection (default: umap, then t-SNE, then PCA).
    `budget_mb` bounds the point data the page holds (default 6 MB; see attnatlas.app.page for the rule).
    Returns an AtlasView; outside a notebook it says how to look at it."""
    from attnatlas.app import page as page_mod
    from attnatlas.app.data import AppData

    path = getattr(atlas, "path", atlas)
    data = AppData(str(path))
    budget = page_mod.INLINE_BUDGET if budget_mb is None else int(float(budget_mb) * (1 << 20))
    if not 1 << 20 <= budget <= 1 << 30:
        raise InputError(f"budget_mb={budget_mb}: choose 1 to 1024.")
    page = page_mod.build(data, model, method, layer, head, budget=budget)
    view = AtlasView(data, page)
    if not _in_notebook():
        print(f"attnatlas.show: not in a notebook, so nothing is drawn here. Save the view with "
              f"view.save('atlas.html') and open that file in a browser, or run `attnatlas serve {data.shown_path}`.",
              file=sys.stderr)
    return view
