"""Head types: a hand-built causal model whose layer-0 head 1 copies the previous token and whose layer-1
head 2 is an induction head, found (and nothing else) by the detector; scores against attention_from_atlas;
the CLI's refusals, reruns and the corpus-only path; the shared type rule."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf
from tiny_models import _tokenizer, save_image_model, save_text_model, write_images

from attnatlas.analyze import head_types as ht
from attnatlas.attention import attention_from_atlas
from attnatlas.cli import main as cli
from attnatlas.extract import ExtractOptions, extract
from attnatlas.store import open_atlas

V, P = 64, 64  # vocabulary, positions
TOK, POS, PREV = 0, V, V + P  # residual blocks; each has a negated mirror at +HALF so every vector has mean 0
HALF = V + P + V
D = 2 * HALF  # 384
N_HEAD, D_HEAD = 4, 96
PREV_HEAD = (0, 1)
INDUCTION_HEAD = (1, 2)

TEXTS = [
    "the cat sat on a mat and the bank of the river ran dark while anna said hello world to london and paris",
    "x = f ( y ) + 1 and the light was slow , the money ran fast ? the cat said hello to anna in paris !",
    "anna ran to the bank with money ; the river was dark and light , the mat sat on 42 cats and 3 dogs .",
    "hello world said the cat , paris and london ran slow while the dark river bank sat on the mat x y f",
]


def save_hand_built(folder):
    """GPT-2 with hand-set weights. Layer 0 head 1 reads position i as its query and position j + 1 as its key,
    so it attends to i - 1 and writes that token into the PREV block; layer 1 head 2 queries with the current
    token and keys with PREV, so it attends to the token after an earlier occurrence of the current one
    (induction). Every other head has zero q and k (uniform attention) and zero v; the MLPs are zero."""
    cfg = tf.GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=N_HEAD, bos_token_id=2,
                        eos_token_id=3, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = tf.GPT2Model(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.zero_()
        for ln in [model.ln_f] + [m for b in model.h for m in (b.ln_1, b.ln_2)]:
            ln.weight.fill_(1.0)
        t = torch.arange(V)
        model.wte.weight[t, TOK + t] = 1.0
        model.wte.weight[t, HALF + TOK + t] = -1.0
        p = torch.arange(P)
        model.wpe.weight[p, POS + p] = 1.0
        model.wpe.weight[p, HALF + POS + p] = -1.0
        s0 = (D / 4) ** 0.5  # ln_1's scale before layer 0: 4 unit entries per vector
        w = model.h[0].attn.c_attn.weight  # (in, 3 * D): q | k | v
        h = PREV_HEAD[1] * D_HEAD
        a = 1.5
        w[POS + p, h + p] = a  # query: own position
        w[POS + p[:-1], D + h + p[:-1] + 1] = a  # key: position + 1
        w[TOK + t, 2 * D + h + t] = 1.0  # value: the token
        proj = model.h[0].attn.c_proj.weight  # (D, D)
        proj[h + t, PREV + t] = 1 / s0
        proj[h + t, HALF + PREV + t] = -1 / s0
        w = model.h[1].attn.c_attn.weight
        h = INDUCTION_HEAD[1] * D_HEAD
        b = 2.0
        w[TOK + t, h + t] = b  # query: the current token
        w[PREV + t, D + h + t] = b  # key: the token before
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hand_atlas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hand")
    folder = save_hand_built(tmp / "gpt2hand")
    name = extract(tmp / "atlas", str(folder), texts=TEXTS, name="hand",
                   options=ExtractOptions(dtype="float32", progress=False))
    return open_atlas(tmp / "atlas"), name, folder


def typed_heads(df: pd.DataFrame, name: str) -> set[tuple[int, int]]:
    t = ht.head_types(df)
    return {(int(r["layer"]), int(r["head"])) for _, r in t.iterrows() if name in r.types.split(",")}


def test_hand_built_heads_are_found_and_nothing_else(hand_atlas):
    atlas, name, _ = hand_atlas
    res = ht.compute_head_scores(atlas, name, force=True)
    s = res.scores.set_index(["layer", "head"])
    assert s.loc[INDUCTION_HEAD, "induction"] > 0.9
    assert s.loc[PREV_HEAD, "previous_token"] > 0.9
    assert typed_heads(res.scores, "induction") == {INDUCTION_HEAD}
    assert typed_heads(res.scores, "previous-token") == {PREV_HEAD}
    others = s.drop(index=[INDUCTION_HEAD])
    assert others["induction"].max() < 0.1
    # the primary type of the two heads is theirs
    t = ht.head_types(res.scores).set_index(["layer", "head"])
    assert t.loc[INDUCTION_HEAD, "type"] == "induction" and t.loc[PREV_HEAD, "type"] == "previous-token"
    # the probe's settings are stored with the scores
    st = json.loads(res.scores["settings"].iloc[0])
    assert st["probe"] == {"seed": 0, "length": 32, "count": 8} and st["ran"]["length_used"] == 31


def test_corpus_scores_match_attention_from_atlas(hand_atlas):
    atlas, name, _ = hand_atlas
    df, _ = ht.corpus_scores(atlas, name)
    layer, head = PREV_HEAD
    n_seq = len(atlas.sequences(name))
    prev, total = 0.0, 0
    for s in range(n_seq):
        p = attention_from_atlas(atlas, name, layer, head, s)
        prev += float(np.diag(p, -1).sum())
        total += len(p) - 1
    got = df.set_index(["layer", "head"]).loc[PREV_HEAD, "previous_token"]
    assert got == pytest.approx(prev / total, abs=1e-5)
    sc = df.set_index(["layer", "head"])
    assert sc.loc[PREV_HEAD, "positional"] > 0.9  # a fixed offset kernel
    assert np.isnan(sc["next_token"]).all()  # causal: no next token
    unit = sc[ht.UNIT_SCORES[2:10]].to_numpy()
    assert np.nanmin(unit) >= 0 and np.nanmax(unit) <= 1 + 1e-5


def test_cli_reruns_refusals_and_corpus_only(hand_atlas, tmp_path, capsys):
    atlas, name, folder = hand_atlas
    path = str(atlas.path)
    assert cli(["analyze", path, "--head-types", "--quiet", "--force"]) == 0
    out = capsys.readouterr().out
    assert "head types done" in out and "induction (1): L1H2" in out and "previous-token (1): L0H1" in out
    before = atlas.read_table(name, ht.TABLE)
    assert cli(["analyze", path, "--head-types", "--quiet"]) == 0
    assert "already stored, kept" in capsys.readouterr().out
    assert atlas.read_table(name, ht.TABLE).equals(before)
    # new settings recompute
    assert cli(["analyze", path, "--head-types", "--quiet", "--seed", "1"]) == 0
    assert "head types done" in capsys.readouterr().out
    # corpus-only on a table with probe scores keeps them
    assert cli(["analyze", path, "--head-types", "--corpus-only", "--quiet", "--seed", "1"]) == 0
    assert "with the probe's, already stored, kept" in capsys.readouterr().out
    assert atlas.read_table(name, ht.TABLE)["induction"].notna().all()
    assert cli(["analyze", path, "--head-types", "--probe-count", "0"]) == 2
    assert "--probe-count must be" in capsys.readouterr().err

    # the model folder moved: one message, exit 2, nothing stored; --corpus-only still works
    import shutil

    moved = tmp_path / "atlas_copy"
    shutil.copytree(atlas.path, moved)
    (moved / "models" / name / "analysis" / f"{ht.TABLE}.parquet").unlink()
    _break_source(moved, name, str(tmp_path / "no-such-model"))
    assert cli(["analyze", str(moved), "--head-types"]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded here" in err and "--corpus-only" in err and "Traceback" not in err
    assert not open_atlas(moved).has_table(name, ht.TABLE)
    assert cli(["analyze", str(moved), "--head-types", "--corpus-only", "--quiet"]) == 0
    capsys.readouterr()
    s = open_atlas(moved).read_table(name, ht.TABLE)
    assert s["induction"].isna().all() and s["previous_token"].notna().all()
    assert typed_heads(s, "previous-token") == {PREV_HEAD}


def _break_source(atlas_dir, model, where):
    """Point the model's recorded id and source at a folder that does not exist."""
    f = atlas_dir / "models" / model / "zarr.json"
    meta = json.loads(f.read_text())
    meta["attributes"]["model_id"] = where
    meta["attributes"]["source"] = where
    f.write_text(json.dumps(meta))


