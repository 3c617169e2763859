"""Fakes for tests and benchmarks: synthetic atlases written through the real store (no torch)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd

from attnatlas.project.reducers import PCAReducer, register_reducer
from attnatlas.store import ArraySpec, Atlas, tokens_per_chunk

WORDS = ["the", "cat", "sat", "on", "a", "mat", ",", ".", "42", "##ing", "bank", "river", "?", "run", "<b>x</b>"]


def synthetic_tokens(n_seq: int, seq_len: int, rng: np.random.Generator,
                     lengths: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A token table and sequence table shaped like a text extraction (with [CLS]/[SEP]); every sequence
    has `seq_len` tokens, or `lengths[s]`."""
    rows, seqs = [], []
    for s in range(n_seq):
        n = lengths[s] if lengths is not None else seq_len
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), n - 2)]
        pieces = ["[CLS]", *words, "[SEP]"]
        text = " ".join(words)
        offset = 0
        for p, tok in enumerate(pieces):
            special = tok in ("[CLS]", "[SEP]")
            start = -1 if special else text.find(tok.lstrip("#"), offset)
            end = -1 if special else start + len(tok.lstrip("#"))
            if not special:
                offset = end
            rows.append(
                dict(sequence=s, position=p, token=tok, token_id=hash(tok) % 30000, is_special=special,
                     char_start=start, char_end=end, word=-1 if special else p - 1, source=f"synthetic:{s + 1}")
            )
        seqs.append(dict(sequence=s, source=f"synthetic:{s + 1}", text=text, n_tokens=len(pieces)))
    return pd.DataFrame(rows), pd.DataFrame(seqs)


