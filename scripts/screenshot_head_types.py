"""Screenshot of the grid filtered to one head type, driven as a user would (not a test).

    python scripts/screenshot_head_types.py ATLAS --model smollm2 --type induction --out grid-induction.png

Serves ATLAS with `attnatlas serve` on 127.0.0.1, opens it in headless Chromium, picks the type in the grid's
"Head type" menu (a real <select>), ticks "sort heads in each layer", and saves the page. The atlas needs head
types (`attnatlas analyze ATLAS --model M --head-types`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import GRID_DRAWN, MODEL, make_driver, serve, wait_js  # noqa: E402


def widget_input(driver, name: str, selector: str):
    """The DOM element of a Bokeh widget (inside its shadow root)."""
    return driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format(name)}); return v.shadow_el.querySelector(arguments[0])",
        selector)


def scatter(driver, out: str) -> int:
    """Open the head scatter with its button, hover the top point (a real pointer move), save the page."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    buttons = driver.execute_script(f"const v = Bokeh.index.find_one({MODEL.format('grid_mode')});"
                                    "return Array.from(v.shadow_el.querySelectorAll('button'))")
    buttons[2].click()
    wait_js(driver, f"Bokeh.index.find_one({MODEL.format('head_scatter_figure')}) != null", timeout=60)
    time.sleep(1.5)
    d = driver.execute_script(f"const d = {MODEL.format('head_scatter_points')}.data;"
                              "return [Array.from(d.x), Array.from(d.y), d.label]")
    i = max(range(len(d[1])), key=lambda j: d[1][j])
    px, py = driver.execute_script(
        f"const v = Bokeh.index.find_one({MODEL.format('head_scatter_figure')});"
        "const r = v.canvas_view.el.getBoundingClientRect();"
        "return [r.left + v.frame.x_scale.compute(arguments[0]), r.top + v.frame.y_scale.compute(arguments[1])]",
        d[0][i], d[1][i])
    builder = ActionBuilder(driver)
    builder.pointer_action.move_to_location(int(px), int(py))
    builder.perform()
    time.sleep(1.0)
    driver.save_screenshot(out)
    print(f"wrote {out}; hovering {d[2][i]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("atlas")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--type", default="induction")
    ap.add_argument("--out", default="grid-induction.png")
    ap.add_argument("--no-sort", action="store_true")
    ap.add_argument("--scatter", action="store_true",
                    help="instead: the head scatter, hovering the head with the highest y score")
    ap.add_argument("--height", type=int, default=1400, help="window height in px (a 30-layer grid needs ~4400)")
    args = ap.parse_args()
    from selenium.webdriver.support.ui import Select

    with serve(Path(args.atlas), timeout=120) as url:
        driver = make_driver(1500, args.height)
        try:
            driver.get(f"{url}?model={args.model}")
            wait_js(driver, GRID_DRAWN, timeout=120)
            if args.scatter:
                return scatter(driver, args.out)
            Select(widget_input(driver, "grid_type", "select")).select_by_visible_text(args.type)
            if not args.no_sort:
                boxes = driver.execute_script(
                    f"const v = Bokeh.index.find_one({MODEL.format('grid_metric_opts')});"
                    "return Array.from(v.shadow_el.querySelectorAll('input[type=checkbox]'))")
                boxes[1].click()  # "sort heads in each layer"
            time.sleep(1.0)
            wait_js(driver, GRID_DRAWN, timeout=60)
            time.sleep(1.0)
            shown = driver.execute_script(
                f"const d = {MODEL.format('grid_cells')}.data; const out = [];"
                "for (let i = 0; i < d.fade.length; i++) if (d.fade[i] == 0) out.push('L' + d.layer[i] + 'H' + d.head[i]);"
                "return out")
            driver.save_screenshot(args.out)
            print(f"wrote {args.out}; heads shown (not veiled): {', '.join(shown)}")
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