def test_encoders_and_image_models(tmp_path, capsys):
    folder = save_text_model("bert", tmp_path / "bert")
    extract(tmp_path / "atlas", str(folder), texts=TEXTS, name="bert", options=ExtractOptions(progress=False))
    images = write_images(tmp_path / "imgs", n=3)
    extract(tmp_path / "atlas", str(save_image_model("vit", tmp_path / "vit")), images=str(images), name="vit",
            options=ExtractOptions(progress=False))
    atlas = open_atlas(tmp_path / "atlas")
    for model in ("bert", "vit"):
        assert cli(["analyze", str(atlas.path), "--model", model, "--head-types", "--induction"]) == 2
        err = capsys.readouterr().err
        assert "need a causal text model" in err and "Traceback" not in err
        assert not atlas.has_table(model, ht.TABLE)
    res = ht.compute_head_scores(atlas, "bert")
    assert res.scores["induction"].isna().all() and any("encoder" in n for n in res.notes)
    assert res.scores["next_token"].notna().all()
    res = ht.compute_head_scores(atlas, "vit")
    assert res.scores["local"].notna().all() and res.scores["previous_token"].isna().all()
    assert any("no layout stored" in n for n in res.notes)


def test_rule_is_documented_and_monotone():
    df = pd.DataFrame({"layer": [0, 0, 0], "head": [0, 1, 2], "induction": [0.95, 0.31, 0.1],
                       "previous_token": [0.6, 0.0, 0.2], "sink": [0.0, 0.0, 0.99]})
    t = ht.head_types(df)
    assert t.types.tolist() == ["induction,previous-token", "induction", "sink"]
    assert t.confidence.iloc[0] > t.confidence.iloc[1] >= 0.5
    assert ht.confidence(0.3, 0.3) == 0.5 and ht.confidence(1.0, 0.3) == 1.0 and ht.confidence(0.29, 0.3) == 0.0
    for name in ht.TYPE_RULES:
        assert name in ht.__doc__ or ht.TYPE_RULES[name][0] in ht.__doc__


