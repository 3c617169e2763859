"""Compile umap-learn's numba kernels once per machine instead of once per process.

umap-learn declares its fuzzy-graph kernels (`smooth_knn_dist`, `compute_membership_strengths`, both
`parallel=True`) and its per-epoch layout kernel without `cache=True`, so every new process (each
projection worker, each Dask worker) compiles them again on its first head: 9.6 s of a 10-epoch
UMAP here, against 0.23 s once cached. This re-wraps the same Python functions with the same numba
options plus `cache=True`: the compiled code is identical, and numba keeps it next to umap-learn's
source (or in its user cache folder when that is read-only). Anything unexpected leaves umap-learn
as it is.
"""

from __future__ import annotations

import functools

# (module, attribute) of kernels that umap-learn looks up as module globals at call time.
KERNELS = (
    ("umap.umap_", "smooth_knn_dist"),
    ("umap.umap_", "compute_membership_strengths"),
    ("umap.layouts", "_nb_optimize_layout_euclidean_single_epoch"),
)
ORIGINALS: dict[tuple[str, str], object] = {}  # umap-learn's own dispatchers, for tests and for undoing


@functools.cache
def cache_umap_kernels() -> int:
    """Install cached twins of umap-learn's uncached kernels; returns how many were installed."""
    import importlib

    try:
        import numba
    except ImportError:
        return 0
    done = 0
    for module_name, attr in KERNELS:
        try:
            module = importlib.import_module(module_name)
            kernel = getattr(module, attr)
            if not isinstance(kernel, numba.core.registry.CPUDispatcher):
                continue
            options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}  # njit implies it
            twin = numba.njit(kernel.py_func, cache=True, locals=dict(kernel.locals), **options)
            ORIGINALS[(module_name, attr)] = kernel
            setattr(module, attr, twin)
            done += 1
        except Exception:  # another umap-learn version: keep its own kernels
            continue
    return done
