""""Your text": the user's own sentence (or image) placed into every head, drawn over the corpus.

The dashboard composes this with one call (`compose(dash, doc)`, listed in the registry's ADD_ONS: it joins
the head view and the grid rather than having a tab of its own). A request goes to the live worker
(`attnatlas.live.worker`, a separate process started by `serve --live`; this module never imports torch)
and asks for every head of the current model and method at once, so stepping through heads redraws from
what came back, without a new request; the grid shows every head's placed points in its cell. Placed tokens are distinct markers (triangles for queries,
squares for keys, a red outline and cross when they lie far outside the corpus) with their token as a
label and the new input's own top-k attention as lines; a table lists each token's fit.

Security: the user's text, tokens and file names are escaped before they reach any Div; labels and
tooltips are plain text fields; no string is spliced into JS.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import logging
import threading
import time
from functools import partial
from typing import Any

import numpy as np
from bokeh.events import RangesUpdate
from bokeh.layouts import column, row
from bokeh.models import Button, ColumnDataSource, Div, FileInput, HoverTool, TextAreaInput

from attnatlas.app import colors
from attnatlas.live.bounds import upload_refusal
from attnatlas.project.placement import FAR
from attnatlas.render.raster import MARGIN

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 5_000  # characters sent from the box (the model truncates to its token limit anyway)
MAX_IMAGE_BYTES = 20 << 20
MIN_LINE_WEIGHT = 0.05  # attention lines below this weight are not drawn (they would only be noise)
MAX_FIT_ROWS = 60  # tokens listed in the fit table
MAX_LABELS = 400  # markers given a label (placed apart); the rest are named by their tooltip
PANEL_W = 370  # px: the third column of the head view, beside its controls, in a 1600 px window
OFF_TEXT = ("Live placement is off. Start the dashboard with <code>attnatlas serve ATLAS --live</code> to place "
            "your own text (or image, for image models) into every head: a worker process runs the atlas's model "
            "and the new tokens appear here on top of the corpus.")
TOOLTIPS = [("your token", "@token"), ("type", "@kind"), ("position", "@position"), ("fit", "@fit{0.00}"),
            ("far outside the corpus", "@far_text"), ("nearest corpus token", "@nearest")]


def _div(text: str = "", **kw: Any) -> Div:
    return Div(text=text, disable_math=True, **kw)


class LiveView:
    """The box, the markers and the fit table of one session."""

    def __init__(self, dash: Any, worker: Any, doc: Any = None):
        self.dash, self.worker, self.doc = dash, worker, doc
        self.result: dict[str, Any] | None = None  # the last answer, for (model, method) in it
        self._by_head: dict[tuple[int, int], np.ndarray] = {}  # (layer, head) -> indices into result["cols"]
        self._pending = False
        self._build()

    # ---- construction -------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.title = _div("<b>Your text</b>", name="live_title")
        self.text = TextAreaInput(placeholder="Type a sentence to place into every head", rows=3, width=370,
                                  max_length=MAX_TEXT_CHARS, name="live_text")
        self.button = Button(label="Place into every head", button_type="primary", width=180, name="live_place")
        self.button.on_click(self._on_place)
        self.upload = FileInput(accept="image/*", width=230, name="live_image")
        self.upload.on_change("value", self._on_upload)
        self.status = _div("", width=PANEL_W, name="live_status", styles={"overflow-wrap": "anywhere"})
        self.timing = _div("", visible=False, render_as_text=True, name="live_timing")  # for scripts/bench_live.py
        self.fit_table = _div("", width=PANEL_W, name="live_fit", styles={"overflow-wrap": "anywhere"})
        self.src = ColumnDataSource(data=_empty_points(), name="live_points")
        self.line_src = ColumnDataSource(data=dict(x0=[], y0=[], x1=[], y1=[], alpha=[]), name="live_lines")
        fig = self.dash.fig
        self.lines = fig.segment("x0", "y0", "x1", "y1", source=self.line_src, line_color="#222", line_alpha="alpha",
                                 line_width=2, line_dash="dashed", name="live_lines")
        self.markers = fig.scatter("x", "y", source=self.src, marker="marker", size=13, fill_color="colour",
                                   line_color="outline", line_width=2, fill_alpha=0.95, name="live_markers")
        self.far_marks = fig.scatter("x", "y", source=self.src, marker="x", size="far_size", line_color="#d00000",
                                     line_width=2, name="live_far")
        # Labels placed apart (label_offsets): in dense spots a label moves around its marker, or is left out
        # (the marker's tooltip still names it); placed again after each zoom.
        self.labels = fig.text("x", "y", text="label", source=self.src, x_offset="lx", y_offset="ly", text_font_size="11px",
                               text_color="#111", text_font_style="bold", name="live_labels")
        fig.add_tools(HoverTool(renderers=[self.markers], tooltips=TOOLTIPS))
        fig.on_event(RangesUpdate, self._on_ranges)
        # The grid: every placed point of every head as a small marker in its head's cell.
        self.grid_src = ColumnDataSource(data=_empty_grid(), name="live_grid_points")
        grid = getattr(self.dash, "grid", None)
        if grid is not None and hasattr(grid, "fig"):
            dots = grid.fig.scatter("x", "y", source=self.grid_src, marker="marker", size=6, fill_color="colour",
                                    line_color="outline", line_width=1, name="live_grid_markers")
            grid.fig.add_tools(HoverTool(renderers=[dots], tooltips=[("your token", "@token"), ("type", "@kind"),
                                                                     ("head", "@where"), ("fit", "@fit{0.00}")]))
        self._set_mode()
        self.panel = column(self.title, self.text, row(self.button, self.upload), self.status, self.fit_table,
                            self.timing, name="live_panel", width=PANEL_W + 10)

    def _set_mode(self) -> None:
        image = self.dash.data.modality(self.dash.model) == "image"
        live = self.worker is not None
        self.text.visible = live and not image
        self.button.visible = live and not image
        self.upload.visible = live and image
        self.title.text = "<b>Your image</b>" if image else "<b>Your text</b>"
        if not live:
            self.status.text = OFF_TEXT
        elif image:
            self.status.text = "Choose an image: its patches are placed into every head of this model."

    # ---- requests -----------------------------------------------------------------------------------------
    def _on_place(self) -> None:
        text = (self.text.value or "").strip()
        if not text:
            self._say("Type a sentence first: the box is empty.", error=True)
            return
        self._request({"text": text[:MAX_TEXT_CHARS]})

    def _on_upload(self, attr: str, old: Any, new: Any) -> None:
        # BokehJS sends value, filename and mime_type in one message, value first: read them once the whole
        # message is applied (the next tick), never the filename of the previous upload or an unset one.
        ctx = getattr(self.doc, "session_context", None) if self.doc is not None else None
        if ctx is None:
            self._read_upload()
        else:
            self.doc.add_next_tick_callback(self._read_upload)

    def _read_upload(self) -> None:
        value, name = _prop(self.upload, "value"), _prop(self.upload, "filename")
        if isinstance(value, list):  # multiple files: the first one
            value = value[0] if value else ""
        if isinstance(name, list):
            name = name[0] if name else ""
        if not value:
            return  # the input was cleared
        name = str(name or "upload")
        try:
            data = base64.b64decode(value or "", validate=True)
        except (binascii.Error, ValueError):
            self._say(f"{name} could not be read as an uploaded file.", error=True)
            return
        if len(data) > MAX_IMAGE_BYTES:
            self._say(f"{name} is larger than {MAX_IMAGE_BYTES >> 20} MB; choose a smaller image.", error=True)
            return
        if why := upload_refusal(data, name):  # too large, or a header declaring too many pixels (a bomb)
            return self._say(why, error=True)
        self._request({"image": data, "image_name": name})

    def _request(self, what: dict[str, Any]) -> None:
        if self.worker is None:
            self._say(OFF_TEXT, raw=True)
            return
        if self._pending:
            self._say("Still placing the previous input\u2026")
            return
        self._pending = True
        self.button.disabled = True
        d = self.dash
        payload = {"op": "place", "model": d.model, "method": d.method, **what}
        self._say(f"Placing into every head of {html.escape(d.model)} ({html.escape(d.method)})\u2026", raw=True)
        started = time.perf_counter()
        if self.doc is None or getattr(self.doc, "session_context", None) is None:
            self._answer(payload, started, *self._ask(payload))  # no server loop (tests): answer at once
            return
        threading.Thread(target=self._ask_then_answer, args=(payload, started), daemon=True,
                         name="attnatlas-live-request").start()

    def _ask(self, payload: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        from attnatlas.live.worker import LiveError

        try:
            return self.worker.request(payload), None
        except LiveError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one failed request, the session stays usable
            log.exception("live request failed")
            return None, f"Placing failed: {exc}"

    def _ask_then_answer(self, payload: dict[str, Any], started: float) -> None:
        reply, error = self._ask(payload)
        try:
            self.doc.add_next_tick_callback(partial(self._answer, payload, started, reply, error))
        except Exception:  # noqa: BLE001 - the session closed while the worker was busy: nobody to tell
            log.debug("live answer for a closed session dropped")

    def _answer(self, payload: dict[str, Any], started: float, reply: dict[str, Any] | None, error: str | None) -> None:
        self._pending = False
        self.button.disabled = False
        if error is not None or reply is None:
            self._say(error or "Placing failed.", error=True)
            return
        self.result = reply
        cols = reply["cols"]
        keys = cols["layer"].astype(np.int64) * 10_000 + cols["head"].astype(np.int64)
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        self._by_head = {(int(g[0] // 10_000), int(g[0] % 10_000)): idx
                         for g, idx in ((keys[i], i) for i in np.split(order, bounds)) if len(idx)}
        t_draw = time.perf_counter()
        self.show()
        self.show_grid()
        secs = reply.get("seconds", {})
        n = len(reply["tokens"])
        heads = len(self._by_head)
        notes = "".join(f"<br><i>{html.escape(str(x))}</i>" for x in reply.get("notes", []))
        load = f"; first request: model loaded in {secs.get('load', 0):.1f} s" if reply.get("first_load") else ""
        n_far = int(np.asarray(cols["far"]).sum())
        what = f"{html.escape(str(payload['image_name']))}: " if payload.get("image_name") else ""
        self._say(f"Placed {what}{n} tokens into {heads} heads ({html.escape(reply['method'])}): model "
                  f"{secs.get('model', 0):.2f} s, placement {secs.get('place', 0):.2f} s{load}. "
                  f"{n_far} of {len(cols['far'])} points lie far outside the corpus (fit &gt; {FAR:g}).{notes}", raw=True)
        self.timing.text = json.dumps({"model": secs.get("model"), "place": secs.get("place"), "load": secs.get("load"),
                                       "first_load": bool(reply.get("first_load")), "server_total": t_draw - started,
                                       "draw_prep": time.perf_counter() - t_draw, "tokens": n, "heads": heads,
                                       "stamp": time.time()})

    def _say(self, text: str, error: bool = False, raw: bool = False) -> None:
        body = text if raw else html.escape(text)
        self.status.text = f'<span style="color:#b00">{body}</span>' if error else body

    # ---- drawing ------------------------------------------------------------------------------------------
    def follow(self) -> None:
        """The model or method changed: drop markers of another one; the box follows the model's modality."""
        r = self.result
        if r is not None and (r["model"], r["method"]) != (self.dash.model, self.dash.method):
            self.result, self._by_head = None, {}
            if self.worker is not None:
                self._say("Place your text again to see it in this model or projection.")
        self._set_mode()
        self.show()
        self.show_grid()

    def show_grid(self) -> None:
        """Every head's placed points in the grid, each mapped into its cell as the grid maps the corpus
        (the cell's robust range, points outside it on the edge)."""
        r, grid = self.result, getattr(self.dash, "grid", None)
        g = getattr(grid, "g", None)
        if r is None or g is None or (getattr(grid, "model", None), getattr(grid, "method", None)) != (r["model"], r["method"]):
            self.grid_src.data = _empty_grid()
            return
        c = r["cols"]
        layer, head = c["layer"].astype(np.int64), c["head"].astype(np.int64)
        lo, hi = g.lo[layer, head].astype(np.float64), g.hi[layer, head].astype(np.float64)
        u = np.clip((c["x"] - lo[:, 0]) / (hi[:, 0] - lo[:, 0]), 0, 1)
        v = np.clip((c["y"] - lo[:, 1]) / (hi[:, 1] - lo[:, 1]), 0, 1)
        n_layers = g.done.shape[0]
        inner = 1 - 2 * MARGIN
        is_query = c["kind"] == 0
        far = np.asarray(c["far"], bool)
        self.grid_src.data = dict(
            x=grid.columns[layer, head] + MARGIN + u * inner, y=(n_layers - 1 - layer) + MARGIN + v * inner,
            marker=np.where(is_query, "triangle", "square").tolist(),
            colour=np.where(is_query, colors.QUERY, colors.KEY).tolist(),
            outline=np.where(far, "#d00000", "#000000").tolist(),
            token=np.asarray(r["tokens"], dtype=object)[c["token"]].tolist(),
            kind=np.where(is_query, "query", "key").tolist(), where=[f"L{a}H{b}" for a, b in zip(layer, head)],
            fit=c["fit"].astype(np.float64))

    def show(self) -> None:
        """Draw the placed tokens in the dashboard's current head (nothing when there are none)."""
        r = self.result
        d = self.dash
        idx = self._by_head.get((int(d.layer), int(d.head))) if r is not None else None
        if r is None or idx is None or (r["model"], r["method"]) != (d.model, d.method):
            self.src.data = _empty_points()
            self.line_src.data = dict(x0=[], y0=[], x1=[], y1=[], alpha=[])
            self.fit_table.text = ""
            return
        cols = r["cols"]
        tok = cols["token"][idx]
        is_query = cols["kind"][idx] == 0
        far = np.asarray(cols["far"][idx], bool)
        x, y = cols["x"][idx].astype(np.float64), cols["y"][idx].astype(np.float64)
        tokens = np.asarray(r["tokens"], dtype=object)
        self.src.data = dict(
            x=x, y=y, token=tokens[tok].tolist(), kind=np.where(is_query, "query", "key").tolist(),
            position=np.asarray(r["positions"])[tok].tolist(), fit=cols["fit"][idx].astype(np.float64),
            far_text=np.where(far, "yes", "no").tolist(),
            nearest=np.asarray(r["nearest_token"], dtype=object)[idx].tolist(),
            marker=np.where(is_query, "triangle", "square").tolist(),
            colour=np.where(is_query, colors.QUERY, colors.KEY).tolist(),
            outline=np.where(far, "#d00000", "#000000").tolist(), far_size=np.where(far, 22.0, 0.0),
            **self._labels(x, y, tokens[tok].tolist()))
        self.line_src.data = self._lines(r, int(d.layer), int(d.head), tok, is_query, x, y)
        self.fit_table.text = self._fit_html(r, tok, is_query, cols["fit"][idx], far,
                                             np.asarray(r["nearest_token"], dtype=object)[idx])

    def _labels(self, x: np.ndarray, y: np.ndarray, tokens: list[str], ranges: tuple | None = None) -> dict[str, Any]:
        """Label text and offsets of the markers at (x, y) for the head figure's current view."""
        fig = self.dash.fig
        x0, x1, y0, y1 = ranges or (fig.x_range.start, fig.x_range.end, fig.y_range.start, fig.y_range.end)
        w, h = (_prop(fig, "inner_width") or fig.width or 720), (_prop(fig, "inner_height") or fig.height or 680)
        sx = (np.asarray(x, np.float64) - x0) / ((x1 - x0) or 1.0) * w
        sy = (y1 - np.asarray(y, np.float64)) / ((y1 - y0) or 1.0) * h
        text, lx, ly = label_offsets(sx, sy, [str(t) for t in tokens])
        return dict(label=text, lx=lx, ly=ly)

    def _on_ranges(self, event: RangesUpdate) -> None:
        if None not in (event.x0, event.x1, event.y0, event.y1):
            self.relabel((event.x0, event.x1, event.y0, event.y1))

    def relabel(self, ranges: tuple | None = None) -> None:
        """Place the labels again for the view (a zoom, or the next head's ranges)."""
        if not len(self.src.data.get("x", [])):
            return
        try:
            d = self.src.data
            self.src.data.update(self._labels(np.asarray(d["x"]), np.asarray(d["y"]), list(d["token"]), ranges))
        except Exception:  # noqa: BLE001 - labels only: the markers stay
            log.exception("live labels could not be placed")

    def _lines(self, r: dict[str, Any], layer: int, head: int, tok: np.ndarray, is_query: np.ndarray,
               x: np.ndarray, y: np.ndarray) -> dict[str, list]:
        """The new input's own top-k attention in this head: each placed query to the placed keys it attends to."""
        out: dict[str, list] = dict(x0=[], y0=[], x1=[], y1=[], alpha=[])
        ti, tw = r.get("topk_index"), r.get("topk_weight")
        if ti is None or tw is None:
            return out
        key_pos = {int(t): i for i, (t, q) in enumerate(zip(tok, is_query)) if not q}
        for i, (t, q) in enumerate(zip(tok, is_query)):
            if not q:
                continue
            for k, w in zip(ti[layer, head, int(t)], tw[layer, head, int(t)].astype(np.float64)):
                j = key_pos.get(int(k))
                if k < 0 or j is None or w < MIN_LINE_WEIGHT:
                    continue
                out["x0"].append(float(x[i])), out["y0"].append(float(y[i]))
                out["x1"].append(float(x[j])), out["y1"].append(float(y[j]))
                out["alpha"].append(float(0.15 + 0.7 * w))
        return out

    def _fit_html(self, r: dict[str, Any], tok: np.ndarray, is_query: np.ndarray, fit: np.ndarray, far: np.ndarray,
                  nearest: np.ndarray) -> str:
        """Per token of the input: the fit of its query and key in this head, and the nearest corpus token."""
        tokens = r["tokens"]
        per: dict[int, dict[str, Any]] = {}
        for t, q, f, fa, nb in zip(tok, is_query, fit, far, nearest):
            per.setdefault(int(t), {})["q" if q else "k"] = (float(f), bool(fa), str(nb))
        rows = []
        for t in sorted(per)[:MAX_FIT_ROWS]:
            cells = []
            for kind in ("q", "k"):
                f, fa, nb = per[t].get(kind, (float("nan"), False, ""))
                flag = ' <b style="color:#d00000">far</b>' if fa else ""
                cells.append(f"<td>{f:.2f}{flag}</td><td style='color:#555'>{html.escape(nb)}</td>")
            rows.append(f"<tr><td><b>{html.escape(str(tokens[t]))}</b></td>{''.join(cells)}</tr>")
        more = f"<br><i>{len(per) - MAX_FIT_ROWS} more tokens not listed</i>" if len(per) > MAX_FIT_ROWS else ""
        d = self.dash
        return (f"<div style='font-size:12px'>Fit in L{int(d.layer)}H{int(d.head)}: mean distance to the 10 nearest corpus "
                f"points over the corpus's own typical distance (1 = as close as the corpus is to itself; above {FAR:g} "
                f"= far outside the corpus, its position is a guess).<table style='border-collapse:collapse'>"
                f"<tr><th>token</th><th>query fit</th><th>nearest</th><th>key fit</th><th>nearest</th></tr>"
                f"{''.join(rows)}</table>{more}</div>")


