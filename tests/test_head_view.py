"""The single-head view in headless Chromium: honest highlighting, colour modes, the tooltip, attention
lines and shading, search over text, and the defaults (issue 16, items 1-6); the app's import graph."""

from __future__ import annotations

import ast
import html
import json
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_browser import DOC, IDLE, MODEL, click_data_point, make_driver, screenshot_array, serve, wait_js

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "atlases" / "demo"
APP = ROOT / "attnatlas" / "app"
needs_demo = pytest.mark.skipif(not (DEMO / "minilm").exists() and not DEMO.exists(), reason="needs atlases/demo")
browser = pytest.mark.browser
SCATTER = MODEL.format("head_scatter")
HEAD_READY = f"{IDLE} && {SCATTER} != null && {SCATTER}.data_source.data.x.length > 0"


# ---- helpers ---------------------------------------------------------------------------------------------------
def frame_pixels(driver, figure_name: str = "head_figure") -> np.ndarray:
    """The screenshot cropped to the plotting frame of a figure (no toolbar, no axes)."""
    box = driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format(figure_name)}); const r = v.canvas_view.el.getBoundingClientRect();"
        "const f = v.frame.bbox; return [r.left + f.left, r.top + f.top, r.left + f.right, r.top + f.bottom, window.devicePixelRatio]")
    x0, y0, x1, y1, ratio = box
    shot = screenshot_array(driver)
    return shot[int(y0 * ratio) + 2:int(y1 * ratio) - 2, int(x0 * ratio) + 2:int(x1 * ratio) - 2]


def saturated_blobs(pixels: np.ndarray, threshold: int = 70) -> int:
    """Connected areas of strongly coloured pixels: what the eye counts as bright dots."""
    from scipy import ndimage

    sat = pixels.max(2) - pixels.min(2) > threshold
    return int(ndimage.label(sat)[1])


def densest_head(model: str, method: str) -> tuple[int, int, int]:
    """(layer, head, size) of the head of the demo model whose largest stack of identical points is biggest."""
    from attnatlas.app.data import AppData

    data = AppData(DEMO)
    info = data.infos[model]
    best = (0, 0, 0)
    for layer in range(info.n_layers):
        for head in range(info.n_heads):
            h = data.head(model, method, layer, head)
            _, counts = np.unique(np.stack([h.x, h.y], 1), axis=0, return_counts=True)
            if counts.max() > best[2]:
                best = (layer, head, int(counts.max()))
    return best


def set_value(driver, name: str, value) -> None:
    driver.execute_script(f"{MODEL.format(name)}.value = arguments[0]", value)


def open_head(driver, url: str, model: str, method: str, layer: int, head: int) -> None:
    driver.get(f"{url}?model={model}&method={method}&layer={layer}&head={head}")
    wait_js(driver, HEAD_READY)
    wait_js(driver, "[...Bokeh.index.all_views()].some(v => v.model.name == 'head_scatter')")
    time.sleep(0.5)  # one paint


def point_xy(driver, index: int) -> tuple[float, float]:
    return tuple(driver.execute_script(f"const d = {SCATTER}.data_source.data; return [d.x[arguments[0]], d.y[arguments[0]]]", index))


def hover_entries(driver) -> int:
    """Entries the head scatter's hover tool shows now (BokehJS keeps them for tests); the tool of the
    attention lines is left out: hovering a line on purpose may show its weight."""
    return driver.execute_script(
        "const views = [...Bokeh.index.all_views()].filter(v => v.model.type == 'HoverTool' && v.model.name != 'line_hover');"
        "let n = 0; for (const t of views) n += (t._current_entries || []).length; return n")


