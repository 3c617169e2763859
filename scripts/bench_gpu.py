"""Extraction on a GPU box against the plain forward pass, for random-weight models of real sizes.

For a BERT-base-size model (12 layers x 12 heads, d_model 768) and a 1B-Llama-size one (16 layers x 32 query
heads, 8 key/value heads, d_model 2048), both built in code with random weights and real tokenizers, over
corpora of about 10k and 100k+ tokens (paragraphs made from data/corpus/demo.txt, max 256 tokens a sequence),
it measures in the same run: the plain forward pass and extraction with default options (top-k 8, float16
storage; bfloat16 autocast on CUDA), their ratio, peak GPU and host memory, the write bandwidth reached against
the disk's own, and the exactness of attention recomputed from the atlas against the model's eager float32
attention (max abs difference, every head of the first, middle and last layers of a few sequences). Results are
printed and written as JSON to --out.

    python scripts/bench_gpu.py --tiny --out /tmp/gpu.json               # CPU, small models, under a minute
    python scripts/bench_gpu.py --save-tokenizers /tmp/toks               # here: the tokenizer folders to carry
    python scripts/bench_gpu.py --device cuda --tokenizer-dir /tmp/toks --out gpu.json   # on the GPU box

Nothing downloads: tokenizers come from --tokenizer-dir (folders "bert" and "llama", as --save-tokenizers
writes them) or from the offline weight packages (MiniLM's BERT vocabulary, SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = {"bert": "minilm", "llama": "smollm2"}  # tokenizer folder -> offline model that ships it


def fail(message: str) -> None:
    print(f"bench_gpu: {message}", file=sys.stderr)
    sys.exit(2)


# ---- inputs ------------------------------------------------------------------------------------------------

def load_tokenizers(folder: str | None, names: list[str]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = {}
    for name in names:
        if folder:
            path = Path(folder) / name
            if not (path / "tokenizer_config.json").is_file():
                fail(f"--tokenizer-dir {folder} has no tokenizer folder {name!r} (write one with --save-tokenizers).")
        else:
            from attnatlas.extract.offline import prepare_offline_model

            path = prepare_offline_model(TOKENIZERS[name], log=lambda msg: print(msg, file=sys.stderr))
        out[name] = AutoTokenizer.from_pretrained(str(path))
    return out


def paragraphs(tok: Any, tokens: int, max_len: int, seed: int = 0) -> list[str]:
    """Paragraphs of 2-14 demo-corpus sentences in a seeded random order, until they hold `tokens` tokens
    (each counted at most `max_len`, as extraction truncates)."""
    sentences = [line.strip() for line in (ROOT / "data" / "corpus" / "demo.txt").read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    out, total = [], 0
    while total < tokens:
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(2, 14)))
        out.append(text)
        total += min(len(tok(text)["input_ids"]), max_len)
    return out


def build_model(kind: str, tok: Any, tiny: bool) -> Any:
    """A random-weight model of the named size, built from its config (nothing loads)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    vocab = len(tok)
    if kind == "bert":
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else \
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        config = tf.BertConfig(vocab_size=vocab, max_position_embeddings=512, **size)
        model = tf.BertModel(config, add_pooling_layer=False)
    else:
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128) if tiny else \
            dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192)
        config = tf.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, rope_theta=500000.0,
                                tie_word_embeddings=True, **size)
        model = tf.LlamaModel(config)
    model.config._attn_implementation = "sdpa"
    return model


# ---- measuring ---------------------------------------------------------------------------------------------