def _prop(model: Any, name: str) -> Any:
    """A property the browser sets (FileInput's value and filename), or None while it is still unset."""
    from bokeh.core.property.descriptors import UnsetValueError

    try:
        return getattr(model, name)
    except UnsetValueError:
        return None


def label_offsets(sx: np.ndarray, sy: np.ndarray, texts: list[str], char_px: float = 7.0, line_px: float = 13.0,
                  marker_px: float = 13.0, max_labels: int = MAX_LABELS) -> tuple[list[str], list[float], list[float]]:
    """Greedy label placement in screen pixels (y down): each label tries right, left, above and below its
    marker and takes the first spot that overlaps no label placed before it and no other marker; with none
    free (or past `max_labels`) it is left out (""). Returns (text, x offset, y offset) per marker, for a
    left-aligned text whose baseline is at the offset."""
    n = len(texts)
    half = marker_px / 2
    sx, sy = np.asarray(sx, np.float64), np.asarray(sy, np.float64)
    boxes = np.empty((n + min(n, max_labels), 4))  # markers, then the labels placed: x0, y0, x1, y1
    boxes[:n] = np.c_[sx - half, sy - half, sx + half, sy + half]
    used = n
    out_t, out_x, out_y = [""] * n, [0.0] * n, [0.0] * n
    for i in range(min(n, max_labels)):
        a, b, t = sx[i], sy[i], texts[i]
        if not np.isfinite(a) or not np.isfinite(b):
            continue
        wpx = char_px * max(len(t), 1)
        for dx, dy in ((half + 2, line_px / 2), (-half - 2 - wpx, line_px / 2), (-wpx / 2, -half - 2),
                       (-wpx / 2, half + line_px + 2)):
            x0, y0, x1, y1 = a + dx, b + dy - line_px, a + dx + wpx, b + dy
            c = boxes[:used]
            hit = (x0 < c[:, 2]) & (c[:, 0] < x1) & (y0 < c[:, 3]) & (c[:, 1] < y1)
            hit[i] = False  # its own marker
            if not hit.any():
                boxes[used] = (x0, y0, x1, y1)
                used += 1
                out_t[i], out_x[i], out_y[i] = t, float(dx), float(dy)
                break
    return out_t, out_x, out_y


