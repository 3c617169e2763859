"""`attnatlas compare` on a corpus with a few long sequences vs the same tokens in sequences of even length.

Two synthetic models over 2,000 sequences: 1% of them 512 tokens long, the rest short. The even corpus holds
the same number of tokens in 2,000 sequences of one length. Both are compared in the same run; printed are
the times, their ratio, the attention cells computed (compare.metrics.WORK), and the ratio that exact
attention cannot go below: sum of squared lengths, mixed over even. One padded batch, as compare used to
run, would compute sequences x 512^2 cells per head; that figure is printed too (not run: 2 GB per head).

    python scripts/bench_compare.py [--short 30] [--layers 2] [--heads 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=2000)
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--short", type=int, default=30)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    args = ap.parse_args()

    from attnatlas import testing
    from attnatlas.compare import metrics as M
    from attnatlas.compare.run import compare_models

    n_long = max(1, args.sequences // 100)
    mixed = [args.long] * n_long + [args.short] * (args.sequences - n_long)
    even = [round(sum(mixed) / args.sequences)] * args.sequences
    root = Path(tempfile.mkdtemp(prefix="attnatlas-bench-compare-"))
    out = {}
    for label, lengths in (("mixed", mixed), ("even", even)):
        atlas = testing.synthetic_atlas(root / label, n_layers=args.layers, n_heads=args.heads, n_seq=len(lengths),
                                        lengths=lengths, topk=1)
        testing.write_synthetic_model(atlas, name="other", n_layers=args.layers, n_heads=args.heads - 1,
                                      n_seq=len(lengths), lengths=lengths, topk=1)
        M.WORK["cells"] = 0
        t = time.perf_counter()
        compare_models(atlas, ["synthetic", "other"], store=False)
        out[label] = (time.perf_counter() - t, M.WORK["cells"], sum(n * n for n in lengths))
        print(f"{label:>6}: {sum(lengths):,} tokens in {len(lengths):,} sequences, compare {out[label][0]:.1f} s, "
              f"{out[label][1]:,} attention cells")
    heads = args.layers * (2 * args.heads - 1)
    (tm, cm, sm), (te, ce, se) = out["mixed"], out["even"]
    print(f"ratio mixed / even: {tm / te:.2f}x time, {cm / ce:.2f}x cells; exact attention needs at least "
          f"{sm / se:.2f}x (sum of squared lengths)")
    print(f"one padded batch would compute {heads * args.sequences * args.long ** 2:,} cells "
          f"({heads * args.sequences * args.long ** 2 / cm:.0f}x the bucketed run)")


if __name__ == "__main__":
    main()
