"""Heads per minute of projection: this process, and a Dask LocalCluster of 1 and 2 worker processes.

Data: one synthetic atlas (attnatlas.testing) of LAYERS x HEADS heads, SEQ sequences x LEN tokens
(2 x tokens points per head), d_head 32. Each Dask cluster first projects one head per worker of a
separate warm-up model, so the per-process start-up (imports, umap-learn's numba compile) is
reported apart from the steady rate. With CUDA, also times extraction of a tiny random BERT on GPU
vs CPU and says whether cuML reducers are in use; without CUDA it prints that it skipped that.

    python scripts/bench_scale.py [--layers 2 --heads 6 --seq 100 --len 20 --methods pca,umap] [--no-s3]

With moto and s3fs installed, a last row runs the 2-worker cluster on an atlas in a local S3 server.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path


def project_rate(atlas, model: str, methods: str, scheduler: str | None, workers: int) -> dict:
    from attnatlas.project.runner import project_model
    from attnatlas.scale.distributed import dask_client, project_distributed

    if scheduler is None:
        t = time.perf_counter()
        project_model(atlas, "warm", methods=methods, layers=[0], heads=[0], progress=False)
        warm = time.perf_counter() - t
        s = project_model(atlas, model, methods=methods, progress=False)
        return {"warmup_s": warm, **s}
    t = time.perf_counter()
    with dask_client("local", workers=workers, threads_per_worker=1) as client:
        started = time.perf_counter() - t
        project_distributed(client, atlas, "warm", methods=methods, heads=list(range(workers)), layers=[0], progress=False)
        warm = time.perf_counter() - t
        s = project_distributed(client, atlas, model, methods=methods, progress=False)
    return {"cluster_start_s": started, "warmup_s": warm, **s}


def gpu_path(tmp: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        print("GPU: skipped (no CUDA device here)")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_text_model

    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.scale.build import reducer_backends
    from attnatlas.store import Atlas

    model = save_text_model("bert", tmp / "bert")
    texts = [" ".join(["the cat sat on a mat"] * 8)] * 4000
    print(f"GPU: {torch.cuda.get_device_name(0)}; reducer backends: {reducer_backends(['tsne', 'umap'])}")
    for device, precision, batch in (("cpu", "float32", 16), ("cuda", "float32", 64), ("cuda", "bfloat16", 64)):
        t = time.perf_counter()
        extract(tmp / f"gpu-{device}-{precision}", str(model), texts=texts, name="m",
                options=ExtractOptions(device=device, precision=precision, batch_size=batch, progress=False))
        secs = time.perf_counter() - t
        n = len(Atlas.open(tmp / f"gpu-{device}-{precision}").tokens("m"))
        print(f"  extract tiny BERT, {len(texts)} sequences, {n} tokens, {device} {precision} batch {batch}: "
              f"{secs:.1f} s ({n / secs:,.0f} tokens/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--len", type=int, default=20)
    ap.add_argument("--methods", default="pca,umap")
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=None,
                    help="also run 2 workers on an atlas in a local S3 server (default: when moto and s3fs are installed)")
    args = ap.parse_args()
    if args.s3 is None:
        import importlib.util

        args.s3 = all(importlib.util.find_spec(m) is not None for m in ("moto", "s3fs"))

    from attnatlas.store import Atlas
    from attnatlas.testing import write_synthetic_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        size = dict(n_layers=args.layers, n_heads=args.heads, n_seq=args.seq, seq_len=args.len, d_head=32)
        print(f"atlas: {args.layers} layers x {args.heads} heads, {args.seq * args.len} tokens "
              f"({2 * args.seq * args.len} points per head), d_head 32; methods {args.methods}")
        runs = [("this process, 1 worker", None, 1, None), ("Dask local, 1 worker x 1 thread", "local", 1, None),
                ("Dask local, 2 workers x 1 thread", "local", 2, None)]
        if args.s3:
            runs.append(("Dask local, 2 workers x 1 thread, atlas on S3 (local moto server)", "local", 2, "s3"))
        for label, sched, workers, store in runs:
            with contextlib.ExitStack() as stack:
                if store == "s3":
                    from attnatlas.testing import local_s3

                    where: str | Path = stack.enter_context(local_s3()) + "/bench"
                else:
                    where = tmp / label.replace(" ", "_").replace(",", "")
                atlas = Atlas.open(where, create=True)
                write_synthetic_model(atlas, name="warm", **{**size, "n_layers": 1})
                write_synthetic_model(atlas, name="bench", **size)
                r = project_rate(atlas, "bench", args.methods, sched, workers)
            assert not r["failed"], r["failed"]
            start = f"cluster start {r['cluster_start_s']:.1f} s, " if "cluster_start_s" in r else ""
            print(f"{label}: {r['heads_done']} heads in {r['seconds']:.1f} s = {r['heads_per_min']:.1f} heads/min "
                  f"(after warm-up; {start}first heads incl. imports/compile {r['warmup_s']:.1f} s)", flush=True)
        if not args.skip_gpu:
            gpu_path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
