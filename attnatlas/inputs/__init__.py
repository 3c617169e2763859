"""Corpus and image loaders: everything a user can feed to an atlas enters through here."""

from attnatlas.inputs.corpus import load_corpus
from attnatlas.inputs.dataset import load_dataset_records
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
    "load_corpus",
    "load_dataset_records",
    "load_images",
    "load_texts",
    "patch_colour_table",
    "to_rgb",
]
