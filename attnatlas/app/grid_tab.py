"""The "All heads" tab: the global grid of heads and the head map, composed behind `view.View`.

grid_view draws the grid and hands the head map (head_map, which draws its thumbnails with grid_view's
renderer) in through a factory, so neither imports the other back."""

from __future__ import annotations

from typing import Callable

from attnatlas.app.data import AppData
from attnatlas.app.grid_view import GridView
from attnatlas.app.head_map import HeadMap
from attnatlas.app.head_scatter import HeadScatter
from attnatlas.app.view import Place


class GridTab:
    key, title = "grid", "All heads"

    def __init__(self, data: AppData, place: Place, on_open: Callable[[int, int], None],
                 on_open_model: Callable[[str, int, int], None], on_error: Callable[[str], None]):
        self.place = place
        self.grid = GridView(data, on_open=on_open, on_error=on_error, on_open_model=on_open_model, make_head_map=HeadMap,
                             make_head_scatter=HeadScatter)
        self.root = self.grid.panel
        self.update()

    def update(self) -> None:
        """Draw the place's model and projection."""
        self.grid.show(self.place.model, self.place.method)
