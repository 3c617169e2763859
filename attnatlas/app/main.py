"""Runs once per browser session: build a fresh document from the shared, read-only atlas."""

from __future__ import annotations

import html
import logging
import sys

from bokeh.io import curdoc
from bokeh.models import Div

from attnatlas.app.dashboard import build_document
from attnatlas.app.data import AppData
from attnatlas.render.safe import seal

doc = curdoc()
ctx = doc.session_context
data = getattr(ctx.server_context, "attnatlas_data", None) if ctx is not None else None
try:
    if data is None:  # not started through app_hooks (e.g. a bare handler): open it for this session
        data = AppData(sys.argv[1])
    args = ctx.request.arguments if ctx is not None and ctx.request is not None else {}
    build_document(doc, data, args)
    seal(doc)  # theme.yaml covers Divs made later; titles and labels are made plain here
except Exception as exc:  # noqa: BLE001 - one broken session page, not a dead server
    logging.getLogger("attnatlas.app").exception("could not build a session")
    doc.add_root(Div(text=f"<b>attnatlas could not open this view:</b> {html.escape(str(exc))}", disable_math=True))
