"""Dashboard benchmark (not a test): grid draw, page load, head switch, bytes per switch, 20 concurrent sessions.

    python scripts/bench_app.py [--atlas DIR] [--layers 12 --heads 12 --tokens 5000] [--sessions 20]
    python scripts/bench_app.py --grid-only --tokens 10000 [--demo atlases/demo] [--old-rev REV]
    python scripts/bench_app.py --before REV --tokens 10000 [--rounds 2]

Builds (or reuses) a synthetic atlas with `tokens` tokens, so 2 x tokens query+key points per head, serves it
with `attnatlas serve` on 127.0.0.1, and drives it with headless Chromium (Debian's chromium + chromedriver).

The grid section measures the global grid (request to drawn: document idle and its image decoded and painted;
bytes received over the websocket) for the synthetic atlas and for the SmolLM2 demo grid, against the grid of
`--old-rev` (the 100-token scatter grid before the full-density grid), served from a `git archive` of that
revision in the same run. `--before REV` instead serves this tree and REV's tree in alternating rounds and compares
page load, grid drawn, head switch and the head map with the same measure, so "no slower than before" is one run's
ratio. Targets from issue 13: grid drawn <= 1.5 s and <= 3 MB for 144 heads x 20,000 points
and for SmolLM2's 270 heads; head switch <= 0.2 s median.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_browser import GRID_DRAWN, IDLE, MODEL, make_driver, serve, wait_js  # noqa: E402

OLD_REV = "192af1f^"  # the last revision with the 100-token scatter grid
OLD_GRID_DRAWN = f"{IDLE} && Bokeh.index.find_one({MODEL.format('grid_scatter')}) != null"
TWO_FRAMES = "const done = arguments[arguments.length - 1]; requestAnimationFrame(() => requestAnimationFrame(() => done(true)))"

SWITCH_JS = """
const done = arguments[arguments.length - 1];
const doc = Bokeh.documents[0];
const src = doc.get_model_by_name('head_scatter').data_source;
const sel = doc.get_model_by_name('head_select');
const old = src.data.x;
const t0 = performance.now();
sel.value = arguments[0];
function check() {
  if (src.data.x !== old) {
    // two frames: the one that paints the new data, and the next, which starts after it
    requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));
  } else if (performance.now() - t0 > 20000) { done(-1) } else { requestAnimationFrame(check) }
}
check();
"""


def build_atlas(path: Path, layers: int, heads: int, tokens: int) -> None:
    from attnatlas import testing
    from attnatlas.store import Atlas

    if path.exists():
        a = Atlas.open(path)
        if "synthetic" in a.models and a.layout_methods("synthetic"):
            return
    seq_len = 20
    t0 = time.time()
    atlas = testing.synthetic_atlas(path, n_layers=layers, n_heads=heads, n_seq=tokens // seq_len, seq_len=seq_len, d_head=32, topk=8)
    testing.random_layouts(atlas, "synthetic", "pca")
    print(f"built atlas {path}: {layers}x{heads} heads, {tokens} tokens ({2 * tokens} points) per head in {time.time() - t0:.0f} s")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ws_bytes(driver) -> tuple[int, int]:
    """Bytes and frames received over websockets since the last call (Chrome performance log)."""
    total = frames = 0
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") != "Network.webSocketFrameReceived":
            continue
        resp = msg["params"]["response"]
        data = resp.get("payloadData", "")
        total += len(base64.b64decode(data)) if resp.get("opcode") == 2 else len(data.encode())
        frames += 1
    return total, frames


@contextlib.contextmanager
def rev_tree(rev: str):
    """A temporary folder holding the `attnatlas` package of git revision `rev` (a `git archive`)."""
    with tempfile.TemporaryDirectory(prefix="attnatlas-old-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "attnatlas"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        yield tree


@contextlib.contextmanager
def serve_rev(atlas: Path, rev: str, timeout: float = 180.0):
    """`attnatlas serve` from the code of git revision `rev`."""
    with rev_tree(rev) as tree:
        # cwd = the old tree: `python -m` puts the working folder first on sys.path
        with serve(atlas.resolve(), timeout, cwd=tree, env={**os.environ, "PYTHONPATH": tree}) as url:
            yield url


def bench_grid(url: str, drawn: str, loads: int, width: int = 1600) -> dict[str, list[float]]:
    """Grid page loads: seconds from request to drawn (then two frames painted), websocket bytes per load."""
    driver = make_driver(width, 1200, perf_log=True)
    times, sizes = [], []
    try:
        for _ in range(loads):
            driver.get("about:blank")
            ws_bytes(driver)
            t0 = time.perf_counter()
            driver.get(url)
            wait_js(driver, drawn, timeout=120, poll=0.01)
            driver.execute_async_script(TWO_FRAMES)
            times.append(time.perf_counter() - t0)
            time.sleep(0.3)  # trailing frames into the log
            sizes.append(ws_bytes(driver)[0])
    finally:
        driver.quit()
    return {"s": times, "bytes": sizes}


MAP_JS = """
const done = arguments[arguments.length - 1];
const doc = Bokeh.documents[0];
const t0 = performance.now();
doc.get_model_by_name('grid_mode').active = 1;
function check() {
  const m = doc.get_model_by_name('head_map_thumbs');
  const v = m && Bokeh.index.find_one(m);
  if (v && v.glyph._images_rendered && doc.is_idle) {
    requestAnimationFrame(() => requestAnimationFrame(() => done([performance.now() - t0, m.data_source.data.url.length])));
  } else if (performance.now() - t0 > 60000) { done([-1, 0]) } else { requestAnimationFrame(check) }
}
check();
"""


def bench_head_map(url: str, loads: int) -> tuple[list[float], int]:
    """Seconds from the 'head map' button to every thumbnail painted, per fresh page."""
    driver = make_driver(1600, 1200)
    times, n = [], 0
    try:
        for _ in range(loads):
            driver.get(url)
            wait_js(driver, GRID_DRAWN, timeout=120)
            ms, n = driver.execute_async_script(MAP_JS)
            times.append(ms / 1000)
    finally:
        driver.quit()
    return times, n


def grid_section(a: argparse.Namespace) -> None:
    cases = [(f"synthetic {a.layers}x{a.heads} heads x {2 * a.tokens:,} points", a.atlas, "")]
    if a.demo and (a.demo / "zarr.json").exists():
        cases.append(("SmolLM2 demo, 30x9 heads, pca", a.demo, "?model=smollm2&method=pca"))
    rows = []
    for label, atlas, query in cases:
        with serve(atlas, timeout=300) as url:
            new = bench_grid(url + query, GRID_DRAWN, a.loads)
        with serve_rev(atlas, a.old_rev, timeout=300) as url:
            old = bench_grid(url + query, OLD_GRID_DRAWN, a.loads)
        rows.append((label, new, old))
    if a.demo and (a.demo / "zarr.json").exists():
        with serve(a.demo, timeout=300) as url:
            map_s, n_heads = bench_head_map(url + "?model=minilm&method=tsne", a.loads)
    for label, new, old in rows:
        nt, ot = statistics.median(new["s"]), statistics.median(old["s"])
        nb, ob = statistics.median(new["bytes"]), statistics.median(old["bytes"])
        print(f"grid, {label}, {a.loads} loads each, median request -> drawn: full-density {nt:.2f} s "
              f"(first {new['s'][0]:.2f}, max {max(new['s']):.2f}), old 100-token grid {ot:.2f} s "
              f"(first {old['s'][0]:.2f}, max {max(old['s']):.2f}): ratio {nt / ot:.2f}x; "
              f"websocket bytes: {nb / 1e6:.2f} MB vs {ob / 1e6:.2f} MB: ratio {nb / ob:.2f}x")
    if a.demo and (a.demo / "zarr.json").exists():
        print(f"head map, {n_heads} heads (MiniLM with SmolLM2), button to thumbnails painted, {a.loads} fresh pages: "
              f"median {statistics.median(map_s):.2f} s, first {map_s[0]:.2f} s, max {max(map_s):.2f} s")


def build_atlas_at_rev(rev: str, path: Path, layers: int, heads: int, tokens: int) -> None:
    """A synthetic atlas written by REV's code, so both trees can read it (newer code reads older atlases)."""
    if (path / "zarr.json").exists():
        return
    with rev_tree(rev) as tree:
        code = ("import sys; from attnatlas import testing; "
                f"a = testing.synthetic_atlas({str(path)!r}, n_layers={layers}, n_heads={heads}, n_seq={tokens // 20}, "
                "seq_len=20, d_head=32, topk=8); testing.random_layouts(a, 'synthetic', 'pca')")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tree, env={**os.environ, "PYTHONPATH": tree})


