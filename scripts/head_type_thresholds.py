"""How the head-type thresholds were chosen (not a test): each score's distribution over the heads of a real model
against a null, the same architecture with seeded random weights run through the same probes and corpus.

    python scripts/head_type_thresholds.py [--atlas atlases/demo] [--models smollm2,minilm] [--seed 0]

For every score: the null's largest value and 99th percentile, the real model's quantiles, and how many real heads
reach the threshold in attnatlas.analyze.head_types.TYPE_RULES. The atlas is only read: the real scores are computed
in a temporary copy, the null's extraction goes to a temporary atlas.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def random_twin(model_id: str, seed: int):
    """The model loaded as extract loads it, with every weight re-initialised from `seed`."""
    import torch

    from attnatlas.extract import load_model, prepare_model

    real = load_model(model_id)
    torch.manual_seed(seed)
    twin = type(real.model)(real.config)
    return prepare_model(twin, real.preprocessor, f"{model_id} (random init, seed {seed})", real.source)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default=str(ROOT / "atlases" / "demo"))
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from attnatlas.analyze import head_types as ht
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.store import open_atlas

    with tempfile.TemporaryDirectory(prefix="head-type-null-") as tmp:
        copy = Path(tmp) / "real"
        shutil.copytree(args.atlas, copy, ignore=shutil.ignore_patterns("analysis"))
        real_atlas = open_atlas(copy)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            info = real_atlas.info(model)
            real = ht.compute_head_scores(real_atlas, model, force=True).scores
            twin = random_twin(str(info.attrs.get("model_id") or model), args.seed)
            texts = real_atlas.sequences(model)["text"].tolist()
            null_path = Path(tmp) / f"null-{model}"
            extract(null_path, twin, texts=texts, name=model,
                    options=ExtractOptions(dtype=str(info.attrs.get("dtype", "float16")), attention_topk=0,
                                           progress=False))
            null = ht.compute_head_scores(open_atlas(null_path), model, loaded=twin, force=True).scores
            print(f"\n{model}: {len(real)} heads; null = the same architecture with random weights (seed {args.seed})")
            print(f"  {'score':16s} {'null max':>8s} {'null p99':>8s} | {'real p50':>8s} {'p90':>6s} {'p99':>6s} "
                  f"{'max':>6s} | threshold  real heads >= it")
            for typ, (col, thr, _) in ht.TYPE_RULES.items():
                r, n = real[col].to_numpy(float), null[col].to_numpy(float)
                if not np.isfinite(r).any():
                    continue
                q = np.nanquantile(r, [0.5, 0.9, 0.99])
                nm = np.nanmax(n) if np.isfinite(n).any() else np.nan
                n99 = np.nanquantile(n, 0.99) if np.isfinite(n).any() else np.nan
                print(f"  {col:16s} {nm:8.3f} {n99:8.3f} | {q[0]:8.3f} {q[1]:6.3f} {q[2]:6.3f} {np.nanmax(r):6.3f} | "
                      f"{thr:9.2f}  {int((r >= thr).sum())} ({typ})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
