"""Every token placed vs the sampled projection alone, side by side in one run.

A MiniLM corpus of about 100,000 tokens (10x the 10,000-token layout cap) is built from pairs of demo
sentences (so tokens have their own contexts, not exact duplicates), extracted once, and projected twice on
the same heads: once with `place=False` (only the 10,000 sampled tokens get coordinates) and once with
every other token placed. Prints both times, their ratio, and the trustworthiness of placed points next to
that of the sampled ones.

    python scripts/bench_place.py [--heads 6] [--methods tsne,umap,pca] [--tokens 100000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(n_tokens: int, seed: int = 0) -> list[str]:
    sentences = [s for s in (ROOT / "data" / "corpus" / "demo.txt").read_text().splitlines() if s.strip()]
    rng = random.Random(seed)
    lines, approx = [], 0
    while approx < n_tokens:
        line = " ".join(rng.sample(sentences, 2))
        lines.append(line)
        approx += int(len(line.split()) * 1.3) + 2  # word pieces per word, plus [CLS] and [SEP]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--heads", type=int, default=6, help="heads of layer 0 to project")
    ap.add_argument("--methods", default="tsne,umap,pca")
    ap.add_argument("--work", default=None, help="folder for the atlases (default: a temp folder)")
    args = ap.parse_args()

    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.project import project_model
    from attnatlas.store import Atlas

    work = Path(args.work or tempfile.mkdtemp(prefix="attnatlas-bench-place-"))
    base = work / "base"
    if not (base / "zarr.json").exists():
        t = time.perf_counter()
        extract(base, "minilm", texts=corpus(args.tokens), name="minilm", options=ExtractOptions(attention_topk=0))
        print(f"extracted in {time.perf_counter() - t:.1f} s")
    n = len(Atlas.open(base).tokens("minilm"))
    print(f"MiniLM corpus: {n:,} tokens ({2 * n:,} points per head); layout cap 20,000 points (10,000 tokens)")
    heads = list(range(args.heads))
    results = {}
    for label, place in (("sampled only", False), ("every token placed", True)):
        path = work / label.replace(" ", "-")
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        atlas = Atlas.open(path)
        t = time.perf_counter()
        s = project_model(atlas, "minilm", methods=args.methods, layers=[0], heads=heads, place=place, progress=False)
        results[label] = (time.perf_counter() - t, s)
        print(f"{label:>20}: {results[label][0]:7.1f} s for {len(heads)} heads x {args.methods}")
    (t0, s0), (t1, s1) = results["sampled only"], results["every token placed"]
    print(f"ratio placed / sampled: {t1 / t0:.2f}x  (target <= 1.5x)")
    for m in s1["quality"]:
        print(f"  {m}: trustworthiness sampled {s1['quality'][m]:.3f} (sampled-only run {s0['quality'][m]:.3f}), "
              f"placed points {s1['placed_quality'][m]:.3f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
