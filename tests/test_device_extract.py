"""Extraction's device path: rows gathered per batch on the model's device, copied to pinned host memory on a
stream of its own and waited for one batch later, mask checks deferred to the device. On CPU the same gather and
copy code runs when forced (`HostCopies(copy=True)`); tests marked `gpu` run it on CUDA and check exactness."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from tiny_models import eager_attentions, save_image_model, save_text_model, write_images

import attnatlas.extract.batches as batches
from attnatlas import attention_from_atlas
from attnatlas.errors import ModelError
from attnatlas.extract import ExtractOptions, extract
from attnatlas.extract.capture import LayerCapture
from attnatlas.extract.recipe import Recipe
from attnatlas.store import open_atlas

TEXTS = ["the cat sat on a mat .", "anna said hello world !", "bank", "x = f ( y ) + 1",
         "the river bank ran dark and the money ran fast , said anna in london ?", "light", "1 2 3 42"]
ARRAYS = ("queries", "keys", "values", "attn_topk_index", "attn_topk_weight", "hidden")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _same_atlas(a, b, model: str = "m", tol: float = 0.0) -> None:
    for key in ARRAYS:
        if a.has_array(model, key):
            x, y = np.asarray(a.array(model, key)[:]), np.asarray(b.array(model, key)[:])
            assert x.shape == y.shape, key
            if tol and key != "attn_topk_index":
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=tol, err_msg=key)
            elif not tol:
                np.testing.assert_array_equal(x, y, err_msg=key)
    assert a.tokens(model).equals(b.tokens(model))


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_forced_device_copies_on_cpu_store_what_the_host_path_stores(tmp_path, monkeypatch, family):
    folder = save_text_model(family, tmp_path / "m")
    opts = ExtractOptions(batch_size=3, attention_topk=4, values=True, hidden_states=True, progress=False)
    extract(tmp_path / "host", str(folder), texts=TEXTS, options=opts)
    monkeypatch.setattr(batches, "HostCopies", functools.partial(batches.HostCopies, copy=True))
    extract(tmp_path / "copied", str(folder), texts=TEXTS, options=opts)
    _same_atlas(open_atlas(tmp_path / "host"), open_atlas(tmp_path / "copied"))


def test_forced_device_copies_on_cpu_for_images(tmp_path, monkeypatch):
    folder = save_image_model("vit", tmp_path / "m")
    images = write_images(tmp_path / "img", n=5)
    opts = ExtractOptions(batch_size=2, progress=False)
    extract(tmp_path / "host", str(folder), images=images, options=opts)
    monkeypatch.setattr(batches, "HostCopies", functools.partial(batches.HostCopies, copy=True))
    extract(tmp_path / "copied", str(folder), images=images, options=opts)
    _same_atlas(open_atlas(tmp_path / "host"), open_atlas(tmp_path / "copied"))


def test_topk_rows_are_global_key_rows_with_none_for_short_sequences(tmp_path):
    """Sequences shorter than K keys and causal early queries: the missing keys are -1 with weight 0, the others
    are token rows of the query's own sequence."""
    folder = save_text_model("gpt2", tmp_path / "m")
    extract(tmp_path / "a", str(folder), texts=TEXTS, options=ExtractOptions(batch_size=3, attention_topk=5,
                                                                               progress=False))
    atlas = open_atlas(tmp_path / "a")
    tokens = atlas.tokens("m")
    idx = np.asarray(atlas.array("m", "attn_topk_index")[:])
    w = np.asarray(atlas.array("m", "attn_topk_weight")[:])
    seq = tokens.sequence.to_numpy()
    pos = tokens.position.to_numpy()
    none = idx < 0
    assert (w[none] == 0).all() and (w[~none] > 0).all()
    row = np.broadcast_to(np.arange(len(tokens))[None, None, :, None], idx.shape)
    assert (seq[idx[~none]] == seq[row[~none]]).all()  # a key of the query's own sequence
    assert (idx[~none] <= row[~none]).all()  # causal: never a later token
    # A query at position p of a causal model has p + 1 keys: min(p + 1, K) of them are stored.
    assert ((~none).sum(-1) == np.minimum(pos + 1, 5)[None, None]).all()


def _cap(mask: torch.Tensor, n: int) -> LayerCapture:
    z = torch.zeros(1, 2, n, 4)
    return LayerCapture(z, z, z, mask, 0.5)


def test_a_mask_no_longer_than_one_read_is_checked_on_its_device_and_refused_at_the_end():
    def causal(n: int) -> torch.Tensor:
        return torch.ones(n, n, dtype=torch.bool).tril()[None, None]

    odd = causal(4).clone()
    odd[0, 0, 3, 1] = False  # a blocked key that is neither padding, causal nor a window
    valid = {n: torch.ones(1, n, dtype=torch.bool) for n in (4, 6)}
    deferred = Recipe("x", 1, True, [None], "causal", defer=True)
    deferred.observe({0: _cap(causal(6), 6)}, valid[6], image=False)  # read on the host
    deferred.observe({0: _cap(causal(4), 4)}, valid[4], image=False)
    deferred.finish()  # every deferred check held
    deferred.observe({0: _cap(odd, 4)}, valid[4], image=False)  # no wait for the device here
    with pytest.raises(ModelError, match="layer 0.*not padding, causal and a sliding window"):
        deferred.finish()
    at_once = Recipe("x", 1, True, [None], "causal")
    at_once.observe({0: _cap(causal(6), 6)}, valid[6], image=False)
    with pytest.raises(ModelError, match="not padding, causal and a sliding window"):
        at_once.observe({0: _cap(odd, 4)}, valid[4], image=False)


