"""Write the demo images in data/images/: sample photos from scikit-image/scikit-learn, plus synthetic PNGs.

Deterministic: no randomness, fixed sizes and JPEG quality. Run from anywhere:
    python scripts/make_demo_images.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "data" / "images"
SYNTH_SIZE = 224  # the input size of the common ViT checkpoints
PHOTO_SHORT_SIDE = 256
JPEG_QUALITY = 90

# Only images that ship inside the scikit-image wheel; others need pooch and the network.
SKIMAGE_PHOTOS = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
]

SOLID_HUES = {
    "red": (220, 30, 30),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 210),
    "purple": (140, 40, 180),
}


def _resize_short_side(image: Image.Image, short: int) -> Image.Image:
    w, h = image.size
    scale = short / min(w, h)
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)


def _save_photo(array: np.ndarray, name: str) -> None:
    image = Image.fromarray(array)  # (H, W) grey stays mode L: a useful non-RGB case for the loader
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    _resize_short_side(image, PHOTO_SHORT_SIDE).save(OUT / f"photo_{name}.jpg", quality=JPEG_QUALITY)


def photos() -> None:
    import skimage.data
    from sklearn.datasets import load_sample_images

    for name in SKIMAGE_PHOTOS:
        _save_photo(getattr(skimage.data, name)(), name)
    samples = load_sample_images()
    for filename, array in zip(samples.filenames, samples.images):
        _save_photo(array, Path(filename).stem)


def _save_synth(array: np.ndarray, name: str) -> None:
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(OUT / f"synth_{name}.png", optimize=True)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W) arrays in [0, 1] -> (H, W, 3) uint8 RGB."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(h.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        rgb[mask] = np.stack([r, g, b], axis=-1)[mask]
    return np.rint(rgb * 255).astype(np.uint8)


def synthetic() -> None:
    n = SYNTH_SIZE
    for name, rgb in SOLID_HUES.items():
        _save_synth(np.broadcast_to(np.array(rgb, np.uint8), (n, n, 3)), f"solid_{name}")

    ramp = np.linspace(0, 255, n)  # (n,)
    _save_synth(np.rint(np.broadcast_to(ramp[None, :, None], (n, n, 3))), "gradient_horizontal")
    # Vertical ramp from blue at the top to yellow at the bottom, so it differs from the grey one in colour too.
    t = np.linspace(0, 1, n)[:, None, None]  # (n, 1, 1)
    top, bottom = np.array([30, 60, 220]), np.array([240, 210, 40])
    _save_synth(np.rint(np.broadcast_to(top + (bottom - top) * t, (n, n, 3))), "gradient_vertical")

    yy, xx = np.mgrid[0:n, 0:n] + 0.5 - n / 2  # (n, n) centred coordinates
    radius = np.hypot(xx, yy) / (n / 2 - 4)
    hue = (np.arctan2(-yy, xx) / (2 * np.pi)) % 1.0
    wheel = _hsv_to_rgb(hue, np.clip(radius, 0, 1), np.ones_like(hue))
    wheel[radius > 1] = 255  # white outside the disc
    _save_synth(wheel, "hue_wheel")

    for cell in (16, 56):  # one ViT patch per cell, and 3.5 patches per cell
        idx = (np.arange(n) // cell)
        board = (idx[:, None] + idx[None, :]) % 2 == 0  # (n, n)
        _save_synth(np.where(board[..., None], 235, 25).repeat(3, axis=2), f"checker_{cell}px")

    stripes = (np.arange(n) // 14) % 2 == 0  # (n,) 14 px vertical bands
    stripe_img = np.where(stripes[None, :, None], np.array([250, 250, 250]), np.array([200, 30, 40]))
    _save_synth(np.broadcast_to(stripe_img, (n, n, 3)), "stripes_vertical")

    shapes = [
        ("circle", (255, 255, 255), (210, 40, 40)),
        ("square", (225, 225, 225), (30, 80, 200)),
        ("triangle", (20, 20, 20), (60, 190, 80)),
    ]
    for shape, bg, fg in shapes:
        image = Image.new("RGB", (n, n), bg)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((52, 52, 172, 172), fill=fg)
        elif shape == "square":
            draw.rectangle((56, 56, 167, 167), fill=fg)
        else:
            draw.polygon([(112, 40), (186, 180), (38, 180)], fill=fg)
        _save_synth(np.asarray(image), f"shape_{shape}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    photos()
    synthetic()
    files = sorted(p for p in OUT.iterdir() if p.suffix in {".jpg", ".png"})
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} images to {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
