"""Load images as RGB, and summarise the colour of each ViT patch."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from attnatlas.errors import InputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_NUMERIC_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_WHITE = (255, 255, 255, 255)

# Every image input is bounded before it is decoded: a file's size, and its pixel count read from the header
# (a "decompression bomb" is a small file that decodes to gigapixels). 64 Mpx decodes to 192 MB as RGB; ViTs
# resize to a few hundred pixels a side anyway.
MAX_IMAGE_FILE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 64 << 20


@dataclass(frozen=True)
class ImageRecord:
    """One input image and where it came from."""

    image: Image.Image  # always mode "RGB", fully loaded
    source: str  # the file path as given/resolved


def load_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ImageRecord]:
    """Load a folder of images (sorted, recursive, hidden files skipped), one image file, or a list of files."""
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        path = Path(name)
        if not path.exists():
            raise InputError(f"image path not found: {name}")
        paths = _folder_images(path, name) if path.is_dir() else [name]
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("no image paths given (the list is empty)")
        paths = []
        for item in spec:
            if not isinstance(item, (str, os.PathLike)):
                raise InputError(f"expected image file paths, got a {type(item).__name__}: {item!r}")
            paths.append(os.fspath(item))
    else:
        raise InputError(f"expected an image folder, file, or list of files, got {type(spec).__name__}")
    return [ImageRecord(_load_one(p), p) for p in paths]


def _folder_images(root: Path, name: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of hidden folders (.git, .ipynb_checkpoints, ...).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, fn))
    if not found:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"no images found in folder {name} (looked for {exts})")
    return sorted(found)


def _load_one(name: str) -> Image.Image:
    path = Path(name)
    if not path.exists():
        raise InputError(f"image file not found: {name}")
    if path.is_dir():
        raise InputError(f"{name} is a directory; give image files, or the folder itself instead of a list")
    size = path.stat().st_size
    if size > MAX_IMAGE_FILE_BYTES:
        raise InputError(f"{name} is {size / 2**20:.0f} MB, over the {MAX_IMAGE_FILE_BYTES >> 20} MB an image may have")
    try:
        with Image.open(path) as im:
            check_pixels(im.size, name)  # from the header, before anything is decoded
            # load() forces a full decode so truncation shows up here, not later in the model.
            im.load()
            im = ImageOps.exif_transpose(im)  # camera photos are stored sideways with an EXIF flag
            return to_rgb(im)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from exc
    except Image.DecompressionBombError:
        # Pillow's own guard (over twice its MAX_IMAGE_PIXELS) fires in open(), before our check can.
        raise InputError(_too_many(name, None)) from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise InputError(
            f"{name} is not a readable image or is truncated/corrupt ({type(exc).__name__}: {exc})"
        ) from exc


def check_pixels(size: tuple[int, int], name: str) -> None:
    """InputError when an image of `size` (width, height) has more than MAX_IMAGE_PIXELS pixels."""
    w, h = int(size[0]), int(size[1])
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(_too_many(name, (w, h)))


def _too_many(name: str, size: tuple[int, int] | None) -> str:
    dims = f" ({size[0]:,} x {size[1]:,} pixels)" if size else ""
    return (f"{name} is too large to decode safely{dims}: an image may have at most {MAX_IMAGE_PIXELS:,} pixels "
            "(a decompression bomb, or a photo to shrink first)")


def check_image_bytes(data: bytes, name: str) -> None:
    """The same bounds for an image held in memory (an upload): its size, and the pixel count its header
    declares, without decoding it. InputError names `name`; a file that is no image is left to the reader."""
    import io

    if len(data) > MAX_IMAGE_FILE_BYTES:
        raise InputError(f"{name} is {len(data) / 2**20:.0f} MB, over the {MAX_IMAGE_FILE_BYTES >> 20} MB an image may have")
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except Image.DecompressionBombError:
        raise InputError(_too_many(name, None)) from None
    except Exception:  # noqa: BLE001 - not an image: the full read gives that message
        return
    check_pixels(size, name)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return a fully loaded mode-"RGB" copy: alpha composited on white, numeric modes rescaled to 0..255."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "La":
        # Pillow cannot convert premultiplied La directly; undo it through LA first.
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _NUMERIC_MODES:
        return _rescale_to_rgb(image)
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"unsupported image mode {mode!r} ({exc})") from exc


def _rescale_to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit, 32-bit and float images use arbitrary ranges; stretch the range actually present.
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    finite = np.isfinite(values)
    out = np.full(values.shape, 128.0)
    if finite.any():
        lo, hi = values[finite].min(), values[finite].max()
        if hi > lo:
            out = (values - lo) / (hi - lo) * 255.0
    out = np.where(np.isnan(values), 0.0, out)
    out = np.where(values == np.inf, 255.0, out)
    out = np.where(values == -np.inf, 0.0, out)
    grey = np.clip(np.rint(out), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(grey).convert("RGB")


def patch_colour_table(pixels: np.ndarray, patch_size: int) -> pd.DataFrame:
    """One row per patch, row-major: patch_row, patch_col, mean_r/g/b, and hue/saturation/brightness of that mean.

    pixels: (H, W, 3) floats in [0, 1]; H and W must be multiples of patch_size.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(f"expected pixels of shape (H, W, 3), got {pixels.shape}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise InputError(f"patch_size must be a positive integer, got {patch_size!r}")
    h, w, _ = pixels.shape
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise InputError(
            f"image size {h}x{w} is not a positive multiple of the patch size {patch_size}; "
            "resize or crop it first"
        )
    data = pixels.astype(np.float64)
    if data.size and (np.nanmin(data) < -1e-6 or np.nanmax(data) > 1 + 1e-6):
        raise InputError(
            f"pixel values must be floats in [0, 1], got range [{np.nanmin(data):g}, {np.nanmax(data):g}]"
        )
    rows, cols = h // patch_size, w // patch_size
    means = data.reshape(rows, patch_size, cols, patch_size, 3).mean(axis=(1, 3)).reshape(-1, 3)  # (P, 3)
    hsv = np.array([colorsys.rgb_to_hsv(*rgb) for rgb in means]).reshape(-1, 3)  # (P, 3)
    # colorsys takes h % 1.0, which rounds a tiny negative hue up to exactly 1.0.
    hue = np.where(hsv[:, 0] >= 1.0, 0.0, hsv[:, 0])
    grid_r, grid_c = np.divmod(np.arange(rows * cols), cols)
    return pd.DataFrame(
        {
            "patch_row": grid_r.astype(np.int64),
            "patch_col": grid_c.astype(np.int64),
            "mean_r": means[:, 0],
            "mean_g": means[:, 1],
            "mean_b": means[:, 2],
            "hue": hue,
            "saturation": hsv[:, 1],
            "brightness": hsv[:, 2],
        }
    )
