"""Row selection, the same on every kind of corpus: the first --limit rows, then --sample of those with --seed."""

from __future__ import annotations

import logging

import numpy as np

from attnatlas.errors import InputError

log = logging.getLogger(__name__)


def select_rows(n_rows: int, limit: int | None, sample: int | None, seed: int, what: str) -> np.ndarray:
    """Row indices to use: the first `limit`, then `sample` of those drawn with `seed` (kept in corpus order)."""
    for name, value in (("--limit", limit), ("--sample", sample)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be a positive number of rows, not {value}.")
    rows = np.arange(n_rows if limit is None else min(limit, n_rows))
    if sample is not None:
        if sample >= len(rows):
            if sample > len(rows):
                log.warning("--sample %d is more than the %d rows of %s; using all of them.", sample, len(rows), what)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(rows, sample, replace=False))
    return rows
