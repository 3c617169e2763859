"""The dashboard driven as a user drives it, in headless Chromium: the Model menu, a real file chosen in the
"Your image" input, window widths, and typing into the search box. Each test drives one defect of issue 26.
"""

from __future__ import annotations

import os
import time

import pytest
from test_browser import CHROMEDRIVER, CHROMIUM, GRID_DRAWN, IDLE, MODEL, click_data_point, make_driver, serve, wait_js, wheel_zoom_at

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]

VIEW = "Bokeh.index.find_one({})"
# The page is never wider than the window: no sideways scroll bar, nothing cut at the right.
NO_OVERFLOW = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"


def input_of(driver, name: str):
    """The <input>/<select> element of a Bokeh input widget, inside its shadow root."""
    return wait_js(driver, f"{VIEW.format(MODEL.format(name))} && {VIEW.format(MODEL.format(name))}.input_el")


def choose(driver, name: str, value: str) -> None:
    """Pick an option in a Bokeh Select as a user does (the <select> element's own change)."""
    from selenium.webdriver.support.ui import Select

    Select(input_of(driver, name)).select_by_value(value)


def type_into(driver, name: str, text: str) -> None:
    """Type into a Bokeh TextInput and press Enter (Bokeh sends the value on change)."""
    from selenium.webdriver.common.keys import Keys

    el = input_of(driver, name)
    el.clear()
    el.send_keys(text + Keys.ENTER)


def click_button(driver, widget: str, label: str) -> None:
    """A real click on the button labelled `label` of a button widget or button group."""
    el = wait_js(driver, f"{VIEW.format(MODEL.format(widget))} && [...{VIEW.format(MODEL.format(widget))}.shadow_el"
                         f".querySelectorAll('button')].find(b => b.textContent.trim() === {label!r})")
    el.click()


def right_edge(driver, name: str) -> float:
    return driver.execute_script(f"return {VIEW.format(MODEL.format(name))}.el.getBoundingClientRect().right")


@pytest.fixture(scope="module")
def atlas3(tmp_path_factory):
    """Three models of different shapes: 3 x 8 heads, 9 x 3 heads, and an image model of 4 x 4."""
    from attnatlas import testing

    path = tmp_path_factory.mktemp("tour") / "atlas"
    atlas = testing.synthetic_atlas(path, name="wide", n_layers=3, n_heads=8, n_seq=20, seq_len=10)
    testing.write_synthetic_model(atlas, name="tall", n_layers=9, n_heads=3, n_seq=20, seq_len=10)
    testing.write_synthetic_image_model(atlas, name="vit", n_layers=4, n_heads=4,
                                        file_names=["cat_01.png", "dog_02.png", "cat_03.png"])
    for m in ("wide", "tall", "vit"):
        testing.random_layouts(atlas, m, "pca")
    return path


def grid_state(driver) -> dict:
    """The grid's ranges as drawn, and the size of one cell on screen."""
    return driver.execute_script(
        f"const v = {VIEW.format(MODEL.format('grid_figure'))}; const f = v.frame;"
        "return {x: [f.x_range.start, f.x_range.end], y: [f.y_range.start, f.y_range.end],"
        " cw: Math.abs(f.x_scale.compute(1) - f.x_scale.compute(0)), ch: Math.abs(f.y_scale.compute(1) - f.y_scale.compute(0))}")


def assert_whole_grid(driver, n_layers: int, n_heads: int) -> None:
    want = f"[0,{n_heads},0,{n_layers}]"
    try:
        wait_js(driver, f"{IDLE} && (() => {{ const f = {VIEW.format(MODEL.format('grid_figure'))}.frame;"
                        f" return JSON.stringify([f.x_range.start, f.x_range.end, f.y_range.start, f.y_range.end]) == '{want}' }})()",
                timeout=20)
    except TimeoutError:
        raise AssertionError(f"grid shows {grid_state(driver)}, not {n_layers} layers x {n_heads} heads") from None
    s = grid_state(driver)
    assert 0.75 < s["cw"] / s["ch"] < 1.33, f"cells are stretched on screen: {s}"


