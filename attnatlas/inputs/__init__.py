"""Corpus and image loaders: everything a user can feed to an atlas enters through here."""

from attnatlas.inputs.images import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    load_images,
    patch_colour_table,
    to_rgb,
)
from attnatlas.inputs.text import TextRecord, load_texts

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "TextRecord",
    "load_images",
    "load_texts",
    "patch_colour_table",
    "to_rgb",
]
