"""What every view of the dashboard shares: the session's place in the atlas, the small interface a view
offers the dashboard (`View`) and the dashboard offers a view (`Host`), the registry entry that declares a
view (`ViewSpec`), and helpers for messages and failures, the one error guard among them. Imports no view:
each view module imports this one, and the registry lists them.

A view is built for one session from the shared, read-only `AppData` and the session's `Place`; it shows
its layout as `root` and follows the place when `update()` is called (after a model, head or token change).
"""

from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bokeh.models import Div

from attnatlas.analyze.common import require_image
from attnatlas.app.data import AppData
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


class Host(Protocol):
    """What a view may ask of the dashboard that holds it (views that open heads or report errors)."""

    def open_head(self, layer: int, head: int) -> None: ...

    def open_model_head(self, model: str, layer: int, head: int) -> None: ...

    def report_error(self, message: str) -> None: ...

    def head_changed(self, what: str) -> None: ...


@dataclass(frozen=True)
class ViewSpec:
    """One tab as the registry lists it; the dashboard builds and routes every tab from these alone."""

    key: str  # the URL's view=
    title: str
    build: Callable[[AppData, Place, Host], View]
    per_model: bool = False  # built again when the model changes
    follows_head: bool = False  # updated after a head or token change; the URL then keeps layer and head
    eager: bool = False  # built with the page and never named in the URL; else built when first opened
    waiting: str | None = None  # an eager view's stand-in until first opened: a smaller first page
    modality: str | None = None  # serves only models of this modality; others see why in its place (lazy views)
    min_models: int = 1  # shown only in atlases with at least this many models

    def shown(self, data: AppData) -> bool:
        return len(data.atlas.models) >= self.min_models

    def refusal(self, data: AppData, model: str) -> str | None:
        """Why this view does not serve `model` (None: it does)."""
        if self.modality is None or data.modality(model) == self.modality:
            return None
        if self.modality == "image":
            try:
                require_image(data.atlas, model, self.title)  # its words name the image models to pick
            except AtlasError as exc:
                return str(exc)
        return f"{self.title} shows {self.modality} models only, and {model!r} is not one."


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
    """The one guard of every view's callbacks: a failing callback reports through its object's
    `report_error` or `on_error` (this session's status line) and leaves the other sessions alone."""

    @functools.wraps(fn)
    def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
        try:
            return fn(self, *a, **kw)
        except Exception as exc:  # noqa: BLE001 - shown to this session only
            log.exception("callback %s.%s failed", type(self).__name__, fn.__name__)
            (getattr(self, "report_error", None) or self.on_error)(str(exc))
            return None

    return wrapper


class HeadPanel:
    """A panel whose points are heads (the head map, the head scatter): redrawn when one of its controls changes,
    a click opens a head through `on_open(model, layer, head)`, errors go to `on_error` (the status line)."""

    def __init__(self, data: Any, on_open: Callable[[str, int, int], None], on_error: Callable[[str], None]):
        self.data = data
        self.on_open = on_open
        self.on_error = on_error
        self.model: str | None = None
        self.method: str | None = None
        self._quiet = False  # True while `show` sets the controls: their callbacks must not redraw

    @guarded
    def _on_change(self, attr: str, old: Any, new: Any) -> None:
        if not self._quiet and self.model is not None:
            self._draw()

    def _draw(self) -> None:
        raise NotImplementedError

    @guarded
    def _on_tap(self, attr: str, old: list[int], new: list[int]) -> None:
        """A click on a head's point opens it (in its own model, where the panel shows several)."""
        if not new:
            return
        i = int(new[0])
        self.src.selected.indices = []
        d = self.src.data
        model = str(d["model"][i]) if "model" in d else self.model
        self.on_open(model, int(d["layer"][i]), int(d["head"][i]))


def partner(data: Any, model: str) -> str | None:
    """The model to compare `model` with by default: one with a stored comparison, else one of the same
    modality; None when there is none (compare needs the same inputs, so never across modalities)."""
    others = [m for m in data.atlas.models if m != model]
    for m in others:
        if data.atlas.has_table(model, f"similarity__{m}"):
            return m
    kind = data.atlas.info(model).modality
    return next((m for m in others if data.atlas.info(m).modality == kind), None)