def move_to_data(driver, figure_name: str, x: float, y: float) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    px, py = driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format(figure_name)});"
        "const r = v.canvas_view.el.getBoundingClientRect();"
        "return [r.left + v.frame.x_scale.compute(arguments[0]), r.top + v.frame.y_scale.compute(arguments[1])]", x, y)
    builder = ActionBuilder(driver)
    builder.pointer_action.move_to_location(int(px) + 1, int(py))
    builder.pointer_action.move_to_location(int(px), int(py))
    builder.perform()


@pytest.fixture(scope="module")
def demo_url():
    if not DEMO.exists():
        pytest.skip("needs atlases/demo")
    with serve(DEMO, timeout=180) as url:
        yield url


@pytest.fixture()
def driver():
    d = make_driver(1500, 1300)
    try:
        yield d
    finally:
        d.quit()


# ---- item 1: search highlighting ----------------------------------------------------------------------------------
@browser
def test_search_shows_matches_in_their_true_count(demo_url, driver):
    layer, head, stack = densest_head("minilm", "tsne")
    assert stack >= 50  # the [CLS] keys of this head share one spot
    open_head(driver, demo_url, "minilm", "tsne", layer, head)
    set_value(driver, "search", "bank")
    count = wait_js(driver, f"{MODEL.format('search_count')}.text.includes('bank') && {MODEL.format('search_count')}.text")
    n = int(re.search(r"(\d+) match", count).group(1))
    assert n > 0
    time.sleep(0.8)
    blobs = saturated_blobs(frame_pixels(driver))
    # every bright dot is a match (queries and keys of the matching tokens), none is a stack of non-matches
    assert 1 <= blobs <= 2 * n, (blobs, n, count)
    matches = driver.execute_script(f"return {MODEL.format('search_matches')}.data_source.data.x.length")
    assert matches == 2 * n  # each matching token as a query and as a key, drawn on top
    # stacked points are told as such in the tooltip
    tips = json.dumps(driver.execute_script(f"return [...{DOC}.all_models].filter(m => m.type == 'HoverTool').map(m => m.tooltips)"))
    assert "here" in tips


# ---- item 2: colour modes survive a click ---------------------------------------------------------------------------
@browser
def test_patch_colour_survives_a_click(demo_url, driver):
    open_head(driver, demo_url, "dinov2-small", "tsne", 5, 2)
    colour = f"[...{DOC}.all_models].find(m => m.type == 'Select' && m.title == 'Colour')"
    driver.execute_script(f"{colour}.value = 'patch'")
    wait_js(driver, f"{IDLE} && {colour}.value == 'patch'")
    time.sleep(0.8)

    def query_key_share() -> float:
        px = frame_pixels(driver).astype(float)
        ink = px.min(2) < 235
        qk = np.zeros(ink.shape, bool)
        for hexc in ("#1b9e77", "#d9458e"):
            rgb = np.array([int(hexc[i:i + 2], 16) for i in (1, 3, 5)], float)
            qk |= np.abs(px - rgb).sum(2) < 60
        return qk.sum() / max(ink.sum(), 1)

    before = query_key_share()
    x, y = point_xy(driver, 3)
    click_data_point(driver, "head_figure", x, y)
    wait_js(driver, f"{SCATTER}.data_source.selected.indices.length > 0 && {IDLE}")
    time.sleep(0.8)
    after = query_key_share()
    glyph, sel = driver.execute_script(
        f"const r = {SCATTER}; const spec = (c) => c == null ? null : (typeof c == 'string' ? c : [c.field || c.value, c.transform ? c.transform.id : null]);"
        "return [JSON.stringify(spec(r.glyph.fill_color)), JSON.stringify(spec(r.selection_glyph.fill_color))]")
    assert after < before + 0.05, (before, after)  # the scatter keeps its patch colours
    assert glyph == sel, (glyph, sel)
    legend = driver.execute_script(f"return [...{DOC}.all_models].filter(m => m.type == 'Div').map(m => m.text).join(' ')")
    assert "mean colour of each patch" in legend


