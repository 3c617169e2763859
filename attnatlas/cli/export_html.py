"""attnatlas export ATLAS --model M --html OUT.html: the grid and every head's view in one file, no server.

The page is attnatlas.app.page's (the dashboard's own views with CustomJS); its size rule keeps the same
whole sequences for every head, as many as fit the budget (default 34 MB of point data, which with BokehJS
and base64 keeps the file under 50 MB; --budget-mb to change it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from attnatlas.errors import InputError, StoreError

MIN_BUDGET_MB, MAX_BUDGET_MB = 1, 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--html", metavar="OUT.html", default=None,
                   help="write one self-contained page with the grid and every head's view (opens offline, no server)")
    p.add_argument("--budget-mb", type=float, default=None,
                   help=f"--html: MB of point data the page may hold ({MIN_BUDGET_MB}-{MAX_BUDGET_MB}; default 34); "
                        "every head keeps the same whole sequences, as many as fit")


def run(args: argparse.Namespace) -> int:
    from attnatlas.app import page as page_mod
    from attnatlas.app.data import AppData
    from attnatlas.cli.files import atomic_write

    out = Path(args.html).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--html {out}: give a .html file name.")
    mb = args.budget_mb
    if mb is not None and not MIN_BUDGET_MB <= mb <= MAX_BUDGET_MB:
        raise InputError(f"--budget-mb {mb}: choose {MIN_BUDGET_MB} to {MAX_BUDGET_MB}.")
    parent = out.parent.resolve()
    if not parent.is_dir():
        raise StoreError(f"--html {out}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"--html {out}: the folder {parent} is not writable.")
    data = AppData(args.atlas)  # read-only; not an atlas: StoreError
    if "://" not in str(args.atlas):
        atlas_dir = Path(args.atlas).resolve()
        if parent == atlas_dir or atlas_dir in parent.parents:
            raise InputError(f"--html {out} is inside the atlas {args.atlas}; write it somewhere else.")
    budget = page_mod.EXPORT_BUDGET if mb is None else int(mb * (1 << 20))
    page = page_mod.build(data, args.model, args.method, budget=budget)
    try:
        atomic_write(out, lambda tmp: Path(tmp).write_text(page.html, encoding="utf-8"))
    except OSError as exc:
        raise StoreError(f"Could not write {out}: {exc.strerror or exc}.") from None
    L, H = data.infos[page.model].n_layers, data.infos[page.model].n_heads
    kept = f"all {page.total_rows:,} tokens" if len(page.rows) == page.total_rows else \
        f"{len(page.rows):,} of {page.total_rows:,} tokens (whole sequences, seeded)"
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {page.model} {page.method}, {len(page.heads)} of {L * H} heads "
          f"with {kept} each")
    return 0
