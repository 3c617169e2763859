"""Extraction with storage vs a plain forward pass over the same batches of the same model.

Runs both side by side, alternating (and which of the two goes first alternates too), and prints the ratio
per model: target <= 1.15x on CPU for MiniLM and SmolLM2 on the demo corpus, median of 5, both models in the
same run, --attention-topk 0 (q and k only). With --memory it also extracts the corpus cycled to
--memory-sequences sequences (default: 1x, 10x and 20x the corpus), each in a fresh process, and prints how much
resident memory grew during extraction: it stays flat because writing streams per batch.

    python scripts/bench_extract.py [--models minilm,smollm2] [--texts data/corpus/demo.txt] [--repeats 5] [--memory]
    python scripts/bench_extract.py --memory --repeats 0 --memory-sequences 487,10000,100000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from attnatlas.extract import ExtractOptions, extract, load_model
from attnatlas.inputs import load_texts

ROOT = Path(__file__).resolve().parents[1]


def plain_forward(loaded, texts: list[str], batch_size: int, max_len: int) -> None:
    tok = loaded.preprocessor
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            loaded.model(**enc)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@contextmanager
def rss_peak(into: dict[str, float]) -> Iterator[None]:
    """Host RSS just before the block ("before") and its peak during it ("peak", sampled every 10 ms), in MiB."""
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        into["before"], into["peak"] = before, max(peak[0], rss_mib())


def child(args: argparse.Namespace) -> None:
    """Extract the corpus cycled to `args.child` sequences; print RSS just before extraction and its
    peak during extraction (sampled every 10 ms), in MiB, as JSON."""
    corpus = [r.text for r in load_texts(args.texts)]
    texts = [corpus[i % len(corpus)] for i in range(args.child)]
    loaded = load_model(args.model)
    out = Path(tempfile.mkdtemp()) / "atlas"
    source: dict = {"texts": texts}
    if args.memory_source == "datasets":  # the same corpus as a Hugging Face dataset on disk, read by extract
        import datasets

        folder = out.parent / "dataset"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder))
        source = {"dataset": str(folder)}
    rss: dict[str, float] = {}
    with rss_peak(rss):
        t = time.perf_counter()
        extract(out, loaded, **source, options=ExtractOptions(batch_size=args.batch_size, progress=False))
        seconds = time.perf_counter() - t
    before, peak = rss["before"], rss["peak"]
    stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(out.parent)
    print(json.dumps({"sequences": len(texts), "before_mib": round(before, 1), "peak_mib": round(peak, 1),
                      "growth_mib": round(peak - before, 1), "stored_mib": round(stored, 1),
                      "seconds": round(seconds, 2)}))


def wait_quiet(limit_s: float) -> float:
    """Wait (up to limit_s) until no other process is running for 1 s, so that a timing pair is not
    shared with another job's burst on a shared machine; returns the seconds waited."""
    start = time.perf_counter()
    calm = 0
    while time.perf_counter() - start < limit_s and calm < 10:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])  # runnable right now, this reader included
        calm = calm + 1 if running <= 1 else 0
        time.sleep(0.1)
    return time.perf_counter() - start


