"""Every view of the dashboard, in tab order: the one list the dashboard builds its tabs, URL keys and
routing from. Adding a view is one module (a `ViewSpec` named VIEW, or VIEWS for several) and one entry here.

Importing this loads each view's module but none of the heavy parts (the analyses, compare's figures): a
view loads those when it is first built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnatlas.app.data import AppData
from attnatlas.app.views import compare, grid, head, live, model_math, vit
from attnatlas.app.views.base import ViewSpec

VIEWS: tuple[ViewSpec, ...] = (
    grid.VIEW,
    head.VIEW,
    compare.VIEW,
    *vit.VIEWS,
    model_math.VIEW,
)
# Parts that join other views instead of having a tab: each is called as add_on(dashboard, document).
ADD_ONS: tuple[Callable[[Any, Any], Any], ...] = (live.compose,)


def shown(data: AppData) -> tuple[ViewSpec, ...]:
    """The views this atlas gets a tab for."""
    return tuple(v for v in VIEWS if v.shown(data))
