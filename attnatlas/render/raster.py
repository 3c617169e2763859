"""The grid's rasteriser: every head's layout points as one small palette image, numpy and PIL only.

Per cell, two count images (queries, keys) over the head's robust range, log-shaded into 15 levels each, and
blended like inks on white, so overlaps mix instead of hiding each other. A whole grid is one palette PNG
(most pixels are blank, so it compresses to a small part of an RGBA array). The dashboard's grid and head
map, and `attnatlas export --grid`, all draw through here.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

QUERY = "#1b9e77"  # the inks of queries and keys, everywhere they are drawn
KEY = "#d9458e"
LEVELS = 16  # shading levels per channel, 0 = empty; LEVELS**2 palette entries must fit a byte
FLOOR = 0.45  # ink of a pixel with one point: a lone point stays visible
MARGIN = 0.04  # blank share of a cell on each side, between cells
TARGET_WIDTH = 1560  # px the base image is rendered for (a 1600 px window); zooming re-renders at the real size
MIN_CELL_PX, MAX_CELL_PX = 40, 256
FRAME = "#d0d0d0"
# A grid cell's range: the 0.5-99.5% quantiles, cut further to 3 interquartile ranges beyond the quartiles.
# A sink token (a decoder's first token: one in ten points of short sequences) far from the rest would
# otherwise shrink the head's structure into a band; its points are drawn on the cell's edge instead.
GRID_QUANTILE = 0.005
GRID_FENCE = 3.0


@dataclass(frozen=True)
class GridLayouts:
    """Every stored layout point of every head of one (model, method), for the global grid."""

    coords: np.ndarray  # (layer, head, point, 2) float32: queries first, then keys; NaN where not projected
    n_queries: int  # points [0, n_queries) of a head are queries, the rest keys
    done: np.ndarray  # (layer, head) bool: heads with a finished layout
    lo: np.ndarray  # (layer, head, 2) robust lower corner (x, y) of each head's points
    hi: np.ndarray  # (layer, head, 2) robust upper corner


def robust_range(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point, 2) finite coordinates -> (lo, hi), each (2,): the range a grid cell maps."""
    a, q1, q3, b = np.quantile(xy, [GRID_QUANTILE, 0.25, 0.75, 1 - GRID_QUANTILE], axis=0)
    iqr = q3 - q1
    lo, hi = np.maximum(a, q1 - GRID_FENCE * iqr), np.minimum(b, q3 + GRID_FENCE * iqr)
    flat = ~(hi > lo)  # every point on one line: centre it instead of dividing by zero
    return np.where(flat, lo - 0.5, lo).astype(np.float32), np.where(flat, hi + 0.5, hi).astype(np.float32)


@functools.lru_cache(maxsize=4)
def palette(query: str = QUERY, key: str = KEY) -> np.ndarray:
    """(LEVELS**2, 4) uint8 RGBA: entry q * LEVELS + k is query level q over key level k, mixed like inks on
    white (each channel multiplies what the other lets through), so an overlap shows both hues darker."""
    q_rgb = np.array([int(query[i:i + 2], 16) for i in (1, 3, 5)], np.float64) / 255
    k_rgb = np.array([int(key[i:i + 2], 16) for i in (1, 3, 5)], np.float64) / 255
    ink = np.concatenate([[0.0], FLOOR + (1 - FLOOR) * np.arange(LEVELS - 1) / (LEVELS - 2)])  # (LEVELS,)
    rgb = (1 - ink[:, None, None] * (1 - q_rgb)) * (1 - ink[None, :, None] * (1 - k_rgb))  # (q, k, 3)
    out = np.empty((LEVELS, LEVELS, 4), np.uint8)
    out[..., :3] = np.round(255 * rgb).astype(np.uint8)
    out[..., 3] = 255
    out[0, 0, 3] = 0  # no point: transparent, the cell's background shows
    return out.reshape(LEVELS * LEVELS, 4)


