"""Your own input in every head: `place`, `attnatlas place`, probe sets, and the live worker."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
from tiny_models import WORDS, save_image_model, save_text_model, write_images

from attnatlas.cli import main as cli
from attnatlas.project.placement import FAR
from attnatlas.store import open_atlas

SKIP = {"<img", "src", "onerror", "alert", ">"}


def corpus(n: int = 36, seed: int = 0) -> list[str]:
    """Sentences in which no word appears twice at one position: with a tiny random model two such tokens
    would have almost the same vectors, and "near its stored position" would mean "near its twin"."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in SKIP]  # 37, prime: s -> 5 s + 3 p (mod 37) is one-to-one
    assert n <= len(words)
    return [" ".join(words[(5 * s + 3 * p) % len(words)] for p in range(rng.randint(6, 12))) for s in range(n)]


def fingerprint(path) -> str:
    """Every file of the atlas, names and bytes (claim files hold no data)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".claims" not in p.parts):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def build(tmp_path, family: str = "bert", max_points: int = 20_000, name: str = "tiny"):
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.project import project_model

    folder = save_text_model(family, tmp_path / f"{family}-weights")
    atlas = tmp_path / f"atlas-{family}-{max_points}"
    texts = corpus()
    extract(atlas, str(folder), texts=texts, name=name, options=ExtractOptions(progress=False))
    project_model(atlas, name, methods="pca", max_points=max_points, progress=False)
    return atlas, folder, texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("live"))


def nn_spacing(xy: np.ndarray) -> float:
    """Median distance of a layout point to its nearest other point (the layout's own spacing)."""
    xy = np.unique(xy, axis=0)  # identical points ([CLS] in layer 0) are one spot
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(1)))


def assert_lands_on_stored(atlas_path, model: str, method: str, texts: list[str], seq: int, table: pd.DataFrame) -> int:
    """Each placed point of corpus sentence `seq` against the stored position of the same token; returns
    how many points were compared. The median distance must be well under the layout's NN spacing."""
    atlas = open_atlas(atlas_path)
    tok = atlas.tokens(model)
    rows = tok.index[tok.sequence == seq].to_numpy()
    stored_rows = atlas.layout_rows(model, method)
    sampled = atlas.layout_sampled(model, method)
    n = len(stored_rows)
    pos_of_row = {int(r): i for i, r in enumerate(stored_rows)}
    info = atlas.info(model)
    compared, ratios = 0, []
    for L in range(info.n_layers):
        for h in range(info.n_heads):
            xy = atlas.layout_coords(model, method, L, h)
            laid = np.concatenate([np.flatnonzero(sampled), n + np.flatnonzero(sampled)])
            spacing = nn_spacing(xy[laid])
            got = table[(table.layer == L) & (table["head"] == h) & (table.method == method)]
            dists = []
            for kind, off in (("query", 0), ("key", n)):
                g = got[got.kind == kind].sort_values("position")
                assert len(g) == len(rows)
                for r, x, y in zip(rows, g.x, g.y):
                    if int(r) in pos_of_row:  # laid out, or placed by project the same way
                        p = off + pos_of_row[int(r)]
                        dists.append(np.hypot(x - xy[p, 0], y - xy[p, 1]))
            compared += len(dists)
            ratios.append(np.median(dists) / spacing)
    assert compared > 0
    assert np.median(ratios) < 0.1, ratios  # well under the spacing: on their own stored points
    assert max(ratios) < 0.5, ratios
    return compared


# ---- placing: a corpus sentence lands on its stored positions ---------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])  # llama: grouped-query keys, causal mask, rotary
def test_a_corpus_sentence_lands_on_its_stored_positions(tmp_path, family):
    from attnatlas.live import place

    atlas, _, texts = build(tmp_path, family)
    table = place(atlas, "tiny", texts[3], methods="pca")
    info = open_atlas(atlas).info("tiny")
    assert list(table.columns[:10]) == ["text", "sequence", "token", "position", "kind", "layer", "head", "method", "x", "y"]
    assert {"top_keys", "top_weights", "fit", "far"} <= set(table.columns)
    n_tok = int((open_atlas(atlas).tokens("tiny").sequence == 3).sum())
    assert len(table) == info.n_layers * info.n_heads * 2 * n_tok
    assert_lands_on_stored(atlas, "tiny", "pca", texts, 3, table)
    # A corpus token sits among its neighbours as closely as corpus tokens do (fit about 1); only the
    # corpus's own outliers are flagged.
    assert 0.3 < table.fit.median() < 1.5 and table.far.mean() < 0.1


