"""End to end: `attnatlas serve` on loopback, the page in headless Chromium (Debian's chromium + chromedriver).

The helpers here are reused by scripts/bench_app.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS = "<img src=x onerror=alert(1)>"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(atlas: Path, timeout: float = 60.0, args: tuple[str, ...] = (), cwd: str | None = None,
          env: dict[str, str] | None = None):
    """`attnatlas serve ATLAS [args]` in a subprocess (from `cwd` with `env` when given: another revision's
    code); yields the base URL once the port answers."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "attnatlas", "serve", str(atlas), "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    try:
        end = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"attnatlas serve exited: {log.read().decode(errors='replace')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > end:
                raise TimeoutError("attnatlas serve did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def make_driver(width: int = 1500, height: int = 1300, perf_log: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="attnatlas-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    if perf_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    quit_browser = driver.quit

    def quit_and_remove_profile() -> None:  # a fresh profile per driver, so it goes with the driver
        try:
            quit_browser()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_remove_profile
    return driver


def wait_js(driver, expr: str, timeout: float = 30.0, poll: float = 0.02):
    """Poll a JS expression until it is truthy; returns its value."""
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(f"try {{ return ({expr}) }} catch (e) {{ return null }}")
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout}s for: {expr}")


DOC = "Bokeh.documents[0]"
IDLE = f"Bokeh.documents.length > 0 && {DOC}.is_idle"
MODEL = DOC + ".get_model_by_name('{}')"
# The grid's image is a PNG the browser decodes after the document is idle: drawn once its glyph says so.
GRID_DRAWN = f"{IDLE} && Bokeh.index.find_one({MODEL.format('grid_image')}).glyph._images_rendered"


def screenshot_array(driver) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(np.int16)


def click_data_point(driver, figure_name: str, x: float, y: float) -> None:
    """A real pointer click at data coordinates (x, y) of a Bokeh figure."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    px, py = driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format(figure_name)});"
        "const r = v.canvas_view.el.getBoundingClientRect();"
        "return [r.left + v.frame.x_scale.compute(arguments[0]), r.top + v.frame.y_scale.compute(arguments[1])]",
        x, y)
    builder = ActionBuilder(driver)
    builder.pointer_action.move_to_location(int(px), int(py)).click()
    builder.perform()


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory):
    from attnatlas import testing

    path = tmp_path_factory.mktemp("browser") / "atlas"
    mp = pytest.MonkeyPatch()
    mp.setattr(testing, "WORDS", [*testing.WORDS, XSS])
    try:
        atlas = testing.synthetic_atlas(path, n_layers=4, n_heads=5, n_seq=30, seq_len=12)
    finally:
        mp.undo()
    testing.random_layouts(atlas, "synthetic", "pca")
    return path


def test_grid_draws_and_a_click_opens_the_head(atlas_path):
    from selenium.common.exceptions import NoAlertPresentException

    with serve(atlas_path) as url:
        driver = make_driver()
        try:
            driver.get(url)
            wait_js(driver, IDLE)
            wait_js(driver, GRID_DRAWN)
            names = driver.execute_script(f"return [...{DOC}.all_models].map(m => m.name).filter(n => n)")
            assert {"grid_image", "grid_cells", "grid_figure", "tabs"} <= set(names)
            backend = driver.execute_script(f"return {MODEL.format('grid_figure')}.output_backend")
            assert backend == "canvas"  # faster than WebGL under software rendering (scripts/bench_app.py)

            shot = screenshot_array(driver)
            assert shot.std() > 10, "the page is blank"
            r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
            greenish = int(((g > r + 40) & (g > b)).sum())  # query colour
            pinkish = int(((r > g + 40) & (b > g)).sum())  # key colour
            assert greenish > 500 and pinkish > 500, (greenish, pinkish)

            click_data_point(driver, "grid_figure", 2.5, 4 - 1 - 1 + 0.5)  # cell of layer 1, head 2
            wait_js(driver, f"{MODEL.format('tabs')}.active == 1 && {MODEL.format('head_scatter')}.data_source.data.x.length > 0")
            title = wait_js(driver, f"{MODEL.format('head_title')}.text.includes('L1H2') && {MODEL.format('head_title')}.text")
            # Views, not just models: the head view must be drawn in the page.
            views = wait_js(driver, "[...Bokeh.index.all_views()].map(v => v.model.name).filter(n => n).includes('head_scatter')"
                                    " && [...Bokeh.index.all_views()].map(v => v.model.name).filter(n => n)")
            assert {"head_figure", "head_scatter", "attention_lines", "sequence_panel", "search", "export_html"} <= set(views)
            assert "trustworthiness" in title
            assert wait_js(driver, "window.location.search.includes('layer=1') && window.location.search") == \
                "?model=synthetic&method=pca&layer=1&head=2"

            # Standalone HTML export reaches the browser as a download (a Blob handed to an <a download>).
            wait_js(driver, f"Bokeh.index.find_one({MODEL.format('export_html')}) != null")
            driver.execute_script(
                "window.__exported = []; const orig = URL.createObjectURL;"
                "URL.createObjectURL = (b) => { window.__exported.push(b.size); return orig(b) };"
                f"Bokeh.index.find_one({MODEL.format('export_html')}).button_el.click()")
            sizes = wait_js(driver, "window.__exported.length > 0 && window.__exported", timeout=60)
            assert sizes[0] > 100_000

            # The hostile corpus line stays text: search for it, list it, and click it.
            driver.execute_script(f"{MODEL.format('search')}.value = 'onerror'")
            results = wait_js(driver, f"{MODEL.format('search_results')}.text")
            assert "&lt;img" in results
            time.sleep(0.5)
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert.text  # noqa: B018 - an executed onerror=alert(1) would show here
            shadow_imgs = driver.execute_script(
                "const out = []; const walk = (root) => { root.querySelectorAll('*').forEach(el => {"
                " if (el.tagName === 'IMG') out.push(el.getAttribute('src')); if (el.shadowRoot) walk(el.shadowRoot) }) };"
                " walk(document); return out")
            assert "x" not in shadow_imgs
        finally:
            driver.quit()


def test_url_opens_a_head_directly(atlas_path):
    with serve(atlas_path) as url:
        driver = make_driver(1200, 900)
        try:
            driver.get(url + "?model=synthetic&method=pca&layer=3&head=4")
            wait_js(driver, IDLE)
            assert driver.execute_script(f"return {MODEL.format('tabs')}.active") == 1
            assert "L3H4" in driver.execute_script(f"return {MODEL.format('head_title')}.text")
        finally:
            driver.quit()


def wheel_zoom_at(driver, figure_name: str, x: float, y: float, clicks: int = 1) -> None:
    """Real mouse-wheel zoom-in steps with the pointer at data coordinates (x, y) of a Bokeh figure."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    view = f"Bokeh.index.find_one({MODEL.format(figure_name)})"
    el = driver.execute_script(f"return {view}.canvas_view.events_el")
    for _ in range(clicks):
        dx, dy = driver.execute_script(
            f"const v = {view}; const r = v.canvas_view.events_el.getBoundingClientRect();"
            "return [v.frame.x_scale.compute(arguments[0]) - r.width / 2, v.frame.y_scale.compute(arguments[1]) - r.height / 2]",
            x, y)
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(el, int(dx), int(dy)), 0, -300).perform()


