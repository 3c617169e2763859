"""Live input is bounded: each text written once, huge strings cut before the tokenizer, a budget of placed
points per call, a bounded queue in front of the live worker, and images bounded in bytes and pixels."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_live import build, fingerprint
from tiny_models import projected_vit_atlas

from attnatlas.cli import main as cli

# Words the tiny tokenizer knows, one distinct sentence: easy to find in an output file.
LONG = " ".join(["anna said hello to the dark river"] * 40)  # 280 words; the tiny model keeps 64 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bounds"))


@pytest.fixture(scope="module")
def vit_atlas(tmp_path_factory):
    return projected_vit_atlas(tmp_path_factory.mktemp("vit"))


# ---- text: once per output, cut before the tokenizer, a budget per call ------------------------------------------
def test_each_text_is_written_once_in_csv_and_parquet(tiny, tmp_path, capsys):
    from attnatlas.cli.place import texts_file

    atlas, _, _ = tiny
    before = fingerprint(atlas)
    out = tmp_path / "p.csv"
    assert cli(["place", str(atlas), "--text", LONG, "--text", "the cat", "--out", str(out)]) == 0
    rows = out.read_text()
    assert LONG[:60] not in rows and "the cat" not in rows  # rows name their text by sequence
    assert rows.splitlines()[0].startswith("sequence,token,position,kind,layer,head,x_pca,y_pca")
    df = pd.read_csv(out)
    assert len(df) == 8 * 2 * (64 + 4) and set(df.sequence) == {0, 1}  # 8 heads; LONG truncated to 64 tokens
    texts = pd.read_csv(texts_file(str(out)))
    assert texts.sequence.tolist() == [0, 1] and texts.text.tolist() == [LONG, "the cat"]
    assert (out.parent / "p.texts.csv").read_text().count(LONG) == 1
    gz = tmp_path / "p.csv.gz"  # gzipped: the same rows, and the texts beside them
    assert cli(["place", str(atlas), "--text", LONG, "--text", "the cat", "--out", str(gz)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(gz)[["sequence", "token", "kind"]], df[["sequence", "token", "kind"]])
    assert pd.read_csv(tmp_path / "p.texts.csv.gz").text.tolist() == [LONG, "the cat"]
    # To stdout: no text column either.
    capsys.readouterr()
    assert cli(["place", str(atlas), "--text", LONG]) == 0
    std = capsys.readouterr().out
    assert LONG[:60] not in std and len(std.splitlines()) == 8 * 2 * 64 + 1
    # Parquet: one column of texts, dictionary-encoded (each text once), read back as the texts.
    pqf = tmp_path / "p.parquet"
    assert cli(["place", str(atlas), "--text", LONG, "--text", "the cat", "--out", str(pqf)]) == 0
    assert pa.types.is_dictionary(pq.read_schema(pqf).field("text").type)
    meta = pq.ParquetFile(pqf).metadata
    col = meta.schema.names.index("text")
    assert all(meta.row_group(g).column(col).has_dictionary_page for g in range(meta.num_row_groups))
    back = pd.read_parquet(pqf)
    assert sorted(back.text.astype(str).unique()) == sorted([LONG, "the cat"]) and len(back) == len(df)
    assert fingerprint(atlas) == before


def test_a_huge_string_is_cut_before_it_is_tokenized(tiny, monkeypatch):
    from attnatlas.live import Placer, place
    from attnatlas.live.bounds import CHARS_PER_TOKEN

    atlas, _, _ = tiny
    p = Placer(atlas)
    tok = p.model("tiny").preprocessor
    seen: list[int] = []
    call = type(tok).__call__

    def spy(self, text=None, *a, **k):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else (text or [])) if isinstance(t, str))
        return call(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    huge = "anna said hello to the dark river " * 30_000  # 1,020,000 characters
    t0 = time.perf_counter()
    with pytest.warns(UserWarning) as warned:
        table = place(atlas, "tiny", huge, methods="pca", placer=p)
    took = time.perf_counter() - t0
    assert seen and max(seen) <= 64 * CHARS_PER_TOKEN, max(seen)  # the tokenizer never saw the huge string
    notes = " ".join(str(w.message) for w in warned)
    assert "1,020,000" in notes and f"{64 * CHARS_PER_TOKEN:,}" in notes and "truncated to 64" in notes
    assert len(table) == 8 * 2 * 64 and table.text.nunique() == 1 and len(str(table.text.iloc[0])) == 64 * CHARS_PER_TOKEN
    assert took < 60, took


def test_windows_past_the_points_budget_are_left_out_and_said(tiny, monkeypatch, capsys):
    from attnatlas.live import bounds

    atlas, _, _ = tiny
    monkeypatch.setattr(bounds, "MAX_PLACE_POINTS", 2 * 8 * 150)  # 150 tokens into the tiny model's 8 heads
    assert cli(["place", str(atlas), "--text", LONG, "--chunk"]) == 0  # 282 tokens: 5 windows of 64
    out = capsys.readouterr()
    df = pd.read_csv(io.StringIO(out.out))
    assert "Only the first 2 of 5 windows" in out.err and "place the rest in another call" in out.err
    assert set(df.sequence) == {0, 1} and len(df) == 8 * 2 * 128 <= bounds.MAX_PLACE_POINTS
    # One text at the token limit always fits, even under a smaller budget.
    monkeypatch.setattr(bounds, "MAX_PLACE_POINTS", 10)
    assert cli(["place", str(atlas), "--text", LONG, "--text", "the cat"]) == 0
    out = capsys.readouterr()
    assert "Only the first 1 of 2 texts" in out.err and len(out.out.splitlines()) == 8 * 2 * 64 + 1


# ---- the live worker: a bounded queue ----------------------------------------------------------------------------
def test_concurrent_live_requests_are_queued_or_refused_and_the_worker_lives(tiny):
    from attnatlas.live.bounds import MAX_TEXT_CHARS
    from attnatlas.live.worker import LiveError, LiveWorker

    atlas, _, texts = tiny
    w = LiveWorker(str(atlas), max_waiting=2)
    n = 8
    go = threading.Barrier(n)
    results: list[tuple[str, float, str]] = []

    def ask(i: int) -> None:
        go.wait(10)
        t0 = time.monotonic()
        try:
            r = w.request({"op": "place", "model": "tiny", "method": "pca", "text": texts[i]})
            results.append(("ok", time.monotonic() - t0, str(len(r["tokens"]))))
        except LiveError as exc:
            results.append(("refused", time.monotonic() - t0, str(exc)))

    try:
        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads) and len(results) == n
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        # The first request starts the worker (seconds): 1 running + 2 waiting are served, 5 refused at once.
        assert len(ok) == 3 and len(refused) == 5, (results, w.restarts)
        assert all("busy" in why and "Try again" in why for _, _, why in refused)
        assert max(s for _, s, _ in refused) < 2.0, refused
        assert w.alive and w.restarts == 0
        assert w.request({"op": "place", "model": "tiny", "method": "pca", "text": "the cat"})["ok"]
        # Input over its bound is refused in the server, before it is queued or sent.
        with pytest.raises(LiveError, match="at most 5,000"):
            w.request({"op": "place", "model": "tiny", "method": "pca", "text": "a" * (MAX_TEXT_CHARS + 1)})
        # A request that waits longer than the queue allows gets a message, not a hang.
        w.stop()
        w.queue_wait = 0.2
        both: list[str] = []

        def one(text: str) -> None:  # the first to run starts a fresh worker: seconds
            try:
                w.request({"op": "place", "model": "tiny", "method": "pca", "text": text})
                both.append("ok")
            except LiveError as exc:
                both.append(str(exc))

        pair = [threading.Thread(target=one, args=(t,), daemon=True) for t in ("the cat", "the dog")]
        for t in pair:
            t.start()
        for t in pair:
            t.join(120)
        assert sorted(both)[0].startswith("The live worker is busy: your input waited 0.2 s") and "ok" in both, both
        assert w.alive and w.request({"op": "place", "model": "tiny", "method": "pca", "text": "the dog"})["ok"]
    finally:
        w.stop()


# ---- images: bytes, pixels, decompression bombs -------------------------------------------------------------------
def bomb_png(width: int, height: int) -> bytes:
    """A real decompression bomb: a 1-bit PNG of zeros, a few kB that decode to width x height pixels."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(9_000, 9_000), (20_000, 20_000)])  # ours fires; Pillow's own error fires first