def pixel_xy(xy: np.ndarray, lo: np.ndarray, hi: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(point, 2) layout coordinates -> (column, row) pixel indices of a w x h raster over [lo, hi]; points
    outside are clamped onto the edge (the range is a robust quantile range). Row 0 is the top."""
    u = (xy[:, 0] - lo[0]) / (hi[0] - lo[0])
    v = (xy[:, 1] - lo[1]) / (hi[1] - lo[1])
    col = np.clip((u * w).astype(np.int64), 0, w - 1)
    row_ = np.clip(((1 - v) * h).astype(np.int64), 0, h - 1)
    return col, row_


def _spread(levels: np.ndarray, radius: int) -> np.ndarray:
    """Max filter with a (2r+1)^2 square: isolated points of a large raster stay visible."""
    if radius <= 0:
        return levels
    h, w = levels.shape
    pad = np.pad(levels, radius)
    out = levels.copy()
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            np.maximum(out, pad[dy:dy + h, dx:dx + w], out=out)
    return out


def cell_counts(xy: np.ndarray, n_queries: int, lo: np.ndarray, hi: np.ndarray, w: int, h: int) -> np.ndarray:
    """(2, h, w) int64 counts of queries (0) and keys (1) of one head's (point, 2) layout."""
    ok = np.isfinite(xy).all(1)
    counts = np.zeros((2, h * w), np.int64)
    for k, part in enumerate((slice(0, n_queries), slice(n_queries, None))):
        pts = xy[part][ok[part]]
        if len(pts):
            col, row_ = pixel_xy(pts, lo, hi, w, h)
            counts[k] = np.bincount(row_ * w + col, minlength=h * w)
    return counts.reshape(2, h, w)


def shade(counts: np.ndarray) -> np.ndarray:
    """(2, h, w) counts -> (h, w) uint8 palette index. Log shading against the 99th percentile of the
    non-empty pixels of both channels together, so one pixel holding a repeated sink token does not dim
    the rest, and queries and keys are on one scale."""
    nz = counts[counts > 0]
    if not len(nz):
        return np.zeros(counts.shape[1:], np.uint8)
    ref = max(float(np.quantile(nz, 0.99)), 2.0)
    frac = np.log1p(counts) / np.log1p(ref)
    lev = np.where(counts > 0, 1 + np.round(np.clip(frac, 0, 1) * (LEVELS - 2)), 0).astype(np.uint8)
    # Grow points when they are few for the raster (fewer points than half its pixels): lone points would be
    # single specks. 3 px dots, 5 px in a zoomed cell of 600 px or more: a size on screen, not in data units.
    side = min(counts.shape[1:])
    sparse = counts.sum() < 0.5 * counts.shape[1] * counts.shape[2] and side >= 64
    radius = int(sparse) * (2 if side >= 600 else 1)
    lev = np.stack([_spread(lev[0], radius), _spread(lev[1], radius)])
    return (lev[0] * LEVELS + lev[1]).astype(np.uint8)


def render_cell(g: GridLayouts, layer: int, head: int, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 palette index image of one head; all zeros when the head has no layout."""
    if not g.done[layer, head]:
        return np.zeros((h, w), np.uint8)
    return shade(cell_counts(g.coords[layer, head], g.n_queries, g.lo[layer, head], g.hi[layer, head], w, h))


def to_rgba(index: np.ndarray) -> np.ndarray:
    """(h, w) palette index -> (h, w, 4) uint8 RGBA."""
    return palette()[index]


def png_bytes(index: np.ndarray, compress_level: int = 3) -> bytes:
    """A palette PNG of an index image, with entry 0 transparent. zlib level 3: a third of level 6's time
    for 10-20% more bytes (1 MB grid images: 60 ms against 200 ms)."""
    img = Image.fromarray(index, mode="P")
    pal = palette()
    img.putpalette(pal[:, :3].reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=compress_level, transparency=0)
    return buf.getvalue()


def data_url(index: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(index)).decode("ascii")


def base_cell_px(n_heads: int) -> int:
    return int(np.clip(TARGET_WIDTH // max(n_heads, 1), MIN_CELL_PX, MAX_CELL_PX))


@dataclass(frozen=True)
class GridImage:
    """The whole grid as one index image; slot (row r, column c) holds the head order[r][c]."""

    index: np.ndarray  # (rows * cell_px, cols * cell_px) uint8
    cell_px: int
    boxes: list[dict[str, Any]]  # per head: layer, head, x0, y0, x1, y1 (pixels), x_min, x_max, y_min, y_max


def slot_order(n_layers: int, n_heads: int, sort_by: np.ndarray | None = None) -> np.ndarray:
    """(layer, head) -> column: head order, or within each layer by descending metric (NaN last)."""
    if sort_by is None:
        return np.tile(np.arange(n_heads), (n_layers, 1))
    key = np.where(np.isfinite(sort_by), -sort_by, np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # (layer, column) -> head
    col = np.empty_like(order)
    np.put_along_axis(col, order, np.arange(n_heads)[None, :].repeat(n_layers, 0), axis=1)
    return col


def render_grid(g: GridLayouts, cell_px: int, columns: np.ndarray | None = None,
                cells: dict[tuple[int, int], np.ndarray] | None = None) -> GridImage:
    """All cells at `cell_px` into one image, layer 0 at the top. `columns` (layer, head) -> column (default:
    head order); `cells` optional pre-rendered (layer, head) -> inner images, reused across orders."""
    L, H = g.done.shape
    columns = slot_order(L, H) if columns is None else columns
    gap = max(1, int(round(MARGIN * cell_px)))
    inner = cell_px - 2 * gap
    out = np.zeros((L * cell_px, H * cell_px), np.uint8)
    boxes = []
    for layer in range(L):
        for head in range(H):
            img = cells.get((layer, head)) if cells is not None else None
            if img is None:
                img = render_cell(g, layer, head, inner, inner)
                if cells is not None:
                    cells[(layer, head)] = img
            x0, y0 = int(columns[layer, head]) * cell_px + gap, layer * cell_px + gap
            out[y0:y0 + inner, x0:x0 + inner] = img
            lo, hi = g.lo[layer, head], g.hi[layer, head]
            done = bool(g.done[layer, head])
            boxes.append(dict(layer=layer, head=head, x0=x0, y0=y0, x1=x0 + inner, y1=y0 + inner, has_layout=done,
                              x_min=float(lo[0]) if done else None, x_max=float(hi[0]) if done else None,
                              y_min=float(lo[1]) if done else None, y_max=float(hi[1]) if done else None))
    return GridImage(out, cell_px, boxes)


# ---- a figure for papers (`attnatlas export --grid`) ------------------------------------------------------
LABEL_LEFT, LABEL_TOP = 40, 22  # px of margin for the layer and head labels


def grid_figure(g: GridLayouts, cell_px: int, layers: list[int] | None = None,
                heads: list[int] | None = None) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The grid as the dashboard draws it, on white with a frame per cell and layer/head labels, and each
    head's pixel box in that image with the data range the box maps (`has_layout` False: drawn empty).
    `layers`, `heads`: the rows and columns to draw (default all), labelled with their own numbers."""
    from PIL import ImageDraw, ImageFont

    layers = list(range(g.done.shape[0])) if layers is None else list(layers)
    heads = list(range(g.done.shape[1])) if heads is None else list(heads)
    pick = np.ix_(layers, heads)
    g = GridLayouts(g.coords[pick], g.n_queries, g.done[pick], g.lo[pick], g.hi[pick])
    L, H = g.done.shape
    grid = render_grid(g, cell_px)
    rgba = Image.fromarray(to_rgba(grid.index), mode="RGBA")
    canvas = Image.new("RGB", (LABEL_LEFT + rgba.width, LABEL_TOP + rgba.height), "white")
    canvas.paste(rgba, (LABEL_LEFT, LABEL_TOP), rgba)
    draw = ImageDraw.Draw(canvas)
    size = int(np.clip(cell_px // 6, 9, 14))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        font = ImageFont.load_default()
    boxes = []
    for b in grid.boxes:
        box = {**b, "layer": layers[b["layer"]], "head": heads[b["head"]], "x0": b["x0"] + LABEL_LEFT,
               "x1": b["x1"] + LABEL_LEFT, "y0": b["y0"] + LABEL_TOP, "y1": b["y1"] + LABEL_TOP}
        draw.rectangle((box["x0"] - 1, box["y0"] - 1, box["x1"], box["y1"]), outline=FRAME if b["has_layout"] else "#888888")
        boxes.append(box)
    for c, head in enumerate(heads):
        draw.text((LABEL_LEFT + c * cell_px + cell_px / 2, LABEL_TOP / 2), f"H{head}", fill="#333333", font=font, anchor="mm")
    for r, layer in enumerate(layers):
        draw.text((LABEL_LEFT / 2, LABEL_TOP + r * cell_px + cell_px / 2), f"L{layer}", fill="#333333", font=font, anchor="mm")
    return canvas, boxes
