"""The dashboard's tabs beyond the grid and the single head: compare two models, the ViT analyses, and the
model overview with one head's math. Each tab is built the first time it is opened (the first page stays
small), from stored results only; a missing result or a text model asked for an image view shows the
builder's message, escaped, in place of the tab.
"""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from bokeh.layouts import column, row
from bokeh.models import Div, Select

from attnatlas.errors import AtlasError

if TYPE_CHECKING:
    from attnatlas.app.dashboard import Dashboard

log = logging.getLogger(__name__)

# (key used in the URL's view=, tab title); "grid" and "head" are built by the Dashboard itself.
VIEWS = (
    ("grid", "All heads"),
    ("head", "Single head"),
    ("compare", "Compare"),
    ("patches", "Patch similarity"),
    ("rollout", "Rollout"),
    ("embeddings", "Layer embeddings"),
    ("neurons", "Neurons"),
    ("math", "Model & head math"),
)
LAZY = tuple(k for k, _ in VIEWS if k not in ("grid", "head"))
PER_MODEL = ("patches", "rollout", "embeddings", "neurons", "math")  # rebuilt when the model changes


def message(text: str, colour: str = "#555") -> Div:
    """A note in place of a view; `text` is escaped here."""
    return Div(text=f'<div style="color:{colour};max-width:760px">{html.escape(text)}</div>', name="view_message")


def placeholder(title: str) -> Div:
    return Div(text=f"<i>{html.escape(title)}: loading\u2026</i>")


