"""Colour modes of the single-head view: each maps per-point columns to one numeric field and a palette,
so a mode or head change sends one float column instead of a colour string per point."""

from __future__ import annotations

import colorsys
import html

import numpy as np
from bokeh.palettes import Category10, Greens9, Greys256, Plasma256, RdPu9, Viridis256, interp_palette

from attnatlas.inputs.tokens import CATEGORIES
from attnatlas.render.raster import KEY, QUERY  # noqa: F401 - the inks, one source for the grid and the views

Q_RAMP = tuple(interp_palette(Greens9[::-1][2:], 128))
K_RAMP = tuple(interp_palette(RdPu9[::-1][2:], 128))
HUE = tuple("#%02x%02x%02x" % tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / 256, 0.85, 0.9)) for i in range(256))
CATEGORY_COLOURS = ("#e41a1c", "#999999", "#984ea3", "#ff7f00", "#377eb8")

TEXT_MODES = [("kind", "query / key"), ("position", "position"), ("mod5", "position mod 5"),
              ("category", "token category"), ("norm", "vector norm"), ("length", "token length")]
IMAGE_MODES = [("kind", "query / key"), ("position", "position"), ("patch", "patch colour"), ("hue", "hue"),
               ("brightness", "brightness"), ("norm", "vector norm")]


def token_style(rgb: str, alpha: float, special: bool) -> str:
    """CSS of a token shaded with colour "r,g,b" at `alpha` (0: unshaded). Special tokens ([CLS], [SEP]) are
    grey only when unshaded; shaded, every token is black text, which reads better than white even on the
    full key colour (contrast 5.2 against 4.0)."""
    style = f"background:rgba({rgb},{alpha:.2f});" if alpha > 0 else ""
    if special:
        style += "color:#888;" if alpha <= 0 else "color:#000;"
    if special:
        style += "font-size:smaller;padding:0 2px;border-radius:3px;"
    return style


def modes(modality: str) -> list[tuple[str, str]]:
    return IMAGE_MODES if modality == "image" else TEXT_MODES


def _swatch(colour: str, label: str) -> str:
    return (f'<span style="display:inline-block;width:10px;height:10px;background:{colour};margin:0 3px 0 8px">'
            f"</span>{html.escape(label)}")


def colour(mode: str, cols: dict[str, np.ndarray], norm: np.ndarray) -> tuple[np.ndarray | None, tuple, float, float, str]:
    """(values, palette, low, high, legend html); values None means: use the per-point 'rgb' column."""
    kind = cols["kind_code"].astype(np.float32)
    if mode == "position":
        leg = _swatch(Q_RAMP[0], "query start") + _swatch(Q_RAMP[-1], "query end") + _swatch(K_RAMP[0], "key start") + _swatch(K_RAMP[-1], "key end")
        return np.minimum(cols["pos_frac"], 0.999).astype(np.float32) + kind, Q_RAMP + K_RAMP, 0.0, 2.0, leg
    if mode == "mod5":
        pal = tuple(Category10[5])
        return (cols["position"] % 5).astype(np.float32), pal, -0.5, 4.5, "".join(_swatch(c, f"{i} mod 5") for i, c in enumerate(pal))
    if mode == "category":
        leg = "".join(_swatch(c, n) for c, n in zip(CATEGORY_COLOURS, CATEGORIES))
        return cols["category"].astype(np.float32), CATEGORY_COLOURS, -0.5, 4.5, leg
    if mode == "norm":
        finite = norm[np.isfinite(norm)]
        lo, hi = (np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0))
        leg = _swatch(Viridis256[0], f"norm {lo:.2f}") + _swatch(Viridis256[-1], f"norm {hi:.2f}")
        return norm.astype(np.float32), tuple(Viridis256), float(lo), float(max(hi, lo + 1e-6)), leg
    if mode == "length":
        leg = _swatch(Plasma256[0], "1 char") + _swatch(Plasma256[-1], "12+ chars")
        return np.minimum(cols["length"], 12).astype(np.float32), tuple(Plasma256), 0.0, 12.0, leg
    if mode == "hue" and "hue" in cols:
        return cols["hue"].astype(np.float32), HUE, 0.0, 1.0, _swatch(HUE[0], "hue 0") + _swatch(HUE[128], "hue 0.5")
    if mode == "brightness" and "brightness" in cols:
        return cols["brightness"].astype(np.float32), tuple(Greys256[::-1]), 0.0, 1.0, _swatch("#000000", "dark") + _swatch("#ffffff", "bright")
    if mode == "patch" and "rgb" in cols:
        return None, (QUERY, KEY), 0.0, 1.0, "mean colour of each patch"
    return kind, (QUERY, KEY), 0.0, 1.0, _swatch(QUERY, "query") + _swatch(KEY, "key")


# Patch colours, quantised to 16 levels a channel: a palette index per point instead of a colour string.
RGB_PALETTE = tuple("#%02x%02x%02x" % (r * 17, g * 17, b * 17) for r in range(16) for g in range(16) for b in range(16))


def palette_index(values: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Values -> palette indices, as a LinearColorMapper(low=lo, high=hi) over n colours would pick them."""
    v = np.nan_to_num(np.asarray(values, np.float64), nan=lo)
    return np.clip(np.floor((v - lo) / max(hi - lo, 1e-12) * n), 0, n - 1).astype(np.int32)


def indexed(mode: str, cols: dict[str, np.ndarray], norm: np.ndarray) -> tuple[np.ndarray, tuple, str]:
    """(palette index per point, palette, legend html) of a colour mode.

    Every mode is an index into one palette, so the scatter's fill is always the same mapping of one column:
    BokehJS copies a glyph's fill into its non-selection and decimated (pan/zoom) glyphs once, so a fill
    switched to another column later would show only until the next click or pan."""
    values, palette, lo, hi, legend = colour(mode, cols, norm)
    if values is None:  # patch colour: its mean RGB, quantised
        rgb = np.stack([np.nan_to_num(cols[c]) for c in ("mean_r", "mean_g", "mean_b")], 1)
        q = np.clip(np.round(rgb * 15), 0, 15).astype(np.int32)
        return (q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]).astype(np.int32), RGB_PALETTE, legend
    return palette_index(values, lo, hi, len(palette)), tuple(palette), legend
