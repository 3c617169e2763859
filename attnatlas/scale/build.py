"""`attnatlas build CONFIG.toml`: extract every model over every corpus, then project every head.

Resumable and idempotent:
- extraction of MODEL.CORPUS is skipped when the atlas already holds it with the same model id,
  corpus hash and storage options (an interrupted extraction leaves nothing visible, so it reruns);
- projection skips heads whose layout is already written (`project_model` reads the quality array),
  so a rerun after a crash or a lost worker continues where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from attnatlas.errors import InputError
from attnatlas.scale.config import BuildConfig, Corpus, ModelSpec

STAGES = ("extract", "project")
CPU_BATCH, GPU_BATCH = 16, 64


@dataclass
class Compute:
    device: str  # resolved: cpu | cuda | mps
    precision: str
    batch_size: int


def choose_compute(device: str, precision: str, batch_size: int | str) -> Compute:
    """Resolve 'auto': CUDA if present, then bfloat16 (or float16) autocast and larger batches;
    on CPU float32 (autocast on CPU is slower here and only changes the stored values)."""
    import torch

    from attnatlas.extract.device import resolve_device

    dev = resolve_device(device).type
    if precision == "auto":
        precision = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if dev == "cuda" else "float32"
    if batch_size == "auto":
        batch_size = GPU_BATCH if dev == "cuda" else CPU_BATCH
    return Compute(dev, precision, int(batch_size))


def reducer_backends(methods: list[str], device: str = "auto") -> dict[str, str]:
    """Which backend each method will use here with `device` (project's --device)."""
    from attnatlas.project.jobs import options_on, project_device
    from attnatlas.project.reducers import get_reducer

    dev = project_device(device)
    return {m: get_reducer(m, **options_on(m, {}, dev)).backend() for m in methods}


def _records(corpus: Corpus) -> tuple[str, int]:
    """(input hash, number of sequences), computed exactly as extract() does."""
    from attnatlas.extract.extractor import hash_images, hash_texts
    from attnatlas.inputs import load_images, load_texts

    if corpus.texts is not None:
        recs = load_texts(corpus.texts, column=corpus.column)
        return hash_texts(recs), len(recs)
    imgs = load_images(corpus.images)
    return hash_images(imgs), len(imgs)


def _is_current(atlas: Any, name: str, spec: ModelSpec, input_hash: str, cfg: BuildConfig) -> bool:
    if name not in atlas.models:
        return False
    a = atlas.info(name).attrs
    want = {"model_id": spec.model_id, "input_hash": input_hash, "dtype": cfg.dtype, "attention_topk": cfg.attention_topk}
    if cfg.max_tokens:
        want["max_tokens"] = cfg.max_tokens
    return all(a.get(k) == v for k, v in want.items())


@contextlib.contextmanager
def _client(cfg: BuildConfig, scheduler: str) -> Iterator[Any]:
    if scheduler == "none":
        yield None
        return
    from attnatlas.scale.distributed import dask_client

    with dask_client(scheduler, cfg.workers, cfg.threads_per_worker, timeout=cfg.connect_timeout) as client:
        yield client


def run_build(cfg: BuildConfig, stages: tuple[str, ...] = STAGES, scheduler: str | None = None,
              force: bool = False, progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the configured build; returns {'extract': {name: stats}, 'project': {name: summary}}."""
    from attnatlas.store import Atlas

    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError(f"Unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}.")
    scheduler = scheduler or cfg.scheduler
    atlas = Atlas.open(cfg.atlas, create=True)
    report: dict[str, Any] = {"extract": {}, "project": {}}
    if "extract" in stages:
        report["extract"] = _extract_all(cfg, atlas, progress, say)
    if "project" in stages:
        missing = [n for _, _, n in cfg.jobs() if n not in atlas.models]
        if missing:
            raise InputError(f"{missing[0]} is not in the atlas {cfg.atlas} yet; run the extract stage first.")
        with _client(cfg, scheduler) as client:
            where = ("this process" if cfg.workers == 1 else f"{cfg.workers} local processes") if client is None else \
                f"Dask {scheduler} ({len(client.scheduler_info().get('workers', {}))} workers)"
            for spec, _, name in cfg.jobs():
                report["project"][name] = _project_one(cfg, atlas, spec, name, client, where, force, progress, say)
    return report


def _extract_all(cfg: BuildConfig, atlas: Any, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from attnatlas.extract import ExtractOptions, extract, load_model

    out: dict[str, Any] = {}
    for spec in cfg.models:
        loaded, comp = None, None
        for c in spec.corpora:
            corpus, name = cfg.corpora[c], f"{spec.key}.{c}"
            input_hash, n_seq = _records(corpus)
            if _is_current(atlas, name, spec, input_hash, cfg):
                say(f"extract {name}: kept (same model, corpus and options already in the atlas)")
                out[name] = {"kept": True}
                continue
            if loaded is None:
                comp = choose_compute(cfg.device, spec.precision, spec.batch_size)
                t = time.perf_counter()
                loaded = load_model(spec.model_id, comp.device)
                say(f"load {spec.model_id} on {comp.device} in {time.perf_counter() - t:.1f} s")
            assert comp is not None
            opts = ExtractOptions(dtype=cfg.dtype, batch_size=comp.batch_size, max_tokens=cfg.max_tokens or None,
                                  attention_topk=cfg.attention_topk, device=comp.device, precision=comp.precision,
                                  progress=progress)
            replacing = name in atlas.models
            t = time.perf_counter()
            extract(atlas.path, loaded, texts=corpus.texts, images=corpus.images, name=name, options=opts,
                    overwrite=replacing, text_column=corpus.column)
            secs = time.perf_counter() - t
            n_tok = len(atlas.tokens(name))
            out[name] = {"kept": False, "sequences": n_seq, "tokens": n_tok, "seconds": secs,
                         "tokens_per_s": n_tok / secs if secs > 0 else 0.0, **vars(comp)}
            say(f"extract {name}: {n_seq} sequences, {n_tok} tokens in {secs:.1f} s ({n_tok / secs:,.0f} tokens/s) on "
                f"{comp.device}, {comp.precision}, batch {comp.batch_size}{' (replaced an older extraction)' if replacing else ''}")
        del loaded  # frees the model (and GPU memory) before the next one loads
    return out


def _project_one(cfg: BuildConfig, atlas: Any, spec: ModelSpec, name: str, client: Any, where: str, force: bool,
                 progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from attnatlas.project.runner import MAX_POINTS, project_model

    kw = dict(methods=spec.methods, metric=cfg.metric, seed=cfg.seed, force=force,
              max_points=cfg.max_points or MAX_POINTS, progress=progress,
              device=cfg.device if cfg.device in ("auto", "cpu", "cuda") else "cpu")  # mps: the CPU reducers
    if client is None:
        s = project_model(atlas, name, workers=cfg.workers, **kw)
    else:
        from attnatlas.scale.distributed import project_distributed

        s = project_distributed(client, atlas, name, **kw)
    backends = ", ".join(f"{m}: {b}" for m, b in s["backends"].items()) + f" (reducers on {s['device']})"
    say(f"project {name}: {s['done']} layouts made, {s['skipped']} already done, {len(s['failed'])} failed; "
        f"{s['heads_done']} heads in {s['seconds']:.1f} s ({s['heads_per_min']:.1f} heads/min) on {where}; "
        f"{s['points']} points per head{' (sampled, cap ' + str(kw['max_points']) + ')' if s['sampled'] else ''}; {backends}")
    for L, h, m, msg in s["failed"]:
        say(f"  L{L}H{h} {'all methods' if m == '*' else m} failed: {msg}")
    return s
