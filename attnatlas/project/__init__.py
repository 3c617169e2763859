"""Projection stage: per-head normalisation, reducers by name, whole-model runs, faithfulness."""

from attnatlas.project.normalize import DEFAULT_NORMALISE, joint_points, normalise_head, scale_factor
from attnatlas.project.quality import knn_graph, layout_quality, quality_sample
from attnatlas.project.reducers import METRICS, REDUCERS, Reducer, get_reducer, register_reducer
from attnatlas.project.runner import DEFAULT_METHODS, MAX_POINTS, project_head, project_model, sample_rows

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_NORMALISE", "MAX_POINTS", "METRICS", "REDUCERS", "Reducer", "get_reducer",
    "joint_points", "knn_graph", "layout_quality", "normalise_head", "project_head", "project_model",
    "quality_sample", "register_reducer", "sample_rows", "scale_factor",
]
