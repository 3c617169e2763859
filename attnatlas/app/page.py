"""A standalone page of the dashboard's own views: the grid (views.grid.GridView) and the single head
(views.head.HeadView), with BokehJS inlined and CustomJS in place of the server callbacks, so it works
with no server: inline in a notebook (attnatlas.show) and as one file (`attnatlas export --html`).

The views are built exactly as a session builds them; this module only adds what a page without a
server needs: every embedded head's points in one data source (`store`), and JS that opens a head from
the grid (click a cell, or zoom into one), switches colour modes, searches tokens, draws attention lines
on a click, and posts the selected points to the notebook around it (attnatlas.notebook's widget listens).

Size rule: every embedded head keeps the same token rows, whole sequences picked in a seeded order, as
many as fit `budget` bytes of point data (each row costs, per head, 2 points x 8 bytes plus its top-k
attention at 3 bytes a weight), at most `max_rows`. Heads the layout sampled keep only rows with a point.
Coordinates and norms travel as uint16 steps of each head's own range (1/65,534 of it: finer than a pixel at
any zoom the figure allows), attention weights as uint8 (1/255 steps).
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from bokeh.embed import file_html
from bokeh.layouts import column, row
from bokeh.models import (
    BoxSelectTool,
    ColumnDataSource,
    CustomJS,
    Div,
    LassoSelectTool,
    TabPanel,
    Tabs,
)
from bokeh.palettes import Viridis256
from bokeh.resources import INLINE

from attnatlas.app import colors
from attnatlas.app.data import AppData, stack_counts
from attnatlas.app.still import INLINE_BUDGET, check, check_grid, grid_cell
from attnatlas.app.views.base import Place
from attnatlas.app.views.grid import HAND_OVER, GridView
from attnatlas.app.views.head import (
    BASE_ALPHA,
    DIM_ALPHA,
    DIM_COLOUR,
    LINE_MIN_WEIGHT,
    MAX_LIST,
    MAX_THUMBS,
    THUMB_SPAN,
    HeadView,
    patch_thumbnail,
)
from attnatlas.errors import InputError
from attnatlas.render.safe import JS_ESCAPE, seal

# 2-byte columns first, so every typed view into the block is aligned.
BLOB_COLUMNS = (("x", np.uint16), ("y", np.uint16), ("norm", np.uint16), ("stack", np.uint16), ("tk_idx", np.uint16),
                ("tk_w", np.uint8))
QUANT = 65534  # steps of a head's range; 65535 stands for NaN (x, y, norm) and for "no key" (tk_idx)
POINT_BYTES = 8  # x, y, norm (uint16 steps) and stack count (uint16) of one point
WEIGHT_BYTES = 3  # a top-k entry: key row (uint16, so at most 65,534 rows) and weight (uint8, 1/255 steps)
STATIC_ROW_BYTES = 260  # token, context and the other per-row columns, as JSON, both points of a row
EXPORT_BUDGET = 34 << 20  # `export --html`: x 4/3 for base64, + 3 MB of BokehJS and grid image: under 50 MB
MAX_ROWS = 50_000  # one head of 100,000 points stays smooth on canvas and WebGL; under QUANT for uint16 key rows
MIN_ROWS = 200  # below this a head is not worth drawing: fewer heads are embedded instead


@dataclass(frozen=True)
class Page:
    """A built page: the standalone HTML, the token rows each head keeps, and what was embedded."""

    html: str
    page_id: str
    model: str
    method: str
    rows: np.ndarray  # (R,) atlas token rows of the embedded points: point i < R is the query of rows[i], R + i its key
    block: tuple[int, int]  # where in `html` the heads' base64 block lies: a notebook posts it in after the page loads
    heads: list[tuple[int, int]]  # embedded (layer, head) pairs
    total_rows: int  # token rows of the layout
    data_bytes: int  # point and attention bytes embedded (before base64)
    height: int  # px the page needs
    single: bool  # one head, no grid
    still: str = ""  # the grid image (data URL) a viewer that runs no scripts can show instead
    still_px: int = 0  # its width as the page shows it (it is drawn at twice that)


def _pick_rows(data: AppData, model: str, method: str, n_rows: int, seed: int = 0) -> np.ndarray:
    """Indices into the layout's rows (Tokens.rows) of whole sequences, seeded, up to n_rows rows."""
    t = data.tokens(model, method)
    if n_rows >= len(t.rows):
        return np.arange(len(t.rows))
    seq = t.seq_of_row[t.rows]
    order = np.random.default_rng(seed).permutation(np.unique(seq))
    counts = dict(zip(*np.unique(seq, return_counts=True)))
    keep, total = [], 0
    for s in order:
        if total + counts[s] > n_rows:
            continue  # a shorter sequence may still fit
        keep.append(s)
        total += counts[s]
    return np.flatnonzero(np.isin(seq, keep))