def test_capped_layout_places_against_the_laid_out_sample(tmp_path):
    """With a point cap, the head's normalisation and references are the sample's, not all tokens'."""
    from attnatlas.live import place

    atlas, _, texts = build(tmp_path, "bert", max_points=300)
    a = open_atlas(atlas)
    sampled = a.layout_sampled("tiny", "pca")
    seq_of_row = a.tokens("tiny").sequence.to_numpy()[a.layout_rows("tiny", "pca")]
    mixed = [s for s in range(len(texts)) if sampled[seq_of_row == s].any() and (~sampled[seq_of_row == s]).any()]
    assert mixed  # a sentence with tokens both laid out and placed by project
    table = place(atlas, "tiny", texts[mixed[0]], methods="pca")
    assert assert_lands_on_stored(atlas, "tiny", "pca", texts, mixed[0], table) > 0


def test_new_text_gets_top_k_attention_and_a_fit(tiny):
    from attnatlas.live import place

    atlas, _, _ = tiny
    table = place(atlas, "tiny", ["paris said hello", "the dark river"], methods="pca")
    assert sorted(table.text.unique()) == ["paris said hello", "the dark river"]
    q = table[table.kind == "query"]
    assert all(len(k) == len(w) > 0 for k, w in zip(q.top_keys, q.top_weights))
    assert all(abs(sum(w) - 1) < 1e-2 for w, k in zip(q.top_weights, q.top_keys) if len(k) < 8)  # short: all keys
    assert (table[table.kind == "key"].top_keys.map(len) == 0).all()
    assert np.isfinite(table.fit).all() and (table.far == (table.fit > FAR)).all()


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_writes_csv_or_parquet_and_leaves_the_atlas_as_it_was(tiny, tmp_path, capsys):
    atlas, _, texts = tiny
    before = fingerprint(atlas)
    assert cli(["place", str(atlas), "--text", texts[0]]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    # A row per placed point, its coordinates in every stored method side by side; the text once, apart.
    assert lines[0].startswith("sequence,token,position,kind,layer,head,x_pca,y_pca,")
    assert ",method," not in lines[0] and ",text," not in lines[0]
    assert len(lines) > 10 and "flagged far" in out.err
    pq = tmp_path / "p.parquet"
    assert cli(["place", str(atlas), "--model", "tiny", "--text", "the cat", "--out", str(pq)]) == 0
    df = pd.read_parquet(pq)
    assert set(df.kind) == {"query", "key"} and len(df) == 8 * 2 * 4  # 8 heads, [CLS] the cat [SEP]
    assert fingerprint(atlas) == before


def test_save_stores_a_probe_set_beside_the_corpus(tmp_path, capsys):
    from attnatlas.live.probes import list_probes, read_probe

    atlas, _, _ = build(tmp_path)
    tokens_before = open_atlas(atlas).tokens("tiny").copy()
    assert cli(["place", str(atlas), "--text", "anna said hello", "--save", "greeting", "--out",
                str(tmp_path / "g.csv")]) == 0
    a = open_atlas(atlas)
    assert list_probes(a, "tiny") == ["greeting"]
    assert (atlas / "models" / "tiny" / "probes" / "greeting.parquet").is_file()
    table, meta = read_probe(a, "tiny", "greeting")
    assert meta["texts"] == ["anna said hello"] and meta["stale"] == [] and "pca" in meta["layouts"]
    pd.testing.assert_frame_equal(a.tokens("tiny"), tokens_before)  # the corpus is not mixed with it
    assert not list((atlas / "models" / "tiny" / "probes").glob(".*"))  # no temp file left
    before = fingerprint(atlas)
    assert cli(["place", str(atlas), "--text", "x", "--save", "greeting"]) == 2
    assert "already has a probe set" in capsys.readouterr().err
    assert fingerprint(atlas) == before


# ---- bad input: one message, exit code 2, the atlas unchanged ---------------------------------------------------
def test_bad_input_gives_one_message_and_keeps_the_atlas(tmp_path, capsys):
    atlas, folder, _ = build(tmp_path)
    vit = save_image_model("vit", tmp_path / "vit")
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.project import project_model

    imgs = write_images(tmp_path / "imgs", n=3)
    extract(atlas, str(vit), images=str(imgs), name="vit", options=ExtractOptions(progress=False))
    project_model(atlas, "vit", methods="pca", progress=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(next(imgs.glob("*.png")).read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "empty text": (["--model", "tiny", "--text", "   "], "empty"),
        "model not in the atlas": (["--model", "nope", "--text", "the cat"], "not in the atlas"),
        "truncated image": (["--model", "vit", "--image", str(broken)], "broken.png"),
        "text as an image": (["--model", "vit", "--image", str(tmp_path / "text.png")], "text.png"),
        "missing image": (["--model", "vit", "--image", str(tmp_path / "none.png")], "not found"),
        "image for a text model": (["--model", "tiny", "--image", str(broken)], "text model"),
        "text for an image model": (["--model", "vit", "--text", "the cat"], "image model"),
        "unknown method": (["--model", "tiny", "--text", "the cat", "--method", "umap"], "no 'umap' layouts"),
        "bad --out": (["--model", "tiny", "--text", "the cat", "--out", str(tmp_path / "x.json")], ".parquet file name"),
        "bad probe name": (["--model", "tiny", "--text", "the cat", "--save", "../x"], "Invalid probe name"),
    }
    before = fingerprint(atlas)
    capsys.readouterr()  # what setting up printed
    for case, (args, needle) in cases.items():
        code = cli(["place", str(atlas), *args])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (case, err)
        assert needle in err, (case, err)
        assert fingerprint(atlas) == before, case
    # Weights that cannot be loaded here (the model folder is gone): one message, nothing written.
    folder.rename(tmp_path / "moved")
    capsys.readouterr()
    code = cli(["place", str(atlas), "--model", "tiny", "--text", "the cat"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be loaded here" in err and len(err.strip().splitlines()) == 1, err
    assert fingerprint(atlas) == before


def test_over_long_text_is_truncated_or_chunked_and_says_so(tiny, capsys):
    atlas, _, _ = tiny
    long = " ".join(["the cat sat on a mat"] * 20)  # 120 words, the tiny model takes 64 positions
    before = fingerprint(atlas)
    assert cli(["place", str(atlas), "--text", long, "--method", "pca"]) == 0
    out = capsys.readouterr()
    assert "truncated to 64" in out.err and "--chunk" in out.err
    df = pd.read_csv(__import__("io").StringIO(out.out))
    assert df.position.max() == 63
    assert cli(["place", str(atlas), "--text", long, "--chunk"]) == 0
    out = capsys.readouterr()
    assert "windows" in out.err
    df = pd.read_csv(__import__("io").StringIO(out.out))
    assert df.sequence.nunique() >= 2 and df.position.max() <= 63
    words = df[(df.kind == "query") & (df.layer == 0) & (df["head"] == 0) & ~df.token.isin(["[CLS]", "[SEP]"])]
    assert len(words) == 120  # every word placed, none lost between windows
    assert fingerprint(atlas) == before


def test_an_image_is_placed_into_an_image_model(tmp_path):
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.live import place
    from attnatlas.live.encode import read_image_bytes
    from attnatlas.project import project_model

    vit = save_image_model("vit", tmp_path / "vit")
    imgs = write_images(tmp_path / "imgs", n=3)
    atlas = tmp_path / "a"
    extract(atlas, str(vit), images=str(imgs), name="vit", options=ExtractOptions(progress=False))
    project_model(atlas, "vit", methods="pca", progress=False)
    first = sorted(imgs.iterdir())[0]
    table = place(atlas, "vit", images=read_image_bytes(first.read_bytes(), first.name))
    assert table.text.unique().tolist() == [first.name]
    assert set(table.token) >= {"[CLS]", "patch 0,0"}
    assert_lands_on_stored(atlas, "vit", "pca", [], 0, table)


# ---- the live worker ----------------------------------------------------------------------------------------------
def test_worker_places_and_survives_its_own_death(tiny):
    from attnatlas.live.worker import LiveError, LiveWorker

    atlas, _, texts = tiny
    w = LiveWorker(str(atlas))
    try:
        w.start()
        first_pid = w.pid
        # Killed mid-request (while it loads torch and the model): one message, then a fresh worker.
        err: list[str] = []

        def ask() -> None:
            try:
                w.request({"op": "place", "model": "tiny", "method": "pca", "text": texts[1]})
            except LiveError as exc:
                err.append(str(exc))

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(1.0)
        os.kill(first_pid, signal.SIGKILL)
        t.join(60)
        assert err and "stopped" in err[0] and "restarted" in err[0], err
        r = w.request({"op": "place", "model": "tiny", "method": "pca", "text": texts[1]})
        assert w.pid != first_pid and w.restarts == 1
        assert r["first_load"] and r["seconds"]["load"] > 0
        n = len(r["tokens"])
        assert len(r["cols"]["x"]) == 8 * 2 * n and np.isfinite(r["cols"]["x"]).all()
        again = w.request({"op": "place", "model": "tiny", "method": "pca", "text": "anna said hello"})
        assert not again["first_load"]
        with pytest.raises(LiveError, match="empty"):
            w.request({"op": "place", "model": "tiny", "method": "pca", "text": " "})
        with pytest.raises(LiveError, match="not in the atlas"):
            w.request({"op": "place", "model": "other", "method": "pca", "text": "the cat"})
        assert w.request({"op": "place", "model": "tiny", "method": "pca", "text": "the cat"})["ok"]  # still usable
    finally:
        w.stop()
    assert not w.alive


def test_worker_module_and_live_view_never_import_torch():
    import subprocess
    import sys

    code = ("import sys; import attnatlas.live.worker, attnatlas.live.reference, attnatlas.live.probes, "
            "attnatlas.app.views.live; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ---- real weights -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_corpus_sentence_lands_on_its_stored_positions(tmp_path):
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.live import place
    from attnatlas.project import project_model

    lines = [s for s in (open(os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "demo.txt"))
                         .read().splitlines()) if s.strip()][:40]
    atlas = tmp_path / "real"
    extract(atlas, "minilm", texts=lines, options=ExtractOptions(progress=False))
    project_model(atlas, "minilm", methods="pca", progress=False)
    table = place(atlas, "minilm", lines[7], methods="pca")
    assert assert_lands_on_stored(atlas, "minilm", "pca", lines, 7, table) > 0
    assert not table.far.any()


# ---- in the browser -----------------------------------------------------------------------------------------------
SHADOW_FIND = """
const want = arguments[0], text = arguments[1]
const walk = (root) => {
  for (const el of root.querySelectorAll('*')) {
    if (el.tagName === want && (!text || el.textContent.trim() === text)) return el
    if (el.shadowRoot) { const hit = walk(el.shadowRoot); if (hit) return hit }
  }
  return null
}
const el = walk(document)
if (!el) return false
if (arguments[2] === 'click') { el.click() }
else if (arguments[2] === 'blur') { el.dispatchEvent(new Event('change', {bubbles: true})); el.blur() }
else { el.focus(); if (arguments[2] === 'clear') el.value = '' }
return true
"""


def serve_live(atlas, timeout: float = 90.0, live: bool = True):
    """`attnatlas serve ATLAS --live` on loopback (a context manager yielding the base URL)."""
    from test_browser import serve

    return serve(atlas, timeout, args=("--live",) if live else ())


def type_and_place(driver, text: str) -> None:
    """Type into the "Your text" box and press its button, as a user does."""
    from selenium.webdriver.common.action_chains import ActionChains

    assert driver.execute_script(SHADOW_FIND, "TEXTAREA", None, "clear")
    ActionChains(driver).send_keys(text).perform()
    assert driver.execute_script(SHADOW_FIND, "TEXTAREA", None, "blur")  # Bokeh sends the value on change
    assert driver.execute_script(SHADOW_FIND, "BUTTON", "Place into every head", "click")


@pytest.mark.browser
def test_browser_types_a_sentence_and_sees_its_markers(tiny):
    from test_browser import CHROMEDRIVER, CHROMIUM, IDLE, MODEL, make_driver, wait_js

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs chromium and chromedriver")
    atlas, _, _ = tiny
    hostile = "anna said <img src=x onerror=alert(1)> $$x$$"
    with serve_live(atlas) as url:
        driver = make_driver()
        try:
            driver.get(url + "?model=tiny&method=pca&layer=1&head=2")
            wait_js(driver, f"{IDLE} && {MODEL.format('live_text')} != null", 60)
            type_and_place(driver, hostile)
            try:
                n = wait_js(driver, f"{MODEL.format('live_points')}.data.x.length", 120)
            except TimeoutError:
                raise AssertionError(driver.execute_script(f"return {MODEL.format('live_status')}.text")) from None
            status = driver.execute_script(f"return {MODEL.format('live_status')}.text")
            assert "Placed" in status, status
            tokens = driver.execute_script(f"return {MODEL.format('live_points')}.data.token")
            assert n == len(tokens) and "anna" in tokens and ">" in tokens
            # Drawn: the markers' renderer has a view with as many points, on top of the corpus.
            drawn = wait_js(driver, f"Bokeh.index.find_one({MODEL.format('live_markers')}) && "
                                    f"Bokeh.index.find_one({MODEL.format('live_markers')}).glyph.sx.length")
            assert drawn == n
            fit = driver.execute_script(f"return {MODEL.format('live_fit')}.text")
            assert "<b>&gt;</b>" in fit and "<img" not in fit  # the user's tokens are escaped in the table
            # Stepping to the next head keeps them (drawn from what the one request returned).
            assert driver.execute_script(SHADOW_FIND, "BUTTON", "head \u25b6", "click")
            wait_js(driver, f"{MODEL.format('head_select')}.value == '3'")
            xs = wait_js(driver, f"{IDLE} && {MODEL.format('live_points')}.data.x.length == {n} && "
                                 f"{MODEL.format('live_fit')}.text.includes('L1H3')")
            assert xs
            # An empty box: one message, the session stays usable.
            type_and_place(driver, "   ")
            wait_js(driver, f"{MODEL.format('live_status')}.text.includes('empty')")
        finally:
            driver.quit()


@pytest.mark.browser
def test_without_live_the_box_says_how_to_turn_it_on(tiny):
    from test_browser import CHROMEDRIVER, CHROMIUM, IDLE, MODEL, make_driver, wait_js

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs chromium and chromedriver")
    atlas, _, _ = tiny
    with serve_live(atlas, live=False) as url:
        driver = make_driver()
        try:
            driver.get(url + "?model=tiny&method=pca&layer=0&head=0")
            status = wait_js(driver, f"{IDLE} && {MODEL.format('live_status')}.text", 60)
            assert "--live" in status and not driver.execute_script(f"return {MODEL.format('live_text')}.visible")
        finally:
            driver.quit()


# ---- the dashboard's view, without a browser -------------------------------------------------------------------
class FakeWorker:
    """Answers like the live worker; `fail` makes the next request fail as a worker that died would."""

    def __init__(self, atlas):
        from attnatlas.live import Placer

        self.placer, self.fail, self.calls = Placer(atlas), None, 0

    def request(self, payload):
        from attnatlas.errors import AtlasError
        from attnatlas.live.worker import LiveError, handle

        self.calls += 1
        if self.fail:
            msg, self.fail = self.fail, None
            raise LiveError(msg)
        try:
            return {"ok": True, **handle(self.placer, payload)}
        except AtlasError as exc:
            raise LiveError(str(exc)) from None


def test_live_view_draws_keeps_and_recovers(tiny):
    from bokeh.document import Document
    from bokeh.models import Div

    from attnatlas.app.dashboard import build_document
    from attnatlas.app.data import AppData
    from attnatlas.app.views.live import OFF_TEXT

    atlas, _, texts = tiny
    dash = build_document(Document(), AppData(str(atlas)), {"model": [b"tiny"], "layer": [b"1"], "head": [b"2"]})
    view = dash.live_view
    assert view.status.text == OFF_TEXT and not view.text.visible  # no worker: the box says how to turn it on
    assert all(m.disable_math for m in view.panel.references() if isinstance(m, Div))
    view.worker = FakeWorker(atlas)
    view._set_mode()
    view.text.value = "anna said <b>hello</b>"
    view._on_place()
    n = len(view.src.data["x"])
    assert n > 0 and set(view.src.data["kind"]) == {"query", "key"} and "Placed" in view.status.text
    assert "<b>&gt;</b>" in view.fit_table.text and "hello" not in view.status.text  # tokens escaped in the table
    q = np.array(view.src.data["kind"]) == "query"
    assert len(view.line_src.data["x0"]) > 0  # the new input's own attention lines
    # The grid: every head's placed points inside that head's cell.
    g = dash.grid.g
    L, H = g.done.shape
    gx, gy = np.array(view.grid_src.data["x"]), np.array(view.grid_src.data["y"])
    assert len(gx) == L * H * n
    where = [tuple(int(v) for v in w[1:].split("H")) for w in view.grid_src.data["where"]]
    col = np.array([dash.grid.columns[a, b] for a, b in where])
    row_ = np.array([L - 1 - a for a, _ in where])
    assert ((gx > col) & (gx < col + 1) & (gy > row_) & (gy < row_ + 1)).all()
    xy_before = np.array(view.src.data["x"]).copy()
    dash.head_view.step("next_head")  # L1H3: drawn from the same answer, no new request
    assert view.worker.calls == 1 and len(view.src.data["x"]) == n and not np.allclose(view.src.data["x"], xy_before)
    assert "L1H3" in view.fit_table.text and q.sum() == n // 2
    # The worker dies mid-request: one message, the box works again, the last markers stay.
    view.worker.fail = "The live worker stopped (exit code -9) while placing your input; it is restarted on the next request."
    view._on_place()
    assert "stopped" in view.status.text and "color:#b00" in view.status.text and not view.button.disabled
    assert len(view.src.data["x"]) == n
    view.text.value = texts[2]
    view._on_place()
    assert "Placed" in view.status.text and view.worker.calls == 3
    view.text.value = "  "
    view._on_place()
    assert "empty" in view.status.text and view.worker.calls == 3  # caught before any request
    # Markers of another projection are never drawn over this one (the dashboard calls follow on a switch).
    view.result["method"] = "tsne"
    view.follow()
    assert view.result is None and len(view.src.data["x"]) == 0 and "again" in view.status.text


def upload(view, name: str, data: bytes) -> None:
    """What the browser sends when a file is chosen (FileInput's read-only properties, set as from JSON)."""
    import base64

    view.upload.set_from_json("filename", name)
    view.upload.set_from_json("value", base64.b64encode(data).decode())


def test_live_view_places_an_uploaded_image_and_refuses_a_broken_one(tmp_path):
    from bokeh.document import Document

    from attnatlas.app.dashboard import build_document
    from attnatlas.app.data import AppData
    from attnatlas.extract import ExtractOptions, extract
    from attnatlas.project import project_model

    vit = save_image_model("vit", tmp_path / "vit")
    imgs = write_images(tmp_path / "imgs", n=3)
    atlas = tmp_path / "a"
    extract(atlas, str(vit), images=str(imgs), name="vit", options=ExtractOptions(progress=False))
    project_model(atlas, "vit", methods="pca", progress=False)
    dash = build_document(Document(), AppData(str(atlas)), {"model": [b"vit"], "layer": [b"0"], "head": [b"1"]})
    view = dash.live_view
    view.worker = FakeWorker(atlas)
    view._set_mode()
    assert view.upload.visible and not view.text.visible and "image" in view.title.text.lower()
    png = sorted(imgs.glob("*.png"))[0]
    upload(view, "my <photo>.png", png.read_bytes())
    assert "Placed" in view.status.text, view.status.text
    assert "patch 0,0" in view.src.data["token"] and "[CLS]" in view.src.data["token"]
    upload(view, "broken <b>.png", png.read_bytes()[:100])
    assert "not a readable image" in view.status.text and "broken &lt;b&gt;.png" in view.status.text
    assert "patch 0,0" in view.src.data["token"]  # the last placement stays drawn


def test_live_labels_never_overlap_and_sparse_ones_all_show():
    """Issue 26 item 5: labels of placed tokens in a dense spot move around their markers or are left out."""
    from attnatlas.app.views.live import label_offsets

    rng = np.random.default_rng(0)
    sx, sy = rng.normal(300, 15, 40), rng.normal(300, 15, 40)  # 40 markers within about 30 px
    texts = ["because", "fit", "was", "in", "the"] * 8
    t, dx, dy = label_offsets(sx, sy, texts)
    boxes = [(a + x, b + y - 13, a + x + 7 * len(s), b + y) for a, b, s, x, y in zip(sx, sy, t, dx, dy) if s]
    assert 0 < len(boxes) < 40
    for i, p in enumerate(boxes):
        for q in boxes[i + 1:]:
            assert not (p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]), (p, q)
    # Far apart: every label shows, to the right of its marker.
    t, dx, _ = label_offsets(np.arange(5) * 200.0, np.full(5, 100.0), texts[:5])
    assert t == texts[:5] and all(x > 0 for x in dx)
