"""Heads per minute of projection: this process, and a Dask LocalCluster of 1 and 2 worker processes.

Data: one synthetic atlas (attnatlas.testing) of LAYERS x HEADS heads, SEQ sequences x LEN tokens
(2 x tokens points per head), d_head 32. Each Dask cluster first projects one head per worker of a
separate warm-up model, so the per-process start-up (imports, umap-learn's numba compile) is
reported apart from the steady rate. With CUDA, also times extraction of a tiny random BERT on GPU
vs CPU and says whether cuML reducers are in use; without CUDA it prints that it skipped that.

    python scripts/bench_scale.py [--layers 2 --heads 6 --seq 100 --len 20 --methods pca,umap]
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()

    from attnatlas.store import Atlas
    from attnatlas.testing import write_synthetic_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        size = dict(n_layers=args.layers, n_heads=args.heads, n_seq=args.seq, seq_len=args.len, d_head=32)
        print(f"atlas: {args.layers} layers x {args.heads} heads, {args.seq * args.len} tokens "
              f"({2 * args.seq * args.len} points per head), d_head 32; methods {args.methods}")
        for label, sched, workers in (("this process, 1 worker", None, 1), ("Dask local, 1 worker x 1 thread", "local", 1),
                                      ("Dask local, 2 workers x 1 thread", "local", 2)):
            atlas = Atlas.open(tmp / label.replace(" ", "_").replace(",", ""), create=True)
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
