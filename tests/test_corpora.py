"""Corpora from the ecosystem: Parquet, Hugging Face datasets (saved folders, image folders), row selection,
provenance, and their bad inputs."""

from __future__ import annotations

import logging

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
