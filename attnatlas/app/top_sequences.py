"""Top sequences of one head: where in the corpus the head is most characteristic.

Two lists, from stored results only:
- strongest attention: the queries whose largest top-k weight on a non-sink key (not the sequence's first
  token, not a special token) is highest, one entry per sequence, with that query's keys shaded by weight;
- typical of each cluster: the head's layout (queries and keys together) split into clusters by k-means on
  its 2-D coordinates; per cluster, the sequences with the largest share of their tokens in it, those
  tokens shaded (query colour when the sequence's queries are there, key colour for its keys).

`TopSequences(data)` builds a button and a Div for the head view; `.show(model, method, layer, head)` marks
the head, the button fills the Div (computed on demand, so a head switch costs nothing). All text is
escaped; no value reaches JavaScript code.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from bokeh.layouts import column
from bokeh.models import Button, Div

from attnatlas.app import colors
from attnatlas.app.data import AppData

log = logging.getLogger(__name__)

N_STRONGEST = 5
N_CLUSTERS = 6
PER_CLUSTER = 2


@dataclass(frozen=True)
class Entry:
    sequence: int
    score: float  # weight, or share of the sequence's tokens in the cluster
    shade: dict[int, float]  # token row -> 0..1
    mark: int | None  # token row outlined (the query), if any
    colour: str  # rgb triple for the shading, "r,g,b"


def _rgb(hex_colour: str) -> str:
    return ",".join(str(int(hex_colour[i:i + 2], 16)) for i in (1, 3, 5))


def kmeans(xy: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """(point, 2) -> (point,) cluster labels; seeded farthest-point start, then Lloyd steps."""
    n = len(xy)
    k = min(k, n)
    rng = np.random.default_rng(seed)
    centres = [xy[rng.integers(n)]]
    for _ in range(k - 1):
        d = np.min(((xy[:, None] - np.array(centres)[None]) ** 2).sum(2), axis=1)
        centres.append(xy[int(d.argmax())])
    c = np.array(centres, dtype=np.float64)
    lab = np.zeros(n, np.int64)
    for _ in range(iters):
        lab = ((xy[:, None] - c[None]) ** 2).sum(2).argmin(1)
        new = np.array([xy[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return lab


def strongest(data: AppData, model: str, layer: int, head: int, n: int = N_STRONGEST) -> list[Entry]:
    """Sequences holding the head's strongest non-sink attention weights, one entry per sequence."""
    if not data.has_attention(model):
        return []
    tok = data.atlas.tokens(model)
    idx, w = data.topk(model, layer, head)  # (token, k) key rows and weights
    sink = (tok["position"].to_numpy() == 0) | tok["is_special"].to_numpy().astype(bool)
    valid = idx >= 0
    ok = valid & ~sink[np.where(valid, idx, 0)]
    w_ok = np.where(ok, w.astype(np.float32), 0.0)
    best = w_ok.max(1)  # (token,) strongest non-sink weight of each query
    seq = tok["sequence"].to_numpy()
    order = np.argsort(-best, kind="stable")
    out: list[Entry] = []
    seen: set[int] = set()
    for q in order:
        if best[q] <= 0 or len(out) >= n:
            break
        s = int(seq[q])
        if s in seen:
            continue
        seen.add(s)
        top = float(best[q])
        shade = {int(r): float(v) / top for r, v in zip(idx[q], w_ok[q]) if v > 0}
        out.append(Entry(s, top, shade, int(q), _rgb(colors.KEY)))
    return out


def typical(data: AppData, model: str, method: str, layer: int, head: int, k: int = N_CLUSTERS,
            per_cluster: int = PER_CLUSTER) -> list[tuple[int, int, list[Entry]]]:
    """(cluster, points in it, entries) per cluster of the head's layout, largest cluster first."""
    t = data.tokens(model, method)
    h = data.head(model, method, layer, head)
    xy = np.c_[h.x, h.y]
    ok = np.isfinite(xy).all(1)
    if ok.sum() < 2:
        return []
    n = len(t.rows)
    lab = np.full(2 * n, -1)
    lab[ok] = kmeans(xy[ok].astype(np.float64), k)
    rows = np.concatenate([t.rows, t.rows])
    is_key = np.arange(2 * n) >= n
    seq = t.seq_of_row[rows]
    size = pd.Series(seq).value_counts()  # points per sequence (queries and keys)
    out = []
    for c in pd.Series(lab[lab >= 0]).value_counts().index:
        inside = lab == c
        share = pd.Series(seq[inside]).value_counts() / size
        share = share.dropna().sort_values(ascending=False, kind="stable")
        entries = []
        for s, v in share.head(per_cluster).items():
            pts = np.flatnonzero(inside & (seq == s))
            keys = is_key[pts].mean()  # which kind of the sequence's points this cluster holds
            shade = {int(rows[p]): 1.0 for p in pts}
            entries.append(Entry(int(s), float(v), shade, None, _rgb(colors.KEY if keys > 0.5 else colors.QUERY)))
        out.append((int(c), int(inside.sum()), entries))
    return out