# ---- item 3: one tooltip entry, hidden after a click -------------------------------------------------------------
@browser
def test_tooltip_is_one_entry_and_hides_after_a_click(demo_url, driver):
    layer, head, _ = densest_head("minilm", "tsne")
    open_head(driver, demo_url, "minilm", "tsne", layer, head)
    xy = driver.execute_script(f"return [{SCATTER}.data_source.data.x, {SCATTER}.data_source.data.y]")
    pts = np.stack([np.asarray(xy[0], float), np.asarray(xy[1], float)], 1)
    uniq, inv, counts = np.unique(pts, axis=0, return_inverse=True, return_counts=True)
    x, y = uniq[counts.argmax()]
    move_to_data(driver, "head_figure", x, y)
    n = wait_js(driver, "(() => { const v = [...Bokeh.index.all_views()].filter(v => v.model.type == 'HoverTool' && v.model.name != 'line_hover');"
                        " let n = 0; for (const t of v) n += (t._current_entries || []).length; return n })()", timeout=10)
    assert n == 1, n
    shown = driver.execute_script(
        "const out = []; const walk = (root) => { root.querySelectorAll('*').forEach(el => {"
        " if (el.className && String(el.className).includes('bk-tooltip-row-value')) out.push(el.textContent);"
        " if (el.shadowRoot) walk(el.shadowRoot) }) }; walk(document); return out.join(' | ')")
    assert str(counts.max() - 1) in shown or str(counts.max()) in shown, shown  # the stack is counted
    click_data_point(driver, "head_figure", x, y)
    wait_js(driver, f"{SCATTER}.data_source.selected.indices.length > 0 && {IDLE}")
    move_to_data(driver, "head_figure", x, y)
    time.sleep(0.6)
    assert hover_entries(driver) == 0


# ---- item 4: attention lines and shading on an absolute scale -----------------------------------------------------
@browser
def test_attention_lines_above_a_threshold_and_absolute_shading(demo_url, driver):
    open_head(driver, demo_url, "minilm", "tsne", 2, 5)
    n_points = driver.execute_script(f"return {SCATTER}.data_source.data.x.length") // 2
    checked = 0
    for p in (5, 40, 77, 300, 600):  # queries
        x, y = point_xy(driver, p)
        driver.execute_script(f"{SCATTER}.data_source.selected.indices = [arguments[0]]", p)
        wait_js(driver, f"{IDLE} && {MODEL.format('sequence_panel')}.text.includes('query')")
        time.sleep(0.3)
        # shading in the sequence panel: background opacity is the weight itself (0-1 scale)
        panel = driver.execute_script(f"return {MODEL.format('sequence_panel')}.text")
        for alpha, weight in re.findall(r"rgba\(217,69,142,([0-9.]+)\);[^\"]*\"[^>]*title=\"weight ([0-9.]+)", panel):
            assert abs(float(alpha) - float(weight)) < 0.011, (alpha, weight)
            checked += 1
        legend = driver.execute_script(f"return {MODEL.format('attention_legend')}.text")
        threshold = float(re.search(r"\u2265\s*([0-9.]+)", legend).group(1))
        d = driver.execute_script(f"return {MODEL.format('attention_line_data')}.data")
        w = np.asarray(d["weight"], float)
        assert (w >= threshold).all(), (w, threshold)
        # the same weight gets the same opacity whatever the strongest key of this query is
        assert np.allclose(np.asarray(d["alpha"], float), [_line_alpha(v) for v in w], atol=1e-3)
        assert n_points > p
    assert checked > 0
    # weights are printed on hover of a line
    tips = json.dumps(driver.execute_script(f"return [...{DOC}.all_models].filter(m => m.type == 'HoverTool').map(m => m.tooltips)"))
    assert "@weight" in tips


def _line_alpha(weight: float) -> float:
    from attnatlas.app.views.head import line_alpha

    return float(line_alpha(np.array([weight]))[0])


