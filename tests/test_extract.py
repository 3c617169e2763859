"""Extraction is correct when attention recomputed from the stored q and k equals the model's own."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import transformers as tf
from tiny_models import eager_attentions, save_image_model, save_text_model, write_images

from attnatlas import attention_from_atlas
from attnatlas.cli import main as cli
from attnatlas.extract import ExtractOptions, extract
from attnatlas.store import open_atlas

TEXTS = [
    "the cat sat on a mat .",
    "anna said hello world !",
    "x = f ( y ) + 1",
    "bank",
    "the river bank ran dark and the money ran fast , said anna in london ?",
    "<img src = x onerror = alert ( 1 ) >",
    "light",
]


def recomputed(atlas, model: str, sequence: int) -> np.ndarray:
    """(layer, head, query, key) attention from the atlas alone (attnatlas.attention_from_atlas)."""
    info = atlas.info(model)
    return np.stack([np.stack([attention_from_atlas(atlas, model, layer, head, sequence) for head in range(info.n_heads)])
                     for layer in range(info.n_layers)])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 2e-2)])
@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_text_attention_recomputed_from_atlas_equals_model(tmp_path, family, dtype, tol):
    folder = save_text_model(family, tmp_path / family)
    atlas_path = tmp_path / "atlas"
    opts = ExtractOptions(dtype=dtype, batch_size=3, attention_topk=4, progress=False)
    name = extract(atlas_path, str(folder), texts=TEXTS, options=opts)
    atlas = open_atlas(atlas_path)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    info = atlas.info(name)
    if family == "llama":
        assert (info.n_heads, info.n_kv_heads) == (4, 2)
    for s, text in enumerate(TEXTS):
        enc = tok(text, return_tensors="pt")  # one sequence alone: no padding at all
        ref = np.stack([a[0].numpy() for a in eager_attentions(folder, family, **enc)])
        got = recomputed(atlas, name, s)
        assert got.shape == ref.shape, (s, got.shape, ref.shape)
        assert np.abs(got - ref).max() <= tol, (family, s, np.abs(got - ref).max())
        # Stored top-k attention: the strongest keys with their weights, as global token rows.
        rows = np.flatnonzero(atlas.tokens(name).sequence.to_numpy() == s)
        idx, w = atlas.attention_topk(name, 1, 2)
        for qi, row in enumerate(rows):
            top = np.argsort(-ref[1, 2, qi])[:4]
            valid = idx[row] >= 0
            np.testing.assert_allclose(w[row][valid], ref[1, 2, qi, top][: valid.sum()], atol=2e-3)
            assert set(idx[row][valid] - rows[0]) <= set(np.flatnonzero(ref[1, 2, qi] > 0))


def test_llama_keys_are_the_serving_kv_head(tmp_path):
    folder = save_text_model("llama", tmp_path / "m")
    extract(tmp_path / "a", str(folder), texts=TEXTS, options=ExtractOptions(dtype="float32", progress=False))
    atlas = open_atlas(tmp_path / "a")
    raw = np.asarray(atlas.array("m", "keys")[0])  # (kv_head, token, d)
    assert raw.shape[0] == 2
    for head in range(4):
        np.testing.assert_array_equal(atlas.keys("m", 0, head), raw[head // 2])


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 2e-2)])
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_image_attention_recomputed_from_atlas_equals_model(tmp_path, family, dtype, tol):
    folder = save_image_model(family, tmp_path / family)
    images = write_images(tmp_path / "imgs", n=4)
    name = extract(tmp_path / "atlas", str(folder), images=images,
                   options=ExtractOptions(dtype=dtype, batch_size=3, hidden_states=True, progress=False))
    atlas = open_atlas(tmp_path / "atlas")
    tokens = atlas.tokens(name)
    prefix = {"vit": 1, "deit": 2, "dinov2": 1}[family]
    assert int(tokens.is_special.sum()) == 4 * prefix
    assert set(tokens.token_kind) == ({"cls", "patch", "distillation"} if family == "deit" else {"cls", "patch"})
    patches = tokens[tokens.token_kind == "patch"]
    assert patches.patch_row.max() == 3 and patches.patch_col.max() == 3
    assert patches[["hue", "saturation", "brightness"]].notna().all().all()
    pixels = np.asarray(atlas.array(name, "images"))
    assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.uint8
    proc = tf.AutoImageProcessor.from_pretrained(folder)
    from attnatlas.inputs import load_images

    records = load_images(images)
    for s, rec in enumerate(records):
        pv = proc(images=[rec.image], return_tensors="pt")["pixel_values"]
        ref = np.stack([a[0].numpy() for a in eager_attentions(folder, family, pixel_values=pv)])
        got = recomputed(atlas, name, s)
        assert np.abs(got - ref).max() <= tol
    hidden = atlas.hidden_states(name, 2)
    assert hidden.shape == (len(tokens), 32)


def test_padding_never_reaches_the_table(tmp_path):
    folder = save_text_model("bert", tmp_path / "m")
    extract(tmp_path / "a", str(folder), texts=TEXTS, options=ExtractOptions(batch_size=4, progress=False))
    atlas = open_atlas(tmp_path / "a")
    tokens = atlas.tokens("m")
    tok = tf.AutoTokenizer.from_pretrained(folder)
    assert len(tokens) == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert tok.pad_token_id not in set(tokens.token_id)
    assert atlas.array("m", "queries").shape[2] == len(tokens)
    for _, g in tokens.groupby("sequence"):
        assert list(g.position) == list(range(len(g)))
    # Offsets point into the source text for every non-special token.
    seqs = atlas.sequences("m").set_index("sequence")
    known = tokens[~tokens.is_special & (tokens.token != tok.unk_token)]
    assert len(known) > 20
    for row in known.itertuples():
        piece = seqs.loc[row.sequence, "text"][row.char_start:row.char_end]
        assert piece.lower() == row.token.replace("##", "").strip().lower()


@pytest.mark.parametrize("background", [True, False])
def test_chunk_columns_written_in_the_background_or_between_batches_hold_the_same(tmp_path, monkeypatch, background):
    """Many chunk columns (8 tokens each), written on the write thread with two buffers taking turns, or
    between batches from one: either way every token row lands where it belongs."""
    import attnatlas.extract.extractor as extractor

    folder = save_text_model("gpt2", tmp_path / "m")
    texts = [f"sentence {i} of the corpus, about cats and dogs" for i in range(12)]
    extract(tmp_path / "ref", str(folder), texts=texts, options=ExtractOptions(batch_size=12, dtype="float32",
                                                                               progress=False))
    monkeypatch.setattr(extractor, "tokens_per_chunk", lambda d_head, heads=None: 8)
    monkeypatch.setattr(extractor, "_spare_core", lambda device: background)
    extract(tmp_path / "a", str(folder), texts=texts, options=ExtractOptions(batch_size=5, dtype="float32",
                                                                             progress=False))
    ref, got = open_atlas(tmp_path / "ref"), open_atlas(tmp_path / "a")
    assert got.array("m", "queries").chunks[2] == 8 and got.array("m", "queries").shape[2] > 40
    for key in ("queries", "keys", "attn_topk_index", "attn_topk_weight"):
        np.testing.assert_allclose(got.array("m", key)[:], ref.array("m", key)[:], atol=1e-5)


def test_truncation_warns_and_counts(tmp_path):
    folder = save_text_model("bert", tmp_path / "m")
    long = " ".join(["the cat"] * 40)
    with pytest.warns(UserWarning, match="1 of 2 sequences"):
        extract(tmp_path / "a", str(folder), texts=[long, "the cat"], options=ExtractOptions(max_tokens=16, progress=False))
    atlas = open_atlas(tmp_path / "a")
    assert atlas.info("m").attrs["truncated_sequences"] == 1
    assert atlas.sequences("m").n_tokens.tolist() == [16, 4]


def test_values_stored_when_asked(tmp_path):
    folder = save_text_model("gpt2", tmp_path / "m")
    extract(tmp_path / "a", str(folder), texts=TEXTS[:3], options=ExtractOptions(values=True, progress=False))
    atlas = open_atlas(tmp_path / "a")
    assert atlas.values("m", 1, 3).shape == (len(atlas.tokens("m")), 8)


# ---- bad input: one clear message, non-zero exit, the atlas untouched -----------------------------

def _fingerprint(path) -> str:
    h = hashlib.sha256()
    # Claim files say who writes a name right now; they hold no data.
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".claims" not in p.parts):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def existing(tmp_path):
    folder = save_text_model("bert", tmp_path / "bert")
    atlas = tmp_path / "atlas"
    assert cli(["extract", "--model", str(folder), "--texts", _write(tmp_path / "ok.txt", "the cat\nsat on a mat\n"),
                "--out", str(atlas), "--no-progress"]) == 0
    return folder, atlas


def _write(path, content, binary=False):
    path.write_bytes(content) if binary else path.write_text(content)
    return str(path)


def _bad_cases(tmp_path, folder):
    no_heads = tmp_path / "resnet"
    tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(no_heads)
    not_image = tmp_path / "imgs"
    not_image.mkdir()
    _write(not_image / "fake.png", "this is text")
    truncated = tmp_path / "trunc"
    write_images(truncated, n=1)
    png = next(truncated.glob("*.png"))
    png.write_bytes(png.read_bytes()[:200])
    img_model = save_image_model("vit", tmp_path / "vit")
    m = str(folder)
    return {
        "missing file": (["--model", m, "--texts", str(tmp_path / "nope.txt")], "not found"),
        "empty corpus": (["--model", m, "--texts", _write(tmp_path / "e.txt", "")], "no non-empty"),
        "whitespace only": (["--model", m, "--texts", _write(tmp_path / "w.txt", "  \n\t\n")], "no non-empty"),
        "non-utf8": (["--model", m, "--texts", _write(tmp_path / "b.txt", b"ok\n\xff\xfe bad\n", binary=True)], "UTF-8"),
        "not an image": (["--model", str(img_model), "--images", str(not_image)], "fake.png"),
        "truncated image": (["--model", str(img_model), "--images", str(truncated)], png.name),
        "unknown model": (["--model", str(tmp_path / "no-such-model"), "--texts", _write(tmp_path / "t.txt", "the cat")],
                          "offline names"),
        "no attention heads": (["--model", str(no_heads), "--texts", str(tmp_path / "t.txt")], "not supported"),
        "name clash": (["--model", m, "--texts", str(tmp_path / "t.txt")], "--overwrite"),
        "text model given images": (["--model", m, "--images", str(truncated)], ""),
    }


def test_bad_input_gives_one_message_and_keeps_the_atlas(tmp_path, existing, capsys):
    folder, atlas = existing
    before = _fingerprint(atlas)
    for case, (args, needle) in _bad_cases(tmp_path, folder).items():
        code = cli(["extract", *args, "--out", str(atlas), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, case
        assert "Traceback" not in err and "error:" in err, (case, err)
        assert needle in err, (case, err)
        assert _fingerprint(atlas) == before, case
    assert open_atlas(atlas).models == ["bert"]


def test_output_paths_that_are_not_atlases(tmp_path, existing, capsys):
    folder, _ = existing
    texts = _write(tmp_path / "t.txt", "the cat")
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "keep.txt", "precious")
    a_file = tmp_path / "file"
    _write(a_file, "x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = {"non-atlas folder": other, "a file": a_file}
    import os

    if os.geteuid() != 0:  # root can write anywhere
        cases["unwritable"] = locked / "atlas"
    for case, out in cases.items():
        code = cli(["extract", "--model", str(folder), "--texts", texts, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (case, err)
    assert (other / "keep.txt").read_text() == "precious" and sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_and_crash_leaves_nothing_visible(tmp_path, existing, monkeypatch):
    folder, atlas = existing
    texts = _write(tmp_path / "t.txt", "the cat sat\nbank\nriver")
    assert cli(["extract", "--model", str(folder), "--texts", texts, "--out", str(atlas), "--name", "bert",
                "--overwrite", "--no-progress"]) == 0
    assert len(open_atlas(atlas).sequences("bert")) == 3
    before = _fingerprint(atlas)

    from attnatlas.store import atlas as store_mod

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(store_mod.ModelWriter, "commit", boom)
    with pytest.raises(RuntimeError):
        extract(atlas, str(folder), texts=TEXTS, name="bert", overwrite=True, options=ExtractOptions(progress=False))
    with pytest.raises(RuntimeError):
        extract(atlas, str(folder), texts=TEXTS, name="second", options=ExtractOptions(progress=False))
    assert _fingerprint(atlas) == before
    assert open_atlas(atlas).models == ["bert"]
    monkeypatch.undo()
    # A re-run after the crash restarts cleanly.
    extract(atlas, str(folder), texts=TEXTS, name="second", options=ExtractOptions(progress=False))
    assert open_atlas(atlas).models == ["bert", "second"]
    assert not [p for p in (atlas / "models").iterdir() if p.name.startswith(".") and p.name != ".claims"]


def test_info_summarises(tmp_path, existing, capsys):
    _, atlas = existing
    assert cli(["info", str(atlas)]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 4 heads" in out and "bert" in out


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path, existing, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder, atlas = existing
    code = cli(["extract", "--model", str(folder), "--texts", _write(tmp_path / "t.txt", "x"), "--out", str(tmp_path / "n"),
                "--device", "cuda", "--no-progress"])
    assert code == 2 and "no CUDA" in capsys.readouterr().err