def bench_model(model: str, texts: list[str], args: argparse.Namespace) -> dict:
    """Plain forward vs extraction (q and k stored) of one model, alternating, `args.repeats` times each."""
    loaded = load_model(model)
    max_len = 512
    opts = ExtractOptions(batch_size=args.batch_size, attention_topk=args.attention_topk, progress=False)
    plain_forward(loaded, texts[:32], args.batch_size, max_len)  # warm-up
    # Wall time, and this process's CPU time: on a machine shared with other jobs the wall clock also
    # counts their load, CPU time mostly does not.
    plain, ours, plain_cpu, ours_cpu = [], [], [], []
    waited = 0.0

    def run_plain() -> None:
        t, c = time.perf_counter(), time.process_time()
        plain_forward(loaded, texts, args.batch_size, max_len)
        plain.append(time.perf_counter() - t)
        plain_cpu.append(time.process_time() - c)

    def run_ours() -> None:
        out = Path(tempfile.mkdtemp()) / "atlas"
        t, c = time.perf_counter(), time.process_time()
        extract(out, loaded, texts=texts, options=opts)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
        shutil.rmtree(out.parent)

    for i in range(args.repeats):
        # The order alternates (plain first, then extraction first), so a machine that drifts slower or faster
        # during the run does not favour either side.
        for run in (run_plain, run_ours) if i % 2 == 0 else (run_ours, run_plain):
            if args.wait_quiet:
                waited += wait_quiet(args.wait_quiet)
            run()
    p, o = statistics.median(plain), statistics.median(ours)
    pc, oc = statistics.median(plain_cpu), statistics.median(ours_cpu)
    print(f"model {model}, {len(texts)} sequences, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"top-k {args.attention_topk}, median of {args.repeats}")
    print(f"  plain forward    wall {p:7.2f} s  runs {[round(x, 2) for x in plain]}")
    print(f"                   cpu  {pc:7.2f} s  runs {[round(x, 2) for x in plain_cpu]}")
    print(f"  extract + store  wall {o:7.2f} s  runs {[round(x, 2) for x in ours]}")
    print(f"                   cpu  {oc:7.2f} s  runs {[round(x, 2) for x in ours_cpu]}")
    # Other jobs only ever add time, so the fastest runs are the least disturbed: their ratio is shown too.
    paired = statistics.median(b / a for a, b in zip(plain, ours))  # each pair ran back to back
    print(f"  ratio extract/forward  wall {o / p:.3f}x, cpu {oc / pc:.3f}x, fastest runs {min(ours) / min(plain):.3f}x,"
          f" median of pairs {paired:.3f}x  (target <= 1.15x)"
          + (f"; waited {waited:.0f} s for a quiet machine" if args.wait_quiet else ""), flush=True)
    return {"model": model, "plain_s": plain, "extract_s": ours, "plain_cpu_s": plain_cpu, "extract_cpu_s": ours_cpu,
            "ratio": o / p, "ratio_cpu": oc / pc, "ratio_fastest": min(ours) / min(plain), "ratio_paired": paired}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2", help="comma-separated; each timed in this same run")
    ap.add_argument("--model", default=None, help="one model (the --memory runs use the first of --models)")
    ap.add_argument("--texts", default=str(ROOT / "data" / "corpus" / "demo.txt"))
    ap.add_argument("--sequences", type=int, default=None, help="use only the first N sequences of the corpus")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention-topk", type=int, default=0, help="0: store q and k only (the 1.15x target)")
    ap.add_argument("--memory", action="store_true", help="also measure memory growth at several corpus sizes")
    ap.add_argument("--memory-sequences", default=None, help="comma-separated sequence counts (default: 1x,10x,20x)")
    ap.add_argument("--memory-source", default="txt", choices=["txt", "datasets"],
                    help="feed the --memory runs a list of lines, or the same lines as a saved Hugging Face dataset")
    ap.add_argument("--json", default=None, help="also write the timings here")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each timed run wait up to S seconds until no other process runs (shared machines)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = [args.model] if args.model else args.models.split(",")
    args.model = models[0]
    if args.child:
        return child(args)

    texts = [r.text for r in load_texts(args.texts)][: args.sequences]
    if args.repeats < 1:
        return memory(args, len(texts))
    results = [bench_model(m, texts, args) for m in models]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.memory:
        memory(args, len(texts))


def memory(args: argparse.Namespace, corpus: int) -> None:
    counts = [int(x) for x in args.memory_sequences.split(",")] if args.memory_sequences else [corpus, 10 * corpus, 20 * corpus]
    for n in counts:
        res = subprocess.run([sys.executable, __file__, "--child", str(n), "--model", args.model, "--texts", args.texts,
                              "--batch-size", str(args.batch_size), "--memory-source", args.memory_source],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{args.memory_source:>8} {r['sequences']:7d} sequences ({n / corpus:5.1f}x corpus), "
              f"{r['stored_mib']:8.1f} MiB stored: RSS grew by "
              f"{r['growth_mib']:6.1f} MiB during extraction ({r['before_mib']:.0f} -> {r['peak_mib']:.0f} MiB), "
              f"{r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
