"""The "Model & head math" tab: the model overview and the math of the session's current head, for the
token pair clicked in the head view (or a default pair); query and key selects pick another pair."""

from __future__ import annotations

import html

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import Div, Select

from attnatlas.app.data import AppData
from attnatlas.app.view import Place, guarded_build, layout_note_div, show_layout_note


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
    key, title = "math", "Model & head math"

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
        from attnatlas.app.vit_views import build_overview  # the analyses load on first use, not with the page

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