def test_grid_draws_every_cell_and_zooming_into_one_opens_it(atlas_path):
    with serve(atlas_path) as url:
        driver = make_driver(1200, 1500)  # 5 x 4 cells across 1200 px: the whole grid in the window
        try:
            driver.get(url)
            wait_js(driver, GRID_DRAWN)
            fig = MODEL.format("grid_figure")
            width = driver.execute_script(f"return Bokeh.index.find_one({fig}).canvas_view.el.getBoundingClientRect().width")
            assert width > 0.9 * 1200  # the grid fills the window width
            # Every cell carries ink in the screenshot: all of its head's points are drawn.
            shot = screenshot_array(driver)
            boxes = driver.execute_script(
                f"const v = Bokeh.index.find_one({fig}); const r = v.canvas_view.el.getBoundingClientRect();"
                "const out = []; for (let c = 0; c < 5; c++) for (let l = 0; l < 4; l++) out.push(["
                " r.left + v.frame.x_scale.compute(c + 0.1), r.top + v.frame.y_scale.compute(l + 0.9),"
                " r.left + v.frame.x_scale.compute(c + 0.9), r.top + v.frame.y_scale.compute(l + 0.1)]); return out")
            ratio = driver.execute_script("return window.devicePixelRatio")
            for x0, y0, x1, y1 in boxes:
                cell = shot[int(y0 * ratio):int(y1 * ratio), int(x0 * ratio):int(x1 * ratio)]
                assert (cell.sum(2) < 3 * 235).mean() > 0.05, "a blank cell"
            # Zooming in re-renders the visible cells at screen resolution, then hands over to the head.
            wheel_zoom_at(driver, "grid_figure", 2.5, 4 - 1 - 1 + 0.5, clicks=2)  # layer 1, head 2
            wait_js(driver, f"{MODEL.format('grid_detail_image')}.data_source.data.url.length > 0")
            for _ in range(20):
                if driver.execute_script(f"return {MODEL.format('tabs')}.active") == 1:
                    break
                wheel_zoom_at(driver, "grid_figure", 2.5, 2.5)
                time.sleep(0.3)
            wait_js(driver, f"{MODEL.format('tabs')}.active == 1 && {MODEL.format('head_title')}.text.includes('L1H2')")
            wait_js(driver, "[...Bokeh.index.all_views()].some(v => v.model.name == 'head_scatter')")
            # Back on the grid, the whole grid is shown again.
            assert driver.execute_script(f"const f = {fig}; return [f.x_range.start, f.x_range.end]") == [0, 5]

            # The head map: every head as its thumbnail; a click on one opens it.
            driver.execute_script(f"{MODEL.format('tabs')}.active = 0; {MODEL.format('grid_mode')}.active = 1")
            thumbs = MODEL.format("head_map_thumbs")
            wait_js(driver, f"{thumbs} && Bokeh.index.find_one({thumbs}) && Bokeh.index.find_one({thumbs}).glyph._images_rendered")
            data = driver.execute_script(f"const d = {MODEL.format('head_map_points')}.data;"
                                         "return [d.url.length, d.cx[7], d.cy[7], d.label[7]]")
            assert data[0] == 20 and data[3] == "L1H2"
            click_data_point(driver, "head_map_figure", data[1], data[2])
            wait_js(driver, f"{MODEL.format('tabs')}.active == 1 && {MODEL.format('head_title')}.text.includes('L1H2')")
        finally:
            driver.quit()
