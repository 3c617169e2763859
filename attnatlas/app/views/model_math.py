"""The "Model & head math" tab: the model overview and the math of the session's current head, for the
token pair clicked in the head view (or a default pair); query and key selects pick another pair."""

from __future__ import annotations

import html

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, Div, Select
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from attnatlas.app.data import AppData
from attnatlas.app.views.base import Host, Place, ViewSpec, guarded_build, layout_note_div, show_layout_note
from attnatlas.app.views.vit import ALPHA, legend_outside
from attnatlas.render.safe import plain
from attnatlas.store import Atlas


def math_target(data: AppData, place: Place) -> tuple[int, int, int, str]:
    """(sequence, query position i, key position j, note) for the head math: the clicked token of the
    single-head view when there is one, else the first sequence's first query for images ([CLS]) or last for text."""
    model = place.model
    tok = data.atlas.tokens(model)
    t = data.tokens(model, place.method)
    n = len(t.rows)
    if place.selected is not None and 0 <= place.selected < 2 * n:
        p = place.selected
        row_ = int(t.rows[p % n])
        seq, pos = int(tok["sequence"].iat[row_]), int(tok["position"].iat[row_])
        weights: dict[int, float] = {}
        if data.has_attention(model):
            idx, w = data.topk(model, place.layer, place.head)
            if p < n:
                weights = {int(r): float(v) for r, v in zip(idx[row_], w[row_]) if r >= 0}
            else:
                qs, ks = np.nonzero(idx == row_)
                weights = {int(r): float(w[a, b]) for r, a, b in zip(qs, qs, ks)}
        best = max(weights, key=weights.get) if weights else row_
        other = int(tok["position"].iat[best])
        i, j = (pos, other) if p < n else (other, pos)
        what = "query" if p < n else "key"
        return seq, i, j, f"the {what} clicked in the single-head view (sequence {seq}, position {pos})"
    seq = int(tok["sequence"].iat[0])
    n_seq = int((tok["sequence"] == seq).sum())
    i = 0 if data.modality(model) == "image" else n_seq - 1
    return seq, i, 0, f"sequence {seq}, query {i}; click a point in the single-head view to follow it"


