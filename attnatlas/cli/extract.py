"""attnatlas extract: run a model over a corpus and store per-head q and k in an atlas."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="store per-head queries and keys of a model over a corpus",
                       description="Run a model over texts or images and store every head's q and k in an atlas.")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH_OR_SHORTNAME",
                   help="Hugging Face hub id, local model folder, or an offline short name (minilm, smollm2, dinov2-small)")
    p.add_argument("--name", help="name of the model inside the atlas (default: short name or last part of the id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", metavar="FILE", help=".txt (one sequence per line), .jsonl or .csv")
    src.add_argument("--images", metavar="DIR_OR_FILE", help="a folder of images or one image file")
    src.add_argument("--dataset", metavar="ID_OR_DIR",
                     help="a Hugging Face dataset: a save_to_disk folder, a folder of images, or a hub id")
    p.add_argument("--text-column", metavar="NAME",
                   help="field of .jsonl / column of .csv, .parquet or a dataset holding the text (default: text)")
    p.add_argument("--image-column", metavar="NAME", help="image column of a --dataset (default: its only one)")
    p.add_argument("--split", help="split of a --dataset (default: train, or its only split)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N rows of the corpus")
    p.add_argument("--sample", type=int, metavar="N", help="use N rows drawn at random (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--out", required=True, metavar="ATLAS", help="atlas folder (created if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype of vectors")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute precision (autocast); float32 keeps attention exact")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, help="truncate longer sequences (default: model limit, at most 512)")
    p.add_argument("--chunk", action="store_true",
                   help="split longer documents into windows of --max-tokens instead of truncating them")
    p.add_argument("--stride", type=int, default=0, help="tokens shared by consecutive --chunk windows (default 0)")
    p.add_argument("--values", action="store_true", help="also store value vectors")
    p.add_argument("--attention-topk", type=int, default=8, metavar="K",
                   help="store each query's K strongest keys and weights (0 = off; default 8)")
    p.add_argument("--hidden-states", action="store_true", help="also store hidden states of every layer")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attnatlas.extract import ExtractOptions, extract

    opts = ExtractOptions(dtype=args.dtype, batch_size=args.batch_size, max_tokens=args.max_tokens,
                          values=args.values, attention_topk=args.attention_topk, hidden_states=args.hidden_states,
                          device=args.device, precision=args.precision, progress=not args.no_progress,
                          chunk=args.chunk, stride=args.stride)
    corpus = dict(split=args.split, image_column=args.image_column, limit=args.limit, sample=args.sample, seed=args.seed)
    name = extract(args.out, args.model, texts=args.texts, images=args.images, dataset=args.dataset, name=args.name,
                   options=opts, overwrite=args.overwrite, text_column=args.text_column, corpus=corpus)
    print(f"stored model {name!r} in {args.out}")
    return 0
