"""Hostile text in the served dashboard: TeX and HTML in corpus lines, image file names and model names are
shown as written. Nothing is typeset by MathJax, no javascript: link appears, no script runs."""

from __future__ import annotations

import time

import pytest
from test_browser import DOC, IDLE, MODEL, make_driver, serve, wait_js

from attnatlas import testing
from attnatlas.store import atlas as store_mod

pytestmark = pytest.mark.browser

TEX_LINK = r"$$\href{javascript:alert(22)}{x}$$"
TEX_INLINE = "$x^2$"
TEX_FILE = r"$$\href{javascript:alert(23)}{y}$$.png"
HOSTILE_MODEL = "<img src=x onerror=alert(77)>"

# Every element of the page, shadow roots included: MathJax output, links, images, and the visible text.
SCAN = """
const found = {mjx: 0, js_links: 0, x_imgs: 0, text: ''};
const walk = (root) => root.querySelectorAll('*').forEach((el) => {
  const tag = el.tagName.toLowerCase();
  if (tag.startsWith('mjx-')) found.mjx += 1;
  if (tag === 'a' && (el.getAttribute('href') || '').trim().toLowerCase().startsWith('javascript')) found.js_links += 1;
  if (tag === 'img' && el.getAttribute('src') === 'x') found.x_imgs += 1;
  if (el.shadowRoot) { found.text += ' ' + el.shadowRoot.textContent; walk(el.shadowRoot) }
});
walk(document);
found.text += ' ' + document.body.textContent;
return found;
"""


@pytest.fixture(scope="module")
def hostile_atlas(tmp_path_factory):
    from attnatlas.compare.run import compare_models

    path = tmp_path_factory.mktemp("hostile") / "atlas"
    mp = pytest.MonkeyPatch()
    mp.setattr(testing, "WORDS", [TEX_LINK, TEX_INLINE, *testing.WORDS])
    # A name from an atlas written before names were checked: the app must still escape it everywhere.
    mp.setattr(store_mod, "check_name", lambda name: name)
    try:
        atlas = testing.synthetic_atlas(path, n_layers=2, n_heads=3, n_seq=12, seq_len=10)
        testing.write_synthetic_model(atlas, name=HOSTILE_MODEL, n_layers=2, n_heads=2, n_seq=12, seq_len=10)
        testing.write_synthetic_image_model(atlas, file_names=[TEX_FILE, "b.png", "c.png"])
    finally:
        mp.undo()
    for m in ("synthetic", HOSTILE_MODEL, "synthetic-vit"):
        testing.random_layouts(atlas, m, "pca")
    compare_models(atlas, ["synthetic", HOSTILE_MODEL])
    return path


def _no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    time.sleep(0.5)
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - a script that ran alert() would show here


def _select_point(driver, sequence_has: str) -> None:
    """Select (as a tap would) the first point whose sequence text holds `sequence_has`."""
    driver.execute_script(
        f"const s = {MODEL.format('head_scatter')}.data_source;"
        "const i = s.data.ctx.findIndex((c) => String(c).includes(arguments[0]));"
        "s.selected.indices = [i < 0 ? 0 : i]", sequence_has)


def test_tex_and_html_in_text_files_and_names_stay_text(hostile_atlas):
    with serve(hostile_atlas) as url:
        driver = make_driver(1400, 1100)
        try:
            # corpus text: search results and the sequence panel
            driver.get(url + "?model=synthetic&method=pca&layer=0&head=1")
            wait_js(driver, IDLE)
            driver.execute_script(f"{MODEL.format('search')}.value = 'href'")
            wait_js(driver, f"{MODEL.format('search_results')}.text.includes('href')")
            _select_point(driver, "href")
            wait_js(driver, f"{MODEL.format('sequence_panel')}.text.includes('href')")
            time.sleep(1.5)  # MathJax, had it been asked to, typesets within this
            found = driver.execute_script(SCAN)
            assert found["mjx"] == 0 and found["js_links"] == 0, found["mjx"]
            assert TEX_LINK in found["text"] and TEX_INLINE in found["text"]
            _no_alert(driver)

            # an image file name
            driver.get(url + "?model=synthetic-vit&method=pca&layer=0&head=0")
            wait_js(driver, IDLE)
            driver.execute_script(f"{MODEL.format('head_scatter')}.data_source.selected.indices = [0]")
            wait_js(driver, f"{MODEL.format('sequence_panel')}.text.includes('href')")
            time.sleep(1.5)
            found = driver.execute_script(SCAN)
            assert found["mjx"] == 0 and found["js_links"] == 0
            assert TEX_FILE in found["text"]
            _no_alert(driver)

            # a model name in the compare view's custom JS, after a click on a head
            driver.get(url + "?model=synthetic&method=pca&view=compare")
            wait_js(driver, IDLE)
            wait_js(driver, f"{DOC}.get_model_by_name('compare-grid-a') != null")
            driver.execute_script(
                f"const names = [...{DOC}.all_models].filter((m) => m.name === 'compare-grid-a' || m.name === 'compare-grid-b');"
                "for (const f of names) { const r = f.renderers[0]; r.data_source.selected.indices = [0] }")
            wait_js(driver, f"{MODEL.format('compare-nearest')}.text.includes('nearest in')")
            time.sleep(1.0)
            found = driver.execute_script(SCAN)
            assert found["x_imgs"] == 0, "a model name was put into the page as HTML"
            assert HOSTILE_MODEL in found["text"]
            _no_alert(driver)
        finally:
            driver.quit()
