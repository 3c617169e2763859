"""The ViT analysis tabs (patch similarity, rollout, layer embeddings, neurons): one stored result each, drawn
by vit_views when the tab is first opened (scikit-learn and the analyses load then, not with the page)."""

from __future__ import annotations

from attnatlas.app.data import AppData
from attnatlas.app.view import Place, guarded_build

BUILDERS = {"patches": "build_patch_similarity", "rollout": "build_rollout", "embeddings": "build_layer_embeddings",
            "neurons": "build_neurons"}
TITLES = {"patches": "Patch similarity", "rollout": "Rollout", "embeddings": "Layer embeddings", "neurons": "Neurons"}


class AnalysisTab:
    """One analysis of the session's model, drawn once: the dashboard builds the tab again after a model switch."""

    def __init__(self, key: str, data: AppData, place: Place):
        from attnatlas.app import vit_views

        self.key, self.title = key, TITLES[key]
        self.root = guarded_build(key, getattr(vit_views, BUILDERS[key]), data.atlas, place.model)

    def update(self) -> None:
        """Nothing follows the head: these analyses are per model."""