def before_section(a: argparse.Namespace) -> None:
    """This tree against `a.before`, alternating rounds so both see the same machine load. The atlases are
    synthetic and written by REV's code: the grid of 144 heads x 2 * tokens points, and a model shaped like the
    demo's SmolLM2 (30 x 9 heads, 2,860 points each) for the 270-head grid and the head map."""
    trees = {"now": None, "before": a.before}
    got: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    big = a.atlas.with_name(a.atlas.name + f"-{a.before}")
    wide = a.atlas.with_name(a.atlas.name + f"-270-{a.before}")
    build_atlas_at_rev(a.before, big, a.layers, a.heads, a.tokens)
    build_atlas_at_rev(a.before, wide, 30, 9, 1430)

    def add(tree: str, key: str, values: list[float]) -> None:
        got[tree].setdefault(key, []).extend(values)

    for r in range(a.rounds):
        for tree, rev in (trees.items() if r % 2 == 0 else reversed(list(trees.items()))):
            ctx = (lambda atlas: serve(atlas, timeout=300)) if rev is None else (lambda atlas, rev=rev: serve_rev(atlas, rev, timeout=300))
            with ctx(big) as url:
                b = bench_browser(url, a.loads, a.switches)
                add(tree, "head map, 144 heads: button to thumbnails painted", bench_head_map(url, a.loads)[0])
            add(tree, f"page: request to grid drawn, 144 heads x {2 * a.tokens:,} points", b["grid_load_s"])
            add(tree, "head switch", [s for s in b["switch_s"] if s >= 0])
            with ctx(wide) as url:
                add(tree, "page: request to grid drawn, 270 heads", bench_grid(url, GRID_DRAWN, a.loads)["s"])
            print(f"round {r + 1}/{a.rounds}: {tree} done", flush=True)
    print(f"this tree vs {a.before}, {a.rounds} alternating rounds, {a.tokens * 2:,} points per synthetic head:")
    for key in got["now"]:
        now, before = statistics.median(got["now"][key]), statistics.median(got["before"][key])
        print(f"  {key}: median {now:.3f} s now vs {before:.3f} s before (n={len(got['now'][key])}), ratio {now / before:.2f}x")


