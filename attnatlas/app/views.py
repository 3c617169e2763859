"""The dashboard's tabs beyond the grid and the single head, by key: compare two models, the ViT analyses,
and the model overview with one head's math. Each tab is built the first time it is opened (the first page
stays small), from stored results only; a missing result or a text model asked for an image view shows the
builder's message, escaped, in place of the tab.

Each view lives in its own module behind `view.View` (a `root` layout and `update()`); this module only
maps keys to them. It imports no module that imports it.
"""

from __future__ import annotations

from attnatlas.app.compare_tab import CompareTab
from attnatlas.app.data import AppData
from attnatlas.app.math_view import MathView
from attnatlas.app.similar import similar_heads_html  # noqa: F401 - kept importable from here
from attnatlas.app.view import Place, View, guarded_build, message, partner, placeholder  # noqa: F401
from attnatlas.app.vit_tab import BUILDERS, AnalysisTab

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


def build_view(key: str, data: AppData, place: Place) -> View:
    """The view of one lazy tab for the session's place."""
    if key == "compare":
        return CompareTab(data, place)
    if key == "math":
        return MathView(data, place)
    if key in BUILDERS:
        return AnalysisTab(key, data, place)
    raise KeyError(key)
