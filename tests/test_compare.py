"""Head metrics and head similarity on attention patterns whose answers are known, plus bad input."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from attnatlas.cli import main as cli
from attnatlas.compare import metrics as M
from attnatlas.compare import similarity as S
from attnatlas.compare.run import compare_models, load, nearest_heads
from attnatlas.errors import InputError
from attnatlas.store import ArraySpec, Atlas, tokens_per_chunk
from attnatlas.testing import random_layouts, write_synthetic_image_model, write_synthetic_model

TEXTS = ["the cat sat on the mat .", "anna said hello , world !", "a river bank ran dark and cold",
         "money ran fast , said anna in london ?", "light rain fell on the old roof"]


def toks(n: int, special_first: bool = False) -> pd.DataFrame:
    return pd.DataFrame({"sequence": 0, "position": np.arange(n), "token": ["w"] * n,
                         "is_special": [special_first and i == 0 for i in range(n)]})


def one(p: np.ndarray) -> np.ndarray:
    return p[None].astype(np.float32)  # (1 sequence, query, key)


# ---- metric functions on attention matrices with known answers ---------------------------------

def test_previous_token_head():
    n = 6
    p = np.zeros((n, n))
    p[0, 0] = 1
    p[np.arange(1, n), np.arange(n - 1)] = 1
    r = M.head_metrics(one(p), M.make_batch(toks(n)), causal=True)
    m = r.metrics
    assert m["n_queries"] == n - 1  # query 0 has a single key: no choice
    assert m["prev_share"] == pytest.approx(1) and m["self_share"] == 0 and m["next_share"] == 0
    assert m["entropy_mean"] == pytest.approx(0, abs=1e-6)
    assert m["distance_mean"] == pytest.approx(1)
    assert m["keys90_mean"] == 1
    assert m["first_share"] == pytest.approx(1 / (n - 1))  # only query 1's previous token is the first
    assert m["frac90_mean"] == pytest.approx(np.mean([1 / (i + 1) for i in range(1, n)]))
    assert r.keys90[0].tolist() == [1] * n


@pytest.mark.parametrize("n,k90", [(5, 5), (10, 9), (20, 18)])
def test_uniform_head(n, k90):
    p = np.full((n, n), 1 / n)
    m = M.head_metrics(one(p), M.make_batch(toks(n)), causal=False).metrics
    assert m["entropy_mean"] == pytest.approx(np.log(n), rel=1e-5)
    assert m["entropy_norm_mean"] == pytest.approx(1, rel=1e-5)
    assert m["entropy_std"] == pytest.approx(0, abs=1e-5)
    assert m["keys90_mean"] == k90  # ceil(0.9 n): exactly-reached 90% counts
    assert m["prev_share"] == pytest.approx(1 / n) and m["next_share"] == pytest.approx(1 / n)
    i = np.arange(n)
    assert m["distance_mean"] == pytest.approx(np.abs(i[:, None] - i[None]).mean(), rel=1e-5)


def test_sink_head_on_special_token():
    n = 7
    p = np.zeros((n, n))
    p[:, 0] = 1
    m = M.head_metrics(one(p), M.make_batch(toks(n, special_first=True)), causal=False).metrics
    assert m["first_share"] == pytest.approx(1) and m["special_share"] == pytest.approx(1)
    assert m["keys90_mean"] == 1 and m["frac90_mean"] == pytest.approx(1 / n)
    assert m["self_share"] == pytest.approx(1 / n)
    # query i sits i tokens from the sink; the farthest it could look is max(i, n-1-i)
    i = np.arange(n)
    assert m["distance_rel_mean"] == pytest.approx(np.mean(i / np.maximum(i, n - 1 - i)), rel=1e-5)


def test_punctuation_and_image_distance():
    assert M.is_punct("Ġ,") and M.is_punct("...") and not M.is_punct("a.") and not M.is_punct("[CLS]")
    # 2x2 patches after a cls token; every patch attends to the diagonally opposite patch: distance sqrt(2)
    tok = pd.DataFrame({"sequence": 0, "position": range(5), "token": "p", "is_special": [True, 0, 0, 0, 0],
                        "patch_row": [-1, 0, 0, 1, 1], "patch_col": [-1, 0, 1, 0, 1]})
    p = np.zeros((5, 5))
    p[0, 0] = 1
    for q, k in ((1, 4), (2, 3), (3, 2), (4, 1)):
        p[q, k] = 1
    m = M.head_metrics(one(p), M.make_batch(tok, image=True), causal=False).metrics
    assert m["distance_mean"] == pytest.approx(np.sqrt(2)) and m["distance_rel_mean"] == pytest.approx(1)


def test_layout_measures():
    rng = np.random.default_rng(0)
    n = 600
    pos = rng.random(n)
    along = np.c_[np.concatenate([pos, pos]), rng.normal(0, 0.01, 2 * n)]  # x = position, q and k mixed
    lm = M.layout_metrics(along, pos)
    assert lm["layout_positional"] > 0.95 and abs(lm["qk_separation"]) < 0.2
    noise = rng.normal(size=(2 * n, 2))
    assert abs(M.layout_metrics(noise, pos)["layout_positional"]) < 0.2
    apart = noise + np.repeat([[0, 0], [100, 0]], n, axis=0)
    assert M.layout_metrics(apart, pos)["qk_separation"] == pytest.approx(1)


# ---- tiny atlases where q and k make the attention exactly a known pattern ---------------------

def write_pattern_model(atlas: Atlas, name: str, texts: list[str], heads: list[str], split: bool = False,
                        cls: bool = True, causal: bool = True) -> None:
    """Text model whose heads attend exactly: 'prev' to the previous word, 'self' to its own word,
    'uniform' to every allowed key, 'sink' to the first token. `split` cuts longer words into two
    tokens (another tokenizer); `cls` starts each sequence with a special [CLS]."""
    rows, seqs, widx = [], [], []
    for s, text in enumerate(texts):
        pieces = [("[CLS]", -1, -1, -1)] if cls else []
        for w, m in enumerate(re.finditer(r"\S+", text)):
            a, b = m.span()
            cuts = [(a, a + (b - a) // 2), (a + (b - a) // 2, b)] if split and b - a >= 3 else [(a, b)]
            pieces += [(text[x:y], x, y, w) for x, y in cuts]
        for p, (t, x, y, w) in enumerate(pieces):
            rows.append(dict(sequence=s, position=p, token=t, token_id=p, is_special=w < 0 and t == "[CLS]",
                             char_start=x, char_end=y, word=w, source=f"t:{s}"))
            widx.append(w)
        seqs.append(dict(sequence=s, source=f"t:{s}", text=text, n_tokens=len(pieces)))
    tokens, T, d = pd.DataFrame(rows), len(rows), 4
    w = np.array(widx, dtype=float)
    first = (tokens["position"] == 0).to_numpy()
    theta, c = np.pi / 16, 30.0  # word-index angles; c^2 (1 - cos theta) ~ 17 logits between neighbours

    def ang(x: np.ndarray) -> np.ndarray:
        return np.c_[np.cos(theta * x), np.sin(theta * x), np.zeros_like(x), np.zeros_like(x)]

    q = np.zeros((1, len(heads), T, d), np.float32)
    k = np.zeros((1, len(heads), T, d), np.float32)
    for h, kind in enumerate(heads):
        if kind in ("prev", "self"):
            q[0, h] = c * ang(w - (kind == "prev"))
            k[0, h] = c * ang(w)
        elif kind == "sink":
            q[0, h, :, 2] = c
            k[0, h, first, 2] = c
        # uniform: q = 0, so every allowed key gets the same logit
    tc = tokens_per_chunk(d)
    specs = {"queries": ArraySpec(q.shape, "float32", 2, (1, 1, tc, d)), "keys": ArraySpec(k.shape, "float32", 2, (1, 1, tc, d))}
    attrs = dict(model_id=name, family="test", modality="text", n_layers=1, n_heads=len(heads), n_kv_heads=len(heads),
                 d_head=d, causal=causal, scaling=[1.0], input_hash="h:" + "|".join(texts))
    with atlas.model_writer(name, T, specs, attrs, overwrite=True) as wr:
        wr.append({"queries": q, "keys": k}, tokens, pd.DataFrame(seqs))
        wr.commit(overwrite=True)


@pytest.fixture(scope="module")
def pattern_atlas(tmp_path_factory):
    atlas = Atlas.open(tmp_path_factory.mktemp("cmp") / "atlas", create=True)
    write_pattern_model(atlas, "wordy", TEXTS, ["prev", "uniform", "sink", "self"], split=False, cls=True)
    write_pattern_model(atlas, "piecey", TEXTS, ["self", "sink", "prev", "uniform"], split=True, cls=False)
    return atlas


def test_end_to_end_metrics_from_stored_q_k(pattern_atlas):
    res = compare_models(pattern_atlas, ["wordy", "piecey"], store=False)
    h = res.metrics["wordy"].heads.set_index("head")
    assert h.loc[0, "prev_share"] == pytest.approx(1, abs=1e-4)  # one token per word: previous word = previous token
    assert h.loc[0, "entropy_mean"] == pytest.approx(0, abs=1e-3)
    pos = pattern_atlas.tokens("wordy")["position"].to_numpy()
    expected = np.mean(np.log(pos[pos >= 1] + 1))  # causal uniform: query i spreads over i + 1 keys
    assert h.loc[1, "entropy_mean"] == pytest.approx(expected, rel=1e-4)
    assert h.loc[1, "entropy_norm_mean"] == pytest.approx(1, rel=1e-4)
    assert h.loc[2, "first_share"] == pytest.approx(1, abs=1e-4) and h.loc[2, "special_share"] == pytest.approx(1, abs=1e-4)
    assert h.loc[2, "keys90_mean"] == 1
    p = res.metrics["piecey"].heads.set_index("head")
    assert p.loc[1, "first_share"] == pytest.approx(1, abs=1e-4) and p.loc[1, "special_share"] == 0  # no [CLS] here
    assert p.loc[2, "prev_share"] < 0.9  # split words: the previous token is often the same word
    assert res.metrics["wordy"].notes and "no layout" in res.metrics["wordy"].notes[0]
    assert np.isnan(h["layout_positional"]).all()


def test_similar_heads_across_tokenizers(pattern_atlas):
    res = compare_models(pattern_atlas, ["wordy", "piecey"], store=True)
    near = res.nearest
    best = near[(near.model == "wordy") & (near.scope == "other") & (near["rank"] == 1)].set_index(["measure", "head"])
    # same behaviour, different head index and tokenizer: word-level pooling lines them up
    assert best.loc[("pattern", 0), "other_head"] == 2 and best.loc[("pattern", 0), "score"] > 0.99  # prev
    assert best.loc[("pattern", 3), "other_head"] == 0 and best.loc[("pattern", 3), "score"] > 0.99  # self
    assert best.loc[("pattern", 1), "other_head"] == 3  # uniform
    assert best.loc[("profile", 2), "other_head"] == 1  # sink: on [CLS] vs on the first word, alike by profile
    # the sink on [CLS] has no weight left on words: its pattern is undefined, not a crash
    assert res.pairs.query("model == 'wordy' and head == 2")["pattern"].isna().all()
    stored = load(pattern_atlas, "wordy", "piecey")
    np.testing.assert_allclose(stored.block("pattern", "wordy", "piecey"), res.block("pattern", "wordy", "piecey"))
    nh = nearest_heads(pattern_atlas, "piecey", 0, 2, k=1)
    assert set(nh.scope) == {"same", "other"} and nh[nh.scope == "other"].other_head.item() == 0
    assert pattern_atlas.read_table("wordy", "token_sparsity").shape == (len(pattern_atlas.tokens("wordy")), 5)


def test_word_alignment_through_offsets():
    tok = pd.DataFrame({"char_start": [-1, 0, 4, 6, 7], "char_end": [-1, 3, 6, 7, 8], "is_special": [True, 0, 0, 0, 0]})
    m = S.text_membership(tok, "the cat.")  # units: the, cat, .
    assert m.tolist() == [[0, 0, 0], [3, 0, 0], [0, 2, 0], [0, 1, 0], [0, 0, 1]]
    g = pd.DataFrame({"patch_row": [-1, 0, 3, 2], "patch_col": [-1, 0, 3, 1]})
    assert S.grid_membership(g, (4, 4), (2, 2)).argmax(1).tolist()[1:] == [0, 3, 2]


def test_cli_outputs_and_store(tmp_path, capsys):
    atlas = Atlas.open(tmp_path / "a", create=True)
    write_synthetic_model(atlas, name="m1", n_seq=8, seed=3)
    write_synthetic_model(atlas, name="m2", n_layers=1, n_heads=2, n_kv_heads=1, n_seq=8, seed=3)
    random_layouts(atlas, "m1")
    assert cli(["compare", str(tmp_path / "a"), "--models", "m1", "m2", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "no layout stored" in out  # m2 has none; m1's random layout is measured
    m1 = pd.read_csv(tmp_path / "o" / "metrics_m1.csv")
    assert len(m1) == 6 and m1["layout_positional"].notna().all() and (m1["qk_separation"].abs() < 0.3).all()
    assert pd.read_csv(tmp_path / "o" / "metrics_m2.csv")["layout_positional"].isna().all()
    ts = pd.read_csv(tmp_path / "o" / "token_sparsity_m2.csv")
    assert len(ts) == 8 * 12 and {"L0H0", "L0H1", "keys90_mean", "token"} <= set(ts.columns)
    sim = pd.read_csv(tmp_path / "o" / "similarity.csv")
    assert len(sim) == 8 * 7 and sim["pattern"].between(-1, 1).all()
    html = (tmp_path / "o" / "report.html").read_text()
    assert "m1 vs m2" in html and "attnatlas-compare" in html and "cdn.bokeh.org" not in html  # standalone
    assert atlas.has_table("m1", "head_metrics") and atlas.has_table("m2", "nearest__m1")


def test_compare_view_builds_and_says_when_nothing_stored(pattern_atlas, tmp_path):
    from bokeh.models import Div

    from attnatlas.app.views.compare import build_compare_view

    compare_models(pattern_atlas, ["wordy", "piecey"])
    view = build_compare_view(pattern_atlas, "wordy", "piecey")
    assert view.name == "attnatlas-compare"
    atlas = Atlas.open(tmp_path / "b", create=True)
    write_pattern_model(atlas, "x", TEXTS, ["prev"])
    write_pattern_model(atlas, "y", TEXTS, ["prev"])
    v = build_compare_view(atlas, "x", "y")
    assert isinstance(v, Div) and "attnatlas compare" in v.text


# ---- bad input ---------------------------------------------------------------------------------

def test_no_common_inputs_missing_model_same_model(tmp_path, capsys):
    atlas = Atlas.open(tmp_path / "a", create=True)
    write_synthetic_model(atlas, name="m1", n_seq=4, seed=1)
    write_synthetic_model(atlas, name="m2", n_seq=4, seed=2)  # other random sentences
    write_synthetic_image_model(atlas, name="vit", n_images=2)
    with pytest.raises(InputError, match="different inputs"):
        compare_models(atlas, ["m1", "m2"])
    with pytest.raises(InputError, match="share no inputs"):
        compare_models(atlas, ["m1", "vit"])
    for models, msg in ((["m1", "m2"], "no sequence text is shared"), (["m1", "nope"], "not in the atlas"),
                        (["m1", "m1"], "two different models")):
        assert cli(["compare", str(tmp_path / "a"), "--models", *models, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_one_token_sequences_are_reported_not_crashed(tmp_path):
    atlas = Atlas.open(tmp_path / "a", create=True)
    words = ["cat", "dog", "bank", "light"]
    write_pattern_model(atlas, "x", words, ["prev", "uniform"], cls=False)
    write_pattern_model(atlas, "y", words, ["sink"], cls=False, causal=False)
    res = compare_models(atlas, ["x", "y"])
    h = res.metrics["x"].heads
    assert (h["n_queries"] == 0).all() and h["entropy_mean"].isna().all() and h["note"].str.contains("undefined").all()
    assert any("undefined" in n for n in res.notes)
    assert res.pairs["pattern"].isna().all()  # one word per sequence: nothing to correlate
    assert res.pairs["profile"].isna().all() and res.nearest.empty  # no metric defined: no profile either
    # a single token still has a per-token sparsity: its one key holds everything
    assert (atlas.read_table("x", "token_sparsity")[["L0H0", "L0H1"]] == 1).all().all()


def test_two_image_models_align_on_the_patch_grid(tmp_path):
    atlas = Atlas.open(tmp_path / "a", create=True)
    write_synthetic_image_model(atlas, name="fine", grid=4, n_images=2)
    write_synthetic_image_model(atlas, name="coarse", grid=2, patch=8, n_images=2)
    res = compare_models(atlas, ["fine", "coarse"], store=False)
    assert res.n_sequences == 2 and np.isfinite(res.pattern).any()
    assert res.metrics["fine"].heads["distance_mean"].notna().all()


def test_no_torch_in_compare_or_view():
    code = ("import sys, attnatlas.compare.run, attnatlas.compare.report, attnatlas.app.views.compare, attnatlas.render.compare_html, "
            "attnatlas.cli.compare; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
