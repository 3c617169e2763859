"""Server lifecycle: open the atlas once per process and share it, read-only, with every session."""

from __future__ import annotations

import logging
import os
import sys

from attnatlas.app.data import AppData
from attnatlas.app.views import grid, head_map

log = logging.getLogger(__name__)

# Bokeh sets sys.argv to the app's --args only while it runs this module's top level, so keep a copy.
ARGS = tuple(sys.argv[1:])


def on_server_loaded(server_context) -> None:
    if not ARGS:
        raise SystemExit("attnatlas app: give the atlas path, e.g. `bokeh serve attnatlas/app --args ATLAS`.")
    # Knob for benchmarks (scripts/bench_app.py): the scatters' backend. Canvas is the default: faster than WebGL
    # in headless Chromium's software rendering (docs: bench).
    data = AppData(ARGS[0], backend=os.environ.get("ATTNATLAS_BACKEND", "canvas"))
    # Warm the default grids and head maps (every model's, a model switch is one click) and the first model's
    # token columns, so the first visitor waits no longer than later ones.
    first = data.models[0]
    for model in data.models:
        grid.warm(data, model, data.method(model, None))
        head_map.warm(data, model, data.method(model, None))
    data.tokens(first, data.method(first, None))
    server_context.attnatlas_data = data
    if "--live" in ARGS[1:]:
        # The worker process runs the models (torch) for "Your text"; this process never imports torch.
        from attnatlas.live.worker import LiveWorker

        server_context.attnatlas_live = LiveWorker(ARGS[0])
        server_context.attnatlas_live.start()
    log.info("attnatlas: serving %s (%s)", ARGS[0], ", ".join(data.models))


def on_server_unloaded(server_context) -> None:
    worker = getattr(server_context, "attnatlas_live", None)
    if worker is not None:
        worker.stop()