def bench_browser(url: str, loads: int, switches: int) -> dict[str, object]:
    out: dict[str, object] = {}
    driver = make_driver(1500, 1300, perf_log=True)
    try:
        times = []
        for _ in range(loads):
            driver.get("about:blank")
            t0 = time.perf_counter()
            driver.get(url)
            wait_js(driver, GRID_DRAWN, timeout=60, poll=0.01)
            times.append(time.perf_counter() - t0)
            # cross-check with the browser's own clock: navigation start to now
        out["grid_load_s"] = times

        driver.get(url + "?layer=0&head=0")
        wait_js(driver, IDLE, timeout=60)
        wait_js(driver, f"{MODEL.format('head_scatter')}.data_source.data.x.length > 0", timeout=60)
        out["head_points"] = driver.execute_script(f"return {MODEL.format('head_scatter')}.data_source.data.x.length")
        ws_bytes(driver)
        sw, sizes = [], []
        n_heads = len(driver.execute_script(f"return {MODEL.format('head_select')}.options"))
        for i in range(switches):
            target = str((i + 1) % n_heads)
            ms = driver.execute_async_script(SWITCH_JS, target)
            time.sleep(0.3)  # let trailing frames land before reading the log
            b, _ = ws_bytes(driver)
            sw.append(ms / 1000)
            sizes.append(b)
        out["switch_s"] = sw
        out["switch_bytes"] = sizes
    finally:
        driver.quit()
    return out