# ---- item 5: search over text, folding as the tokenizer does, byte tokens decoded -----------------------------------
TEXTS = ["Wir trafen Herrn Müller in München.", "東京 ist groß und Москва ist kalt.", "Ich mag 🍕 und Pasta.",
         "The bank of the river.", "Zum Müller-Haus geht es hier."]


def _fold(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", s.lower()) if unicodedata.category(c) != "Mn")


def _wordpiece(text: str) -> list[tuple[str, int, int]]:
    """An uncased WordPiece-like split: words, punctuation and CJK characters; lower-cased, accents stripped,
    words over 4 characters cut into ## pieces."""
    out = []
    for m in re.finditer(r"[\u3040-\u9fff]|\w+|[^\w\s]", text):
        a, b = m.span()
        word = _fold(m.group())
        if len(word) <= 4:
            out.append((word, a, b))
            continue
        for i in range(0, len(word), 4):
            out.append((("##" if i else "") + word[i:i + 4], a + i, min(a + i + 4, b)))
    return out


def _byte_level(text: str) -> list[tuple[str, int, int]]:
    """A byte-level BPE-like split: words with a leading-space marker; a character of several UTF-8 bytes as
    pieces of two bytes each, decoded alone (so shown as U+FFFD), each with that character's offsets."""
    out = []
    for m in re.finditer(r" ?\S+", text):
        a = m.start()
        for i, ch in enumerate(m.group()):
            raw = ch.encode("utf-8")
            if len(raw) == 1:
                if out and out[-1][2] == a + i and out[-1][0][-1:].isascii() and ch.isalnum() and out[-1][0][-1:].isalnum():
                    tok, s, _ = out.pop()
                    out.append((tok + ch, s, a + i + 1))
                else:
                    out.append(((("\u0120" if ch == " " else ch)), a + i, a + i + 1))
            else:
                for j in range(0, len(raw), 2):
                    out.append((raw[j:j + 2].decode("utf-8", errors="replace"), a + i, a + i + 1))
    return out


def _write_text_model(atlas, name: str, split, attrs: dict) -> None:
    from attnatlas.store import ArraySpec, tokens_per_chunk

    rows, seqs = [], []
    for s, text in enumerate(TEXTS):
        pieces = [("[CLS]", -1, -1), *split(text)]
        for p, (tok, a, b) in enumerate(pieces):
            rows.append(dict(sequence=s, position=p, token=tok, token_id=p, is_special=a < 0, char_start=a, char_end=b,
                             word=-1 if a < 0 else p, source=f"t:{s}"))
        seqs.append(dict(sequence=s, source=f"t:{s}", text=text, n_tokens=len(pieces)))
    tokens, seqs = pd.DataFrame(rows), pd.DataFrame(seqs)
    T, d = len(tokens), 8
    rng = np.random.default_rng(0)
    specs = {"queries": ArraySpec((1, 2, T, d), "float16", 2, (1, 1, tokens_per_chunk(d), d)),
             "keys": ArraySpec((1, 2, T, d), "float16", 2, (1, 1, tokens_per_chunk(d), d))}
    base = dict(model_id=name, modality="text", n_layers=1, n_heads=2, n_kv_heads=2, d_head=d, causal=False,
                dtype="float16", scaling=[1 / np.sqrt(d)])
    with atlas.model_writer(name, T, specs, {**base, **attrs}, overwrite=True) as writer:
        writer.append({"queries": rng.normal(size=(1, 2, T, d)).astype(np.float16),
                       "keys": rng.normal(size=(1, 2, T, d)).astype(np.float16)}, tokens, seqs)
        writer.commit(overwrite=True)


@pytest.fixture(scope="module")
def text_atlas(tmp_path_factory):
    from attnatlas import testing
    from attnatlas.store import Atlas

    path = tmp_path_factory.mktemp("text") / "atlas"
    atlas = Atlas.open(path, create=True)
    _write_text_model(atlas, "uncased", _wordpiece, dict(family="bert", model_type="bert", config={"model_type": "bert"}))
    _write_text_model(atlas, "bytes", _byte_level, dict(family="llama", model_type="llama", config={"model_type": "llama"}))
    for m in ("uncased", "bytes"):
        testing.random_layouts(atlas, m, "pca")
    return path


def _search(driver, query: str, regex: bool = False) -> tuple[int, list[str]]:
    mode = f"[...{DOC}.all_models].find(m => m.type == 'RadioButtonGroup' && m.labels.includes('substring'))"
    driver.execute_script(f"const m = {mode}; m.active = m.labels.indexOf(arguments[0])", "regex" if regex else "substring")
    driver.execute_script(f"{MODEL.format('search')}.value = ''")
    wait_js(driver, f"{IDLE} && {MODEL.format('search_count')}.text == ''")
    set_value(driver, "search", query)
    text = wait_js(driver, f"{IDLE} && {MODEL.format('search_count')}.text.length > 0 && {MODEL.format('search_count')}.text")
    m = re.search(r"(\d+) match", text)
    toks = driver.execute_script(f"const m = {MODEL.format('search_matches')}; return m ? m.data_source.data.token : []")
    return (int(m.group(1)) if m else 0), list(toks)


@browser
def test_search_matches_text_with_the_tokenizers_folding(text_atlas, driver):
    with serve(text_atlas) as url:
        open_head(driver, url, "uncased", "pca", 0, 0)
        n, toks = _search(driver, "東京")
        assert n == 2 and set(toks) == {"東", "京"}, (n, toks)
        n, toks = _search(driver, "Москва")
        assert n == 2 and "моск" in toks, (n, toks)  # "моск" "##ва"
        n, toks = _search(driver, "müller")
        assert n >= 4, (n, toks)  # two Müllers, each cut into two pieces
        n, toks = _search(driver, "ü")  # uncased: the tokenizer strips accents, so ü is u
        assert n >= 2
        n, toks = _search(driver, "m[uü]ller-h", regex=True)
        assert n >= 3, (n, toks)
        _, _ = _search(driver, "(unclosed", regex=True)
        msg = driver.execute_script(f"return {MODEL.format('search_count')}.text")
        assert "regular expression" in msg and "Traceback" not in msg

        open_head(driver, url, "bytes", "pca", 0, 0)
        n, toks = _search(driver, "🍕")
        assert n == 2 and toks == ["🍕"] * 4, (n, toks)  # two byte pieces, as queries and keys, shown decoded
        n, toks = _search(driver, "müller")  # cased, exact
        assert n == 0
        n, toks = _search(driver, "Müller")
        assert n >= 2
        shown = driver.execute_script(f"return {SCATTER}.data_source.data.token")
        assert "\ufffd" not in "".join(shown)


# ---- item 6: defaults ------------------------------------------------------------------------------------------------
@browser
def test_default_page_and_compare_never_suggest_a_refused_command(demo_url, driver):
    driver.get(demo_url)
    wait_js(driver, IDLE)
    model = driver.execute_script(f"return [...{DOC}.all_models].find(m => m.type == 'Select' && m.title == 'Model').value")
    assert model == "minilm", model  # a text model with a stored comparison, not the first (an image model)
    driver.get(demo_url + "?model=dinov2-small&view=compare")
    wait_js(driver, f"{IDLE} && {MODEL.format('compare_body')} != null")
    time.sleep(0.5)
    text = driver.execute_script(
        f"return [...{DOC}.all_models].filter(m => m.type == 'Div').map(m => m.text).join(' ')")
    assert not re.search(r"attnatlas compare \S+ --models dinov2-small minilm", text), text
    # choosing an image and a text model says they cannot be compared, instead of naming a command
    set_value(driver, "compare_model_a", "dinov2-small")
    set_value(driver, "compare_model_b", "minilm")
    wait_js(driver, f"{IDLE}")
    time.sleep(0.5)
    body = driver.execute_script(f"return [...{DOC}.all_models].filter(m => m.name == 'view_message').map(m => m.text).join(' ')")
    assert "cannot be compared" in body and "--models dinov2-small minilm" not in body, body


# ---- structure: no import cycles inside attnatlas.app ---------------------------------------------------------------
def _app_imports() -> dict[str, set[str]]:
    """module -> modules of attnatlas.app (views/ included) it imports (at top level or inside functions)."""
    mods = {".".join(p.relative_to(APP.parents[1]).with_suffix("").parts).removesuffix(".__init__"): p
            for p in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnatlas.app"):
                named = {f"{node.module}.{a.name}" for a in node.names} & set(mods)  # `from pkg import module`
                deps |= named or ({node.module} & set(mods))
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & set(mods)
        graph[name] = deps - {name}
    return graph


def test_app_modules_import_each_other_without_cycles():
    graph = _app_imports()
    assert graph, "no app modules found"
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]) if dep in trail else dep)
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not any("attnatlas.app.dashboard" in deps for mod, deps in graph.items() if mod != "attnatlas.app.main")


