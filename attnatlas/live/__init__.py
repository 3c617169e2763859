"""Your own input in every head: placement of new text or images into a stored atlas (`place`), saved
probe sets (`probes`), and the live worker the dashboard talks to (`worker`).

Only `encode` (and the worker process) import torch; the rest, and so the dashboard, do not.
"""

from attnatlas.live.place import Placer, place, texts_table

__all__ = ["Placer", "place", "texts_table"]
