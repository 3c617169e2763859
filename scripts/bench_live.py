"""Your own text, live: from pressing "Place into every head" to the markers drawn, in headless Chromium.

`attnatlas serve ATLAS --live` runs on loopback; the page opens a head of each model, the sentence is typed
into the box, and the button is pressed. Per request it prints the parts: the worker's forward pass
("model"), the placement into every head ("place"), the server's whole answer including the round trip to
the worker ("server"), and the rest (websocket, BokehJS update and the next two frames drawn). The first
request of each model (weights loaded, every head's reference read) is reported apart from the warm ones.

    python scripts/bench_live.py [--atlas atlases/demo] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# 30 tokens for MiniLM ([CLS] and [SEP] included), 28 for SmolLM2.
SENTENCE = ("The old fisherman who lived by the river told his grandson that the bank would close early "
            "because the storm was coming over the hills before dark tonight")
# Click the button, then wait for the answer (a new timing stamp) and two animation frames (drawn).
CLICK_AND_WAIT = """
const done = arguments[arguments.length - 1]
const doc = Bokeh.documents[0]
const timing = doc.get_model_by_name('live_timing'), points = doc.get_model_by_name('live_points')
const before = timing.text
const find = (root) => { for (const el of root.querySelectorAll('*')) {
  if (el.tagName === 'BUTTON' && el.textContent.trim() === 'Place into every head') return el
  if (el.shadowRoot) { const hit = find(el.shadowRoot); if (hit) return hit } } return null }
const t0 = performance.now()
find(document).click()
const poll = () => {
  if (timing.text !== before && doc.is_idle) {
    requestAnimationFrame(() => requestAnimationFrame(() => done({ms: performance.now() - t0, timing: timing.text,
                                                                 points: points.data.x.length})))
  } else if (performance.now() - t0 > 600000) { done({ms: -1, timing: timing.text, points: 0}) }
  else { setTimeout(poll, 2) }
}
poll()
"""


def run_model(driver, url: str, model: str, method: str, repeats: int) -> dict:
    from test_browser import IDLE, MODEL, wait_js
    from test_live import type_and_place

    driver.get(f"{url}?model={model}&method={method}&layer=0&head=0")
    wait_js(driver, f"{IDLE} && {MODEL.format('live_text')} != null", 120)
    driver.set_script_timeout(700)
    type_and_place(driver, SENTENCE)  # types the text; this first press is the cold request
    wait_js(driver, f"{MODEL.format('live_timing')}.text.length > 0 || "
                    f"{MODEL.format('live_status')}.text.includes('color:#b00')", 700)
    first = json.loads(driver.execute_script(f"return {MODEL.format('live_timing')}.text") or "{}")
    if not first:
        raise SystemExit(driver.execute_script(f"return {MODEL.format('live_status')}.text"))
    warm = []
    for _ in range(repeats):
        r = driver.execute_async_script(CLICK_AND_WAIT)
        t = json.loads(r["timing"])
        warm.append({"end_to_end": r["ms"] / 1000, "model": t["model"], "place": t["place"],
                     "server": t["server_total"], "tokens": t["tokens"], "heads": t["heads"], "points": r["points"]})
    return {"first": first, "warm": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default=str(ROOT / "atlases" / "demo"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="minilm:tsne,smollm2:pca", help="model:method pairs")
    args = ap.parse_args()

    from test_browser import make_driver
    from test_live import serve_live

    with serve_live(args.atlas, timeout=180) as url:
        driver = make_driver()
        try:
            for pair in args.models.split(","):
                model, method = pair.split(":")
                res = run_model(driver, url, model, method, args.repeats)
                f, w = res["first"], res["warm"]
                print(f"\n{model} ({method}), {w[0]['tokens']} tokens into {w[0]['heads']} heads "
                      f"({w[0]['points']} markers in the shown head)")
                print(f"  first request: weights loaded in {f['load']:.2f} s; forward {f['model']:.3f} s, "
                      f"placement {f['place']:.2f} s (every head's reference read once), server total "
                      f"{f['server_total']:.2f} s")
                med = {k: statistics.median(x[k] for x in w) for k in ("end_to_end", "model", "place", "server")}
                print(f"  warm, median of {len(w)}: end to end {med['end_to_end']:.3f} s = forward {med['model']:.3f} s + "
                      f"placement {med['place']:.3f} s + server and worker round trip "
                      f"{med['server'] - med['model'] - med['place']:.3f} s + websocket, update and draw "
                      f"{med['end_to_end'] - med['server']:.3f} s")
                print("  each end to end: " + ", ".join(f"{x['end_to_end']:.3f}" for x in w))
        finally:
            driver.quit()


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"\n(bench wall time {time.perf_counter() - t:.0f} s)")
