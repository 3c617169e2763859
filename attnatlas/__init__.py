"""attnatlas: joint query-key layouts of every attention head, across a whole corpus."""

from attnatlas.attention import attention_from_atlas  # numpy only: safe for the app
from attnatlas.store import Atlas, open_atlas  # no torch: safe for the app
from attnatlas.version import __version__


def show(atlas, model=None, method=None, layer=None, head=None, **kw):
    """Inline view of a model's grid, or of one head with layer= and head=: see attnatlas.notebook.show."""
    from attnatlas.notebook import show as _show  # bokeh is imported only when something is shown

    return _show(atlas, model, method, layer, head, **kw)


__all__ = ["Atlas", "attention_from_atlas", "open_atlas", "show", "__version__"]
