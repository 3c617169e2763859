"""Words for the stored per-head metrics wherever they are shown (the grid's menus, compare's table and
report); the data keep the field names."""

from __future__ import annotations

METRIC_LABELS = {"entropy_mean": "entropy (nats)", "first_share": "sink share (first token)",
                 "prev_share": "previous-token share", "distance_mean": "mean distance (tokens)",
                 "special_share": "special-token share", "self_share": "self share", "next_share": "next-token share",
                 "punct_share": "punctuation share", "entropy_norm_mean": "entropy / log(keys)",
                 "distance_rel_mean": "relative distance", "keys90_mean": "keys holding 90%",
                 "frac90_mean": "share of keys holding 90%", "layout_positional": "layout positional R\u00b2",
                 "qk_separation": "query/key separation"}