def plan(data: AppData, model: str, method: str, heads: list[tuple[int, int]], budget: int,
         max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """(rows kept per head, heads kept) under the size rule: rows shrink first, down to MIN_ROWS; then heads."""
    total = len(data.tokens(model, method).rows)
    k = int(data.infos[model].attrs.get("attention_topk", 0) or 0) if data.has_attention(model) else 0
    per_row_head = 2 * POINT_BYTES + k * WEIGHT_BYTES
    n_heads = len(heads)
    rows = min(total, max_rows, int(budget // max(n_heads * per_row_head + STATIC_ROW_BYTES, 1)))
    if rows < min(MIN_ROWS, total):
        rows = min(MIN_ROWS, total)
        n_heads = max(1, int((budget - rows * STATIC_ROW_BYTES) // (rows * per_row_head)))
    return rows, min(n_heads, len(heads))


def build(data: AppData, model: str | None = None, method: str | None = None, layer: int | None = None,
          head: int | None = None, budget: int = INLINE_BUDGET, max_rows: int = MAX_ROWS,
          title: str | None = None, page_id: str | None = None) -> Page:
    """The page of `model`'s grid (layer and head None) or of one head. Arguments are validated here."""
    model, method = check(data, model, method, layer, head)
    info = data.infos[model]
    L, H = info.n_layers, info.n_heads
    g = data.grid_layouts(model, method)
    single = layer is not None
    if single:
        wanted = [(int(layer), int(head))]
    else:
        check_grid(data, model, method)
        wanted = [(a, b) for a in range(L) for b in range(H) if g.done[a, b]]
    n_rows, n_heads = plan(data, model, method, wanted, budget, max_rows)
    heads = wanted[:n_heads]
    keep = _pick_rows(data, model, method, n_rows)  # indices into the layout's rows
    t = data.tokens(model, method)
    n_all = len(t.rows)
    R = len(keep)
    pts = np.concatenate([keep, keep + n_all])  # the kept points: queries, then keys

    # The heads' arrays are read and packed on a second thread while this one builds the Bokeh document
    # (reads and numpy release the GIL): the two took about the same time one after the other.
    k = int(info.attrs.get("attention_topk", 0) or 0) if data.has_attention(model) else 0
    with ThreadPoolExecutor(1) as pool:
        packing = pool.submit(_pack_heads, data, model, t, heads, g.coords, keep, k)
        place = Place(model, method, *(heads[0] if heads else (0, 0)))
        hv = HeadView(data, place, on_change=lambda what: None, on_error=_raise)
        hv.show(place.layer, place.head)  # the app's own drawing of the first head, cut to the kept points below
        static = {k_: np.asarray(v)[pts] for k_, v in hv.src.data.items()}
        hv.src.data = static
        hv.src.selected.indices = []
        hv.fig.add_tools(LassoSelectTool(), BoxSelectTool())
        if not single:
            gv = GridView(data, on_open=lambda a, b: None, on_error=_raise)
            cell = grid_cell(L, H)
            gv.show(model, method, cell_px=2 * cell)  # twice the shown size: sharp on high-density screens
            # Its own size where the column allows, scaled down (aspect kept) in a narrower one: no head cut off.
            gv.fig.width, gv.fig.height = H * cell + 60, L * cell + 50
            gv.fig.sizing_mode, gv.fig.max_width = "scale_width", gv.fig.width
            gv.info.sizing_mode, gv.info.max_width = "stretch_width", max(gv.fig.width, 600)
        blob, offsets, scales, nbytes = packing.result()
    where = np.full(L * H, -1, np.int32)
    for j, (a, b) in enumerate(heads):
        where[a * H + b] = j
    table = data.head_table(model, method)
    quality = {c: [float(table[c].iat[a * H + b]) if c in table else float("nan") for a, b in heads]
               for c in ("trustworthiness", "knn_kept")}
    blob_id = f"attnatlas-heads-{uuid.uuid4().hex[:12]}"
    store = ColumnDataSource(data=dict(trust=quality["trustworthiness"], knn=quality["knn_kept"], **scales), name="page_heads")

    # Colour modes: head-independent palette indices, from the app's own colour code (norm is per head, in JS).
    modes = colors.modes(data.modality(model))
    mcols: dict[str, list] = {"key": [], "index": [], "palette": [], "legend": []}
    sub_cols = {c: np.asarray(v)[pts] for c, v in t.columns.items()}
    for key, _ in modes:
        if key == "norm":
            continue
        index, pal, legend = colors.indexed(key, sub_cols, np.zeros(2 * R, np.float32))
        mcols["key"].append(key), mcols["index"].append(index.astype(np.int32))
        mcols["palette"].append(list(pal)), mcols["legend"].append(legend)
    mode_src = ColumnDataSource(data=mcols, name="page_colour_modes")
    # Image models: every kept patch's thumbnail, drawn (as the app draws them) when a zoom shows few points.
    thumbs = _thumbnails(data, model, t.rows[keep]) if data.modality(model) == "image" else None

    page_id = page_id or uuid.uuid4().hex
    meta = dict(blob=blob_id, offsets=offsets, R=R, k=k, L=L, H=H, model=model, method=method, page=page_id, single=single,
                shown=f"{R:,} of {n_all:,} tokens" if R < n_all else f"all {n_all:,} tokens",
                viridis=list(Viridis256), dim=DIM_COLOUR, dim_alpha=DIM_ALPHA, base_alpha=BASE_ALPHA,
                line_min=LINE_MIN_WEIGHT, max_list=MAX_LIST, hand_over=HAND_OVER, max_thumbs=MAX_THUMBS, thumb_span=THUMB_SPAN,
                query=colors.QUERY, key=colors.KEY, fig_w=hv.fig.width, fig_h=hv.fig.height)
    args = dict(store=store, src=hv.src, line_src=hv.line_src, match_src=hv.match_src, mapper=hv.mapper,
                modes=mode_src, colour=hv.colour_select, legend=hv.legend, search=hv.search, search_mode=hv.search_mode,
                search_count=hv.search_count, search_results=hv.search_results, seq=hv.sequence, title=hv.head_title,
                lsel=hv.layer_select, hsel=hv.head_select, xr=hv.xr, yr=hv.yr, where=where, meta=json.dumps(meta),
                thumb_src=hv.thumb_src, thumbs=thumbs)

    def js(action: str, **extra: Any) -> CustomJS:
        return CustomJS(args=dict(args, action=action, **extra), code=JS_ESCAPE + PAGE_JS)

    hv.colour_select.options = [(k_, lab) for k_, lab in modes]
    hv.layer_select.options = sorted({str(a) for a, _ in heads}, key=int)
    hv.head_select.options = [str(b) for b in range(H)]
    hv.colour_select.js_on_change("value", js("colour"))
    hv.search.js_on_change("value", js("search"))
    hv.search_mode.js_on_change("active", js("search"))
    hv.layer_select.js_on_change("value", js("select"))
    hv.head_select.js_on_change("value", js("select"))
    hv.src.selected.js_on_change("indices", js("tap"))
    hv.fig.js_on_event("selectiongeometry", js("geometry"))
    if thumbs is not None:
        hv.fig.js_on_event("rangesupdate", js("thumbs"))
    hv.sequence.text = "Click a point to see where it attends; lasso or box-select points to hand them to Python."
    note = Div(text=f"<small>This page holds {html.escape(meta['shown'])} per head (whole sequences), "
                    f"{len(heads)} of {L * H} heads; search matches token text. "
                    f"For everything, run <code>attnatlas serve</code>.</small>", disable_math=True, width=420)
    controls = column(hv.head_title, row(hv.layer_select, hv.head_select), hv.colour_select, hv.legend,
                      row(hv.search, hv.search_mode), hv.search_count, hv.search_results, hv.attention_legend,
                      hv.sequence, note)
    head_panel = row(hv.fig, controls, styles={"flex-wrap": "wrap"}, name="page_head")  # a narrow column: controls below
    ready = js("init")
    still, still_px = "", 0
    if single:
        root = head_panel
        height = 780
    else:
        if n_heads < len(wanted):
            gv.info.text += (f"<br><b>This page embeds {n_heads} of {len(wanted)} heads</b> (layers in order) to stay "
                             f"under its size; the others open with <code>attnatlas serve</code>.")
        tabs = Tabs(tabs=[TabPanel(child=column(gv.info, gv.fig, sizing_mode="stretch_width"), title="All heads"),
                        TabPanel(child=head_panel, title="Single head")], name="page_tabs", sizing_mode="stretch_width")
        grid_args = dict(cells=gv.cell_src, tabs=tabs, gx=gv.x_range, gy=gv.y_range)
        gv.cell_src.selected.js_on_change("indices", js("cell", **grid_args))
        tabs.js_on_change("active", js("tab"))
        gv.fig.js_on_event("rangesupdate", js("zoom", **grid_args))
        root = column(tabs, name="page_root", sizing_mode="stretch_width")
        height = max(gv.fig.height + 180, 800)
        still = str(gv.base_src.data["url"][0]) if len(gv.base_src.data.get("url", [])) else ""
        still_px = H * cell
    root.tags = [ready]  # part of the document; run once BokehJS has built it
    seal(root)
    doc_title = title or f"attnatlas \u2013 {model} ({method})"
    from bokeh.document import Document
    doc = Document()
    doc.add_root(root)
    doc.js_on_event("document_ready", ready)
    doc.title = doc_title
    # The views' server callbacks are inert on a page; the CustomJS above stands in for them.
    page = file_html(doc, INLINE, title=doc_title, suppress_callback_warning=True)
    block = base64.b64encode(b"".join(blob)).decode("ascii")  # only [A-Za-z0-9+/=]: nothing to escape
    at = page.index("<head>") + len("<head>")  # the first one: the page's own, before BokehJS
    page = page[:at] + BLOCK_LISTENER.replace("PAGE_ID", page_id) + page[at:]
    end = page.rindex("</body>")  # the last one: BokehJS's own source holds the string too
    before = page[:end] + f'<script type="application/octet-stream" id="{blob_id}">'
    page = before + block + "</script>\n" + page[end:]
    return Page(page, page_id, model, method, np.asarray(t.rows[keep]), (len(before), len(before) + len(block)), heads, n_all,
                nbytes, height, single, still, still_px)


def _thumbnails(data: AppData, model: str, rows: np.ndarray) -> ColumnDataSource:
    """The patch thumbnails of the kept token rows, from the head view's own cropping (1 x 1 and ok 0 where a
    token is no patch)."""
    tok = data.atlas.tokens(model)
    images, ok = [], []
    for r in rows:
        img = patch_thumbnail(data, model, tok, int(r))
        images.append(img if img is not None else np.zeros((1, 1), np.uint32))
        ok.append(int(img is not None))
    return ColumnDataSource(data=dict(image=images, ok=ok), name="page_thumbnails")


def _quantise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head, point) values -> uint16 steps of each head's finite range (NaN -> QUANT + 1), each head's low end
    and step."""
    v = np.asarray(v, np.float64)
    ok = np.isfinite(v)
    lo = np.where(ok, v, np.inf).min(axis=1)
    hi = np.where(ok, v, -np.inf).max(axis=1)
    none = ~ok.any(axis=1)
    lo[none], hi[none] = 0.0, QUANT
    step = (hi - lo) / QUANT
    step[step <= 0] = 1.0
    q = np.clip(np.round((np.where(ok, v, lo[:, None]) - lo[:, None]) / step[:, None]), 0, QUANT).astype(np.uint16)
    q[~ok] = QUANT + 1
    return q, lo, step


def _pack_heads(data: AppData, model: str, t: Any, heads: list[tuple[int, int]], coords: np.ndarray, keep: np.ndarray,
                k: int) -> tuple[list[bytes], dict[str, int], dict[str, list[float]], int]:
    """Every embedded head's arrays in the kept order, column by column (BLOB_COLUMNS; column c holds head j at
    [j * size, (j + 1) * size)): the block's parts, each column's byte offset, each head's scale of x, y and
    norm, and the bytes of point data."""
    info = data.infos[model]
    n_all, R = len(t.rows), len(keep)
    pts = np.concatenate([keep, keep + n_all])
    point_of_kept = np.full(n_all, -1, np.int64)
    point_of_kept[keep] = np.arange(R)
    kept_of_row = np.full(len(t.point_of_row) + 1, -1, np.int64)  # atlas row -> kept index; the last entry for -1
    ok_rows = t.point_of_row >= 0
    kept_of_row[:-1][ok_rows] = point_of_kept[t.point_of_row[ok_rows]]
    sel_rows = t.rows[keep]
    cols: dict[str, list] = {c: [] for c, _ in BLOB_COLUMNS}
    scales: dict[str, list[float]] = {f"{c}_{w}": [] for c in ("x", "y", "norm") for w in ("lo", "step")}
    atlas = data.atlas
    for a in sorted({a for a, _ in heads}):
        bs = [b for a_, b in heads if a_ == a]
        # One read per layer (not per head): a 270-head page is 30 reads of each array; every head of it at once.
        qs = np.asarray(atlas.array(model, "queries")[a])  # (head, token, d_head)
        ks = np.asarray(atlas.array(model, "keys")[a])  # (kv_head, token, d_head)
        qn = np.linalg.norm(qs[bs][:, sel_rows].astype(np.float32), axis=-1)
        kn = np.linalg.norm(ks[[info.kv_head(b) for b in bs]][:, sel_rows].astype(np.float32), axis=-1)
        xy = coords[a, bs]  # (head, 2 n_all, 2): queries then keys
        for c, v in (("x", xy[:, pts, 0]), ("y", xy[:, pts, 1]), ("norm", np.nan_to_num(np.concatenate([qn, kn], axis=1)))):
            q, lo, step = _quantise(v)
            cols[c].append(q), scales[f"{c}_lo"].extend(lo.tolist()), scales[f"{c}_step"].extend(step.tolist())
        cols["stack"] += [np.minimum(stack_counts(xy[i])[pts], 65535).astype(np.uint16) for i in range(len(bs))]
        if k:
            idx = np.asarray(atlas.array(model, "attn_topk_index")[a])[bs][:, sel_rows]  # (head, R, k)
            w = np.nan_to_num(np.asarray(atlas.array(model, "attn_topk_weight")[a], dtype=np.float32)[bs][:, sel_rows])
            mapped = kept_of_row[np.where(idx >= 0, idx, -1)]
            cols["tk_idx"].append(np.where(mapped >= 0, mapped, QUANT + 1).astype(np.uint16).reshape(-1))
            cols["tk_w"].append(np.round(np.clip(w, 0, 1) * 255).astype(np.uint8).reshape(-1))
    blob, offsets, pos = [], {}, 0
    for c, dtype in BLOB_COLUMNS:
        arr = np.concatenate([np.asarray(x).reshape(-1) for x in cols[c]]).astype(dtype) if cols[c] else np.zeros(0, dtype)
        offsets[c] = pos
        blob.append(arr.tobytes())
        pos += arr.nbytes
    return blob, offsets, scales, len(heads) * (2 * R * POINT_BYTES + R * k * WEIGHT_BYTES)


def _raise(message: str) -> None:
    raise InputError(message)


# A notebook output loads the page without its heads' block, so the grid draws sooner, and posts the block in
# once the page has loaded; this listener, first in the page, keeps it for PAGE_JS. Saved pages hold the block.
BLOCK_LISTENER = """<script>window.addEventListener('message', (e) => {
  const d = e.data
  if (e.source !== window.parent || !d || d.attnatlas_block !== 'PAGE_ID' || typeof d.text !== 'string') { return }
  window.__attnatlas_block = d.text
  window.dispatchEvent(new Event('attnatlas-block'))
})</script>"""

# One script for every action, so the page's behaviour reads in one place. Strings from the atlas reach the
# DOM only through esc() or as Bokeh data (which Bokeh escapes); `ctx` is escaped by AppData (only <b> is markup).
PAGE_JS = r"""
const M = JSON.parse(meta), R = M.R, K = M.k
const P = 2 * R
const NONE = 65535  // uint16 code of NaN (x, y, norm) and of "no key" (tk_idx)
function heads() {  // the heads' arrays, decoded from the page's block the first time a head opens; null until it is here
  if (src.__heads == null) {
    const el = document.getElementById(M.blob)
    const text = (el && el.textContent.trim()) || window.__attnatlas_block
    if (text == null) { return null }
    const bin = atob(text), bytes = new Uint8Array(bin.length)
    for (let i = 0; i < bin.length; i++) { bytes[i] = bin.charCodeAt(i) }
    const view = (c, j, n, T) => new T(bytes.buffer, M.offsets[c] + j * n * T.BYTES_PER_ELEMENT, n)
    const steps = (c, j) => {  // uint16 steps of head j's range -> Float32Array
      const q = view(c, j, P, Uint16Array), lo = store.data[c + '_lo'][j], st = store.data[c + '_step'][j]
      const out = new Float32Array(P)
      for (let i = 0; i < P; i++) { out[i] = q[i] == NONE ? NaN : lo + q[i] * st }
      return out
    }
    const S = {trust: store.data.trust, knn: store.data.knn}
    for (const c of ['x', 'y', 'norm']) { S[c] = new Proxy({}, {get: (_, j) => steps(c, +j)}) }
    S.stack = new Proxy({}, {get: (_, j) => view('stack', +j, P, Uint16Array)})
    S.tk_idx = new Proxy({}, {get: (_, j) => view('tk_idx', +j, R * K, Uint16Array)})
    S.tk_w = new Proxy({}, {get: (_, j) => view('tk_w', +j, R * K, Uint8Array)})
    src.__heads = S
  }
  return src.__heads
}
const cur = () => [parseInt(lsel.value), parseInt(hsel.value)]
const row_of = (l, h) => (l >= 0 && h >= 0 && l < M.L && h < M.H) ? where[l * M.H + h] : -1

function pct(a, q) {
  const v = Array.from(a).filter(Number.isFinite).sort((p, r) => p - r)
  if (!v.length) { return 0 }
  return v[Math.min(v.length - 1, Math.max(0, Math.floor(q * (v.length - 1))))]
}

function matches() {
  const q = (search.value || '').trim()
  if (!q) { return null }
  const mode = search_mode.labels[search_mode.active] || 'substring'
  const tok = src.data.token
  let test
  if (mode == 'regex') {
    let re
    try { re = new RegExp(q, 'i') } catch (e) { return {error: String(e.message || e), pts: []} }
    test = (s) => re.test(s)
  } else if (mode == 'whole word') {
    const ql = q.toLowerCase()
    test = (s) => s.trim().replace(/^##/, '').toLowerCase() == ql
  } else {
    const ql = q.toLowerCase()
    test = (s) => s.toLowerCase().includes(ql)
  }
  const pts = []
  for (let i = 0; i < R; i++) { if (test(String(tok[i]))) { pts.push(i) } }
  return {error: null, pts: pts.concat(pts.map((i) => i + R))}
}

function colours(j) {
  const mode = colour.value
  let idx, pal
  if (mode == 'norm') {
    const nrm = heads().norm[j], lo = pct(nrm, 0.02), hi = Math.max(pct(nrm, 0.98), lo + 1e-6)
    pal = M.viridis
    idx = Array.from(nrm, (v) => Math.min(pal.length - 1, Math.max(0, Math.floor((v - lo) / (hi - lo) * pal.length))))
    legend.text = `vector norm of this head: ${lo.toFixed(2)} (dark) to ${hi.toFixed(2)} (yellow)`
  } else {
    const m = Math.max(0, modes.data.key.indexOf(mode))
    idx = modes.data.index[m]; pal = modes.data.palette[m]; legend.text = modes.data.legend[m]
  }
  mapper.palette = pal.concat([M.dim]); mapper.low = 0; mapper.high = pal.length + 1
  const found = matches()
  const c = new Float32Array(2 * R), alpha = new Float32Array(2 * R)
  const hit = new Uint8Array(2 * R)
  if (found) { for (const i of found.pts) { hit[i] = 1 } }
  for (let i = 0; i < 2 * R; i++) {
    const on = !found || hit[i]
    c[i] = on ? idx[i] + 0.5 : pal.length + 0.5
    alpha[i] = found ? (on ? 1.0 : M.dim_alpha) : M.base_alpha
  }
  src.data = Object.assign({}, src.data, {c: c, alpha: alpha})
  const x = src.data.x, y = src.data.y
  if (found && !found.error) {
    const p = found.pts
    match_src.data = {x: p.map((i) => x[i]), y: p.map((i) => y[i]), c: p.map((i) => idx[i] + 0.5), token: p.map((i) => src.data.token[i])}
    const half = p.slice(0, p.length / 2)
    search_count.text = `${half.length} matching tokens for \u201c${esc(search.value.trim())}\u201d (token text, in this page's points)`
    search_results.text = half.length ? "<ul style='margin:0;padding-left:18px'>" + half.slice(0, M.max_list).map((i) =>
      `<li>${src.data.ctx[i]} <small>(seq ${src.data.sequence[i]}, pos ${src.data.position[i]})</small></li>`).join('') + '</ul>' : ''
  } else {
    match_src.data = {x: [], y: [], c: [], token: []}
    search_count.text = found && found.error ? `<span style="color:#b00">${esc(found.error)}</span>` : ''
    search_results.text = ''
  }
}

function open(l, h) {
  const j = row_of(l, h)
  if (j < 0) {
    title.text = `<b>${esc(M.model)} L${l}H${h}</b> is not in this page: it has no ${esc(M.method)} layout, or the page ` +
                 'stopped at its size; open it with <code>attnatlas serve</code>.'
    return
  }
  const S = heads()
  if (S == null) {  // a notebook output whose block is not posted in yet: open once it is
    title.text = `<b>${esc(M.model)} L${l}H${h}</b>: loading the heads' data\u2026`
    window.addEventListener('attnatlas-block', () => open(l, h), {once: true})
    return
  }
  src.selected.indices = []
  thumb_src.data = {image: [], x: [], y: [], cx: [], cy: [], dw: [], dh: [], border: []}
  line_src.data = {x0: [], y0: [], x1: [], y1: [], alpha: [], width: [], weight: [], token: []}
  const x = S.x[j], y = S.y[j]
  src.data = Object.assign({}, src.data, {x: x, y: y, norm: S.norm[j], stack: S.stack[j]})
  colours(j)
  for (const [rng, v] of [[xr, x], [yr, y]]) {
    const lo = pct(v, 0.005), hi = pct(v, 0.995), pad = 0.05 * ((hi - lo) || 1)
    rng.start = lo - pad; rng.end = hi + pad
  }
  const tr = S.trust[j], kn = S.knn[j]
  const faith = Number.isFinite(tr) ? `trustworthiness ${tr.toFixed(3)}, kNN kept ${kn.toFixed(2)}` : 'faithfulness not recorded'
  title.text = `<b>${esc(M.model)} L${l}H${h}</b> (${esc(M.method)}, ${M.L}\u00d7${M.H} heads)<br>${faith}<br>` +
               `<small>points of ${esc(M.shown)}</small>`
  seq.text = 'Click a point to see where it attends; lasso or box-select points to hand them to Python.'
  store.__busy = true  // the selects echo into action 'select'
  try {
    if (String(l) != lsel.value) { lsel.value = String(l) }
    if (String(h) != hsel.value) { hsel.value = String(h) }
  } finally { store.__busy = false }
}

function tap() {
  const sel = src.selected.indices
  const [l, h] = cur(), j = row_of(l, h)
  try { window.parent.postMessage({attnatlas: M.page, layer: l, head: h, indices: Array.from(sel)}, '*') } catch (e) {}
  if (j < 0 || sel.length != 1) {
    line_src.data = {x0: [], y0: [], x1: [], y1: [], alpha: [], width: [], weight: [], token: []}
    if (sel.length > 1) { seq.text = `${sel.length} points selected; read them in Python with <code>view.selection</code>.` }
    return
  }
  const p = sel[0], isq = p < R, r = p % R
  const S = heads(), idx = S.tk_idx[j], w = S.tk_w[j]
  const pairs = []  // [other point, weight]
  if (K) {
    if (isq) {
      for (let m = 0; m < K; m++) {
        const o = idx[r * K + m]
        if (o != NONE && w[r * K + m] > 0) { pairs.push([R + o, w[r * K + m] / 255]) }
      }
    } else {
      for (let q = 0; q < R; q++) { for (let m = 0; m < K; m++) { if (idx[q * K + m] == r && w[q * K + m] > 0) { pairs.push([q, w[q * K + m] / 255]) } } }
    }
  }
  pairs.sort((a, b) => b[1] - a[1])
  const strong = pairs.filter((e) => e[1] >= M.line_min)
  const x = src.data.x, y = src.data.y, tok = src.data.token
  line_src.data = {x0: strong.map(() => x[p]), y0: strong.map(() => y[p]), x1: strong.map((e) => x[e[0]]), y1: strong.map((e) => y[e[0]]),
                   alpha: strong.map((e) => 0.25 + 0.75 * Math.min(1, e[1])), width: strong.map((e) => 1 + 3 * Math.min(1, e[1])),
                   weight: strong.map((e) => e[1]), token: strong.map((e) => tok[e[0]])}
  const what = isq ? 'query' : 'key', other = isq ? 'keys it attends to' : 'queries that attend to it'
  const list = pairs.slice(0, 12).map((e) => `<li>${esc(tok[e[0]])} <small>(pos ${src.data.position[e[0]]}, weight ${e[1].toFixed(3)})</small></li>`).join('')
  seq.text = `<b>${what}</b> \u201c${esc(tok[p])}\u201d in sequence ${src.data.sequence[p]}: ${src.data.ctx[p]}<br>` +
             (K ? `${other} (top-${K}, L${l}H${h}; lines from weight ${M.line_min}):<ul style="margin:0;padding-left:18px">${list}</ul>`
                : '<i>This atlas has no stored attention; extract with --attention-topk K.</i>')
}

function open_cell(l, h) {
  open(l, h)
  if (typeof tabs !== 'undefined') { tabs.active = 1 }
}

if (action == 'init') {
  // The notebook output keeps its still grid image over this page until the page is drawn.
  try { window.parent.postMessage({attnatlas_ready: M.page}, '*') } catch (e) {}
  if (!window.__attnatlas_sized && window.parent !== window) {
    // In a notebook column narrower than the plot, the plot scales down to it (the app draws it at a fixed size),
    // and the notebook sizes its iframe to what the page shows: controls wrapped below the plot, or a tab switch.
    // The shown part's own box, not the body's (as tall as the iframe, so it would only grow), nor the tabs' (as
    // tall as their tallest tab).
    window.__attnatlas_sized = true
    const doc = Bokeh.documents[0], tabs_ = doc.get_model_by_name('page_tabs'), fig = doc.get_model_by_name('head_figure')
    const parts = M.single ? [doc.get_model_by_name('page_head')] : tabs_.tabs.map((t) => t.child)
    const el = (m) => { const v = m && Bokeh.index.find_one(m); return v ? v.el : document.body }
    const fit = () => {
      const w = Math.max(240, Math.min(M.fig_w, window.innerWidth - 16))
      if (fig.width != w) { fig.width = w; fig.height = Math.round(w * M.fig_h / M.fig_w) }
    }
    const tell = () => {
      const shown = el(M.single ? parts[0] : parts[tabs_.active])
      window.parent.postMessage({attnatlas_height: M.page, h: Math.ceil(shown.getBoundingClientRect().bottom + window.scrollY) + 24}, '*')
    }
    window.__attnatlas_tell = tell
    // The frame is sized to the shown part; the tabs below it (as tall as the tallest tab) must not scroll inside it.
    document.documentElement.style.overflowY = 'hidden'
    fit()
    window.addEventListener('resize', fit)
    if (typeof ResizeObserver !== 'undefined') {
      const watch = new ResizeObserver(tell)
      parts.forEach((m) => watch.observe(el(m)))
    }
    setTimeout(tell, 50)
  }
  if (!window.__attnatlas_listen) {  // the notebook widget may set the selection from Python
    window.__attnatlas_listen = true
    window.addEventListener('message', (e) => {
      const d = e.data
      if (!d || d.attnatlas_select !== M.page) { return }
      const [l, h] = [d.layer | 0, d.head | 0]
      if (row_of(l, h) >= 0 && (l != cur()[0] || h != cur()[1])) { open(l, h) }
      src.selected.indices = Array.from(d.indices || [], Number).filter((i) => i >= 0 && i < 2 * R)
    })
  }
  if (M.single) {  // a grid page leaves its heads packed until a cell is opened: the grid draws first
    const [l, h] = cur()
    open(l, h)
  }
} else if (action == 'tab') {
  if (window.__attnatlas_tell) { setTimeout(window.__attnatlas_tell, 30) }  // the notebook output follows the shown tab
} else if (action == 'colour' || action == 'search') {
  const [l, h] = cur(), j = row_of(l, h)
  if (j >= 0) { colours(j) }
} else if (action == 'select') {
  const [l, h] = cur()
  if (!store.__busy && Number.isFinite(l) && Number.isFinite(h)) { open(l, h) }
} else if (action == 'thumbs') {
  // The app's thumbnails: each patch in view drawn at its point once a zoom shows at most max_thumbs points.
  const {x0, x1, y0, y1} = cb_obj, x = src.data.x, y = src.data.y, vis = []
  for (let i = 0; i < x.length && vis.length <= M.max_thumbs; i++) {
    if (x[i] >= x0 && x[i] <= x1 && y[i] >= y0 && y[i] <= y1) { vis.push(i) }
  }
  const d = {image: [], x: [], y: [], cx: [], cy: [], dw: [], dh: [], border: []}
  if (vis.length <= M.max_thumbs) {
    const dw = (x1 - x0) / M.thumb_span, dh = (y1 - y0) / M.thumb_span
    for (const i of vis) {
      if (!thumbs.data.ok[i % R]) { continue }
      d.image.push(thumbs.data.image[i % R]); d.x.push(x[i] - dw / 2); d.y.push(y[i] - dh / 2)
      d.cx.push(x[i]); d.cy.push(y[i]); d.dw.push(dw); d.dh.push(dh); d.border.push(i < R ? M.query : M.key)
    }
  }
  thumb_src.data = d
} else if (action == 'tap') {
  tap()
} else if (action == 'geometry') {
  // A click on a stack of points selects them all; the app's click means one point, the first.
  const sel = src.selected.indices
  if (cb_obj.geometry.type == 'point' && sel.length > 1) { src.selected.indices = [Math.min(...sel)] }
} else if (action == 'cell') {
  const i = cells.selected.indices
  if (!i.length) { return }
  cells.selected.indices = []
  open_cell(cells.data.layer[i[0]], cells.data.head[i[0]])
} else if (action == 'zoom') {
  const {x0, x1, y0, y1} = cb_obj
  if (x1 - x0 < M.hand_over && y1 - y0 < M.hand_over) {
    const c = Math.floor((x0 + x1) / 2), r = M.L - 1 - Math.floor((y0 + y1) / 2)
    gx.start = 0; gx.end = M.H; gy.start = 0; gy.end = M.L
    if (c >= 0 && c < M.H && r >= 0 && r < M.L) { open_cell(r, c) }
  }
}
"""
