"""The most similar heads of one head (stored by `attnatlas compare`), as links that open that head."""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import urlencode

from attnatlas.app.views.base import partner


def head_link(model: str, layer: int, head: int, method: str | None = None) -> str:
    """A query string that opens one head of one model in the head view (a new page of this server)."""
    q: dict[str, Any] = {"model": model, "layer": layer, "head": head, "view": "head"}
    if method:
        q["method"] = method
    return "?" + urlencode(q)


def similar_heads_html(data: Any, model: str, layer: int, head: int, method: str | None = None) -> str:
    """Escaped HTML listing the stored nearest heads of one head as links, or how to compute them."""
    near = data.similar_heads(model, layer, head)
    if near is None or not len(near):
        other = partner(data, model)
        kind = data.atlas.info(model).modality
        if other is None:
            # compare needs common inputs, so a partner must be of the same modality
            return (f"<small><b>Similar heads:</b> none stored; add another {html.escape(kind)} model over the same "
                    f"inputs, then run <code>attnatlas compare</code>.</small>")
        cmd = f"attnatlas compare {data.shown_path} --models {model} {other} --out DIR"
        return f"<small><b>Similar heads:</b> none stored; run <code>{html.escape(cmd)}</code>.</small>"
    parts = []
    for measure, label in (("pattern", "attention-pattern similarity"), ("profile", "metric-profile similarity")):
        sub = near[near["measure"] == measure]
        if not len(sub):
            continue
        groups = []
        for (scope, other), g in sub.groupby(["scope", "other_model"], sort=False):
            target = model if scope == "same" else str(other)
            where = "same model" if scope == "same" else target
            links = ", ".join(
                f'<a href="{html.escape(head_link(target, int(a), int(b), method if target == model else None))}" '
                f'title="open {html.escape(target)} L{int(a)}H{int(b)}">L{int(a)}H{int(b)}</a> {s:.2f}'
                for a, b, s in zip(g["other_layer"], g["other_head"], g["score"]))
            groups.append(f"<i>{html.escape(where)}</i>: {links}")
        parts.append(f"{label} (1 = identical): " + "; ".join(groups))
    return ("<small><b>Similar heads</b> (stored by attnatlas compare; a link opens the head)<br>"
            + "<br>".join(parts) + "</small>")