def test_an_image_bomb_is_refused_with_one_message_everywhere(vit_atlas, tmp_path, capsys, size):
    from bokeh.document import Document

    from attnatlas.app.dashboard import build_document
    from attnatlas.app.data import AppData
    from attnatlas.errors import InputError
    from attnatlas.inputs import load_images
    from attnatlas.live.worker import LiveError, LiveWorker

    atlas, _ = vit_atlas
    data = bomb_png(*size)
    assert len(data) < 2 << 20  # small on disk
    assert struct.unpack(">II", data[16:24]) == size  # the header's width and height
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(data)
    before = fingerprint(atlas)
    capsys.readouterr()
    assert cli(["place", str(atlas), "--model", "vit", "--image", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "bomb.png is too large to decode safely" in err and "at most 67,108,864 pixels" in err
    assert fingerprint(atlas) == before
    with pytest.raises(InputError, match="too large to decode safely"):  # extract's image input
        load_images([str(bomb)])
    with pytest.raises(LiveError, match="too large to decode safely"):  # the worker, before anything is sent
        LiveWorker(str(atlas)).request({"op": "place", "model": "vit", "method": "pca", "image": data,
                                        "image_name": "bomb.png"})
    # The dashboard's upload: refused with one message, the worker never asked.
    import base64

    class Worker:
        calls = 0

        def request(self, payload):
            Worker.calls += 1
            raise AssertionError("a bomb reached the worker")

    dash = build_document(Document(), AppData(str(atlas)), {"model": [b"vit"], "layer": [b"0"], "head": [b"1"]})
    view = dash.live_view
    view.worker = Worker()
    view._set_mode()
    view.upload.set_from_json("filename", "bomb <b>.png")
    view.upload.set_from_json("value", base64.b64encode(data).decode())
    assert "too large to decode safely" in view.status.text and "bomb &lt;b&gt;.png" in view.status.text
    assert Worker.calls == 0


def test_an_image_file_over_the_byte_bound_is_refused(vit_atlas, monkeypatch, capsys):
    from attnatlas.inputs import images

    atlas, imgs = vit_atlas
    png = sorted(imgs.glob("*.png"))[0]
    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", png.stat().st_size - 1)
    capsys.readouterr()
    assert cli(["place", str(atlas), "--model", "vit", "--image", str(png)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "MB an image may have" in err, err


@pytest.mark.browser
def test_browser_upload_of_an_image_bomb_gets_one_message(vit_atlas, tmp_path):
    """A user chooses a bomb in the real file picker: one message in the box, nothing placed, the page lives."""
    import os

    from test_browser import CHROMEDRIVER, CHROMIUM, IDLE, MODEL, make_driver, wait_js
    from test_live import serve_live

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs chromium and chromedriver")
    atlas, _ = vit_atlas
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(9_000, 9_000))
    find_file = """const walk = (root) => { for (const el of root.querySelectorAll('*')) {
        if (el.tagName === 'INPUT' && el.type === 'file') return el
        if (el.shadowRoot) { const hit = walk(el.shadowRoot); if (hit) return hit } } return null }
      return walk(document)"""
    with serve_live(atlas) as url:
        driver = make_driver()
        try:
            driver.get(url + "?model=vit&method=pca&layer=0&head=1")
            wait_js(driver, f"{IDLE} && {MODEL.format('live_status')} != null", 60)
            driver.execute_script(find_file).send_keys(str(bomb))
            try:
                status = wait_js(driver, f"{MODEL.format('live_status')}.text.includes('too large') && "
                                         f"{MODEL.format('live_status')}.text", 60)
            finally:
                shots = os.environ.get("ATTNATLAS_SHOTS") or str(tmp_path)
                driver.save_screenshot(os.path.join(shots, "bomb-upload.png"))
                print(driver.execute_script(f"return {MODEL.format('live_status')}.text"))
            assert "bomb.png is too large to decode safely" in status and "67,108,864 pixels" in status
            assert driver.execute_script(f"return {MODEL.format('live_points')}.data.x.length") == 0
        finally:
            driver.quit()