def test_rule_module_imports_no_torch():
    code = "import sys, attnatlas.analyze.head_types; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_every_view_shows_the_types(hand_atlas, tmp_path, capsys):
    from attnatlas import testing
    from attnatlas.app.data import AppData
    from attnatlas.project import project_model

    atlas, name, _ = hand_atlas
    project_model(atlas, name, methods="pca", workers=1)
    ht.compute_head_scores(atlas, name)
    data = AppData(atlas.path)
    dash, _ = testing.dashboard_for(data, model=name)
    grid = dash.grid
    # badges: the strongest type of each typed head, in its cell
    badges = dict(zip(zip(grid.badge_src.data["x"], grid.badge_src.data["y"]), grid.badge_src.data["text"]))
    L = atlas.info(name).n_layers
    assert badges[(INDUCTION_HEAD[1] + 1.0, float(L - INDUCTION_HEAD[0]))] == "IND"
    assert badges[(PREV_HEAD[1] + 1.0, float(L - PREV_HEAD[0]))] == "PREV"
    # hover shows the types and the scores
    tips = dict(grid.hover.tooltips)
    assert tips["types"] == "@type_text" and "@m_induction" in tips.values()
    cells = grid.cell_src.data
    i = [k for k in range(len(cells["layer"])) if (cells["layer"][k], cells["head"][k]) == INDUCTION_HEAD][0]
    assert cells["type_text"][i].startswith("induction")
    # filter to induction heads: every other head is veiled
    assert "induction" in grid.type_select.options and grid.type_select.visible
    grid.type_select.value = "induction"
    shown = [(a, b) for a, b, f in zip(cells["layer"], cells["head"], grid.cell_src.data["fade"]) if f == 0]
    assert shown == [INDUCTION_HEAD]
    # ... and sorted: the induction head comes first in its layer
    grid.metric_opts.active = [0, 1]
    assert grid.columns[INDUCTION_HEAD] == 0
    # scores are in the metric menu (sort and filter by score)
    assert "induction" in dict(grid.metric_select.options)
    # the head view's title says the type
    dash.open_head(*INDUCTION_HEAD)
    assert "type: <b>induction" in dash.head_view.head_title.text
    dash.open_head(0, 0)
    assert "type:" in dash.head_view.head_title.text or "no head type" in dash.head_view.head_title.text
    # the head scatter: every head by two scores, hover thumbnails, click opens the head
    grid.mode.active = 2
    sc = grid.head_scatter
    assert grid.panel.children[1] is sc.panel
    assert (sc.x_select.value, sc.y_select.value) == ("induction", "previous_token")
    assert len(sc.src.data["x"]) == 8 and all(u.startswith("data:image/png") for u in sc.src.data["thumb"])
    k = [j for j in range(8) if sc.src.data["label"][j] == "L0H1"][0]
    assert sc.src.data["y"][k] > 0.9
    sc.src.selected.indices = [k]
    assert (dash.layer, dash.head, dash.tabs.active) == (0, 1, 1)
    # the head map can frame heads by type
    grid.mode.active = 1
    grid.head_map.colour_by.active = 1
    d = grid.head_map.src.data
    j = [n for n in range(len(d["label"])) if d["label"][n] == "L1H2"][0]
    assert d["colour"][j] == ht.TYPE_COLOURS["induction"] and d["type"][j] == "induction"
    # info lists the typed heads; the grid export's JSON has them
    assert cli(["info", str(atlas.path)]) == 0
    out = capsys.readouterr().out
    assert "head types:" in out and "induction (1): L1H2" in out
    png = tmp_path / "grid.png"
    assert cli(["export", str(atlas.path), "--model", name, "--method", "pca", "--grid", str(png)]) == 0
    meta = json.loads(png.with_suffix(".json").read_text())
    h = {(x["layer"], x["head"]): x for x in meta["heads"]}
    assert "induction" in h[INDUCTION_HEAD]["types"] and h[INDUCTION_HEAD]["type_confidence"]["induction"] > 0.9
    assert h[PREV_HEAD]["scores"]["previous_token"] > 0.9


