"""Notebook view benchmark (not a test): how long `attnatlas.show(...)` takes to show the grid inline.

    python scripts/bench_notebook.py [--atlas atlases/demo] [--rounds 3] [--case smollm2:pca --case minilm:tsne]

For each case, two numbers and their sum:
  python   `attnatlas.show(atlas, model, method)._repr_mimebundle_()` in a fresh process after `import attnatlas`
           (what a notebook cell runs): the first call (it imports Bokeh and anywidget), the median of later calls
           on the atlas opened afresh (warm), and a call on the atlas already opened by the last show (cached);
  browser  the cell's HTML output (what nbconvert and any notebook viewer draw) in a page served on 127.0.0.1,
           loaded in headless Chromium: from the request to the grid image decoded and drawn inside the iframe.
and what a Jupyter cell shows first (`view._ipython_display_()`, IPython's display recorded), in a fresh process
after `import attnatlas` and IPython.display (a kernel has it): when the still grid image is displayed, whether
Bokeh was imported by then, and when the same output is updated with the interactive page; with the still
output's own load in Chromium (`--no-still` leaves this out).
With --lab, also in JupyterLab itself: a local server on 127.0.0.1 (with a token) and headless Chromium; per case a
fresh kernel runs `import attnatlas`, then the cell `attnatlas.show(atlas, model, method)` is run and timed from the
run command to the first grid image on screen (the still image, or the page's grid where there is none), to the
page's grid drawn inside its iframe, and to the still image kept over the page removed.
Target (issue 28): the 270-head SmolLM2 grid inline in <= 2 s, python + browser.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import GRID_DRAWN, make_driver, wait_js  # noqa: E402

PY_CODE = """
import json, sys, time
import attnatlas
from attnatlas import notebook
atlas, model, method, rounds, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
def once():
    t0 = time.perf_counter()
    bundle = attnatlas.show(atlas, model, method)._repr_mimebundle_()
    return time.perf_counter() - t0, bundle
first = once()[0]
fresh = []
for i in range(rounds):
    getattr(notebook, "_OPENED", {}).clear()  # the atlas opened afresh, as for the first show of it in a kernel
    fresh.append(once()[0])
cached, bundle = once()  # the same atlas again, unchanged: its layouts and grid image are reused
open(out, "w").write(bundle["text/html"])
print(json.dumps(dict(first=first, fresh=fresh, cached=cached)))
"""

STILL_CODE = """
import json, sys, time
import IPython.display  # imported in any kernel already
import attnatlas
atlas, model, method, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
seen = {}
class Handle:
    def update(self, obj, **kw):
        seen["page"] = time.perf_counter() - t0
def display(*objs, **kw):
    if kw.get("display_id"):
        seen.update(still=time.perf_counter() - t0, bokeh="bokeh" in sys.modules)
        open(out, "w").write(objs[0]["text/html"])
        return Handle()
    return None
IPython.display.display = display
t0 = time.perf_counter()
attnatlas.show(atlas, model, method)._ipython_display_()
print(json.dumps(seen))
"""

HOST = "<!doctype html><html><head><meta charset='utf-8'><title>cell output</title></head><body>{}</body></html>"


@contextlib.contextmanager
def http_dir(folder: Path):
    """A static file server for `folder` on 127.0.0.1; yields its base URL."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def end_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")  # every round a real load
            super().end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


