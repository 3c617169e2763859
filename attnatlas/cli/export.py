"""attnatlas export: the global grid of one model as a PNG (or PDF) for papers, with a JSON of cell boxes.

Heads without a layout (a model projected on some layers only) are drawn as empty cells and listed in the JSON;
--layers and --heads pick the rows and columns to draw."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from attnatlas.cli import export_html
from attnatlas.cli.files import atomic_write
from attnatlas.errors import InputError, StoreError

FORMATS = {".png": "PNG", ".pdf": "PDF"}
MIN_CELL_PX, MAX_CELL_PX = 16, 1024


def register(sub: argparse._SubParsersAction) -> None:
    from attnatlas.project.reducers import REDUCERS

    p = sub.add_parser("export", help="write the global grid of a model as an image for papers",
                       description="Write the global grid of one model's layouts as the dashboard draws it (PNG or PDF), "
                                   "and beside it OUT.json: every head's pixel box and the data range it maps.")
    p.add_argument("atlas", metavar="ATLAS")
    p.add_argument("--model", required=True, help="model name in the atlas")
    p.add_argument("--method", default=None, help="projection method (" + ", ".join(sorted(REDUCERS)) + "); needed with --grid")
    p.add_argument("--grid", default=None, metavar="OUT.png", help="output image: .png or .pdf")
    p.add_argument("--layers", help="layers to draw, e.g. 0,2,5-7 (default: all)")
    p.add_argument("--heads", help="heads to draw, e.g. 0-3 (default: all)")
    p.add_argument("--cell-px", type=int, default=None,
                   help=f"pixels per cell ({MIN_CELL_PX}-{MAX_CELL_PX}; default: the dashboard's, for a 1600 px window)")
    export_html.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.grid is None and args.html is None:
        raise InputError("Say what to write: --grid OUT.png (an image of the grid) or --html OUT.html (a page with every head).")
    if args.html is not None:
        if args.grid is not None:
            raise InputError("Give --grid or --html, one at a time.")
        return export_html.run(args)
    if args.method is None:
        from attnatlas.project.reducers import REDUCERS

        raise InputError("--grid needs --method (" + ", ".join(sorted(REDUCERS)) + ").")
    out = Path(args.grid).expanduser()
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(f"--grid {out}: give a .png or .pdf file name.")
    if args.cell_px is not None and not MIN_CELL_PX <= args.cell_px <= MAX_CELL_PX:
        raise InputError(f"--cell-px {args.cell_px}: choose {MIN_CELL_PX} to {MAX_CELL_PX} pixels.")
    out_json = out.with_suffix(".json")
    parent = out.parent.resolve()
    if not parent.is_dir():
        raise StoreError(f"--grid {out}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"--grid {out}: the folder {parent} is not writable.")
    from attnatlas.app.data import AppData
    from attnatlas.render.raster import base_cell_px, grid_figure

    data = AppData(args.atlas)  # read-only; a path that is not an atlas is a StoreError here
    if "://" not in str(args.atlas):
        atlas_dir = Path(args.atlas).resolve()
        if parent == atlas_dir or atlas_dir in parent.parents:
            raise InputError(f"--grid {out} is inside the atlas {args.atlas}; write it somewhere else.")
    if args.model not in data.models:
        have = ", ".join(data.models)
        raise InputError(f"Model {args.model!r} has no layouts in {args.atlas} (models with layouts: {have}).")
    if args.method not in data.methods[args.model]:
        have = ", ".join(data.methods[args.model])
        raise InputError(f"Model {args.model!r} has no {args.method!r} layouts (has: {have}); run `attnatlas project`.")
    from attnatlas.project.jobs import parse_list

    g = data.grid_layouts(args.model, args.method)
    L, H = g.done.shape
    layers = parse_list(args.layers, L, "layer") or list(range(L))
    heads = parse_list(args.heads, H, "head") or list(range(H))
    done = g.done[np.ix_(layers, heads)]
    if not done.any():
        have = sorted({int(a) for a in g.done.nonzero()[0]})
        raise InputError(f"None of the selected heads of {args.model!r} has a {args.method!r} layout (layers with "
                         f"layouts: {_ranges(have)}); run `attnatlas project {args.atlas} --model {args.model} "
                         f"--method {args.method}` on them first.")
    cell_px = args.cell_px or base_cell_px(len(heads))
    image, boxes = grid_figure(g, cell_px, layers, heads)
    meta = {"model": args.model, "method": args.method, "cell_px": cell_px, "width": image.width, "height": image.height,
            "image": out.name, "layers": layers, "head_columns": heads,
            "note": "x0, y0, x1, y1: pixel box of the head's points, x1 and y1 exclusive (y down from the top of the image); "
                    "x_min..x_max, y_min..y_max: layout range the box maps (y_max at y0); points outside are drawn on the edge; "
                    "missing: heads with no layout of this method, drawn as empty boxes",
            "heads": [{k: b[k] for k in ("layer", "head", "x0", "y0", "x1", "y1", "x_min", "x_max", "y_min", "y_max")}
                      for b in boxes if b["has_layout"]],
            "missing": [{k: b[k] for k in ("layer", "head", "x0", "y0", "x1", "y1")} for b in boxes if not b["has_layout"]]}
    table = data.head_table(args.model, args.method)
    if "types" in table:  # attnatlas analyze --head-types: each head's types with confidence, and its scores
        from attnatlas.analyze.head_types import SCORE_LABELS

        by_head = {(int(r["layer"]), int(r["head"])): r for _, r in table.iterrows()}
        for h in meta["heads"]:
            r = by_head[(h["layer"], h["head"])]
            h["types"] = [t for t in str(r["types"]).split(",") if t]
            h["type_confidence"] = {p.rpartition(" ")[0]: float(p.rpartition(" ")[2])
                                    for p in str(r["type_text"]).split(", ") if p}
            h["scores"] = {c: float(r[c]) for c in SCORE_LABELS if c in r and np.isfinite(r[c])}
    try:
        atomic_write(out, lambda tmp: image.save(tmp, format=fmt, **({"resolution": 150.0} if fmt == "PDF" else {})))
        atomic_write(out_json, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    except OSError as exc:
        raise StoreError(f"Could not write {out}: {exc.strerror or exc}.") from None
    n_missing = len(meta["missing"])
    empty = f", {n_missing} without a {args.method!r} layout drawn empty (listed in the JSON)" if n_missing else ""
    print(f"wrote {out} ({image.width} x {image.height} px, {len(meta['heads'])} heads{empty}) and {out_json}")
    bare = [layer for r, layer in enumerate(layers) if not done[r].any()]
    if bare:
        what = f"layers {_ranges(bare)} have" if len(bare) > 1 else f"layer {bare[0]} has"
        print(f"{what} no {args.method!r} layout; --layers {_ranges([l for l in layers if l not in bare])} "
              f"leaves {'them' if len(bare) > 1 else 'it'} out")
    return 0


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the form --layers takes)."""
    parts: list[str] = []
    for v in values:
        if parts and v == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ",".join(parts)