class MathView:
    """The model overview and one head's math, following the session's head and clicked token."""

    def __init__(self, data: AppData, place: Place):
        self.data = data
        self.place = place
        self.note = Div(text="", name="math_note", disable_math=True)
        self.layout_note = layout_note_div("math_layout_note", 700)  # the formula below has what the layout lacks
        self.sel_i = Select(title="query token", width=200, name="math_query")
        self.sel_j = Select(title="key token", width=200, name="math_key")
        self.sel_i.on_change("value", self._on_pair)
        self.sel_j.on_change("value", self._on_pair)
        self.body = column(Div(text="", disable_math=True), name="math_body")
        self.root = column(self.note, self.layout_note, row(self.sel_i, self.sel_j), self.body, name="view_math")
        self._busy = False
        self.seq = 0
        self.update()

    def update(self) -> None:
        """Follow the session's head and clicked token."""
        p = self.place
        self.seq, i, j, where = math_target(self.data, p)
        tok = self.data.atlas.tokens(p.model)
        toks = tok[tok["sequence"] == self.seq].sort_values("position")
        opts = [(str(q), f"{q}: {t}") for q, t in zip(toks["position"], toks["token"].astype(str))]  # Select shows text
        self._busy = True
        try:
            self.sel_i.options, self.sel_j.options = opts, opts
            self.sel_i.value, self.sel_j.value = str(i), str(j)
        finally:
            self._busy = False
        self.note.text = (f"<b>{html.escape(p.model)} L{p.layer}H{p.head}</b>, following the single-head view: "
                          f"{html.escape(where)}.")
        show_layout_note(self.layout_note, self.data.atlas, p.model)
        self._draw(i, j)

    refresh = update

    def _draw(self, i: int, j: int) -> None:
        p = self.place
        self.body.children = [guarded_build("math", build_overview, self.data.atlas, p.model, p.layer, p.head, self.seq, i, j)]

    def _on_pair(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        try:
            i, j = int(self.sel_i.value), int(self.sel_j.value)
        except (TypeError, ValueError):
            return
        self._draw(i, j)


def build_overview(atlas: Atlas, model: str, layer: int = 0, head: int = 0, seq: int = 0, i: int = 0, j: int = 0):
    """Architecture table and the numbers of one head for query token i and key token j."""
    from attnatlas.analyze import overview  # the analyses load on first use, not with the page

    arch = overview.architecture(atlas, model)
    rows_html = "".join(f"<tr><td><b>{html.escape(s)}</b></td><td>{html.escape(w)}</td><td><code>{html.escape(o)}</code></td></tr>"
                        for s, w, o in zip(arch.stage, arch.what, arch.output))
    arch_div = Div(text=f"<table>{rows_html}</table>", width=700)
    m = overview.head_math(atlas, model, layer, head, seq, i, j)
    d = len(m.q)
    vec = ColumnDataSource(dict(dim=np.arange(d), q=m.q, k=m.k, qk=m.qk))
    fig = figure(width=460, height=260, title=f"L{layer} H{head}: q, k and q x k per dimension", tools="hover",
                 tooltips=[("dim", "@dim"), ("q", "@q{0.000}"), ("k", "@k{0.000}"), ("q x k", "@qk{0.000}")])
    fig.line("dim", "q", source=vec, color=Category10_10[0], legend_label="q")
    fig.line("dim", "k", source=vec, color=Category10_10[1], legend_label="k")
    fig.vbar(x="dim", top="qk", width=0.8, source=vec, color=Category10_10[2], alpha=ALPHA, legend_label="q x k")
    legend_outside(fig)
    n = len(m.softmax)
    raw = [str(t) for t in m.tokens]  # plot titles and plain hover fields are text: Bokeh escapes them
    toks = [html.escape(t) for t in raw]  # for the Div below, which is HTML
    srow = ColumnDataSource(dict(m=np.arange(n), p=m.softmax, logit=np.where(np.isfinite(m.logits), m.logits, np.nan), token=raw))
    sfig = figure(width=460, height=200, tools="hover,tap",
                  tooltips=[("key", "@token"), ("logit", "@logit{0.000}"), ("weight", "@p{0.0000}")])
    sfig.title.text = plain(f"softmax row of query {i} ({raw[i]})")  # a token: shown as written, never as TeX
    sfig.vbar(x="m", top="p", width=0.8, source=srow)
    # Each step the model takes from q·k to the weight, with this layer's recorded numbers.
    steps = [f"q·k = Σ q×k = <b>{m.dot:.4f}</b>"]
    if m.position is not None:
        steps.append(f"+ content-position terms {m.position:.4f} = <b>{m.dot + m.position:.4f}</b>")
    steps.append(f"× scaling {html.escape(overview.scaling_text(m.scaling, d))} = <b>{m.scaled:.4f}</b>")
    if m.softcap:
        steps.append(f"softcap {m.softcap:g}·tanh(x/{m.softcap:g}) = <b>{m.capped:.4f}</b>")
    if m.bias is not None and np.isfinite(m.bias):
        steps.append(f"+ bias {m.bias:.4f}")
    steps.append(f"masked (key {j} is outside what query {i} may attend to): logit −∞" if m.masked else
                 f"logit <b>{m.logit:.4f}</b>")
    text = Div(text="; ".join(steps) + f"; softmax over the {n} keys of sequence {seq}: weight of key {j} ({toks[j]}) = "
                                       f"<b>{m.weight:.4f}</b>")
    return column(arch_div, row(fig, sfig), text, name="overview")


def build(data: AppData, place: Place, host: Host) -> MathView:
    return MathView(data, place)


VIEW = ViewSpec("math", "Model & head math", build, per_model=True, follows_head=True)