def python_times(atlas: str, model: str, method: str, rounds: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = subprocess.run([sys.executable, "-c", PY_CODE, atlas, model, method, str(rounds), str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    if got.returncode:
        raise RuntimeError(got.stderr)
    return json.loads(got.stdout.strip().splitlines()[-1])


def still_times(atlas: str, model: str, method: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = subprocess.run([sys.executable, "-c", STILL_CODE, atlas, model, method, str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    if got.returncode:
        raise RuntimeError(got.stderr)
    return json.loads(got.stdout.strip().splitlines()[-1])


def still_browser_times(driver, url: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        driver.get("about:blank")
        t0 = time.perf_counter()
        driver.get(url)
        wait_js(driver, "(() => { const i = document.querySelector('img'); return i && i.complete && i.naturalWidth > 0 })()",
                60, poll=0.01)
        times.append(time.perf_counter() - t0)
    return times


LAB_JS_RUN = """
const nb = window.jupyterapp.shell.currentWidget
nb.content.activeCellIndex = arguments[0]
window.jupyterapp.commands.execute('notebook:run-cell')
"""
LAB_IDLE = ("(() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
            "return k && k.status == 'idle' && w.content.widgets.length > 0 })()")


def lab_times(atlas: str, cases: list, rounds: int) -> dict:
    """Per case, [(seconds to the first grid image on screen, seconds to the page's grid drawn)] in JupyterLab."""
    import secrets
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_hex(16)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="attnatlas-bench-lab-") as tmp:
        cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                  "source": src} for src in ["import attnatlas"] + [f"attnatlas.show({atlas!r}, {m!r}, {me!r})" for m, me in cases]]
        nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
        Path(tmp, "bench.ipynb").write_text(json.dumps(nb))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
                                   f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp}",
                                   "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False", "--allow-root"],
                                  env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        driver = make_driver(1500, 1300)
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            driver.get(f"http://127.0.0.1:{port}/lab/tree/bench.ipynb?token={token}")
            for i, (model, method) in enumerate(cases, start=1):
                for _ in range(rounds):
                    # A fresh kernel each round: its first show of the atlas, after `import attnatlas`.
                    wait_js(driver, LAB_IDLE, 120)
                    driver.execute_script("return window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()")
                    wait_js(driver, LAB_IDLE, 120)
                    driver.execute_script("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
                    driver.execute_script(LAB_JS_RUN, 0)
                    time.sleep(0.3)
                    wait_js(driver, LAB_IDLE, 120)
                    area = f"window.jupyterapp.shell.currentWidget.content.widgets[{i}].outputArea.node"
                    t0 = time.perf_counter()
                    driver.execute_script(LAB_JS_RUN, i)
                    first = frame = None
                    while frame is None and time.perf_counter() - t0 < 120:
                        img, frame = driver.execute_script(
                            f"const a = {area}, i = a.querySelector('img'), f = a.querySelector('iframe[data-view]');"
                            "return [!!(i && i.complete && i.naturalWidth > 0), f && f.offsetHeight > 0 ? f : null]")
                        if img and first is None:
                            first = time.perf_counter() - t0
                        time.sleep(0.01)
                    driver.switch_to.frame(frame)
                    wait_js(driver, GRID_DRAWN, 120, poll=0.01)
                    drawn = time.perf_counter() - t0
                    driver.switch_to.default_content()
                    # The still image kept over the page goes once the page says it is drawn.
                    wait_js(driver, f"!{area}.querySelector('[id^=\"attnatlas-still-\"] img')", 30, poll=0.01)
                    gone = time.perf_counter() - t0
                    out.setdefault(f"{model}:{method}", []).append((drawn if first is None else first, drawn, gone))
        finally:
            driver.quit()
            server.terminate()
            server.wait(30)
    return out


def browser_times(driver, url: str, rounds: int) -> list[float]:
    from selenium.webdriver.common.by import By

    times = []
    for _ in range(rounds):
        driver.get("about:blank")
        t0 = time.perf_counter()
        driver.get(url)  # returns at the host page's load event
        driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[data-view]"))
        wait_js(driver, GRID_DRAWN, 60, poll=0.01)
        times.append(time.perf_counter() - t0)
        driver.switch_to.default_content()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", default=str(ROOT / "atlases" / "demo"))
    ap.add_argument("--case", action="append", default=None, help="MODEL:METHOD (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-still", action="store_true", help="leave out the still-image-first measurement")
    ap.add_argument("--lab", action="store_true", help="also time the cell in JupyterLab (a local server, headless Chromium)")
    ap.add_argument("--lab-only", action="store_true", help="only the JupyterLab timing")
    a = ap.parse_args()
    cases = [c.split(":", 1) for c in (a.case or ["smollm2:pca", "minilm:tsne"])]
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    if a.lab or a.lab_only:
        for case, got in lab_times(a.atlas, cases, a.rounds).items():
            first, drawn = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
            rounds = ", ".join(f"{g[0]:.2f}/{g[1]:.2f}" for g in got)
            gone = statistics.median(g[2] for g in got)
            print(f"JupyterLab, fresh kernel after `import attnatlas`, {case}: grid on screen {first:.2f} s, "
                  f"interactive grid drawn {drawn:.2f} s, still image removed {gone:.2f} s (rounds {rounds})")
        if a.lab_only:
            return 0
    with tempfile.TemporaryDirectory(prefix="attnatlas-bench-nb-") as tmp:
        folder = Path(tmp)
        driver = make_driver(1500, 1300)
        try:
            with http_dir(folder) as base:
                for model, method in cases:
                    out = folder / f"{model}-{method}.part"
                    py = python_times(a.atlas, model, method, a.rounds, out)
                    (folder / f"{model}-{method}.html").write_text(HOST.format(out.read_text()), encoding="utf-8")
                    size = out.stat().st_size / 1e6
                    br = browser_times(driver, f"{base}{model}-{method}.html", a.rounds)
                    first, warm, cached, b = py["first"], statistics.median(py["fresh"]), py["cached"], statistics.median(br)
                    print(f"{model} {method}: browser {b:.2f} s (rounds {', '.join(f'{x:.2f}' for x in br)}); "
                          f"cell output {size:.1f} MB\n"
                          f"  python warm {warm:.2f} s -> sum {warm + b:.2f} s\n"
                          f"  python first call in a kernel {first:.2f} s -> sum {first + b:.2f} s\n"
                          f"  python again, atlas already open {cached:.2f} s -> sum {cached + b:.2f} s")
                    if a.no_still:
                        continue
                    sf = folder / f"{model}-{method}-still.html"
                    st = [still_times(a.atlas, model, method, sf) for _ in range(a.rounds)]
                    sf.write_text(HOST.format(sf.read_text()), encoding="utf-8")
                    sb = statistics.median(still_browser_times(driver, f"{base}{sf.name}", a.rounds))
                    still, pg = statistics.median(s["still"] for s in st), statistics.median(s["page"] for s in st)
                    rounds = ", ".join(f"{s['still']:.2f}" for s in st)
                    print(f"  Jupyter display, fresh process: still grid displayed at {still:.2f} s "
                          f"(rounds {rounds}; Bokeh imported by then: "
                          f"{any(s['bokeh'] for s in st)}), drawn {sb:.2f} s later in Chromium -> {still + sb:.2f} s; "
                          f"replaced by the page at {pg:.2f} s -> grid interactive at about {pg + b:.2f} s")
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
