"""Nothing lost under concurrency, kills and full disks; bad numbers refused with one message.

Writers run in subprocesses where a kill must be real (SIGKILL at a named step of the write protocol,
see attnatlas/store/faults.py), in threads where two writers of one process are enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from attnatlas import testing
from attnatlas.cli import main as cli
from attnatlas.errors import InputError, StoreError
from attnatlas.store import Atlas, open_atlas
from attnatlas.store import atlas as store_mod

ROOT = Path(__file__).resolve().parents[1]
# Writes model argv[2] (seed argv[3], argv[4] sequences) into the atlas argv[1], replacing one of that name.
WRITER = """
import sys
from attnatlas import testing
from attnatlas.store import Atlas
atlas = Atlas.open(sys.argv[1], create=True)
testing.write_synthetic_model(atlas, name=sys.argv[2], seed=int(sys.argv[3]), n_seq=int(sys.argv[4]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("ATTNATLAS_KILL_AT", None)
    env.update(extra)
    return env


def _write(atlas: Path, name: str, seed: int, n_seq: int = 20, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(atlas), name, str(seed), str(n_seq)],
                          env=_env(**env), capture_output=True, text=True, timeout=120)


def _queries_digest(atlas: Atlas, model: str) -> str:
    return hashlib.sha256(np.asarray(atlas.array(model, "queries")[:]).tobytes()).hexdigest()


def _side_folders(atlas_path: Path) -> list[str]:
    return sorted(p.name for p in (atlas_path / "models").iterdir() if p.name.startswith(".") and p.name != ".claims")


# ---- concurrent writers ------------------------------------------------------------------------------------
def _held_writer(atlas: Atlas, name: str, release: threading.Event, errors: list) -> threading.Thread:
    """Writes `name` in a thread that stops right before its commit until `release` is set."""
    real_commit = store_mod.ModelWriter.commit

    def commit(self, overwrite=False):
        if self.name == name:
            release.wait(30)
        return real_commit(self, overwrite)

    def run() -> None:
        try:
            testing.write_synthetic_model(atlas, name=name, seed=1)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    store_mod.ModelWriter.commit = commit
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def restore_commit():
    real = store_mod.ModelWriter.commit
    yield
    store_mod.ModelWriter.commit = real


def _wait_for_incoming(path: Path, prefix: str) -> None:
    end = time.time() + 30
    while not [p for p in (path / "models").iterdir() if p.name.startswith(prefix)]:
        assert time.time() < end, "the held writer never started"
        time.sleep(0.02)


@contextlib.contextmanager
def _writing(path: Path, name: str):
    """An atlas at `path` whose writer of `name` (in a thread) waits right before its commit until the
    block ends; it must then land without an error."""
    atlas = Atlas.open(path, create=True)
    release, errors = threading.Event(), []
    t = _held_writer(atlas, name, release, errors)
    _wait_for_incoming(path, f".incoming-{name}-")
    try:
        yield
    finally:
        release.set()
        t.join(60)
    assert not errors, errors


def test_writer_of_a_prefix_name_keeps_the_other_writers_folder(tmp_path, restore_commit):
    path = tmp_path / "atlas"
    with _writing(path, "mini-2"):
        testing.write_synthetic_model(Atlas.open(path), name="mini", seed=2)  # once deleted mini-2's temp folder
    fresh = open_atlas(path)
    assert fresh.models == ["mini", "mini-2"]
    for m in fresh.models:  # both whole: arrays, metadata and tables
        assert fresh.queries(m, 1, 2).shape == (len(fresh.tokens(m)), 8)
        assert np.isfinite(fresh.queries(m, 1, 2)).all()
    assert _side_folders(path) == []


def test_second_writer_of_the_same_name_is_refused_and_the_first_lands(tmp_path, restore_commit):
    path = tmp_path / "atlas"
    with _writing(path, "mini"), pytest.raises(StoreError, match=r"being written by pid \d+"):
        testing.write_synthetic_model(Atlas.open(path), name="mini", seed=2)
    fresh = open_atlas(path)
    assert fresh.models == ["mini"]
    reference = Atlas.open(tmp_path / "ref", create=True)
    testing.write_synthetic_model(reference, name="mini", seed=1)
    assert _queries_digest(fresh, "mini") == _queries_digest(reference, "mini")  # the first writer's data


def test_a_dead_holder_cannot_keep_a_name(tmp_path):
    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, name="m")
    r = _write(path, "m", seed=1, ATTNATLAS_KILL_AT="chunk:1")
    assert r.returncode == -signal.SIGKILL
    # The kill left a temp folder and a claim file naming a dead pid; the next writer is not blocked.
    assert _write(path, "m", seed=2).returncode == 0
    assert _side_folders(path) == []