def test_bench_gpu_tiny_runs_on_cpu_and_refuses_cuda_without_it(tmp_path, repo_root):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(repo_root / "scripts" / "bench_gpu.py"), "--tiny", "--models", "bert",
                          "--device", "cpu", "--project", "pca,tsne", "--out", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(repo_root), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    (r,) = report["runs"]
    assert r["tokens"] >= 400 and r["sequences"] > 4  # several batches of 4
    assert r["ratio"] > 0 and r["extract_memory"]["host_rss_peak_mib"] > 0
    assert r["exactness"]["max_abs_diff"] < 1e-4  # float32 on CPU
    proj = r["projection"]["cpu"]  # the projection section ran: every head laid out, on the CPU's backends
    assert proj["failed"] == 0 and proj["done"] > 0 and proj["backends"]["pca"] == "numpy"
    if torch.cuda.is_available():
        return
    bad = tmp_path / "bad.json"
    run = subprocess.run([sys.executable, str(repo_root / "scripts" / "bench_gpu.py"), "--tiny", "--device", "cuda",
                          "--out", str(bad)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(repo_root), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert run.returncode == 2 and "no CUDA" in run.stderr and "Traceback" not in run.stderr
    assert not bad.exists()


# ---- CUDA ------------------------------------------------------------------------------------------------

@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_cuda_extraction_recomputes_the_models_eager_attention(tmp_path, family):
    folder = save_text_model(family, tmp_path / family)
    opts = ExtractOptions(dtype="float32", batch_size=3, attention_topk=4, device="cuda", progress=False)
    name = extract(tmp_path / "gpu", str(folder), texts=TEXTS, options=opts)
    atlas = open_atlas(tmp_path / "gpu")
    tok = tf.AutoTokenizer.from_pretrained(folder)
    for s, text in enumerate(TEXTS):
        ref = np.stack([a[0].numpy() for a in eager_attentions(folder, family, **tok(text, return_tensors="pt"))])
        got = np.stack([np.stack([attention_from_atlas(atlas, name, layer, head, s) for head in range(ref.shape[1])])
                        for layer in range(ref.shape[0])])
        assert np.abs(got - ref).max() <= 1e-4, (family, s, np.abs(got - ref).max())
    # The same extraction on the CPU: the same tokens, q and k within float32 rounding, the same top-k keys.
    extract(tmp_path / "cpu", str(folder), texts=TEXTS, options=ExtractOptions(
        dtype="float32", batch_size=3, attention_topk=4, device="cpu", progress=False))
    cpu = open_atlas(tmp_path / "cpu")
    _same_atlas(cpu, atlas, name, tol=1e-4)
    assert atlas.group(name).attrs["device"].startswith("cuda")


@cuda
@pytest.mark.gpu
def test_cuda_extraction_with_autocast_and_hidden_states_stays_close(tmp_path):
    folder = save_text_model("llama", tmp_path / "m")
    opts = dict(batch_size=2, attention_topk=8, values=True, hidden_states=True, progress=False)
    extract(tmp_path / "gpu", str(folder), texts=TEXTS, options=ExtractOptions(device="cuda", precision="bfloat16", **opts))
    extract(tmp_path / "cpu", str(folder), texts=TEXTS, options=ExtractOptions(device="cpu", **opts))
    gpu, cpu = open_atlas(tmp_path / "gpu"), open_atlas(tmp_path / "cpu")
    assert gpu.tokens("m").equals(cpu.tokens("m"))
    for key in ("queries", "keys", "values", "hidden"):
        x, y = (np.asarray(a.array("m", key)[:], dtype=np.float32) for a in (gpu, cpu))
        assert np.abs(x - y).max() <= 0.05 * max(1.0, float(np.abs(y).max())), key


@cuda
@pytest.mark.gpu
def test_cuda_image_extraction_matches_cpu(tmp_path):
    folder = save_image_model("vit", tmp_path / "m")
    images = write_images(tmp_path / "img", n=5)
    for device in ("cuda", "cpu"):
        extract(tmp_path / device, str(folder), images=images,
                options=ExtractOptions(dtype="float32", batch_size=2, device=device, progress=False))
    _same_atlas(open_atlas(tmp_path / "cpu"), open_atlas(tmp_path / "cuda"), tol=1e-4)


def test_out_of_device_memory_names_what_to_change_and_leaves_the_atlas(tmp_path, monkeypatch, capsys):
    from attnatlas.cli import main as cli

    folder = save_text_model("bert", tmp_path / "m")
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(TEXTS))
    extract(tmp_path / "a", str(folder), texts=TEXTS, options=ExtractOptions(progress=False))
    original = batches._compact

    def out_of_memory(*args, **kwargs):
        if out_of_memory.calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        out_of_memory.calls += 1
        return original(*args, **kwargs)

    out_of_memory.calls = 0
    monkeypatch.setattr(batches, "_compact", out_of_memory)
    code = cli(["extract", "--model", str(folder), "--texts", str(texts), "--out", str(tmp_path / "a"), "--name", "big",
                "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size 2" in err and "smaller --batch-size" in err and "Traceback" not in err
    assert open_atlas(tmp_path / "a").models == ["m"]
    assert not [p for p in (tmp_path / "a" / "models").iterdir() if p.name.startswith(".incoming-")]