def write_synthetic_model(
    atlas: Atlas,
    name: str = "synthetic",
    n_layers: int = 2,
    n_heads: int = 3,
    n_kv_heads: int | None = None,
    n_seq: int = 20,
    seq_len: int = 12,
    d_head: int = 8,
    topk: int = 4,
    seed: int = 0,
    nonfinite_head: tuple[int, int] | None = None,
    lengths: list[int] | None = None,
    attrs: dict | None = None,
    shape_vectors: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Random clustered q/k for a small text model, with causal top-k attention, stored in `atlas`.
    `shape_vectors(q, k)` may edit the (layer, head, token, d) arrays in place first (awkward head data).
    Sequences have `seq_len` tokens each, or `lengths[s]`; `attrs` go into the model's attrs as given (e.g. an
    `attention` recipe with a window or bias: only what is recorded changes, not the stored top-k)."""
    rng = np.random.default_rng(seed)
    n_kv = n_kv_heads or n_heads
    lengths = list(lengths) if lengths is not None else [seq_len] * n_seq
    tokens, seqs = synthetic_tokens(n_seq, seq_len, rng, lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    T = len(tokens)
    centres = rng.normal(size=(6, d_head)) * 1.5
    lab = rng.integers(0, 6, T)
    pos = tokens["position"].to_numpy()
    q = (centres[lab][None, None] + rng.normal(size=(n_layers, n_heads, T, d_head))).astype(np.float32)
    q[..., 0] += pos / np.repeat(lengths, lengths) * 4
    k = (centres[lab][None, None] * 0.7 + 2 + rng.normal(size=(n_layers, n_kv, T, d_head))).astype(np.float32)
    if nonfinite_head is not None:
        q[nonfinite_head[0], nonfinite_head[1], 0, 0] = np.nan
    if shape_vectors is not None:
        shape_vectors(q, k)
    # Top-k attention within each sequence, causal, from these very vectors.
    idx = np.full((n_layers, n_heads, T, topk), -1, dtype=np.int32)
    w = np.zeros((n_layers, n_heads, T, topk), dtype=np.float16)
    group = n_heads // n_kv
    for s in range(n_seq):
        r = np.arange(starts[s], starts[s + 1])
        for L in range(n_layers):
            for h in range(n_heads):
                logits = q[L, h, r] @ k[L, h // group, r].T / np.sqrt(d_head)
                logits = np.where(np.tri(len(r), dtype=bool), logits, -np.inf)
                logits = np.nan_to_num(logits, nan=0.0, neginf=-1e9)
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                order = np.argsort(-p, axis=1)[:, :topk]
                top = np.take_along_axis(p, order, 1)
                idx[L, h, r] = np.where(top > 0, r[order], -1)
                w[L, h, r] = top
    tc = tokens_per_chunk(d_head)
    specs = {
        "queries": ArraySpec((n_layers, n_heads, T, d_head), "float16", 2, (1, 1, tc, d_head)),
        "keys": ArraySpec((n_layers, n_kv, T, d_head), "float16", 2, (1, 1, tc, d_head)),
        "attn_topk_index": ArraySpec((n_layers, n_heads, T, topk), "int32", 2, (1, 1, tc, topk), compress=True),
        "attn_topk_weight": ArraySpec((n_layers, n_heads, T, topk), "float16", 2, (1, 1, tc, topk), compress=True),
    }
    attrs = dict(
        model_id="synthetic", family="synthetic", modality="text", n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, d_head=d_head, causal=True, attention_topk=topk, dtype="float16",
        scaling=[1 / np.sqrt(d_head)] * n_layers,
    ) | (attrs or {})
    with atlas.model_writer(name, T, specs, attrs, overwrite=True) as writer:
        for s0 in range(0, n_seq, 5):  # five sequences per append, like extraction's batches
            s1 = min(n_seq, s0 + 5)
            a, b = int(starts[s0]), int(starts[s1])
            block = {"queries": q[:, :, a:b], "keys": k[:, :, a:b], "attn_topk_index": idx[:, :, a:b], "attn_topk_weight": w[:, :, a:b]}
            writer.append(block, tokens.iloc[a:b], seqs[(seqs.sequence >= s0) & (seqs.sequence < s1)])
        writer.commit(overwrite=True)


def synthetic_atlas(path: str | os.PathLike, **kwargs) -> Atlas:
    """Create an atlas at `path` holding one synthetic model (see `write_synthetic_model`)."""
    atlas = Atlas.open(path, create=True)
    write_synthetic_model(atlas, **kwargs)
    return atlas


def random_layouts(atlas: Atlas, model: str, method: str = "pca", seed: int = 0) -> None:
    """Fill every head of `model` with a quick PCA-free random layout, for app tests that need one."""
    rng = np.random.default_rng(seed)
    info = atlas.info(model)
    rows = np.arange(len(atlas.tokens(model)))
    writer = atlas.layout_writer(model, method, rows, {"method": method, "fake": True})
    for L in range(info.n_layers):
        for h in range(info.n_heads):
            xy = rng.normal(size=(2 * len(rows), 2)).astype(np.float32)
            writer.write_head(L, h, xy, {"trustworthiness": 0.9, "knn_kept": 0.3, "seconds": 0.0, "points": 2 * len(rows)})


def write_synthetic_image_model(
    atlas: Atlas,
    name: str = "synthetic-vit",
    n_images: int = 3,
    grid: int = 4,
    patch: int = 4,
    n_layers: int = 2,
    n_heads: int = 3,
    d_head: int = 8,
    topk: int = 4,
    seed: int = 0,
    file_names: list[str] | None = None,
) -> None:
    """A small ViT-shaped model ([CLS] + grid x grid patches per image) with an `images` array."""
    import colorsys

    import zarr

    rng = np.random.default_rng(seed)
    size = grid * patch
    images = rng.integers(0, 256, size=(n_images, size, size, 3), dtype=np.uint8)
    rows, seqs = [], []
    for s in range(n_images):
        for p in range(grid * grid + 1):
            r, c = divmod(p - 1, grid) if p else (-1, -1)
            px = images[s, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] if p else images[s]
            mr, mg, mb = (px.reshape(-1, 3).mean(0) / 255).tolist()
            h, sat, v = colorsys.rgb_to_hsv(mr, mg, mb)
            rows.append(dict(sequence=s, position=p, token=f"patch {r},{c}" if p else "[CLS]", is_special=p == 0,
                             token_kind="patch" if p else "cls", patch_row=r, patch_col=c, mean_r=mr, mean_g=mg,
                             mean_b=mb, hue=h, saturation=sat, brightness=v))
        seqs.append(dict(sequence=s, source=f"synthetic-image:{s}", text=file_names[s] if file_names else f"image{s}.png",
                         n_tokens=grid * grid + 1,
                         grid_rows=grid, grid_cols=grid, image_size=size))
    tokens, seq_df = pd.DataFrame(rows), pd.DataFrame(seqs)
    T, n = len(tokens), grid * grid + 1
    q = rng.normal(size=(n_layers, n_heads, T, d_head)).astype(np.float32)
    k = (rng.normal(size=(n_layers, n_heads, T, d_head)) + 1).astype(np.float32)
    idx = np.full((n_layers, n_heads, T, topk), -1, dtype=np.int32)
    w = np.zeros((n_layers, n_heads, T, topk), dtype=np.float16)
    for s in range(n_images):
        r = np.arange(s * n, (s + 1) * n)
        for L in range(n_layers):
            for h in range(n_heads):
                logits = q[L, h, r] @ k[L, h, r].T / np.sqrt(d_head)
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                order = np.argsort(-p, axis=1)[:, :topk]
                idx[L, h, r] = r[order]
                w[L, h, r] = np.take_along_axis(p, order, 1)
    tc = tokens_per_chunk(d_head)
    specs = {
        "queries": ArraySpec((n_layers, n_heads, T, d_head), "float16", 2, (1, 1, tc, d_head)),
        "keys": ArraySpec((n_layers, n_heads, T, d_head), "float16", 2, (1, 1, tc, d_head)),
        "attn_topk_index": ArraySpec((n_layers, n_heads, T, topk), "int32", 2, (1, 1, tc, topk), compress=True),
        "attn_topk_weight": ArraySpec((n_layers, n_heads, T, topk), "float16", 2, (1, 1, tc, topk), compress=True),
    }
    attrs = dict(model_id="synthetic-vit", family="synthetic", modality="image", n_layers=n_layers, n_heads=n_heads,
                 n_kv_heads=n_heads, d_head=d_head, causal=False, attention_topk=topk, dtype="float16", patch_size=patch)
    with atlas.model_writer(name, T, specs, attrs, overwrite=True) as writer:
        writer.append({"queries": q, "keys": k, "attn_topk_index": idx, "attn_topk_weight": w}, tokens, seq_df)
        writer.commit(overwrite=True)
    # The writer streams along the token axis; images have none, so they go in beside the committed model.
    zarr.open_group(str(atlas.path / "models" / name), mode="r+").create_array("images", data=images)


@contextlib.contextmanager
def local_s3(bucket: str = "atlases") -> Iterator[str]:
    """A local S3 endpoint (moto's server, on 127.0.0.1) with one empty bucket; yields "s3://BUCKET".
    Endpoint and dummy credentials go into os.environ for the duration, so s3fs in this process and
    in worker processes started meanwhile (Dask, spawn) reach it. Needs moto[server] and s3fs."""
    import socket
    import subprocess
    import sys
    import time
    from unittest.mock import patch

    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the local S3 server (moto) did not start") from None
                time.sleep(0.1)
        # fsspec caches filesystem instances by their options, not by the endpoint in the environment: one made
        # for an earlier local server would still point at that server's (closed) port.
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        with patch.dict(os.environ, env):
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
            yield f"s3://{bucket}"
    finally:
        server.kill()
        server.wait()
        fsspec.get_filesystem_class("s3").clear_instance_cache()


def dashboard_for(data, **args):
    """(dashboard, document) of a fresh session on `data` (an AppData), with URL arguments `args`, no browser."""
    from bokeh.document import Document

    from attnatlas.app.dashboard import build_document

    doc = Document()
    return build_document(doc, data, {k: [str(v).encode()] for k, v in args.items()}), doc



@register_reducer
class CrashingReducer(PCAReducer):
    """PCA that dies the native way in the first call to claim `claim_file` (so exactly one head of a run):
    "segv" (a real segmentation fault), "abort", "kill" (as the OOM killer does) or "hang". Its retry on the
    safe backend works, unless `crash_safe`."""

    name = "crashing"
    defaults = {"how": "segv", "claim_file": "", "crash_safe": False}

    @property
    def batched(self) -> bool:
        return False

    def fit_transform(self, X, init=None, knn=None):
        import ctypes
        import signal
        import time

        o = self.options
        try:
            first = os.open(o["claim_file"], os.O_CREAT | os.O_EXCL | os.O_WRONLY) >= 0
        except FileExistsError:
            first = False
        if first or (self.safe and o["crash_safe"]):
            if o["how"] == "segv":
                ctypes.string_at(0)
            elif o["how"] == "abort":
                os.abort()
            elif o["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                time.sleep(3600)
        return super().fit_transform(X, init, knn)