def guarded_build(key: str, build, *args: Any, **kw: Any):
    """A builder's layout, or its message: AtlasError (and StoreError, its subclass) name the command to run;
    anything else is logged and reported to this session only."""
    try:
        return build(*args, **kw)
    except AtlasError as exc:
        return message(str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken tab, not a broken session
        log.exception("view %s failed", key)
        return message(f"This view could not be built: {exc}", "#b00")


# ---- compare ------------------------------------------------------------------------------------------------
def partner(data, model: str) -> str:
    """The model to compare `model` with by default: one with a stored comparison, else one of the same modality."""
    others = [m for m in data.atlas.models if m != model]
    if not others:
        return model
    for m in others:
        if data.atlas.has_table(model, f"similarity__{m}"):
            return m
    kind = data.atlas.info(model).modality
    return next((m for m in others if data.atlas.info(m).modality == kind), others[0])


class ComparePanel:
    """Two model selects and the compare view of the chosen pair."""

    def __init__(self, dash: "Dashboard"):
        self.dash = dash
        models = list(dash.data.atlas.models)
        a = dash.model if dash.model in models else models[0]
        b = partner(dash.data, a)
        self.sel_a = Select(title="Model A", options=models, value=a, width=180, name="compare_model_a")
        self.sel_b = Select(title="Model B", options=models, value=b, width=180, name="compare_model_b")
        self.body = column(self._view(a, b), name="compare_body")
        self.sel_a.on_change("value", self._on_change)
        self.sel_b.on_change("value", self._on_change)
        self.root = column(row(self.sel_a, self.sel_b), self.body, name="view_compare")

    def _view(self, a: str, b: str):
        if a == b:
            return message("Choose two different models.")
        res = self.dash.data.compare_result(a, b)
        if res is None:
            return message(f"No comparison of {a} and {b} is stored in this atlas. Run `attnatlas compare "
                           f"{self.dash.data.path} --models {a} {b} --out DIR`, then open this tab again.")
        from attnatlas.app.compare_view import build_compare_view

        return guarded_build("compare", build_compare_view, self.dash.data.atlas, a, b, result=res)

    def _on_change(self, attr: str, old: str, new: str) -> None:
        models = self.dash.data.atlas.models
        a, b = self.sel_a.value, self.sel_b.value
        if a not in models or b not in models:  # never a path: only the atlas's own names
            self.body.children = [message("Unknown model.")]
            return
        self.body.children = [self._view(a, b)]


# ---- model overview and one head's math -----------------------------------------------------------------------
def math_target(dash: "Dashboard") -> tuple[int, int, int, str]:
    """(sequence, query position i, key position j, note) for the head math: the clicked token of the
    single-head view when there is one, else the first sequence's first query for images ([CLS]) or last for text."""
    data, model = dash.data, dash.model
    tok = data.atlas.tokens(model)
    t = data.tokens(model, dash.method)
    n = len(t.rows)
    if dash.selected is not None and 0 <= dash.selected < 2 * n:
        p = dash.selected
        row_ = int(t.rows[p % n])
        seq, pos = int(tok["sequence"].iat[row_]), int(tok["position"].iat[row_])
        weights: dict[int, float] = {}
        if data.has_attention(model):
            idx, w = data.topk(model, dash.layer, dash.head)
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


class MathPanel:
    """The model overview and the math of the dashboard's current head, for the clicked token pair;
    query and key selects pick another pair within the same sequence."""

    def __init__(self, dash: "Dashboard"):
        self.dash = dash
        self.note = Div(text="", name="math_note")
        self.sel_i = Select(title="query token", width=200, name="math_query")
        self.sel_j = Select(title="key token", width=200, name="math_key")
        self.sel_i.on_change("value", self._on_pair)
        self.sel_j.on_change("value", self._on_pair)
        self.body = column(Div(text=""), name="math_body")
        self.root = column(self.note, row(self.sel_i, self.sel_j), self.body, name="view_math")
        self._busy = False
        self.seq = 0
        self.refresh()

    def refresh(self) -> None:
        """Follow the dashboard's head and clicked token."""
        d = self.dash
        self.seq, i, j, where = math_target(d)
        tok = d.data.atlas.tokens(d.model)
        toks = tok[tok["sequence"] == self.seq].sort_values("position")
        opts = [(str(p), f"{p}: {t}") for p, t in zip(toks["position"], toks["token"].astype(str))]  # Select shows text
        self._busy = True
        try:
            self.sel_i.options, self.sel_j.options = opts, opts
            self.sel_i.value, self.sel_j.value = str(i), str(j)
        finally:
            self._busy = False
        self.note.text = (f"<b>{html.escape(d.model)} L{d.layer}H{d.head}</b>, following the single-head view: "
                          f"{html.escape(where)}.")
        self._draw(i, j)

    def _draw(self, i: int, j: int) -> None:
        from attnatlas.app.vit_views import build_overview

        d = self.dash
        self.body.children = [guarded_build("math", build_overview, d.data.atlas, d.model, d.layer, d.head, self.seq, i, j)]

    def _on_pair(self, attr: str, old: str, new: str) -> None:
        if self._busy:
            return
        try:
            i, j = int(self.sel_i.value), int(self.sel_j.value)
        except (TypeError, ValueError):
            return
        self._draw(i, j)


def build_view(key: str, dash: "Dashboard"):
    """The layout of one lazy tab for the dashboard's current model (and head, for the math panel)."""
    if key == "compare":
        dash.compare_panel = ComparePanel(dash)
        return dash.compare_panel.root
    if key == "math":
        dash.math_panel = MathPanel(dash)
        return dash.math_panel.root
    from attnatlas.app import vit_views  # scikit-learn and the analyses load on first use, not with the page

    builders = {"patches": vit_views.build_patch_similarity, "rollout": vit_views.build_rollout,
                "embeddings": vit_views.build_layer_embeddings, "neurons": vit_views.build_neurons}
    return guarded_build(key, builders[key], dash.data.atlas, dash.model)


def similar_heads_html(data, model: str, layer: int, head: int) -> str:
    """Escaped HTML listing the stored nearest heads of one head, or how to compute them."""
    near = data.similar_heads(model, layer, head)
    if near is None or not len(near):
        other = partner(data, model)
        kind = data.atlas.info(model).modality
        if other == model or data.atlas.info(other).modality != kind:
            # compare needs common inputs, so a partner must be of the same modality
            return (f"<small><b>Similar heads:</b> none stored; add another {kind} model over the same inputs, "
                    f"then run <code>attnatlas compare</code>.</small>")
        cmd = f"attnatlas compare ATLAS --models {model} {other} --out DIR"
        return f"<small><b>Similar heads:</b> none stored; run <code>{html.escape(cmd)}</code>.</small>"
    parts = []
    for measure in ("pattern", "profile"):
        sub = near[near["measure"] == measure]
        if not len(sub):
            continue
        groups = []
        for (scope, other), g in sub.groupby(["scope", "other_model"], sort=False):
            label = "same model" if scope == "same" else str(other)
            items = ", ".join(f"L{int(a)}H{int(b)} {s:.2f}" for a, b, s in
                              zip(g["other_layer"], g["other_head"], g["score"]))
            groups.append(f"<i>{html.escape(label)}</i>: {html.escape(items)}")
        parts.append(f"by {measure}: " + "; ".join(groups))
    return "<small><b>Similar heads</b> (stored by attnatlas compare)<br>" + "<br>".join(parts) + "</small>"
