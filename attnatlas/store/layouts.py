"""The layouts of one (model, method) in an atlas: coordinates per head, the rows they cover, and the quality of
the laid-out and of the placed points.

    layouts/<method>/coords         (layer, head, 2 * points, 2) float32, queries first then keys
    layouts/<method>/quality        (layer, head, len(QUALITY_FIELDS)) float32, NaN = not done
    layouts/<method>/placed_quality (layer, head, len(PLACED_FIELDS)) float32  with placed tokens only
    layouts/<method>/rows           (points,) int64, token rows covered
    layouts/<method>/sampled        (points,) bool, False for tokens placed rather than laid out
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr

from attnatlas.store import faults
from attnatlas.store.location import Location
from attnatlas.store.writer import jsonable

# fallback: 1 when the head was laid out on the safe backends, after its first process died (crash, hang, OOM).
QUALITY_FIELDS = ("trustworthiness", "knn_kept", "seconds", "points", "fallback")
# Faithfulness of the tokens placed into a capped layout (not laid out themselves), measured apart.
PLACED_FIELDS = ("trustworthiness", "knn_kept", "points")


@dataclass
class LayoutWriter:
    """Writes one head at a time; each head owns its own chunks, so parallel writers need no locks."""

    coords: Any
    quality: Any
    placed_quality: Any = None

    def write_head(self, layer: int, head: int, xy: np.ndarray, quality: dict[str, float],
                   placed: dict[str, float] | None = None) -> None:
        self.coords[layer, head] = xy.astype(np.float32)
        if self.placed_quality is not None and placed is not None:
            self.placed_quality[layer, head] = np.array([placed.get(f, np.nan) for f in PLACED_FIELDS], dtype=np.float32)
        # Quality last: a head counts as done only once its coordinates are on disk.
        fields = QUALITY_FIELDS[: self.quality.shape[-1]]  # an older layout may have fewer
        self.quality[layer, head] = np.array([quality.get(f, np.nan) for f in fields], dtype=np.float32)
        faults.checkpoint("head")


def open_layout_writer(path: Location, method: str, n_layers: int, n_heads: int, rows: np.ndarray,
                       params: dict[str, Any], sampled: np.ndarray | None = None) -> LayoutWriter:
    """Open (or create) the layout arrays of one method at `path`. Existing heads are kept unless the rows,
    the sample or the parameters changed, in which case the method's layouts start over."""
    params = jsonable(params)
    if (path / "quality" / "zarr.json").is_file():
        grp = zarr.open_group(str(path), mode="r+")
        same_rows = np.array_equal(np.asarray(grp["rows"][:]), rows)
        same_sample = (sampled is None) == ("sampled" not in grp) and (
            sampled is None or np.array_equal(np.asarray(grp["sampled"][:]), sampled))
        if same_rows and same_sample and dict(grp.attrs).get("params") == params:
            return LayoutWriter(grp["coords"], grp["quality"], grp["placed_quality"] if sampled is not None else None)
        path.rmtree()
    n = len(rows)
    grp = zarr.open_group(str(path), mode="w", attributes={"params": params, "method": method})
    grp.create_array("rows", data=np.asarray(rows, dtype=np.int64))
    placed_quality = None
    if sampled is not None:
        grp.create_array("sampled", data=np.asarray(sampled, dtype=bool))
        placed_quality = grp.create_array("placed_quality", shape=(n_layers, n_heads, len(PLACED_FIELDS)),
                                          dtype="float32", chunks=(1, 1, len(PLACED_FIELDS)), fill_value=np.nan)
    coords = grp.create_array("coords", shape=(n_layers, n_heads, 2 * n, 2), dtype="float32", chunks=(1, 1, 2 * n, 2),
                              fill_value=np.nan)
    quality = grp.create_array("quality", shape=(n_layers, n_heads, len(QUALITY_FIELDS)), dtype="float32",
                               chunks=(1, 1, len(QUALITY_FIELDS)), fill_value=np.nan)
    return LayoutWriter(coords, quality, placed_quality)


class Layouts:
    """Reads the stored layouts of one (model, method): `group` is its Zarr group."""

    def __init__(self, group: Any):
        self.group = group

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.group.attrs).get("params", {})

    @property
    def rows(self) -> np.ndarray:
        """(points,) int64 token rows the layouts cover."""
        return np.asarray(self.group["rows"][:])

    @property
    def sampled(self) -> np.ndarray:
        """(points,) bool, aligned with `rows`: True for tokens laid out themselves, False for tokens placed
        into that layout from their neighbours (only capped heads have any)."""
        grp = self.group
        return np.asarray(grp["sampled"][:], dtype=bool) if "sampled" in grp else np.ones(grp["rows"].shape[0], bool)

    def done(self) -> np.ndarray:
        """(layer, head) bool: which heads have a finished layout."""
        return _done(np.asarray(self.group["quality"][:]))

    def quality(self) -> pd.DataFrame:
        """One row per finished head: layer, head and QUALITY_FIELDS (fewer in atlases from before a field)."""
        q = np.asarray(self.group["quality"][:])  # one read: a chunk per head, so each read costs
        return self._per_head(q, QUALITY_FIELDS[: q.shape[-1]], _done(q))

    def placed_quality(self) -> pd.DataFrame:
        """One row per finished head with placed tokens: layer, head and PLACED_FIELDS of the placed points."""
        if "placed_quality" not in self.group:
            return pd.DataFrame(columns=["layer", "head", *PLACED_FIELDS])
        return self._per_head(np.asarray(self.group["placed_quality"][:]), PLACED_FIELDS, self.done())

    def _per_head(self, table: np.ndarray, fields: tuple[str, ...], done: np.ndarray) -> pd.DataFrame:
        """(layer, head, field) -> one row per finished head."""
        L, H, _ = table.shape
        df = pd.DataFrame(table.reshape(L * H, -1), columns=list(fields))
        df.insert(0, "head", np.tile(np.arange(H), L))
        df.insert(0, "layer", np.repeat(np.arange(L), H))
        return df[done.reshape(-1)].reset_index(drop=True)

    def coords(self, layer: int, head: int) -> np.ndarray:
        """(2 * points, 2) float32: queries first, then keys, for the `rows` token rows."""
        return np.asarray(self.group["coords"][layer, head], dtype=np.float32)

    def frame(self, layer: int, head: int) -> pd.DataFrame | None:
        """2 x points rows: x, y, kind (query/key), token (row in the token table) and placed; None when the
        head has no layout yet."""
        xy = self.coords(layer, head)
        if np.isnan(xy).all():
            return None
        rows, placed = self.rows, ~self.sampled
        n = len(rows)
        return pd.DataFrame({
            "x": xy[:, 0],
            "y": xy[:, 1],
            "kind": pd.Categorical(["query"] * n + ["key"] * n, categories=["query", "key"]),
            "token": np.concatenate([rows, rows]),
            "placed": np.concatenate([placed, placed]),
        })


def _done(quality: np.ndarray) -> np.ndarray:
    """(layer, head, field) quality -> (layer, head) bool: finished heads."""
    return ~np.isnan(quality[..., 0]) | ~np.isnan(quality[..., 2])
