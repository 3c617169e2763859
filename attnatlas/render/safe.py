"""Untrusted text (corpus lines, tokens, file and model names) is shown as text, never typeset or run.

Bokeh typesets TeX with MathJax in Divs unless told not to, and parses "$$...$$" in titles, axis labels and
tick labels as math. `seal` switches both off for a layout before it is shown or exported; the app's
theme.yaml does the same for every Div made later in a session. Strings that reach custom JS go through
`JS_ESCAPE` there, never into the code itself.
"""

from __future__ import annotations

from typing import Any

from bokeh.models import Axis, Label, PlainText, Title
from bokeh.models.widgets.markups import Markup

# Escapes a string for HTML inside CustomJS code: `esc(name)`.
JS_ESCAPE = """
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'})[c])
"""



def plain(text: Any) -> PlainText:
    """A title or label that is shown as written, even if it holds "$$" or "\\(" (no typesetting)."""
    return PlainText(text=str(text))


def _texy(value: Any) -> bool:
    """Could Bokeh read this string as math ($$...$$, \\[...\\], \\(...\\))? Only those need wrapping."""
    return isinstance(value, str) and ("$" in value or "\\" in value)


def seal(*roots: Any) -> None:
    """Switch off typesetting on every model reachable from `roots` (layouts, figures, documents)."""
    for root in roots:
        tops = list(root.roots) if hasattr(root, "roots") else [root]  # a Document, or one layout
        for m in [m for top in tops for m in top.references()]:
            if isinstance(m, Markup):
                m.disable_math = True
            elif isinstance(m, (Title, Label)) and _texy(m.text):
                m.text = plain(m.text)
            elif isinstance(m, Axis):
                if _texy(m.axis_label):
                    m.axis_label = plain(m.axis_label)
                if any(_texy(v) for v in (m.major_label_overrides or {}).values()):
                    m.major_label_overrides = {k: plain(v) if _texy(v) else v for k, v in m.major_label_overrides.items()}

