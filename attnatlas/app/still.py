"""What a notebook shows before Bokeh is imported (numpy and PIL only): the arguments of a page checked, and the
grid as a still image, the very image the page's grid draws (attnatlas.app.page builds the page from the same)."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnatlas.errors import InputError
from attnatlas.render.raster import MAX_CELL_PX, MIN_CELL_PX, data_url, render_grid, slot_order

INLINE_BUDGET = 4 << 20  # notebook output: the 270-head SmolLM2 grid keeps 379 of 1,199 tokens a head


def check(data: Any, model: Any, method: Any = None, layer: Any = None, head: Any = None) -> tuple[str, str]:
    """Validate what a caller asked for; InputError names what exists."""
    have = list(data.models)
    if model is None:
        model = data.default_model
    if model not in have:
        missing = [m for m in data.atlas.models if m not in have]
        if model in missing:
            raise InputError(f"Model {model!r} has no layouts yet; run `attnatlas project {data.shown_path} --model {model}`.")
        raise InputError(f"No model {model!r} in {data.shown_path}; models with layouts: {', '.join(have)}.")
    methods = data.methods[model]
    if method is None:
        method = data.method(model, None)
    if method not in methods:
        raise InputError(f"Model {model!r} has no {method!r} layouts; it has: {', '.join(methods)} "
                         f"(make more with `attnatlas project {data.shown_path} --model {model} --method {method}`).")
    info = data.infos[model]
    if (layer is None) != (head is None):
        raise InputError("Give both layer= and head= for one head, or neither for the grid.")
    if layer is not None:
        for name, v, n in (("layer", layer, info.n_layers), ("head", head, info.n_heads)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < n:
                raise InputError(f"{name} {v!r} does not exist: {model!r} has {name}s 0-{n - 1} "
                                 f"({info.n_layers} layers x {info.n_heads} heads).")
    return model, method


def check_grid(data: Any, model: str, method: str) -> None:
    if not data.grid_layouts(model, method).done.any():
        raise InputError(f"Model {model!r} has no finished {method!r} layout; run "
                         f"`attnatlas project {data.shown_path} --model {model} --method {method}`.")


def grid_cell(n_layers: int, n_heads: int) -> int:
    """px a page shows a grid cell at."""
    return int(np.clip(min(880 / n_heads, 880 / n_layers), 28, 100))


def grid_still(data: Any, model: str, method: str) -> tuple[str, int]:
    """The grid image (a PNG data URL) and its width as a page shows it. It is drawn at twice that size (sharp on
    high-density screens), under the keys the page's GridView reads from data's cache, so the page reuses it."""
    g = data.grid_layouts(model, method)
    L, H = g.done.shape
    cell = grid_cell(L, H)
    px = int(np.clip(2 * cell, MIN_CELL_PX // 2, MAX_CELL_PX))  # as GridView.show clips it
    cells = data.grid_image(("cells", model, method, px), dict)
    columns = slot_order(L, H)
    url = data.grid_image(("grid", model, method, px, columns.tobytes()), lambda: data_url(render_grid(g, px, columns, cells).index))
    return url, H * cell