@contextmanager
def peaks(device: Any, into: dict[str, Any]):
    """Peak host RSS (sampled every 10 ms) and peak GPU memory allocated by torch, in MiB, over the block."""
    import torch
    from bench_extract import rss_peak  # this folder is on sys.path when a script runs

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss: dict[str, float] = {}
    try:
        with rss_peak(rss):
            yield
    finally:
        into["host_rss_before_mib"] = round(rss["before"], 1)
        into["host_rss_peak_mib"] = round(rss["peak"], 1)
        if device.type == "cuda":
            into["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeoutError in the main thread after `seconds` (extraction then aborts and removes what it wrote)."""
    def alarm(signum, frame):
        raise TimeoutError(f"{what} ran past its {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_forward(loaded: Any, texts: list[str], batch_size: int, max_len: int, precision: str, device: Any) -> float:
    """Seconds for the model alone over the same batches, inputs moved as extraction moves them."""
    import torch

    from attnatlas.extract.device import autocast, to_device

    tok = loaded.preprocessor
    sync(device)
    t = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        enc = {k: to_device(v, device) for k, v in enc.items()}
        with torch.inference_mode(), autocast(device, precision):
            loaded.model(**enc)
    sync(device)
    return time.perf_counter() - t


def disk_bandwidth(folder: Path, mib: int) -> float:
    """MiB/s of writing `mib` MiB in 8 MiB blocks and fsync-ing them (as `dd conv=fsync` would)."""
    path = folder / "bandwidth.probe"
    block = os.urandom(8 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t = time.perf_counter()
        for _ in range(max(1, mib // 8)):
            os.write(fd, block)
        os.fsync(fd)
        seconds = time.perf_counter() - t
    finally:
        os.close(fd)
        path.unlink()
    return max(1, mib // 8) * 8 / seconds


def exactness(atlas_path: Path, name: str, loaded: Any, texts: list[str], sequences: int = 3) -> dict[str, Any]:
    """Max abs difference between attention recomputed from the atlas and the model's own eager attention in
    float32, one sequence at a time (no padding), every head of the first, middle and last layers."""
    import numpy as np
    import torch

    from attnatlas import attention_from_atlas
    from attnatlas.store import open_atlas

    atlas = open_atlas(atlas_path)
    model, tok = loaded.model, loaded.preprocessor
    info = atlas.info(name)
    layers = sorted({0, info.n_layers // 2, info.n_layers - 1})
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    worst = 0.0
    try:
        for s in range(min(sequences, len(texts))):
            enc = tok(texts[s], truncation=True, max_length=int(atlas.group(name).attrs["max_tokens"]), return_tensors="pt")
            with torch.inference_mode():
                ref = model(**{k: v.to(model.device) for k, v in enc.items()}, output_attentions=True).attentions
            for layer in layers:
                want = ref[layer][0].float().cpu().numpy()
                for head in range(info.n_heads):
                    got = attention_from_atlas(atlas, name, layer, head, s)
                    worst = max(worst, float(np.abs(got - want[head]).max()))
    finally:
        model.set_attn_implementation(previous)
    return {"max_abs_diff": worst, "sequences": min(sequences, len(texts)), "layers": layers, "heads": info.n_heads}


def bytes_stored(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---- projection and placement: the lead's section -----------------------------------------------------------

def projection(atlas_path: Path, name: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """`project_model` on `device` (t-SNE and UMAP batched per layer there), then today's CPU default (library
    backends, one worker per core) over the same heads: seconds, backends, and per method the trustworthiness
    gap of the device layouts against the CPU's, on every head (mean, worst, heads more than 0.01 behind)."""
    if not args.project:
        return {"skipped": "no --project methods given"}
    import numpy as np

    from attnatlas.project import project_model
    from attnatlas.store import open_atlas

    methods = args.project.split(",")
    atlas = open_atlas(atlas_path)
    out: dict[str, Any] = {"methods": methods}
    quality: dict[str, dict[str, Any]] = {}  # device -> method -> trustworthiness per head
    for dev in dict.fromkeys([str(device), "cpu"]):
        part: dict[str, Any] = {}
        with peaks(device, part), time_limit(args.part_limit_s, f"projection on {dev}"):
            t = time.perf_counter()
            s = project_model(atlas, name, methods=methods, device=dev, force=True, progress=False,
                              workers=1 if dev == "cuda" else (os.cpu_count() or 1))
            sync(device)
            part["seconds"] = round(time.perf_counter() - t, 2)
        part.update(backends=s["backends"], done=s["done"], failed=len(s["failed"]), points=s["points"],
                    placed_points=s["placed_points"])
        quality[dev] = {m: atlas.layout_quality(name, m).set_index(["layer", "head"])["trustworthiness"] for m in methods}
        out[dev] = part
    if "cuda" in quality:
        out["trust_gap_cpu_minus_cuda"] = {}
        for m in methods:
            gap = (quality["cpu"][m] - quality["cuda"][m]).dropna().to_numpy()  # heads both devices laid out
            out["trust_gap_cpu_minus_cuda"][m] = {
                "mean": round(float(np.mean(gap)), 4) if len(gap) else None,
                "worst": round(float(np.max(gap)), 4) if len(gap) else None,
                "heads_over_0.01": int(np.sum(gap > 0.01)), "heads": len(gap)}
    return out


# ---- one workload ------------------------------------------------------------------------------------------

def workload(kind: str, loaded: Any, tokens: int, args: argparse.Namespace, device: Any, work: Path) -> dict[str, Any]:
    from attnatlas.extract import ExtractOptions, extract

    res: dict[str, Any] = {"model": kind, "target_tokens": tokens}
    tok = loaded.preprocessor
    texts = paragraphs(tok, tokens, args.max_tokens)
    a = loaded.adapter
    res.update(sequences=len(texts), layers=a.n_layers, heads=a.n_heads, kv_heads=a.n_kv_heads, d_head=a.d_head,
               parameters=sum(p.numel() for p in loaded.model.parameters()))
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    res["precision"] = precision
    plain_forward(loaded, texts[: args.batch_size * 2], args.batch_size, args.max_tokens, precision, device)  # warm-up
    with time_limit(args.part_limit_s, "plain forward"):
        plain = [plain_forward(loaded, texts, args.batch_size, args.max_tokens, precision, device)]
    opts = ExtractOptions(batch_size=args.batch_size, max_tokens=args.max_tokens, precision=precision,
                          device=str(device), progress=False)
    atlas_path = work / f"atlas-{kind}-{tokens}"
    ext: dict[str, Any] = {}
    with peaks(device, ext), time_limit(args.part_limit_s, "extraction"):
        t = time.perf_counter()
        name = extract(atlas_path, loaded, texts=texts, options=opts)
        sync(device)
        seconds = time.perf_counter() - t
    with time_limit(args.part_limit_s, "plain forward"):  # once more after: a drifting machine favours neither
        plain.append(plain_forward(loaded, texts, args.batch_size, args.max_tokens, precision, device))
    from attnatlas.store import open_atlas

    n_tokens = len(open_atlas(atlas_path).tokens(name))
    stored = bytes_stored(atlas_path)
    forward = statistics.median(plain)
    res.update(tokens=n_tokens, forward_s=[round(x, 3) for x in plain], extract_s=round(seconds, 3),
               ratio=round(seconds / forward, 3), tokens_per_s=round(n_tokens / seconds), stored_mib=round(stored / 2**20, 1),
               write_mib_per_s=round(stored / 2**20 / seconds, 1), extract_memory=ext)
    with time_limit(args.part_limit_s, "exactness"):
        res["exactness"] = exactness(atlas_path, name, loaded, texts, sequences=2 if not args.tiny else 3)
    res["projection"] = projection(atlas_path, name, args, device)
    shutil.rmtree(atlas_path, ignore_errors=True)
    return res


def show(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['model']:>5} {r['target_tokens']:>7} tokens: {r['error']}", flush=True)
        return
    m = r["extract_memory"]
    gpu = f", GPU peak {m['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in m else ""
    print(f"{r['model']:>5} {r['tokens']:>7} tokens ({r['sequences']} seqs, {r['layers']}x{r['heads']} heads, "
          f"{r['parameters'] / 1e6:.0f}M params, {r['precision']}): forward {min(r['forward_s']):.2f} s "
          f"(runs {r['forward_s']}), extract {r['extract_s']:.2f} s = {r['ratio']:.2f}x, {r['tokens_per_s']} tokens/s, "
          f"{r['stored_mib']:.0f} MiB at {r['write_mib_per_s']:.0f} MiB/s; host RSS {m['host_rss_before_mib']:.0f} -> "
          f"{m['host_rss_peak_mib']:.0f} MiB{gpu}; attention vs eager float32: max abs diff "
          f"{r['exactness']['max_abs_diff']:.2e}; projection: {r['projection']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--tiny", action="store_true", help="small models and a few hundred tokens (a CPU check)")
    ap.add_argument("--models", default="bert,llama")
    ap.add_argument("--tokens", default=None, help="comma-separated corpus sizes (default 10000,100000; --tiny 600)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 (--tiny: 4, so several batches)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--precision", default=None, help="compute precision (default bfloat16 on CUDA, else float32)")
    ap.add_argument("--tokenizer-dir", default=None, help="folders bert/ and llama/ written by --save-tokenizers")
    ap.add_argument("--save-tokenizers", default=None, metavar="DIR", help="write the tokenizer folders and stop")
    ap.add_argument("--project", default="", help="comma-separated methods for the projection section (lead)")
    ap.add_argument("--work-dir", default=None, help="where the atlases are written (default: a temp folder)")
    ap.add_argument("--disk-probe-mib", type=int, default=None, help="MiB written to measure the disk (default 1024; --tiny 16)")
    ap.add_argument("--part-limit-s", type=float, default=150, help="bound on each timed part")
    ap.add_argument("--budget-s", type=float, default=330, help="no new workload starts after this many seconds")
    ap.add_argument("--out", default=None, help="JSON results here too")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if any(m not in TOKENIZERS for m in models):
        fail(f"--models takes {', '.join(TOKENIZERS)}, not {args.models!r}.")
    if args.save_tokenizers:
        dest = Path(args.save_tokenizers)
        for name, tok in load_tokenizers(None, list(TOKENIZERS)).items():
            tok.save_pretrained(str(dest / name))
            print(f"wrote {dest / name}")
        return
    try:
        sizes = [int(x) for x in (args.tokens or ("600" if args.tiny else "10000,100000")).split(",")]
    except ValueError:
        fail(f"--tokens takes comma-separated numbers, not {args.tokens!r}.")
    if not sizes or min(sizes) < 1 or max(sizes) > 10_000_000:
        fail("--tokens: each corpus size must be 1 to 10,000,000 tokens.")
    args.batch_size = args.batch_size or (4 if args.tiny else 16)
    if not 1 <= args.batch_size <= 4096 or not 8 <= args.max_tokens <= 2048:
        fail("--batch-size must be 1 to 4096 and --max-tokens 8 to 2048.")
    import torch

    from attnatlas.errors import ModelError
    from attnatlas.extract.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ModelError as exc:
        fail(str(exc))
    if args.out and not Path(args.out).parent.is_dir():
        fail(f"--out {args.out}: its folder does not exist.")
    toks = load_tokenizers(args.tokenizer_dir, models)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="attnatlas-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "tiny": args.tiny, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
        "disk_mib_per_s": round(disk_bandwidth(work, args.disk_probe_mib or (16 if args.tiny else 1024)), 1),
        "runs": [],
    }
    print(f"device {report['device']}, torch {report['torch']}, {report['cpus']} CPUs; disk {report['disk_mib_per_s']:.0f} MiB/s "
          f"(written and fsync-ed in {work})", flush=True)
    from attnatlas.extract import prepare_model

    try:
        for kind in models:
            loaded = None
            for tokens in sizes:
                if time.perf_counter() - started > args.budget_s:
                    r = {"model": kind, "target_tokens": tokens, "error": f"skipped: past the {args.budget_s:.0f} s budget"}
                else:
                    try:
                        if loaded is None:  # built once per model, for every corpus size
                            t = time.perf_counter()
                            loaded = prepare_model(build_model(kind, toks[kind], args.tiny), toks[kind], f"random-{kind}",
                                                   device=device)
                            report[f"build_{kind}_s"] = round(time.perf_counter() - t, 1)
                        r = workload(kind, loaded, tokens, args, device, work)
                    except (TimeoutError, torch.cuda.OutOfMemoryError) as exc:
                        r = {"model": kind, "target_tokens": tokens, "error": f"{type(exc).__name__}: {exc}"}
                report["runs"].append(r)
                show(r)
            del loaded
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        report["seconds"] = round(time.perf_counter() - started, 1)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"total {report['seconds']} s" + (f"; JSON in {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