def test_the_model_menu_shows_each_models_whole_grid(atlas3):
    """Issue 26 item 1: after a switch in the Model menu the grid frames the new model (every layer and head,
    square cells), and the reset tool returns to that, not to the first model's ranges."""
    with serve(atlas3) as url:
        driver = make_driver(1600, 1000)
        try:
            driver.get(url + "?model=tall")
            wait_js(driver, GRID_DRAWN)
            assert_whole_grid(driver, 9, 3)
            for model, shape in (("wide", (3, 8)), ("vit", (4, 4)), ("tall", (9, 3)), ("wide", (3, 8))):
                choose(driver, "model_select", model)
                wait_js(driver, f"{MODEL.format('grid_info')}.text.startsWith('{model}:')")
                assert_whole_grid(driver, *shape)
            # Zoom in with the wheel, then the toolbar's reset: the whole grid of this model again.
            wheel_zoom_at(driver, "grid_figure", 4.0, 1.5)
            wait_js(driver, f"{MODEL.format('grid_figure')}.x_range.end - {MODEL.format('grid_figure')}.x_range.start < 7.9")
            driver.find_element("css selector", "body")  # the page is still there
            reset = wait_js(driver, f"(() => {{ const walk = (r) => {{ for (const e of r.querySelectorAll('*')) {{"
                                    " if (e.getAttribute('title') === 'Reset') return e;"
                                    " if (e.shadowRoot) { const f = walk(e.shadowRoot); if (f) return f } } return null };"
                                    f" return walk({VIEW.format(MODEL.format('grid_figure'))}.el.shadowRoot) }})()")
            reset.click()
            assert_whole_grid(driver, 3, 8)
        finally:
            driver.quit()


def test_page_fits_the_window_at_1280_1600_and_1920(atlas3):
    """Issue 26 item 3: opening a head (a click in the grid) and searching never make the page wider than the
    window: the "Your text" panel and its status are inside it, they do not move when results come, and the
    grid's toolbar and last column are inside it when the user goes back."""
    with serve(atlas3) as url:
        for width in (1280, 1600, 1920):
            driver = make_driver(width, 1000)
            try:
                driver.get(url + "?model=wide")
                wait_js(driver, GRID_DRAWN)
                click_data_point(driver, "grid_figure", 7.5, 2.5)  # L0H7, the last column
                wait_js(driver, f"{MODEL.format('tabs')}.active == 1 && {MODEL.format('head_title')}.text.includes('L0H7')")
                wait_js(driver, f"{VIEW.format(MODEL.format('live_status'))} != null && {IDLE}")
                time.sleep(0.5)
                assert driver.execute_script(f"return {NO_OVERFLOW}"), \
                    f"{width} px: the page is {driver.execute_script('return document.documentElement.scrollWidth')} px wide"
                client = driver.execute_script("return document.documentElement.clientWidth")
                for name in ("live_status", "live_title", "head_title", "search_count"):
                    assert right_edge(driver, name) <= client, f"{width} px: {name} is cut at the right"
                left = driver.execute_script(f"return {VIEW.format(MODEL.format('live_title'))}.el.getBoundingClientRect().left")
                type_into(driver, "search", "a")  # matches in many contexts: a long list of results
                wait_js(driver, f"{MODEL.format('search_results')}.text.length > 100")
                click_button(driver, "search_mode", "regex")
                type_into(driver, "search", "(unclosed[")  # a long error message
                wait_js(driver, f"{MODEL.format('search_count')}.text.includes('Not a valid')")
                time.sleep(0.5)
                assert driver.execute_script(f"return {NO_OVERFLOW}"), f"{width} px: search results widened the page"
                now = driver.execute_script(f"return {VIEW.format(MODEL.format('live_title'))}.el.getBoundingClientRect().left")
                assert abs(now - left) < 1, f"{width} px: the Your text column moved from {left} to {now}"
                # Back on the grid: the toolbar and the last column are in the window.
                driver.execute_script(f"{MODEL.format('tabs')}.active = 0")
                wait_js(driver, f"{IDLE} && {VIEW.format(MODEL.format('grid_figure'))}.el.getBoundingClientRect().width > 0")
                time.sleep(0.5)
                assert driver.execute_script(f"return {NO_OVERFLOW}"), f"{width} px: the grid is wider than the window"
                assert right_edge(driver, "grid_figure") <= client
            finally:
                driver.quit()


