"""What one stored model is: its shape, read from the model's attrs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    """What one stored model is, read from its attrs."""

    name: str
    attrs: dict[str, Any] = field(repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.attrs["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.attrs["n_heads"])

    @property
    def n_kv_heads(self) -> int:
        return int(self.attrs["n_kv_heads"])

    @property
    def d_head(self) -> int:
        return int(self.attrs["d_head"])

    @property
    def modality(self) -> str:
        return str(self.attrs.get("modality", "text"))

    def kv_head(self, head: int) -> int:
        """The key/value head that serves query head `head` (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)
