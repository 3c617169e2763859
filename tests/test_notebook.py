"""notebooks/quickstart.ipynb runs top to bottom through the public API, and its HTML (nbconvert, no kernel)
works in Chromium: the grid is drawn, a click on a cell opens that head's scatter, hover shows a token,
and a click on a point is posted to the notebook (what the widget hands to Python as view.selection)."""

from __future__ import annotations

import io
import os
import re
import time

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

pytestmark = pytest.mark.slow

INTERNALS = re.compile(r"attnatlas\.app|AppData|head_layout|bokeh")


@pytest.fixture(scope="module")
def executed(repo_root):
    nb = nbformat.read(repo_root / "notebooks" / "quickstart.ipynb", as_version=4)
    # Without stored widget state nbconvert writes each view's own page (text/html), which needs no CDN.
    NotebookClient(nb, timeout=900, kernel_name="python3", store_widget_state=False,
                   resources={"metadata": {"path": str(repo_root / "notebooks")}}).execute()
    return nb


def test_quickstart_notebook_executes(executed):
    nb = executed
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not INTERNALS.search(code), "the quickstart uses the public API only"
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "6 layers x 12 heads" in text and "144 layouts; failed: []" in text, text
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}) and "<iframe" in o["data"]["text/html"]]
    assert len(pages) == 2 and 'data-view="grid"' in pages[0] and 'data-view="head"' in pages[1]  # the grid, then a head
    # The grid's still image, displayed first, was replaced in place by its page: no bare still is left.
    assert not [o for o in outputs if "drawing the interactive view" in o.get("data", {}).get("text/html", "")
                and "<iframe" not in o["data"]["text/html"]]
    # The last cell: tokens selected from Python come back as a DataFrame (every "the" of the corpus, query and key).
    last = "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[-1].outputs)
    assert re.search(r"key\s+the\s+\d+", last) and re.search(r"query\s+the\s+\d+", last), last


@pytest.mark.browser
def test_notebook_html_opens_a_head_from_the_grid(executed, tmp_path):
    from nbconvert import HTMLExporter
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from test_browser import CHROMEDRIVER, CHROMIUM, make_driver, wait_js

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    body, _ = HTMLExporter().from_notebook_node(executed)
    page = tmp_path / "quickstart.html"
    page.write_text(body)
    model = "Bokeh.documents[0].get_model_by_name('{}')"
    driver = make_driver(1500, 1300)
    try:
        driver.get(page.as_uri())
        driver.execute_script("window.__msgs = []; window.addEventListener('message', (e) => window.__msgs.push(e.data))")
        frame = driver.find_element(By.CSS_SELECTOR, 'iframe[data-view="grid"]')
        driver.execute_script("arguments[0].scrollIntoView()", frame)
        driver.switch_to.frame(frame)
        wait_js(driver, f"Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle && "
                        f"Bokeh.index.find_one({model.format('grid_image')}).glyph._images_rendered", 60)
        # The still grid kept over the iframe while it drew is gone once the page said it is drawn.
        driver.switch_to.default_content()
        assert wait_js(driver, "document.querySelectorAll('iframe[data-view]').length == 2 && "
                               "!document.querySelector('[id^=\"attnatlas-still-\"] img')", 10)
        driver.switch_to.frame(frame)

        def at(fig: str, x: float, y: float) -> tuple:
            """The figure's canvas element and the offset of data point (x, y) from its centre."""
            el, dx, dy = driver.execute_script(
                f"const v = Bokeh.index.find_one({model.format(fig)}); const el = v.canvas_view.events_el;"
                "const r = el.getBoundingClientRect();"
                "return [el, v.frame.x_scale.compute(arguments[0]) - r.width / 2,"  # scales map to canvas pixels
                "        v.frame.y_scale.compute(arguments[1]) - r.height / 2]", x, y)
            return el, int(round(dx)), int(round(dy))

        # 1. The grid image is drawn: its cells hold coloured (query/key) pixels.
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)
        coloured = (np.abs(shot[..., 0] - shot[..., 1]) > 40) | (np.abs(shot[..., 1] - shot[..., 2]) > 40)
        assert coloured.mean() > 0.02, coloured.mean()
        # 2. A click on cell L2H3 opens that head's scatter.
        first_x = driver.execute_script(f"return Array.from({model.format('head_points')}.data.x.slice(0, 5))")
        el, dx, dy = at("grid_figure", 3.5, 6 - 1 - 2 + 0.5)
        ActionChains(driver).move_to_element_with_offset(el, dx, dy).click().perform()
        wait_js(driver, f"{model.format('page_tabs')}.active == 1 && {model.format('head_title')}.text.includes('L2H3')", 20)
        x = driver.execute_script(f"return Array.from({model.format('head_points')}.data.x.slice(0, 5))")
        assert x != first_x  # L2H3's points, not the first head's
        # 3. Hover over a point shows its token.
        xs, ys, toks = driver.execute_script(f"const d = {model.format('head_points')}.data; return [Array.from(d.x), Array.from(d.y), d.token]")
        xy = np.stack([xs, ys], 1) / (np.ptp(np.stack([xs, ys], 1), axis=0) + 1e-9)
        d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(len(xy)) * 1e9
        x0, x1, y0, y1 = driver.execute_script(
            f"const f = {model.format('head_figure')}; return [f.x_range.start, f.x_range.end, f.y_range.start, f.y_range.end]")
        inside = (np.abs(np.array(xs) - (x0 + x1) / 2) < 0.4 * (x1 - x0)) & (np.abs(np.array(ys) - (y0 + y1) / 2) < 0.4 * (y1 - y0))
        i = int(np.argmax(np.where(inside, d2.min(1), -1)))  # the loneliest point in view: the tooltip's nearest
        px, py, tok = xs[i], ys[i], toks[i]
        el, dx, dy = at("head_figure", px, py)
        ActionChains(driver).move_to_element_with_offset(el, dx, dy).perform()
        tip = wait_js(driver, "[...document.querySelectorAll('*')].map(e => e.shadowRoot).filter(s => s)"
                              ".flatMap(s => [...s.querySelectorAll('.bk-tooltip-row-value')]).map(e => e.textContent).join('|')", 10)
        fields = [f.strip() for f in tip.split("|")]
        assert fields[0] == tok.strip() and fields[3] == ("query" if i < len(xs) // 2 else "key"), tip
        # 4. A click on the point: attention lines, and the point posted to the notebook for view.selection.
        ActionChains(driver).move_to_element_with_offset(el, dx, dy).click().perform()
        wait_js(driver, f"{model.format('head_points')}.selected.indices.length == 1", 10)
        sel = driver.execute_script(f"return {model.format('head_points')}.selected.indices[0]")
        assert sel == i
        time.sleep(0.3)
        driver.switch_to.default_content()
        msgs = driver.execute_script("return window.__msgs")
        assert any(m.get("layer") == 2 and m.get("head") == 3 and m.get("indices") == [sel] for m in msgs), msgs
    finally:
        driver.quit()