def _empty_points() -> dict[str, list]:
    return {k: [] for k in ("x", "y", "token", "kind", "position", "fit", "far_text", "nearest", "marker", "colour",
                            "outline", "far_size", "label", "lx", "ly")}


def _empty_grid() -> dict[str, list]:
    return {k: [] for k in ("x", "y", "marker", "colour", "outline", "token", "kind", "where", "fit")}


def compose(dash: Any, doc: Any = None) -> LiveView:
    """Add the "Your text" box to a dashboard's head view and keep its markers with the shown head. The
    worker comes from the server context (app_hooks, `serve --live`); without one the box says how to
    turn it on."""
    ctx = getattr(doc, "session_context", None) if doc is not None else None
    worker = getattr(getattr(ctx, "server_context", None), "attnatlas_live", None) if ctx is not None else None
    view = LiveView(dash, worker, doc)
    dash.live_view = view
    dash.head_panel.children.append(view.panel)

    def redraw(attr: str, old: Any, new: Any) -> None:
        try:
            view.show()
        except Exception:  # noqa: BLE001 - the corpus view must keep working
            log.exception("live markers could not be drawn")

    def follow(attr: str, old: Any, new: Any) -> None:
        try:
            view.follow()
        except Exception:  # noqa: BLE001
            log.exception("live markers could not follow the model")

    def regrid(attr: str, old: Any, new: Any) -> None:
        try:
            view.show_grid()
        except Exception:  # noqa: BLE001
            log.exception("live markers could not be drawn in the grid")

    # The head view sets its ranges after the head (y end last): the labels follow the new view.
    dash.head_view.yr.on_change("end", lambda attr, old, new: view.relabel())
    cells = getattr(getattr(dash, "grid", None), "cell_src", None)
    if cells is not None:
        cells.on_change("data", regrid)  # the grid was redrawn: another model, projection or head order
    dash.layer_select.on_change("value", redraw)
    dash.head_select.on_change("value", redraw)
    dash.model_select.on_change("value", follow)
    dash.method_select.on_change("value", follow)
    return view
