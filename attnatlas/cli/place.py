"""`attnatlas place ATLAS --model M --text "..."`: your own text (or image) in every head's stored layout.

Writes a table (CSV to stdout, or --out FILE.csv / FILE.csv.gz / FILE.parquet): sequence, token, position, kind, layer,
head, method, x, y, the new input's top-k attention, and how well each point fits the corpus. Each text is
written once, never per row: rows name it by `sequence` (the texts in the order given, or their windows with
--chunk); --out FILE.csv also writes FILE.texts.csv (sequence, text), and Parquet holds a `text` column
stored as a dictionary (each text once). A string is cut to 32 characters per token of the model's limit
before it is tokenized, and one call places at most 1,000,000 points (see attnatlas.live.bounds). The atlas
is only written with --save NAME, which stores the placement as a named probe set beside the corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnatlas.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="place new text or an image into every head's layout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("atlas", help="atlas folder (or URL) with projected layouts")
    p.add_argument("--model", help="model in the atlas (default: the only one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", metavar="TEXT", help="a text to place (repeat for several)")
    src.add_argument("--image", action="append", metavar="PATH", help="an image file to place (repeat for several)")
    p.add_argument("--method", help="comma list of stored methods (default: every stored one)")
    p.add_argument("--chunk", action="store_true",
                   help="place text over the model's token limit as windows (default: truncate it, and say so)")
    p.add_argument("--out", help="write FILE.csv, FILE.csv.gz (gzipped) or FILE.parquet instead of CSV to stdout")
    p.add_argument("--save", metavar="NAME", help="also store the placement in the atlas as probe set NAME")
    p.add_argument("--overwrite", action="store_true", help="with --save: replace a probe set of that name")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    p.set_defaults(func=run)


def _check_out(out: str | None) -> str | None:
    """'csv' | 'parquet' from --out's extension, checked before any model loads."""
    if out is None:
        return None
    name = Path(out).name.lower()
    kind = "csv" if name.endswith(".csv.gz") else Path(out).suffix.lower().lstrip(".")
    if kind not in ("csv", "parquet"):
        raise InputError(f"--out {out!r}: give a .csv, .csv.gz or .parquet file name.")
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise InputError(f"--out {out!r}: the folder {parent} does not exist.")
    return kind


def texts_file(out: str) -> Path:
    """FILE.texts.csv beside FILE.csv (FILE.texts.csv.gz beside FILE.csv.gz): each text once."""
    p = Path(out)
    gz = p.name.lower().endswith(".csv.gz")
    stem = p.name[: -len(".csv.gz")] if gz else p.stem
    return p.with_name(stem + (".texts.csv.gz" if gz else ".texts.csv"))


# Coordinates and distances to 5 significant digits and attention weights to 3 decimals: finer than any
# plot or threshold reads them.
CSV_FLOATS = "%.5g"
POINT = ["sequence", "position", "kind", "layer", "head"]  # one placed point; its fit is the same in every layout


def _csv_ready(df):
    """One row per placed point with its coordinates in every method (x_tsne, y_tsne, ...): everything else
    comes from the point's neighbours in the head's own space, the same for every layout, so a row per
    method would repeat it. The text is written once, apart; top-k lists are space-separated values; `far`
    is 0/1. A 100,000-character text into MiniLM's 72 heads x 2 methods: 19.0 MB of CSV in long form."""
    out = df.drop(columns=["text"], errors="ignore")
    if "top_keys" in out:
        out["top_keys"] = [" ".join(str(int(v)) for v in xs) for xs in out["top_keys"]]
    if "top_weights" in out:
        out["top_weights"] = [" ".join(f"{float(v):.3f}" for v in xs) for xs in out["top_weights"]]
    if "far" in out:
        out["far"] = out["far"].astype("int8")
    methods = list(dict.fromkeys(out["method"]))
    wide = out[out["method"] == methods[0]].drop(columns=["method", "x", "y"]).reset_index(drop=True)
    at = wide.columns.get_loc("head") + 1
    for m in methods:
        xy = out[out["method"] == m][POINT + ["x", "y"]].rename(columns={"x": f"x_{m}", "y": f"y_{m}"})
        wide = wide.merge(xy, on=POINT, how="left", validate="one_to_one")
    cols = list(wide.columns)
    coords = [c for m in methods for c in (f"x_{m}", f"y_{m}")]
    rest = [c for c in cols if c not in coords]
    return wide[rest[:at] + coords + rest[at:]]


def _write_csv(df, where) -> None:
    _csv_ready(df).to_csv(where, index=False, float_format=CSV_FLOATS)


def run(args: argparse.Namespace) -> int:
    from attnatlas.live.place import Placer, place, texts_table
    from attnatlas.live.probes import probe_file, save_probe
    from attnatlas.store import Atlas

    kind = _check_out(args.out)
    atlas = Atlas.open(args.atlas)
    model = atlas.resolve_model(args.model)
    if args.save is not None:
        f = probe_file(atlas, model, args.save)  # the name is checked before any model loads
        if f.is_file() and not args.overwrite:
            raise InputError(f"{model!r} already has a probe set named {args.save!r}; choose another --save NAME "
                             "or pass --overwrite.")
    table = place(atlas, model, texts=args.text, images=args.image, methods=args.method, chunk=args.chunk,
                  placer=Placer(atlas, args.device), warn=False)
    for note in table.attrs.get("notes", []):
        print(f"attnatlas place: note: {note}", file=sys.stderr)
    if kind == "parquet":
        table.to_parquet(args.out, index=False)
    elif kind == "csv":
        _write_csv(table, args.out)
        texts_table(table).to_csv(texts_file(args.out), index=False)
    else:
        _write_csv(table, sys.stdout)
    far = int(table["far"].sum())
    where = f" to {args.out}" + (f" (texts in {texts_file(args.out)})" if kind == "csv" else "") if args.out else ""
    n_tokens = len(table[(table.kind == "query") & (table.layer == table.layer.iloc[0]) & (table["head"] == table["head"].iloc[0])
                         & (table.method == table.method.iloc[0])])
    heads = len(table[["layer", "head"]].drop_duplicates())
    print(f"placed {n_tokens:,} tokens' queries and keys into {heads:,} heads x {table.method.nunique()} method(s){where}; "
          f"{far:,} of {len(table):,} points flagged far outside the corpus (fit > {_far()})", file=sys.stderr)
    if args.save is not None:
        saved = save_probe(atlas, model, args.save, table, overwrite=args.overwrite)
        print(f"saved probe set {args.save!r} as {saved}", file=sys.stderr)
    return 0


def _far() -> float:
    from attnatlas.project.placement import FAR

    return FAR