@pytest.mark.browser
def test_type_menu_in_the_browser_veils_other_heads(hand_atlas):
    """A user picks "induction" in the grid's Head type menu (a real <select>): only the induction head stays."""
    pytest.importorskip("selenium")
    import os

    from selenium.webdriver.support.ui import Select
    from test_browser import CHROMEDRIVER, CHROMIUM, GRID_DRAWN, MODEL, make_driver, serve, wait_js

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from attnatlas.project import project_model

    atlas, name, _ = hand_atlas
    project_model(atlas, name, methods="pca", workers=1)
    ht.compute_head_scores(atlas, name)
    with serve(atlas.path, timeout=120) as url:
        driver = make_driver()
        try:
            driver.get(f"{url}?model={name}")
            wait_js(driver, GRID_DRAWN, timeout=60)
            el = driver.execute_script(f"return Bokeh.index.find_one({MODEL.format('grid_type')})"
                                       ".shadow_el.querySelector('select')")
            Select(el).select_by_visible_text("induction")
            shown = wait_js(driver, f"(() => {{ const d = {MODEL.format('grid_cells')}.data; const out = [];"
                                    "for (let i = 0; i < d.fade.length; i++) if (d.fade[i] == 0) "
                                    "out.push([d.layer[i], d.head[i]]); return out.length == 1 ? out : null })()")
            assert [tuple(x) for x in shown] == [INDUCTION_HEAD]
            badges = driver.execute_script(f"return {MODEL.format('grid_type_badges')}.data.text")
            assert "IND" in badges and "PREV" in badges
        finally:
            driver.quit()
