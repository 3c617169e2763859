"""attnatlas info: what an atlas holds."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarise what an atlas holds")
    p.add_argument("atlas", metavar="ATLAS")
    p.add_argument("--model", help="only this model")
    p.set_defaults(func=run)


def describe(atlas, model: str) -> list[str]:
    info = atlas.info(model)
    a = info.attrs
    stored = [k for k in ("queries", "keys", "values", "attn_topk_index", "hidden", "images") if atlas.has_array(model, k)]
    lines = [
        f"model {model}: {a.get('model_id')} ({a.get('family')} / {a.get('model_type')}, {info.modality})",
        f"  {info.n_layers} layers x {info.n_heads} heads ({info.n_kv_heads} key/value heads), d_head {info.d_head}",
        f"  {a.get('n_sequences')} {'images' if info.modality == 'image' else 'sequences'}, "
        f"{len(atlas.tokens(model))} tokens, stored {a.get('dtype')}: {', '.join(stored)}",
        f"  created {a.get('created')} by attnatlas {a.get('attnatlas_version')}, input sha256 {str(a.get('input_hash'))[:12]}",
    ]
    if a.get("description"):
        lines.insert(1, f"  {a['description']}")
    if a.get("truncated_sequences"):
        lines.append(f"  {a['truncated_sequences']} sequences truncated to {a.get('max_tokens')} tokens")
    for method in atlas.layout_methods(model):
        q = atlas.layout_quality(model, method)
        total = info.n_layers * info.n_heads
        if len(q):
            lines.append(
                f"  layout {method}: {len(q)}/{total} heads, trustworthiness {q.trustworthiness.mean():.3f} "
                f"(min {q.trustworthiness.min():.3f}), 10-NN kept {q.knn_kept.mean():.3f}, {q.seconds.sum():.1f} s"
            )
        else:
            lines.append(f"  layout {method}: 0/{total} heads")
    if atlas.tables(model):
        lines.append(f"  analyses: {', '.join(atlas.tables(model))}")
    from attnatlas.analyze.head_types import scores_with_types, type_summary

    typed = scores_with_types(atlas, model)
    if typed is not None:
        n = int((typed["types"] != "").sum())
        lines.append(f"  head types: {n} of {len(typed)} heads typed")
        lines += [f"    {line}" for line in type_summary(typed)]
    return lines


def run(args: argparse.Namespace) -> int:
    from attnatlas.store import Atlas

    atlas = Atlas.open(args.atlas)
    models = [args.model] if args.model else atlas.models
    print(f"atlas {atlas.path} (format {atlas.root.attrs['attnatlas_format']}): {len(atlas.models)} model(s)")
    for m in models:
        print("\n".join(describe(atlas, m)))
    return 0
