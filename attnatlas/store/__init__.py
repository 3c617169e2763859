"""Atlas storage: Zarr arrays per head, Parquet token tables, atomic per-model writes."""

from attnatlas.store.atlas import (
    FORMAT_VERSION,
    PLACED_FIELDS,
    QUALITY_FIELDS,
    ArraySpec,
    Atlas,
    LayoutWriter,
    ModelInfo,
    ModelWriter,
    check_name,
    open_atlas,
    tokens_per_chunk,
)

__all__ = [
    "FORMAT_VERSION",
    "PLACED_FIELDS",
    "QUALITY_FIELDS",
    "ArraySpec",
    "Atlas",
    "LayoutWriter",
    "ModelInfo",
    "ModelWriter",
    "check_name",
    "open_atlas",
    "tokens_per_chunk",
]