# ---- kills at every step of the write protocol --------------------------------------------------------------
# (step, which copy must be there afterwards). 1,700 sequences of 12 tokens make two chunk columns.
KILL_STEPS = [("claim", "old"), ("chunk:1", "old"), ("chunk:5", "old"), ("table", "old"), ("attrs", "old"),
              ("rename:trash", "new"), ("rename:final", "new"), ("cleanup", "new")]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Digests of model 'm' written with seed 0 (old) and seed 1 (new), and an atlas holding the old one."""
    base = tmp_path_factory.mktemp("versions")
    digests = {}
    for label, seed in (("old", 0), ("new", 1)):
        assert _write(base / label, "m", seed, n_seq=1700).returncode == 0
        digests[label] = _queries_digest(open_atlas(base / label), "m")
    return base / "old", digests


@pytest.mark.parametrize("step,survivor", KILL_STEPS, ids=[s for s, _ in KILL_STEPS])
def test_overwrite_killed_at_each_step_loses_nothing(tmp_path, two_versions, step, survivor):
    import shutil

    template, digests = two_versions
    path = tmp_path / "atlas"
    shutil.copytree(template, path)
    r = _write(path, "m", seed=1, n_seq=1700, ATTNATLAS_KILL_AT=step)
    assert r.returncode == -signal.SIGKILL, r.stderr
    atlas = open_atlas(path)  # opening rolls an interrupted swap forward or back
    assert atlas.models == ["m"], f"killed at {step}: model gone"
    assert _queries_digest(atlas, "m") == digests[survivor]
    assert _side_folders(path) == []
    # and the atlas takes the next write as usual
    assert _write(path, "m2", seed=3).returncode == 0
    assert open_atlas(path).models == ["m", "m2"]


def test_kill_between_the_swap_renames_without_fault_hooks(tmp_path):
    """The same hazard reached with no help from the protocol's own checkpoints: os.rename itself dies
    after the first rename of the swap."""
    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, name="m", seed=0)
    before = _queries_digest(open_atlas(path), "m")
    script = ("import os, signal\n_real = os.rename\n"
              "def rename(a, b):\n    _real(a, b)\n    if '.trash-' in str(b): os.kill(os.getpid(), signal.SIGKILL)\n"
              "os.rename = rename\n" + WRITER)
    r = subprocess.run([sys.executable, "-c", script, str(path), "m", "1", "20"], env=_env(), timeout=120)
    assert r.returncode == -signal.SIGKILL
    atlas = open_atlas(path)
    assert atlas.models == ["m"]
    assert _queries_digest(atlas, "m") != before  # the complete new copy was rolled forward
    testing.write_synthetic_model(atlas, name="other")
    assert open_atlas(path).models == ["m", "other"]


# ---- concurrent projects ----------------------------------------------------------------------------------
def _project(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "attnatlas", "project", str(path), "--method", "tsne", "--quiet", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _heads_done(path: Path) -> int:
    try:
        return int(open_atlas(path).layout_done("synthetic", "tsne").sum())
    except StoreError:
        return 0


def _paused_project(tmp_path: Path) -> tuple[Path, subprocess.Popen]:
    """A project run of 24 t-SNE heads, stopped (SIGSTOP) after its first head."""
    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, n_layers=4, n_heads=6, n_seq=40)
    first = _project(path)
    end = time.time() + 120
    while _heads_done(path) < 1:
        assert first.poll() is None, first.communicate()
        assert time.time() < end
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)
    return path, first


def test_project_with_other_settings_is_refused_while_one_runs(tmp_path):
    path, first = _paused_project(tmp_path)
    try:
        second = _project(path, "--force", "--no-scale")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, (out, err)
        assert "other settings" in err and "Traceback" not in err
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    atlas = open_atlas(path)
    assert atlas.layout_params("synthetic", "tsne")["normalise"]["scale"] is True
    assert atlas.layout_done("synthetic", "tsne").all()


def test_identical_projects_share_the_heads(tmp_path):
    path, first = _paused_project(tmp_path)
    try:
        second = _project(path)
        end = time.time() + 60
        while _claim_waiters(path) == 0:  # wait until the second run is blocked on the claim
            assert second.poll() is None, second.communicate()
            assert time.time() < end
            time.sleep(0.1)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, _ = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err2
    assert "waiting for pid" in err2
    assert "0 layouts made, 24 already done" in out2, out2


def test_a_model_is_not_replaced_or_deleted_while_a_project_writes_into_it(tmp_path, capsys):
    from tiny_models import save_text_model

    path, first = _paused_project(tmp_path)
    before = _queries_digest(open_atlas(path), "synthetic")
    folder = save_text_model("bert", tmp_path / "bert")
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\n")
    try:
        assert cli(["extract", "--model", str(folder), "--texts", str(texts), "--out", str(path), "--name", "synthetic",
                    "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is being projected by pid" in err and "project synthetic tsne" in err and "Traceback" not in err
        with pytest.raises(StoreError, match="being projected"):
            open_atlas(path).delete_model("synthetic")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0
    atlas = open_atlas(path)
    assert _queries_digest(atlas, "synthetic") == before and atlas.layout_done("synthetic", "tsne").all()
    assert _side_folders(path) == []
    # Once the projection is over the same overwrite goes through.
    assert cli(["extract", "--model", str(folder), "--texts", str(texts), "--out", str(path), "--name", "synthetic",
                "--overwrite", "--no-progress"]) == 0


def test_a_projection_starting_during_an_overwrite_stops_one_or_the_other(tmp_path):
    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, n_layers=1, n_heads=2, n_seq=20)
    atlas = open_atlas(path)
    before = _queries_digest(atlas, "synthetic")
    # A projection started while the model is being replaced: refused, naming the writer.
    with atlas.claim_model("synthetic", "extract"):
        out, err = _project(path).communicate(timeout=120)
    assert "is being written by pid" in err and "extract synthetic" in err and "Traceback" not in err
    # One that takes its claim after the replacing writer started: the swap is refused at commit instead.
    real_commit = store_mod.ModelWriter.commit

    def commit(self, overwrite=False):
        with atlas.claim_layout("synthetic", "pca", "{}"):
            return real_commit(self, overwrite)

    store_mod.ModelWriter.commit = commit
    try:
        with pytest.raises(StoreError, match="being projected"):
            testing.write_synthetic_model(open_atlas(path), name="synthetic", seed=7)
    finally:
        store_mod.ModelWriter.commit = real_commit
    assert _queries_digest(open_atlas(path), "synthetic") == before and _side_folders(path) == []


def test_results_computed_from_a_replaced_model_are_not_stored_into_its_successor(tmp_path):
    import pandas as pd

    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, n_layers=1, n_heads=2, n_seq=10)
    reader = open_atlas(path)
    reader.tokens("synthetic")  # an analysis run reads the model...
    testing.write_synthetic_model(open_atlas(path), name="synthetic", seed=3)  # ...another process replaces it
    with pytest.raises(StoreError, match="was replaced while"):
        reader.write_table("synthetic", "rollout", pd.DataFrame({"x": [1]}))
    assert open_atlas(path).tables("synthetic") == []
    fresh = open_atlas(path)
    fresh.write_table("synthetic", "rollout", pd.DataFrame({"x": [1]}))
    # A replacement made through the same object is what that object reads from then on.
    testing.write_synthetic_model(fresh, name="synthetic", seed=4)
    fresh.write_table("synthetic", "rollout", pd.DataFrame({"x": [2]}))
    assert open_atlas(path).read_table("synthetic", "rollout").x.tolist() == [2]


def _claim_waiters(path: Path) -> int:
    """Processes blocked in flock on the layout claim (from /proc/locks: a '->' line is a waiter)."""
    claim = path / "models" / ".claims" / "layout.synthetic.tsne.json"
    if not claim.exists():
        return 0
    ino = os.stat(claim).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and line.split()[-3].endswith(f":{ino}"))


def test_workers_die_with_a_killed_driver(tmp_path):
    import psutil

    path = tmp_path / "atlas"
    testing.synthetic_atlas(path, n_layers=6, n_heads=6, n_seq=40)
    driver = _project(path, "--workers", "2")
    proc = psutil.Process(driver.pid)
    end = time.time() + 120
    while not (proc.children(recursive=True) and _heads_done(path) >= 2):
        assert driver.poll() is None, driver.communicate()
        assert time.time() < end
        time.sleep(0.05)
    children = proc.children(recursive=True)
    driver.kill()
    driver.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphans still running: {[p.cmdline()[:3] for p in alive]}"
    done = _heads_done(path)
    time.sleep(2)
    assert _heads_done(path) == done  # nothing writes heads after its driver died


# ---- disk full ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root in a machine that allows mounts")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_message_and_leaves_the_atlas_as_it_was(tmp_path, small_disk):
    from tiny_models import save_text_model

    folder = save_text_model("bert", tmp_path / "bert")
    path = small_disk / "atlas"
    small = tmp_path / "small.txt"
    small.write_text("the cat sat\nbank river\n")
    assert cli(["extract", "--model", str(folder), "--texts", str(small), "--out", str(path), "--name", "small",
                "--no-progress"]) == 0
    before = _queries_digest(open_atlas(path), "small")
    big = tmp_path / "big.txt"
    big.write_text("\n".join("the cat sat on a mat by the river bank and ran fast" for _ in range(4000)) + "\n")
    r = subprocess.run([sys.executable, "-m", "attnatlas", "extract", "--model", str(folder), "--texts", str(big),
                        "--out", str(path), "--name", "big", "--dtype", "float32", "--values", "--hidden-states",
                        "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    atlas = open_atlas(path)
    assert atlas.models == ["small"] and _queries_digest(atlas, "small") == before
    assert _side_folders(path) == []
    # the space came back: a tiny extract after it works
    assert cli(["extract", "--model", str(folder), "--texts", str(small), "--out", str(path), "--name", "again",
                "--no-progress"]) == 0


# ---- bounds and messages ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from tiny_models import save_text_model

    return save_text_model("bert", tmp_path_factory.mktemp("bert") / "bert")


@pytest.mark.parametrize("value", ["-5", "0", "1"])
def test_max_tokens_out_of_bounds_is_one_message(tmp_path, bert, capsys, value):
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\n")
    code = cli(["extract", "--model", str(bert), "--texts", str(texts), "--out", str(tmp_path / "a"),
                "--max-tokens", value, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-tokens" in err, err
    assert not (tmp_path / "a").exists()


def test_attention_topk_is_clamped_to_the_longest_sequence(tmp_path, bert):
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\nbank\n")
    assert cli(["extract", "--model", str(bert), "--texts", str(texts), "--out", str(tmp_path / "a"),
                "--attention-topk", "100000", "--no-progress"]) == 0
    atlas = open_atlas(tmp_path / "a")
    longest = int(atlas.sequences("bert").n_tokens.max())
    assert atlas.array("bert", "attn_topk_index").shape[-1] == longest == atlas.info("bert").attrs["attention_topk"]


def test_failed_extract_creates_no_atlas(tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat\n")
    out = tmp_path / "new-atlas"
    assert cli(["extract", "--model", str(tmp_path / "no-such-model"), "--texts", str(texts), "--out", str(out),
                "--no-progress"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("name", ["<img src=x onerror=alert(77)>", "a b", "$$x$$", "-lead", "a/b", ".hidden", "é"])
def test_model_names_are_identifiers(tmp_path, name):
    atlas = Atlas.open(tmp_path / "a", create=True)
    with pytest.raises(StoreError, match="Invalid model name"):
        testing.write_synthetic_model(atlas, name=name)
    assert atlas.models == []


@pytest.mark.parametrize("args,needle", [(["--port", "70000"], "not a port number"),
                                         (["--address", "203.0.113.7"], "not an address of this machine")])
def test_serve_bad_listen_options_are_one_message(tmp_path, capsys, args, needle):
    testing.synthetic_atlas(tmp_path / "a")
    testing.random_layouts(open_atlas(tmp_path / "a"), "synthetic")
    assert cli(["serve", str(tmp_path / "a"), *args]) == 2
    assert needle in capsys.readouterr().err


def test_csv_with_a_stray_quote_is_refused_naming_the_line(tmp_path):
    from attnatlas.inputs import load_texts

    rows = ["id,text"] + [f'{i},"row {i}, quoted"' if i % 10 == 0 else f"{i},row {i}" for i in range(100)]
    rows[6] = '5,"a stray quote'
    f = tmp_path / "c.csv"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"c\.csv:7: malformed CSV"):
        load_texts(str(f))


def test_project_on_a_full_disk_stops_with_one_message(small_disk):
    path = small_disk / "atlas"
    testing.synthetic_atlas(path, n_layers=1, n_heads=3, n_seq=30)  # chunks are 256 KiB each: about 2 MB
    before = _queries_digest(open_atlas(path), "synthetic")
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:  # the disk is full
        pass
    os.close(fd)
    os.truncate(filler, os.path.getsize(filler) - 40_000)
    r = subprocess.run([sys.executable, "-m", "attnatlas", "project", str(path), "--method", "pca", "--quiet"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1
    atlas = open_atlas(path)
    assert _queries_digest(atlas, "synthetic") == before
    filler.unlink()
    r = subprocess.run([sys.executable, "-m", "attnatlas", "project", str(path), "--method", "pca", "--quiet"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_atlas(path).layout_done("synthetic", "pca").all()


# ---- object stores: claims by heartbeat ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_url():
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with testing.local_s3("claims") as url:
        yield url


def test_object_store_claims_exclude_a_second_writer_and_expire_with_their_holder(s3_url):
    import json

    from attnatlas.store import claims
    from attnatlas.store.location import Location

    models = Location.of(f"{s3_url}/atlas/models")
    first = claims.acquire(models, "model.m", "extract m")
    try:
        with pytest.raises(claims.ClaimBusy) as busy:
            claims.acquire(models, "model.m", "extract m")
        assert busy.value.holder["pid"] == os.getpid()
    finally:
        first.release()
    claims.acquire(models, "model.m", "extract m").release()  # free again once released
    # A holder that died leaves its object behind; once its heartbeat is stale the claim is free.
    loc = claims.claim_location(models, "model.n")
    dead = {"pid": 1, "host": "elsewhere", "started": 0, "token": "dead", "heartbeat": time.time() - claims.STALE_S - 1}
    loc.fs.pipe_file(loc.path, json.dumps(dead).encode())
    claims.acquire(models, "model.n", "extract n").release()
    loc.fs.pipe_file(loc.path, json.dumps({**dead, "heartbeat": time.time()}).encode())
    with pytest.raises(claims.ClaimBusy):
        claims.acquire(models, "model.n", "extract n")


def test_object_store_overwrite_killed_between_renames_is_recovered(s3_url):
    url = f"{s3_url}/swap"
    atlas = testing.synthetic_atlas(url, name="m", seed=0)
    script = ("from attnatlas.store import faults\n" + WRITER)
    r = subprocess.run([sys.executable, "-c", script, url, "m", "1", "20"], env=_env(ATTNATLAS_KILL_AT="rename:trash"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == -signal.SIGKILL, r.stderr
    reopened = open_atlas(url)
    assert reopened.models == ["m"]
    reference = Atlas.open(f"{s3_url}/ref", create=True)
    testing.write_synthetic_model(reference, name="m", seed=1)
    assert _queries_digest(reopened, "m") == _queries_digest(reference, "m")
    del atlas


# ---- the sequence panel ------------------------------------------------------------------------------------
def test_sequence_panel_shows_a_character_split_into_byte_tokens_once():
    import pandas as pd

    from attnatlas.app.views.head import sequence_html

    text = "a 東京 b"
    # Byte-level BPE: the three byte tokens of 東 all carry the offsets of the whole character.
    toks = pd.DataFrame({"row": range(7), "token": ["a", " ", "\ufffd", "\ufffd", "\ufffd", "京", " b"],
                         "is_special": [False] * 7, "char_start": [0, 1, 2, 2, 2, 3, 4], "char_end": [1, 2, 3, 3, 3, 4, 6]})

    class Data:
        def sequence_tokens(self, model, seq):
            return toks

        def sequence_info(self, model, seq):
            return {"text": text}

    out = sequence_html(Data(), "m", 0, 0, {})
    import re

    shown = re.sub(r"<[^>]+>", "", out)
    assert shown == text, shown


def test_shaded_special_tokens_stay_readable():
    """Issue 26 item 7: [CLS] and [SEP] shaded by a weight are black text on the shading, not grey on it."""
    import re

    import pandas as pd

    from attnatlas.app.views.head import sequence_html

    toks = pd.DataFrame({"row": range(4), "token": ["[CLS]", "hi", "there", "[SEP]"], "is_special": [True, False, False, True],
                         "char_start": [-1, 0, 3, -1], "char_end": [-1, 2, 8, -1]})

    class Data:
        def sequence_tokens(self, model, seq):
            return toks

        def sequence_info(self, model, seq):
            return {"text": "hi there"}

    out = sequence_html(Data(), "m", 0, 1, {0: 0.95, 3: 0.3})
    style = {m.group(2): m.group(1) for m in re.finditer(r'<span style="([^"]*)"[^>]*>([^<]*)</span>', out)}
    assert "background:rgba(217,69,142,0.95)" in style["[CLS]"] and "color:#000" in style["[CLS]"]
    assert "color:#000" in style["[SEP]"] and "#888" not in style["[SEP]"]  # light shading: dark text
    assert "#888" not in style["[CLS]"]
    plain = sequence_html(Data(), "m", 0, 1, {})
    assert "color:#888" in plain  # unshaded specials are still grey and small


def test_a_lost_object_store_is_one_message():
    pytest.importorskip("s3fs")
    with __import__("socket").socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="t", AWS_SECRET_ACCESS_KEY="t",
               AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
    r = subprocess.run([sys.executable, "-m", "attnatlas", "info", "s3://gone/atlas"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "storage service failed" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sequence_panel_marks_the_cut_part_and_the_window():
    import re

    import pandas as pd

    from attnatlas.app.views.head import CUT_PREVIEW_CHARS, sequence_html

    text = "seen part " + "x" * 2700
    toks = pd.DataFrame({"row": [0, 1], "token": ["seen", "part"], "is_special": [False, False],
                         "char_start": [0, 5], "char_end": [4, 9]})
    info = {"text": text, "truncated": True, "n_windows": 1}

    class Data:
        def sequence_tokens(self, model, seq):
            return toks

        def sequence_info(self, model, seq):
            return info

    out = sequence_html(Data(), "m", 0, 0, {})
    assert "cut at the token limit" in out and f"({2701 - CUT_PREVIEW_CHARS:,} more characters cut)" in out
    assert len(re.sub(r"<[^>]+>", "", out)) < 400  # a 2,700-character line no longer stretches the panel
    info.update(truncated=False, n_windows=4, window=1, document=7, doc_char_start=1200, text="seen part")
    out = sequence_html(Data(), "m", 0, 0, {})
    assert "window 2 of 4 of document 7" in out and "1,200\u20131,209" in out and "cut" not in out
