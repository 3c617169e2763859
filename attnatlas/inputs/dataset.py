"""Corpora from Hugging Face `datasets` (saved folders, image folders, hub ids), with row selection (--limit,
--sample/--seed) and a provenance record that goes into the atlas.

The records are of the same kinds as the .txt/.jsonl/.csv/.parquet and image-folder loaders give (TextRecord,
ImageRecord), so extraction does not care where a corpus came from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from attnatlas.errors import InputError
from attnatlas.inputs.images import ImageRecord, to_rgb
from attnatlas.inputs.selection import select_rows
from attnatlas.inputs.text import DEFAULT_COLUMN, TextRecord, text_records

log = logging.getLogger(__name__)
IMAGE_FOLDER_BUILDER = "imagefolder"


def _open_dataset(spec: str, split: str | None) -> tuple[Any, str, str]:
    """(datasets.Dataset, kind, split) for a save_to_disk folder, a folder of images, or a hub id."""
    try:
        import datasets
    except ImportError:
        raise InputError("Reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - a broken folder: one message
                raise InputError(f"{spec} looks like a saved dataset but cannot be read ({exc}).") from None
            kind = "save_to_disk"
        else:
            ds = datasets.load_dataset(IMAGE_FOLDER_BUILDER, data_dir=str(path))
            kind = IMAGE_FOLDER_BUILDER
    elif path.exists():
        raise InputError(f"{spec} is a file; --dataset takes a saved dataset folder, an image folder or a hub id "
                         "(give .txt/.jsonl/.csv/.parquet files with --texts).")
    else:
        try:
            ds = datasets.load_dataset(spec)
        except Exception as exc:  # noqa: BLE001 - offline, missing or private: one message
            raise InputError(f"Cannot load the dataset {spec!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
                             "(give a hub id reachable from here, or a folder written by Dataset.save_to_disk).") from None
        kind = "hub"
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise InputError(f"{spec} has the splits {', '.join(splits)}; choose one with --split.")
        if split not in ds:
            raise InputError(f"{spec} has no split {split!r}; it has {', '.join(splits)}.")
        ds = ds[split]
    elif split is not None and split != str(getattr(ds, "split", None) or split):
        raise InputError(f"{spec} holds one split ({ds.split}); drop --split or choose {ds.split!r}.")
    return ds, kind, split or str(getattr(ds, "split", "") or "")


def load_dataset_records(spec: str, split: str | None = None, text_column: str | None = None,
                         image_column: str | None = None, limit: int | None = None, sample: int | None = None,
                         seed: int = 0) -> tuple[list[TextRecord] | list[ImageRecord], dict[str, Any]]:
    """Records and provenance from a Hugging Face dataset. The column is the one named, else "text", else the
    dataset's only image column; a text column gives TextRecords, an image column ImageRecords."""
    import datasets

    ds, kind, split = _open_dataset(spec, split)
    columns = list(ds.column_names)
    image_columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if text_column is not None and image_column is not None:
        raise InputError("Give --text-column or --image-column, not both.")
    column = text_column or image_column
    if column is None:
        if DEFAULT_COLUMN in columns:
            column = DEFAULT_COLUMN
        elif len(image_columns) == 1:
            column = image_columns[0]
        else:
            raise InputError(f"{spec}: say which column to read with --text-column or --image-column; "
                             f"it has {', '.join(map(repr, columns))}.")
    if column not in columns:
        raise InputError(f"{spec} has no column {column!r}; it has {', '.join(map(repr, columns))}.")
    if len(ds) == 0:
        raise InputError(f"{spec} ({split or 'its only split'}) has no rows.")
    where = f"{spec}[{split}]" if split else spec
    is_image = column in image_columns
    if text_column is not None and is_image:
        raise InputError(f"{spec}: column {column!r} holds images; use --image-column {column}.")
    if is_image:  # decoding is the cost here: select rows first, decode only those
        rows = select_rows(len(ds), limit, sample, seed, spec)
        records: list = []
        for i, img in zip(rows, (ds.select(rows) if len(rows) < len(ds) else ds)[column]):
            if img is None:
                continue
            name = getattr(img, "filename", "") or f"row {int(i) + 1}"
            records.append(ImageRecord(to_rgb(img), f"{where}:{os.path.basename(name)}"))
        blank = len(rows) - len(records)
    else:  # text is cheap to read whole: empty rows are dropped first, so --sample N gives N sequences
        everything, blank = text_records(list(ds[column]), lambda i: f"{where}:row {i + 1}", f"{spec} column {column!r}")
        records = [everything[i] for i in select_rows(len(everything), limit, sample, seed, spec)]
    if blank:
        log.info("%s: skipped %d empty row(s)", spec, blank)
    if not records:
        raise InputError(f"{spec}: no non-empty rows in column {column!r}.")
    provenance = {"kind": f"datasets:{kind}", "dataset": str(Path(spec).expanduser().absolute()) if kind != "hub" else spec,
                  "split": split, "column": column, "rows_total": len(ds), "rows_used": len(records),
                  "limit": limit, "sample": sample, "seed": seed if sample is not None else None,
                  "fingerprint": getattr(ds, "_fingerprint", None)}
    return records, provenance


