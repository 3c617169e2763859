"""The corpus of one extraction: exactly one of a text file (or list), an image folder (or files) or a Hugging
Face dataset, its rows selected the same way whatever it is, and a provenance record for the atlas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attnatlas.errors import InputError
from attnatlas.inputs.dataset import load_dataset_records
from attnatlas.inputs.images import ImageRecord, load_images
from attnatlas.inputs.selection import select_rows
from attnatlas.inputs.text import TextRecord, load_texts


def load_corpus(texts: Any = None, images: Any = None, dataset: str | None = None, text_column: str | None = None,
                image_column: str | None = None, split: str | None = None, limit: int | None = None,
                sample: int | None = None, seed: int = 0) -> tuple[list[TextRecord] | None, list[ImageRecord] | None,
                                                                 dict[str, Any]]:
    """(text records, image records, provenance) from exactly one of `texts`, `images` or `dataset`; one of
    the two record lists is None. --limit and --sample work the same on every kind of input."""
    if sum(x is not None for x in (texts, images, dataset)) != 1:
        raise InputError("Give exactly one of --texts, --images or --dataset.")
    if dataset is None and (split is not None or image_column is not None):
        raise InputError("--split and --image-column choose from a --dataset.")
    if dataset is not None:
        records, provenance = load_dataset_records(dataset, split, text_column, image_column, limit, sample, seed)
        is_text = isinstance(records[0], TextRecord)
        return (records, None, provenance) if is_text else (None, records, provenance)
    if texts is not None:
        all_records: list = load_texts(texts, column=text_column)
        where = os.fspath(texts) if isinstance(texts, (str, os.PathLike)) else "list"
    else:
        all_records = load_images(images)
        where = os.fspath(images) if isinstance(images, (str, os.PathLike)) else "list"
    rows = select_rows(len(all_records), limit, sample, seed, where)
    records = [all_records[i] for i in rows] if len(rows) < len(all_records) else all_records
    kind = "list" if where == "list" else ("folder" if os.path.isdir(where) else Path(where).suffix.lower().lstrip(".") or "file")
    provenance = {"kind": kind, "path": where if where == "list" else str(Path(where).expanduser().absolute()),
                  "column": text_column, "rows_total": len(all_records), "rows_used": len(records),
                  "limit": limit, "sample": sample, "seed": seed if sample is not None else None}
    return (records, None, provenance) if texts is not None else (None, records, provenance)
