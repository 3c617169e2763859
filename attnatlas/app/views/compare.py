"""The Compare tab: two model selects and the stored comparison of the chosen pair, drawn by
`attnatlas.render.compare_html` (the layout compare's report shows too). Never suggests a command that would
be refused: an image and a text model are said not to be comparable."""

from __future__ import annotations

from typing import Any

from bokeh.layouts import column, row
from bokeh.models import Select

from attnatlas.app.data import AppData
from attnatlas.app.views.base import Host, Place, ViewSpec, guarded_build, message, partner


def build_compare_view(atlas: Any, model_a: str, model_b: str, result: Any = None, **kw: Any) -> Any:
    """The layout comparing two models (CompareResult `result`, else the stored one); a note instead when
    `attnatlas compare` has not been run. `kw`: compare_layout's metric, measure, top_k."""
    from attnatlas.analyze.head_types import types_by_head
    from attnatlas.compare.metrics import HEAD_FIELDS
    from attnatlas.compare.run import load
    from attnatlas.render.compare_html import compare_layout, not_stored  # its figures load on first use

    res = result if result is not None else load(atlas, model_a, model_b)
    if res is None:
        return not_stored(model_a, model_b)
    return compare_layout(atlas, res, HEAD_FIELDS, types_by_head(atlas, tuple(res.models)), **kw)


class CompareTab:
    """Two model selects over the comparison of the chosen pair."""

    def __init__(self, data: AppData, place: Place):
        self.data = data
        models = list(data.atlas.models)
        a = place.model if place.model in models else models[0]
        b = partner(data, a) or a
        self.sel_a = Select(title="Model A", options=models, value=a, width=180, name="compare_model_a")
        self.sel_b = Select(title="Model B", options=models, value=b, width=180, name="compare_model_b")
        self.body = column(self._view(a, b), name="compare_body")
        self.sel_a.on_change("value", self._on_change)
        self.sel_b.on_change("value", self._on_change)
        self.root = column(row(self.sel_a, self.sel_b), self.body, name="view_compare")

    def update(self) -> None:
        """The pair is the user's choice: a head or model switch elsewhere leaves it."""

    def _view(self, a: str, b: str) -> Any:
        kind_a, kind_b = self.data.atlas.info(a).modality, self.data.atlas.info(b).modality
        if a == b:
            same = [m for m in self.data.atlas.models if m != a and self.data.atlas.info(m).modality == kind_a]
            if not same:
                return message(f"This atlas has no other {kind_a} model to compare {a} with: compare measures two models "
                               f"over the same inputs, so both must be {kind_a} models.")
            return message("Choose two different models.")
        if kind_a != kind_b:
            return message(f"{a} ({kind_a}) and {b} ({kind_b}) cannot be compared: compare measures two models over "
                           f"the same inputs, so both must be {kind_a} models or both {kind_b} models.")
        res = self.data.compare_result(a, b)
        if res is None:
            return message(f"No comparison of {a} and {b} is stored in this atlas. Run `attnatlas compare "
                           f"{self.data.shown_path} --models {a} {b} --out DIR`, then open this tab again.")
        return guarded_build("compare", build_compare_view, self.data.atlas, a, b, result=res)

    def _on_change(self, attr: str, old: str, new: str) -> None:
        models = self.data.atlas.models
        a, b = self.sel_a.value, self.sel_b.value
        if a not in models or b not in models:  # never a path: only the atlas's own names
            self.body.children = [message("Unknown model.")]
            return
        self.body.children = [self._view(a, b)]


def build(data: AppData, place: Place, host: Host) -> CompareTab:
    return CompareTab(data, place)


VIEW = ViewSpec("compare", "Compare", build, min_models=2)
