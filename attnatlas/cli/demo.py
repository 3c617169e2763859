"""attnatlas demo: real offline models -> atlas -> dashboard, in one command.

Sizes are chosen so the whole precompute fits in about 5 minutes on a 2-core CPU (see README);
a second run reuses every model and layout already in the atlas.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class DemoModel:
    short_name: str
    modality: str
    hidden_states: bool
    methods: str


# t-SNE for the two 72-head models, PCA for SmolLM2's 270 heads, to fit 5 minutes on 2 cores; more methods
# are one `attnatlas project ATLAS --model M --method umap` away.
DEMO_MODELS = (
    DemoModel("minilm", "text", True, "pca,tsne"),
    DemoModel("dinov2-small", "image", True, "pca,tsne"),
    DemoModel("smollm2", "text", False, "pca"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a demo atlas from the offline models and serve the dashboard",
                       description=__doc__)
    p.add_argument("--atlas", default="atlases/demo", help="where the demo atlas lives (default atlases/demo)")
    p.add_argument("--texts", default=str(REPO_DATA / "corpus" / "demo.txt"))
    p.add_argument("--images", default=str(REPO_DATA / "images"))
    p.add_argument("--sentences", type=int, default=120, help="sentences of the corpus to use (default 120)")
    p.add_argument("--max-images", type=int, default=6, help="images to use (default 6)")
    p.add_argument("--models", default=",".join(m.short_name for m in DEMO_MODELS),
                   help="comma-separated subset of minilm,dinov2-small,smollm2")
    p.add_argument("--methods", help="override the projection methods of every model (e.g. pca)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--no-serve", action="store_true", help="build the atlas and stop")
    p.set_defaults(func=run)


def _image_subset(folder: str, n: int) -> list[str]:
    from attnatlas.inputs.images import IMAGE_EXTENSIONS

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    photos = [p for p in files if p.name.startswith("photo_")]
    synthetic = [p for p in files if not p.name.startswith("photo_")]

    def spread(items: list[Path], k: int) -> list[Path]:  # evenly spaced, so the picks vary
        return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)] if k and items else []

    # Half photos, half synthetic colour fields and shapes: both object and colour heads show up.
    take = spread(photos, min(len(photos), (n + 1) // 2)) + spread(synthetic, min(len(synthetic), n // 2))
    return [str(p) for p in take[:n]]


def build_demo_atlas(args: argparse.Namespace) -> Path:
    from attnatlas.errors import SettingsChanged
    from attnatlas.extract import ExtractOptions, extract, load_model
    from attnatlas.extract.extractor import hash_images, hash_texts
    from attnatlas.inputs import load_images, load_texts
    from attnatlas.project import project_model
    from attnatlas.store import Atlas

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {m.short_name: m for m in DEMO_MODELS}
    unknown = [m for m in wanted if m not in known]
    if unknown:
        from attnatlas.errors import InputError

        raise InputError(f"Unknown demo model(s) {', '.join(unknown)}; choose from {', '.join(known)}.")
    texts = [r.text for r in load_texts(args.texts)][: args.sentences]
    images = _image_subset(args.images, args.max_images)
    atlas = Atlas.open(args.atlas, create=True)
    started = time.perf_counter()
    for spec in (known[m] for m in wanted):
        t = time.perf_counter()
        if spec.modality == "text":
            inputs, digest = {"texts": texts}, hash_texts(load_texts(texts))
        else:
            inputs, digest = {"images": images}, hash_images(load_images(images))
        have = spec.short_name in atlas.models and atlas.info(spec.short_name).attrs.get("input_hash") == digest
        if have:
            print(f"[demo] {spec.short_name}: already extracted, reusing it")
        else:
            print(f"[demo] {spec.short_name}: extracting {len(next(iter(inputs.values())))} {spec.modality} inputs")
            loaded = load_model(spec.short_name)
            extract(atlas.path, loaded, name=spec.short_name, overwrite=True,
                    options=ExtractOptions(hidden_states=spec.hidden_states, attention_topk=8), **inputs)
            print(f"[demo] {spec.short_name}: extracted in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        try:
            summary = project_model(atlas, spec.short_name, methods=args.methods or spec.methods,
                                    workers=args.workers, progress=True)
        except SettingsChanged:  # made by an older attnatlas: the demo's own atlas is simply made again
            print(f"[demo] {spec.short_name}: layouts made with older settings; making them again")
            summary = project_model(atlas, spec.short_name, methods=args.methods or spec.methods,
                                    workers=args.workers, progress=True, force=True)
        failed = summary.get("failed") or []
        print(f"[demo] {spec.short_name}: {summary['done']} layouts made, {summary['skipped']} reused, "
              f"{len(failed)} failed, in {time.perf_counter() - t:.0f} s")
    _analyses(atlas, wanted)
    print(f"[demo] atlas ready at {atlas.path} after {time.perf_counter() - started:.0f} s")
    return atlas.path


def _analyses(atlas, models: list[str]) -> None:
    """Fill the dashboard's Compare, Rollout, Layer embeddings and Neurons tabs (each skipped when stored)."""
    from attnatlas.analyze.embeddings import compute_embeddings
    from attnatlas.analyze.neurons import compute_neurons
    from attnatlas.analyze.rollout import compute_rollout
    from attnatlas.compare.run import compare_models

    t = time.perf_counter()
    if {"minilm", "smollm2"} <= set(models) and not atlas.has_table("minilm", "nearest__smollm2"):
        compare_models(atlas, ["minilm", "smollm2"], layout_method="pca")
        print(f"[demo] compared minilm and smollm2 in {time.perf_counter() - t:.0f} s")
    from attnatlas.analyze.head_types import compute_head_scores

    for m in models:  # head types in every view (kept when stored with the same settings)
        t = time.perf_counter()
        res = compute_head_scores(atlas, m)
        if not res.skipped:
            print(f"[demo] {m}: head types in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    if "dinov2-small" in models and not atlas.has_table("dinov2-small", "rollout"):
        compute_rollout(atlas, "dinov2-small")
        print(f"[demo] attention rollout of dinov2-small in {time.perf_counter() - t:.0f} s")
    for spec in DEMO_MODELS:
        if spec.short_name not in models or not spec.hidden_states:
            continue
        t = time.perf_counter()
        if not atlas.has_table(spec.short_name, "embedding_quality"):
            compute_embeddings(atlas, spec.short_name, "pca", 3000)
        if not atlas.has_table(spec.short_name, "neuron_labels"):
            compute_neurons(atlas, spec.short_name)
        print(f"[demo] {spec.short_name}: layer embeddings and neuron labels in {time.perf_counter() - t:.0f} s")


def run(args: argparse.Namespace) -> int:
    path = build_demo_atlas(args)
    if args.no_serve:
        return 0
    from attnatlas.cli.serve import make_server

    server, port = make_server(str(path), args.port, "127.0.0.1")
    server.start()
    print(f"[demo] dashboard: http://localhost:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    return 0
