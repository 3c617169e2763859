"""attnatlas: joint query-key layouts of every attention head, across a whole corpus."""

__version__ = "0.1.0"

from attnatlas.store import Atlas, open_atlas  # noqa: E402  (no torch: safe for the app)

__all__ = ["Atlas", "open_atlas", "__version__"]
