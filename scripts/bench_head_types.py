"""Head types benchmark (not a test): `attnatlas analyze --head-types` of one model of an atlas, timed by stage,
and the strongest heads of each probe score.

    python scripts/bench_head_types.py [--atlas atlases/demo] [--model smollm2] [--top 10]

The atlas is copied to a temporary folder first (the scores are written into the copy), so a shared demo atlas is
only read. Target from issue 27: SmolLM2-135M (270 heads, the demo corpus) in <= 30 s on a 2-core CPU, the model's
load included.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default=str(ROOT / "atlases" / "demo"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    import torch

    from attnatlas.analyze import head_types as ht
    from attnatlas.store import open_atlas

    with tempfile.TemporaryDirectory(prefix="bench-head-types-") as tmp:
        copy = Path(tmp) / "atlas"
        shutil.copytree(args.atlas, copy, ignore=shutil.ignore_patterns("analysis"))
        atlas = open_atlas(copy)
        info = atlas.info(args.model)
        t0, c0 = time.perf_counter(), time.process_time()
        res = ht.compute_head_scores(atlas, args.model, force=True)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in (res.seconds or {}).items())
        print(f"{args.model}: {info.n_layers * info.n_heads} heads, {len(atlas.tokens(args.model))} corpus tokens, "
              f"torch threads {torch.get_num_threads()}: head types in {total:.1f} s ({stages}), {cpu:.1f} s CPU of this "
              f"process (wall above CPU / threads means other processes shared the cores)")
        for note in res.notes:
            print(" ", note)
        typed = res.scores.merge(ht.head_types(res.scores), on=["layer", "head"])
        for col in ("induction", "previous_token", "duplicate", "sink"):
            top = typed.sort_values(col, ascending=False).head(args.top)
            print(f"top {args.top} {col}: " + ", ".join(f"L{int(r['layer'])}H{int(r['head'])} {r[col]:.3f}"
                                                     for _, r in top.iterrows()))
        print("types:", *ht.type_summary(typed), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