def sequence_html(data: AppData, model: str, e: Entry) -> str:
    """The entry's sequence as escaped text, tokens shaded by e.shade, the marked token outlined."""
    toks = data.sequence_tokens(model, e.sequence)
    text = str(data.sequence_info(model, e.sequence).get("text", ""))
    has_offsets = "char_start" in toks and data.modality(model) != "image"
    out, cursor = [], 0
    for r, tok, special, a, b in zip(toks["row"], toks["token"], toks["is_special"],
                                     toks["char_start"] if has_offsets else [-1] * len(toks),
                                     toks["char_end"] if has_offsets else [-1] * len(toks)):
        v = e.shade.get(int(r), 0.0)
        plain_piece = has_offsets and a is not None and a >= 0 and b >= a and not special
        style = colors.token_style(e.colour, 0.15 + 0.7 * v if v > 0 else 0.0, not plain_piece)
        if e.mark is not None and int(r) == e.mark:
            style += "outline:2px solid #000;"
        if plain_piece:
            if a > cursor:
                out.append(html.escape(text[cursor:a]))
            piece = text[a:b]
            cursor = max(cursor, b)
        else:
            piece = str(tok)
            out.append(" ")
        out.append(f'<span style="{style}">{html.escape(piece)}</span>')
    if has_offsets and cursor < len(text):
        out.append(html.escape(text[cursor:]))
    return "".join(out)


def top_sequences_html(data: AppData, model: str, method: str, layer: int, head: int) -> str:
    parts = [f"<b>Top sequences of L{layer}H{head}</b>"]
    strong = strongest(data, model, layer, head)
    parts.append("<div><i>Strongest non-sink attention</i> (not the first token or special tokens; the query outlined, "
                 "its keys shaded by weight):</div>")
    if not data.has_attention(model):
        parts.append("<div>This atlas has no stored attention; extract with --attention-topk K.</div>")
    elif not strong:
        parts.append("<div>No attention outside sink tokens is stored for this head.</div>")
    for e in strong:
        parts.append(f'<div style="margin:3px 0">{e.score:.2f} \u00b7 seq {e.sequence}: {sequence_html(data, model, e)}</div>')
    clusters = typical(data, model, method, layer, head)
    if clusters:
        parts.append(f"<div style='margin-top:6px'><i>Typical of each cluster of the {html.escape(method)} layout</i> "
                     "(k-means on the 2-D layout; the sequence's tokens in the cluster shaded, "
                     f'<span style="color:{colors.QUERY}">as queries</span> or <span style="color:{colors.KEY}">as keys</span>):</div>')
    for c, n_points, entries in clusters:
        parts.append(f"<div style='margin-top:3px'>cluster {c + 1} ({n_points:,} points)</div>")
        for e in entries:
            parts.append(f'<div style="margin:2px 0 2px 10px">{100 * e.score:.0f}% of the points of seq {e.sequence}: '
                         f"{sequence_html(data, model, e)}</div>")
    return '<div style="line-height:1.7;white-space:pre-wrap">' + "".join(parts) + "</div>"


class TopSequences:
    """A button and a panel in the head view; computed for the shown head when asked."""

    def __init__(self, data: AppData):
        self.data = data
        self.key: tuple[str, str, int, int] | None = None
        self.button = Button(label="Top sequences of this head", width=200, name="top_sequences_button")
        self.div = Div(text="", width=410, disable_math=True, name="top_sequences", styles={"overflow-wrap": "anywhere"})
        self.button.on_click(self.fill)
        self.panel = column(self.button, self.div, name="top_sequences_panel")

    def show(self, model: str, method: str, layer: int, head: int) -> None:
        """A new head: the old list no longer applies."""
        if self.key != (model, method, layer, head):
            self.key = (model, method, layer, head)
            self.div.text = ""

    def fill(self) -> None:
        if self.key is None:
            return
        try:
            self.div.text = top_sequences_html(self.data, *self.key)
        except Exception as exc:  # noqa: BLE001 - shown in this panel, this session only
            log.exception("top sequences failed")
            self.div.text = f'<span style="color:#b00">Top sequences could not be listed: {html.escape(str(exc))}</span>'

