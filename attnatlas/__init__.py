"""attnatlas: joint query-key layouts of every attention head, across a whole corpus."""

__version__ = "0.1.0"

from attnatlas.attention import attention_from_atlas  # noqa: E402  (numpy only: safe for the app)
from attnatlas.store import Atlas, open_atlas  # noqa: E402  (no torch: safe for the app)

__all__ = ["Atlas", "attention_from_atlas", "open_atlas", "__version__"]
