"""attnatlas analyze: rollout, neuron labels and layer-wise embedding layouts, stored in the atlas."""

from __future__ import annotations

import argparse
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="attention rollout, neuron labels, layer-wise embeddings",
                       description="Compute the ViT analysis views of one model and store them in the atlas.")
    p.add_argument("atlas", metavar="ATLAS")
    p.add_argument("--model", help="model in the atlas (default: the only one)")
    p.add_argument("--rollout", action="store_true", help="attention rollout per image (image models)")
    p.add_argument("--neurons", action="store_true", help="top patches/tokens and a label for every MLP neuron (loads the model)")
    p.add_argument("--embeddings", action="store_true", help="2-D layouts and cluster quality of hidden states per layer")
    p.add_argument("--all", action="store_true", help="every analysis that fits the model's modality")
    p.add_argument("--head-types", action="store_true",
                   help="score every head (induction, previous token, sink, local, positional, colour, ...) and type it")
    p.add_argument("--induction", action="store_true",
                   help="with --head-types: require the repeated-token probe (causal text models; loads the model)")
    p.add_argument("--corpus-only", action="store_true",
                   help="with --head-types: only the scores of the stored corpus (no model is loaded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the repeated random tokens (default 0)")
    p.add_argument("--probe-length", type=int, default=32, help="random tokens per copy (default 32)")
    p.add_argument("--probe-count", type=int, default=8, help="repeated-token sequences (default 8)")
    p.add_argument("--layout", help="layout method the colour and brightness scores read "
                                         "(default: the first of tsne, umap, pca the model has)")
    p.add_argument("--top", type=int, default=16, help="top activations kept per neuron (default 16)")
    p.add_argument("--share", type=float, default=0.75, help="share of top items that must agree for a label (default 0.75)")
    p.add_argument("--method", default="pca", help="reducer of the projection stage for embedding layouts (default pca)")
    p.add_argument("--max-points", type=int, default=3000, help="tokens sampled for embedding layouts (default 3000)")
    p.add_argument("--device", default="cpu", help="device for --neurons (cpu, cuda, mps)")
    p.add_argument("--force", action="store_true", help="recompute results that are already stored")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from attnatlas.analyze import embeddings, neurons, rollout
    from attnatlas.errors import AtlasError
    from attnatlas.store import Atlas

    atlas = Atlas.open(args.atlas)
    model = atlas.resolve_model(args.model)
    info = atlas.info(model)
    if not (args.rollout or args.neurons or args.embeddings or args.all or args.head_types):
        raise AtlasError("Say what to compute: --rollout, --neurons, --embeddings, --head-types or --all.")
    if args.head_types:
        return _head_types(atlas, model, args)
    if args.max_points < 3:
        raise AtlasError("--max-points must be at least 3.")
    do_rollout = args.rollout or (args.all and info.modality == "image")
    if args.all and info.modality != "image":
        print(f"{model}: text model, skipping rollout (image-only)")
    steps = [("rollout", do_rollout, lambda: rollout.compute_rollout(atlas, model)),
             ("embeddings", args.embeddings or args.all,
              lambda: embeddings.compute_embeddings(atlas, model, args.method, args.max_points, progress=not args.quiet)),
             ("neurons", args.neurons or args.all,
              lambda: neurons.compute_neurons(atlas, model, args.top, args.share, device=args.device,
                                              progress=not args.quiet))]
    if do_rollout:  # fail before any slow step
        from attnatlas.analyze.common import require_image
        require_image(atlas, model, "Attention rollout")
    stored = {"rollout": "rollout", "embeddings": "embedding_quality", "neurons": "neuron_labels"}
    for name, wanted, fn in steps:
        if not wanted:
            continue
        if not args.force and atlas.has_table(model, stored[name]):
            print(f"{model}: {name} already stored, kept (--force recomputes it)")
            continue
        t0 = time.perf_counter()
        result = fn()
        print(f"{model}: {name} done in {time.perf_counter() - t0:.1f} s ({len(result)} rows)")
        if name == "embeddings":
            for _, r in result.iterrows():
                print(f"  layer {int(r.layer):2d} {r.label:8s} silhouette {r.silhouette:.3f} purity {r.purity:.3f}")
        if name == "neurons":
            print(neurons.kind_summary(result).round(2).to_string())
    return 0


PROBE_LIMITS = {"probe_length": (2, 1024), "probe_count": (1, 4096)}


def _head_types(atlas, model: str, args: argparse.Namespace) -> int:
    from attnatlas.analyze import head_types as ht
    from attnatlas.errors import AtlasError

    if args.induction and args.corpus_only:
        raise AtlasError("--induction needs the model and --corpus-only loads none: pick one.")
    for name, (lo, hi) in PROBE_LIMITS.items():
        v = getattr(args, name)
        if not lo <= v <= hi:
            raise AtlasError(f"--{name.replace('_', '-')} must be in {lo}..{hi}, not {v}.")
    probe = True if args.induction else (False if args.corpus_only else None)
    t0 = time.perf_counter()
    res = ht.compute_head_scores(atlas, model, probe=probe,
                                 settings=ht.ProbeSettings(args.seed, args.probe_length, args.probe_count),
                                 layout_method=args.layout, force=args.force, device=args.device,
                                 progress=not args.quiet)
    for note in res.notes:
        print(note)
    if not res.skipped:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in (res.seconds or {}).items())
        print(f"{model}: head types done in {time.perf_counter() - t0:.1f} s ({parts}; {len(res.scores)} heads)")
    typed = res.scores.merge(ht.head_types(res.scores), on=["layer", "head"])
    lines = ht.type_summary(typed)
    print("\n".join(f"  {line}" for line in lines) if lines else "  no head reaches a type's threshold")
    return 0