def test_a_bad_regex_greys_nothing_and_image_models_search_file_names(atlas3):
    """Issue 26 item 6: a pattern that cannot run says so and leaves every point as it was (greying all would
    read as "no matches"); an image model's box searches its images' file names."""
    with serve(atlas3) as url:
        driver = make_driver(1600, 1000)
        try:
            driver.get(url + "?model=wide&method=pca&layer=1&head=2")
            wait_js(driver, f"{IDLE} && {MODEL.format('head_scatter')}.data_source.data.x.length > 0")
            src = f"{MODEL.format('head_scatter')}.data_source.data"
            before = driver.execute_script(f"return [Math.max(...{src}.c), Math.min(...{src}.alpha)]")
            click_button(driver, "search_mode", "regex")
            type_into(driver, "search", "sat(")
            wait_js(driver, f"{MODEL.format('search_count')}.text.includes('Not a valid regular expression')")
            time.sleep(0.3)
            after = driver.execute_script(f"return [Math.max(...{src}.c), Math.min(...{src}.alpha)]")
            assert after == before, f"points changed for a query that could not run: {before} -> {after}"
            assert driver.execute_script(f"return {MODEL.format('search_matches')}.data_source.data.x.length") == 0
            # A valid pattern still greys the non-matches.
            type_into(driver, "search", "sat|mat")
            wait_js(driver, f"{MODEL.format('search_count')}.text.includes('matching tokens')")
            assert driver.execute_script(f"return Math.min(...{src}.alpha)") < before[1]

            # An image model: the box says it searches image names, and finds them.
            choose(driver, "model_select", "vit")
            wait_js(driver, f"{MODEL.format('search')}.title == 'Search image names'")
            click_button(driver, "search_mode", "substring")
            type_into(driver, "search", "CAT")
            # The count of this query (the model switch first re-runs the old one, "sat|mat", on the image model).
            count = wait_js(driver, f"{MODEL.format('search_count')}.text.includes('patches for “CAT”') && {MODEL.format('search_count')}.text")
            assert "2 images" in count, count
            n = driver.execute_script(f"return {MODEL.format('search_matches')}.data_source.data.x.length")
            assert n == 2 * 2 * (4 * 4 + 1), n  # two images of 16 patches and [CLS], as queries and keys
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def vit_atlas(tmp_path_factory):
    """A tiny random ViT extracted from three images and projected: the live worker can place a new one."""
    from tiny_models import projected_vit_atlas

    atlas, imgs = projected_vit_atlas(tmp_path_factory.mktemp("upload"))
    return atlas, sorted(imgs.glob("*.png"))


def test_an_image_chosen_in_the_file_input_is_placed(vit_atlas, tmp_path):
    """Issue 26 item 2: "Your image" with a file chosen through the page's <input type=file> (BokehJS sends
    the file's value before its name): the image is placed, under its own name, and a second file under its."""
    import shutil

    atlas, pngs = vit_atlas
    first, second = tmp_path / "my first.png", tmp_path / "another one.png"
    shutil.copy(pngs[0], first)
    shutil.copy(pngs[1], second)
    with serve(atlas, timeout=90, args=("--live",)) as url:
        driver = make_driver(1600, 1000)
        try:
            driver.get(url + "?model=vit&method=pca&layer=0&head=1")
            wait_js(driver, f"{IDLE} && {VIEW.format(MODEL.format('live_image'))} != null", 60)
            for path in (first, second):
                input_of(driver, "live_image").send_keys(str(path))
                status = MODEL.format("live_status")
                try:
                    wait_js(driver, f"{status}.text.includes('Placed') && {status}.text.includes({path.name!r})", 150)
                except TimeoutError:
                    raise AssertionError(driver.execute_script(f"return {status}.text")) from None
                tokens = driver.execute_script(f"return {MODEL.format('live_points')}.data.token")
                assert "patch 0,0" in tokens and "[CLS]" in tokens
        finally:
            driver.quit()