def test_importing_the_views_loads_no_module_that_imports_them_back():
    code = ("import sys, attnatlas.app.views.registry; mods = [m for m in sys.modules if m.startswith('attnatlas.app.')];"
            "print(' '.join(mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    graph = _app_imports()
    assert "attnatlas.app.views.grid" in graph and "attnatlas.app.views.registry" in out
    back = [m for m in out if "attnatlas.app.views.registry" in graph.get(m, set())]
    assert not back, back


# ---- search over text, without a browser ------------------------------------------------------------------------
def _index(texts: list[str], split, uncased: bool):
    from attnatlas.app.search import build_index

    seq, start, end, toks = [], [], [], []
    for s, text in enumerate(texts):
        for tok, a, b in split(text):
            seq.append(s), start.append(a), end.append(b), toks.append(tok)
    return build_index(dict(enumerate(texts)), np.array(seq), np.array(start), np.array(end), uncased), toks


def test_folded_search_keeps_offsets_aligned():
    from attnatlas.app.search import find, looks_uncased

    texts = ["한 \u0301 İstanbul und Müller", "STRASSE Straße", "x"]
    index, toks = _index(texts, _wordpiece, uncased=True)
    assert looks_uncased([t for t in toks], [texts[0][a:b] for _, a, b in _wordpiece(texts[0])])
    # "한" folds to three characters (its jamo) and a lone accent to none: later matches still land on their tokens
    hit = find(index, "müller", "substring")
    assert [toks[i] for i in hit.rows] == ["mull", "##er"] and hit.n_matches == 1
    assert [toks[i] for i in find(index, "ISTANBUL", "whole word").rows] == ["ista", "##nbul"]
    assert find(index, "und m", "substring").n_matches == 1  # across tokens
    assert find(index, "x\x00", "regex").n_matches == 0 and find(index, "ul u", "substring").n_matches == 1
    assert find(index, "l\\W+u", "regex").n_matches == 1  # escapes are not lower-cased away


def test_cased_search_is_exact_and_never_spans_two_sequences():
    from attnatlas.app.search import find

    index, toks = _index(["Bank bank", "bank"], _byte_level, uncased=False)
    assert find(index, "bank", "substring").n_matches == 2
    assert find(index, "Bank", "whole word").n_matches == 1
    assert find(index, "bank.bank", "regex").n_matches == 0  # the sequence boundary is not text


def test_bad_and_catastrophic_patterns_give_one_message():
    from attnatlas.app import search

    index, _ = _index(["a" * 5000 + "b"], _byte_level, uncased=False)
    bad = search.find(index, "(unclosed", "regex")
    assert "Not a valid regular expression" in bad.error and not len(bad.rows)
    long = search.find(index, "a" * (search.MAX_QUERY + 1), "substring")
    assert "over" in long.error
    t0 = time.time()
    slow = search.find(index, "(a|aa)+c", "regex")  # exponential backtracking on 5,000 a's
    assert time.time() - t0 < search.REGEX_SECONDS + 2 and "stopped" in slow.error
    many = search.find(index, "a", "regex")
    assert many.n_matches == 5000 and not many.error


# ---- the note that the layout is of q·k only ---------------------------------------------------------------------
# What a Mistral-style model records: a sliding window on its first layer.
WINDOWED = dict(attention=dict(causal=True, scaling=[8 ** -0.5] * 2, softcap=[None, None], window=[4, None],
                               window_rule="causal", bias=None))


@pytest.fixture(scope="module")
def windowed_atlas(tmp_path_factory):
    from attnatlas import testing

    path = tmp_path_factory.mktemp("windowed") / "atlas"
    atlas = testing.synthetic_atlas(path, name="windowed", n_layers=2, n_heads=2, n_seq=8, seq_len=10, attrs=WINDOWED)
    testing.write_synthetic_model(atlas, name="plain", n_layers=2, n_heads=2, n_seq=8, seq_len=10)
    for m in ("windowed", "plain"):
        testing.random_layouts(atlas, m, "pca")
    return path


def test_head_and_math_views_say_when_the_layout_is_qk_only(windowed_atlas):
    from attnatlas.app.data import AppData
    from attnatlas.attention import layout_note
    from attnatlas.testing import dashboard_for

    data = AppData(windowed_atlas)
    want = layout_note(data.atlas, "windowed")
    assert want and "sliding window" in want and layout_note(data.atlas, "plain") is None
    dash, doc = dashboard_for(data, model="windowed", layer=0, head=1)
    note = dash.layout_note
    assert doc.get_model_by_name("layout_note") is note and note in dash.head_panel.references()
    assert note.visible and note.text == want
    assert note.render_as_text and note.disable_math  # shown as written: no HTML, no TeX
    dash.tabs.active = dash.view_keys.index("math")
    math_note = dash.math_panel.layout_note
    assert math_note.visible and math_note.text == want and math_note.render_as_text and math_note.disable_math
    # A model whose attention is q·k alone: no note, in either view, after a switch of models.
    dash.model_select.value = "plain"
    assert not dash.layout_note.visible and dash.layout_note.text == ""
    assert not dash.math_panel.layout_note.visible
    plain, _ = dashboard_for(data, model="plain", layer=0, head=0)
    assert not plain.layout_note.visible
    # The standalone page of a head says it too.
    from attnatlas.app.export import head_layout

    assert html.escape(want) in head_layout(data, "windowed", "pca", 0, 0).children[0].text
    assert "q·k part only" not in head_layout(data, "plain", "pca", 0, 0).children[0].text


def _rect(driver, name: str) -> dict:
    return driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format(name)}); const r = v.el.getBoundingClientRect();"
        "return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}")


@browser
def test_layout_note_is_on_screen_and_overlaps_nothing(windowed_atlas, driver):
    with serve(windowed_atlas) as url:
        open_head(driver, url, "windowed", "pca", 0, 0)
        wait_js(driver, f"{MODEL.format('layout_note')}.visible")
        text = driver.execute_script(f"return Bokeh.index.find_one({MODEL.format('layout_note')}).el.shadowRoot.textContent")
        assert "The joint layout shows the q·k part only" in text and "sliding window" in text
        note = _rect(driver, "layout_note")
        assert note["bottom"] - note["top"] > 20 and note["right"] <= driver.execute_script("return window.innerWidth")
        for other in ("head_title", "similar_heads", "layer_select", "head_figure"):
            r = _rect(driver, other)
            apart = (r["right"] <= note["left"] or note["right"] <= r["left"] or r["bottom"] <= note["top"]
                     or note["bottom"] <= r["top"])
            assert apart, (other, r, note)