def one_session(url: str, switches: int, out: list, errors: list) -> None:
    from bokeh.client import pull_session

    try:
        t0 = time.perf_counter()
        session = pull_session(url=url, arguments={"layer": "0", "head": "0"})
        pull = time.perf_counter() - t0
        doc = session.document
        src = doc.get_model_by_name("head_points")
        sel = doc.get_model_by_name("head_select")
        lat = []
        for i in range(switches):
            old = src.data["x"]
            t0 = time.perf_counter()
            sel.value = str((i + 1) % len(sel.options))
            deadline = t0 + 60
            # Run this client's loop until the server's data patch has been applied (private API: the public
            # request/reply calls drop patches that arrive while they wait).
            session._connection._loop_until(lambda old=old, deadline=deadline: src.data["x"] is not old or time.perf_counter() > deadline)
            lat.append(time.perf_counter() - t0)
            if src.data["x"] is old:
                errors.append("head switch did not arrive within 60 s")
        out.append((pull, lat))
        session.close()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal to the other sessions
        errors.append(repr(exc))


def load_test(url: str, sessions: int, switches: int) -> tuple[list, list, float]:
    out: list = []
    errors: list = []
    threads = [threading.Thread(target=one_session, args=(url, switches, out, errors)) for _ in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out, errors, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", type=Path, default=Path(tempfile.gettempdir()) / "attnatlas-bench-atlas")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--switches", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--session-switches", type=int, default=10)
    ap.add_argument("--demo", type=Path, default=ROOT / "atlases" / "demo", help="demo atlas for the SmolLM2 grid")
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the old grid to compare with")
    ap.add_argument("--grid-only", action="store_true", help="only the grid section, then the head switch")
    ap.add_argument("--before", metavar="REV", help="compare page load, grid, head switch and head map with REV's tree")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds for --before")
    a = ap.parse_args()
    if a.before:
        before_section(a)
        return
    build_atlas(a.atlas, a.layers, a.heads, a.tokens)
    grid_section(a)
    with serve(a.atlas, timeout=180) as url:
        b = bench_browser(url, a.loads, a.switches)
        g = b["grid_load_s"]
        print(f"grid page, request to drawn (document idle, grid image painted), {a.loads} loads: median "
              f"{statistics.median(g):.2f} s, first {g[0]:.2f} s, max {max(g):.2f} s")
        sw = [s for s in b["switch_s"] if s >= 0]
        print(f"head switch ({b['head_points']} points), value set to new data painted, {len(sw)} switches: "
              f"median {statistics.median(sw) * 1000:.0f} ms, p90 {pct(sw, 90) * 1000:.0f} ms, max {max(sw) * 1000:.0f} ms")
        sb = b["switch_bytes"]
        print(f"bytes received over the websocket per head switch: median {statistics.median(sb) / 1024:.0f} KiB "
              f"(min {min(sb) / 1024:.0f}, max {max(sb) / 1024:.0f})")
        if a.grid_only:
            return
        res, errors, wall = load_test(url, a.sessions, a.session_switches)
        pulls = [p for p, _ in res]
        lats = [x for _, lat in res for x in lat]
        print(f"load test: {a.sessions} concurrent sessions (bokeh.client, one thread each, client and server on "
              f"this machine), {len(res)} completed in {wall:.1f} s, errors: {len(errors)}")
        if pulls:
            print(f"  session open (document built and pulled): p50 {pct(pulls, 50):.2f} s, p90 {pct(pulls, 90):.2f} s, "
                  f"max {max(pulls):.2f} s")
        if lats:
            print(f"  head switch round trip under load ({len(lats)} switches): p50 {pct(lats, 50) * 1000:.0f} ms, "
                  f"p90 {pct(lats, 90) * 1000:.0f} ms, p99 {pct(lats, 99) * 1000:.0f} ms, max {max(lats) * 1000:.0f} ms")
        for e in errors[:5]:
            print("  error:", e)


if __name__ == "__main__":
    main()
