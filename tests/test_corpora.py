"""Corpora from the ecosystem: Parquet, Hugging Face datasets (saved folders, image folders), row selection,
provenance, and their bad inputs."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from attnatlas.errors import InputError
from attnatlas.inputs import ImageRecord, TextRecord, load_corpus, load_texts

datasets = pytest.importorskip("datasets")

TEXTS = ["the cat sat on a mat", "bank river money", "", "paris london", "hello world"] * 8  # 32 non-empty


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))}),
                               "test": datasets.Dataset.from_dict({"body": TEXTS[:5], "n": list(range(5))})})
    dd.save_to_disk(str(root / "dict"))
    datasets.Dataset.from_dict({"text": TEXTS[:10]}).save_to_disk(str(root / "single"))
    datasets.Dataset.from_dict({"text": ["", "  ", None]}).save_to_disk(str(root / "empty"))
    return root


def test_parquet_column(tmp_path):
    f = tmp_path / "c.parquet"
    pd.DataFrame({"text": TEXTS, "other": range(len(TEXTS))}).to_parquet(f)
    recs = load_texts(str(f))
    assert len(recs) == 32 and recs[0] == TextRecord("the cat sat on a mat", f"{f}:row 1")
    assert recs[2].source == f"{f}:row 4"  # the empty row 3 is skipped, rows keep their numbers
    with pytest.raises(InputError, match="no column 'body'.*'text', 'other'"):
        load_texts(str(f), column="body")
    pd.DataFrame({"text": [1, 2]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(InputError, match="not text"):
        load_texts(str(tmp_path / "n.parquet"))


def test_saved_dataset_dict_split_column_and_provenance(saved):
    texts, images, prov = load_corpus(dataset=str(saved / "dict"), text_column="body")
    assert images is None and len(texts) == 32 and texts[0].source.endswith("[train]:row 1")
    assert prov["kind"] == "datasets:save_to_disk" and prov["split"] == "train" and prov["rows_total"] == 40
    assert prov["fingerprint"]
    texts, _, prov = load_corpus(dataset=str(saved / "dict"), text_column="body", split="test")
    assert len(texts) == 4 and prov["split"] == "test"
    texts, _, _ = load_corpus(dataset=str(saved / "single"))  # the "text" column by default
    assert len(texts) == 8


def test_limit_and_seeded_sample(saved):
    spec = dict(dataset=str(saved / "dict"), text_column="body")
    first, _, _ = load_corpus(**spec, limit=5)
    assert [r.text for r in first] == [t for t in TEXTS if t][:5]
    a, _, pa = load_corpus(**spec, sample=10, seed=1)
    b, _, _ = load_corpus(**spec, sample=10, seed=1)
    c, _, _ = load_corpus(**spec, sample=10, seed=2)
    assert len(a) == 10 and a == b and a != c and pa["seed"] == 1
    rows = [int(r.source.rsplit(" ", 1)[1]) for r in a]
    assert rows == sorted(rows)  # kept in corpus order
    # --limit and --sample work on plain files too
    lines, _, pl = load_corpus(texts=TEXTS[:6] + ["x"], sample=3, seed=0)
    assert len(lines) == 3 and pl["kind"] == "list"


def test_sample_larger_than_the_corpus_says_so_and_uses_all(saved, caplog):
    with caplog.at_level(logging.WARNING):
        texts, _, _ = load_corpus(dataset=str(saved / "single"), sample=1000)
    assert len(texts) == 8 and "--sample 1000 is more than the 8 rows" in caplog.text


def test_image_folder_as_a_dataset_image_column(tmp_path):
    from tiny_models import write_images

    folder = write_images(tmp_path / "imgs", n=4)
    texts, images, prov = load_corpus(dataset=str(folder), limit=3)
    assert texts is None and len(images) == 3 and all(isinstance(r, ImageRecord) and r.image.mode == "RGB" for r in images)
    assert prov["kind"] == "datasets:imagefolder" and prov["column"] == "image"


@pytest.mark.parametrize("spec,kwargs,match", [
    ("nosuch-dir/nosuch-dataset", {}, "Cannot load the dataset"),
    ("dict", {"split": "validation"}, "no split 'validation'; it has train, test"),
    ("dict", {"text_column": "nope"}, "no column 'nope'; it has 'body', 'n'"),
    ("dict", {}, "say which column"),
    ("empty", {}, "no non-empty rows in column 'text'"),
    ("dict", {"text_column": "body", "limit": 0}, "--limit must be a positive"),
])
def test_bad_datasets_are_one_message(saved, spec, kwargs, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = str(saved / spec) if (saved / spec).exists() else spec
    with pytest.raises(InputError, match=match):
        load_corpus(dataset=target, **kwargs)


def test_extract_records_provenance(saved, tmp_path):
    from tiny_models import save_text_model

    from attnatlas.cli import main as cli
    from attnatlas.store import open_atlas

    folder = save_text_model("bert", tmp_path / "bert")
    assert cli(["extract", "--model", str(folder), "--dataset", str(saved / "dict"), "--text-column", "body",
                "--sample", "7", "--seed", "4", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    atlas = open_atlas(tmp_path / "a")
    prov = atlas.info("bert").attrs["input"]
    assert prov["rows_used"] == 7 == len(atlas.sequences("bert")) and prov["sample"] == 7 and prov["seed"] == 4
    assert cli(["extract", "--model", str(folder), "--dataset", str(saved / "dict"), "--split", "nope",
                "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert not (tmp_path / "b").exists()


# ---- long documents ------------------------------------------------------------------------------------------
def test_chunked_windows_cover_the_document_with_their_offsets(tmp_path):
    import random
    import re

    from tiny_models import WORDS, save_text_model

    from attnatlas.cli import main as cli
    from attnatlas.store import open_atlas

    rng = random.Random(0)
    doc = " ".join(rng.choice(WORDS[:20]) for _ in range(300))
    f = tmp_path / "long.txt"
    f.write_text(doc + "\nshort line\n")
    folder = save_text_model("bert", tmp_path / "bert")
    out = tmp_path / "a"
    assert cli(["extract", "--model", str(folder), "--texts", str(f), "--out", str(out), "--max-tokens", "40",
                "--chunk", "--stride", "5", "--no-progress"]) == 0
    atlas = open_atlas(out)
    seqs, toks = atlas.sequences("bert"), atlas.tokens("bert")
    windows = seqs[seqs.document == 0]
    assert len(windows) > 5 and (windows.n_windows == len(windows)).all() and (seqs.n_tokens <= 40).all()
    assert not seqs.truncated.any()
    covered = set()
    for _, w in windows.iterrows():
        assert doc[w.doc_char_start: w.doc_char_start + len(w.text)] == w.text  # a window is a slice of its document
        t = toks[(toks.sequence == w.sequence) & ~toks.is_special]
        covered.update(zip(t.char_start + w.doc_char_start, t.char_end + w.doc_char_start))
    # every word of the document is in some window (WordPiece: at least one token per word)
    words = {(m.start(), m.end()) for m in re.finditer(r"\S+", doc)}
    starts = {a for a, _ in covered}
    assert all(a in starts for a, _ in words)
    # consecutive windows share `stride` tokens
    first, second = windows.sequence.iloc[0], windows.sequence.iloc[1]
    a = toks[(toks.sequence == first) & ~toks.is_special].token.tolist()
    b = toks[(toks.sequence == second) & ~toks.is_special].token.tolist()
    assert a[-5:] == b[:5]
    assert seqs[seqs.document == 1].n_windows.tolist() == [1]


def test_truncation_is_marked_and_bad_strides_refused(tmp_path, capsys):
    from tiny_models import save_text_model

    from attnatlas.cli import main as cli
    from attnatlas.store import open_atlas

    f = tmp_path / "t.txt"
    f.write_text(" ".join(["the cat sat"] * 40) + "\nshort\n")
    folder = save_text_model("bert", tmp_path / "bert")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "attnatlas", "extract", "--model", str(folder), "--texts", str(f), "--out",
                        str(tmp_path / "a"), "--max-tokens", "20", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "truncated" in line]  # stated once, on one line
    assert len(said) == 1 and "--chunk" in said[0] and "UserWarning" not in r.stderr, r.stderr
    assert open_atlas(tmp_path / "a").sequences("bert").truncated.tolist() == [True, False]
    for stride in ("20", "18", "-1"):
        assert cli(["extract", "--model", str(folder), "--texts", str(f), "--out", str(tmp_path / "b"), "--max-tokens", "20",
                    "--chunk", "--stride", stride, "--no-progress"]) == 2
        assert "--stride" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---- compare in linear time ----------------------------------------------------------------------------------
def test_compare_work_follows_the_tokens_not_the_longest_sequence(tmp_path):
    from attnatlas import testing
    from attnatlas.compare import metrics as M
    from attnatlas.compare.run import compare_models

    lengths = [12] * 198 + [200, 200]  # 1% long sequences
    atlas = testing.synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=2, n_seq=200, lengths=lengths)
    # same seed and corpus sizes: the same sentences; another head count: other q and k
    testing.write_synthetic_model(atlas, name="other", n_layers=1, n_heads=3, n_seq=200, lengths=lengths)
    M.WORK["cells"] = 0
    res = compare_models(atlas, ["synthetic", "other"], store=False)
    heads = 2 + 3
    needed = heads * sum(n * n for n in lengths)  # every (query, key) pair of every sequence, once
    padded = heads * len(lengths) * max(lengths) ** 2  # what one padded batch computed
    assert M.WORK["cells"] <= 1.3 * needed, (M.WORK["cells"], needed)
    assert M.WORK["cells"] < padded / 20
    # the same metrics as one padded batch gives
    one = M.collect(atlas, "synthetic", batches=[M.make_batch(atlas.tokens("synthetic"))])
    cols = ["entropy_mean", "entropy_std", "first_share", "prev_share", "keys90_mean", "distance_mean"]
    np.testing.assert_allclose(res.metrics["synthetic"].heads[cols].to_numpy(float), one.heads[cols].to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.metrics["synthetic"].token_keys90.to_numpy(), one.token_keys90.to_numpy())


@pytest.mark.slow  # the real MiniLM tokenizer (an offline package)
def test_every_chunk_window_fits_when_tokenized_alone(repo_root):
    import random

    from transformers import AutoTokenizer

    from attnatlas.extract.offline import prepare_offline_model
    from attnatlas.extract.windows import window_documents

    tok = AutoTokenizer.from_pretrained(str(prepare_offline_model("minilm")))
    base = [s for s in (repo_root / "data" / "corpus" / "demo.txt").read_text().splitlines() if s.strip()]
    extra = ["東京で会いましょう。", "Москва — столица России.", "Ich möchte ein Stück Kuchen, über alles 🍕."]
    rng = random.Random(1)
    # Long documents of demo sentences and non-ASCII ones: some window starts inside a word, and alone that
    # piece tokenizes into more tokens than it was in the document (a user trial hit it: "ame" of "rename").
    docs = [TextRecord(" ".join(rng.choice(base + extra) for _ in range(30)), f"doc:{i}") for i in range(60)]
    windows = window_documents(docs, tok, 128, 16)
    sizes = [len(tok(w.text)["input_ids"]) for w in windows]
    assert max(sizes) <= 128, max(sizes)  # none is truncated by the model's own limit afterwards
    for w in windows:  # and each is a slice of its document
        assert docs[w.document].text[w.doc_start: w.doc_start + len(w.text)] == w.text
