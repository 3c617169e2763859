"""What every view of the dashboard shares: the session's place in the atlas, the small interface a view
offers the dashboard, and helpers for messages and failures. Imports no other view: each view module
imports this one, and the dashboard composes the views.

A view is built for one session from the shared, read-only `AppData` and the session's `Place`; it shows
its layout as `root` and follows the place when `update()` is called (after a model, head or token change).
"""

from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from bokeh.models import Div

from attnatlas.attention import layout_note
from attnatlas.errors import AtlasError

log = logging.getLogger(__name__)


@dataclass
class Place:
    """Where a session is: model, projection, head and the clicked point of the head view (None: none)."""

    model: str
    method: str
    layer: int = 0
    head: int = 0
    selected: int | None = None  # point index in the head view's source: queries, then keys


class View(Protocol):
    """One tab's content. `update` brings it up to the session's place; views that need nothing of the
    place (compare) may ignore it."""

    root: Any

    def update(self) -> None: ...


def message(text: str, colour: str = "#555") -> Div:
    """A note in place of a view; `text` is escaped here."""
    return Div(text=f'<div style="color:{colour};max-width:760px">{html.escape(text)}</div>', name="view_message",
               disable_math=True)


def layout_note_div(name: str, width: int) -> Div:
    """The note that a model's joint layout is of q.k only; plain text, hidden until `show_layout_note`."""
    return Div(text="", width=width, name=name, disable_math=True, render_as_text=True, visible=False,
               styles={"color": "#6b4a00", "background": "#fff6dd", "border-left": "3px solid #e0a800",
                       "padding": "4px 8px", "font-size": "13px"})


def show_layout_note(div: Div, atlas: Any, model: str) -> None:
    """Shown only for models whose attention also has a bias, softcap or window (attention.layout_note)."""
    note = layout_note(atlas, model)
    div.text, div.visible = note or "", note is not None


def placeholder(title: str) -> Div:
    return Div(text=f"<i>{html.escape(title)}: loading\u2026</i>", disable_math=True)


def guarded_build(key: str, build: Callable, *args: Any, **kw: Any) -> Any:
    """A builder's layout, or its message: AtlasError (and StoreError, its subclass) name the command to run;
    anything else is logged and reported to this session only."""
    try:
        return build(*args, **kw)
    except AtlasError as exc:
        return message(str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken tab, not a broken session
        log.exception("view %s failed", key)
        return message(f"This view could not be built: {exc}", "#b00")


def guarded(fn: Callable) -> Callable:
    """A failing callback reports through its object's `report_error` or `on_error` (this session's status
    line) and leaves the other sessions alone."""

    @functools.wraps(fn)
    def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
        try:
            return fn(self, *a, **kw)
        except Exception as exc:  # noqa: BLE001 - shown to this session only
            log.exception("dashboard callback %s failed", fn.__name__)
            (getattr(self, "report_error", None) or self.on_error)(str(exc))
            return None

    return wrapper


def partner(data: Any, model: str) -> str | None:
    """The model to compare `model` with by default: one with a stored comparison, else one of the same
    modality; None when there is none (compare needs the same inputs, so never across modalities)."""
    others = [m for m in data.atlas.models if m != model]
    for m in others:
        if data.atlas.has_table(model, f"similarity__{m}"):
            return m
    kind = data.atlas.info(model).modality
    return next((m for m in others if data.atlas.info(m).modality == kind), None)
