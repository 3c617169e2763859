"""A head whose process dies natively (segfault, abort, OOM kill) or hangs fails only itself: it is retried
once on the safe backends, the other heads are kept, and the run ends with one message per failure."""

from __future__ import annotations

import subprocess
import sys

import pytest

import attnatlas.testing  # noqa: F401  (registers the "crashing" reducer)
from attnatlas.project import project_model
from attnatlas.project.pool import Died, run_in_children, signal_cause
from attnatlas.testing import synthetic_atlas

M = "synthetic"


@pytest.fixture()
def atlas(tmp_path):
    return synthetic_atlas(tmp_path / "atlas", n_layers=2, n_heads=3, n_seq=6, seq_len=10)


def crashing(tmp_path, how, crash_safe=False):
    return {"crashing": {"how": how, "claim_file": str(tmp_path / f"claim-{how}"), "crash_safe": crash_safe}}


@pytest.mark.parametrize("how,workers,signame", [("segv", 2, "SIGSEGV"), ("abort", 1, "SIGABRT"), ("kill", 1, "SIGKILL")])
def test_a_native_crash_is_retried_on_the_safe_backend_and_the_other_heads_are_kept(atlas, tmp_path, how, workers,
                                                                                   signame):
    s = project_model(atlas, M, methods="crashing,pca", workers=workers, progress=False,
                      reducer_params=crashing(tmp_path, how))
    assert s["failed"] == []
    # The head's methods not yet written when it died are all made again, on the safe backends.
    assert {(L, h) for L, h, _, _ in s["fallbacks"]} == {s["fallbacks"][0][:2]}
    L, h, _, why = s["fallbacks"][0]
    assert "crashing" in {m for *_, m, _ in s["fallbacks"]} and signame in why and "during crashing" in why
    assert atlas.layout_done(M, "crashing").all() and atlas.layout_done(M, "pca").all()
    q = atlas.layout_quality(M, "crashing").set_index(["layer", "head"])
    assert q.loc[(L, h), "fallback"] == 1 and q.drop(index=(L, h))["fallback"].eq(0).all()


def test_a_head_whose_retry_dies_too_is_reported_and_the_rest_laid_out(atlas, tmp_path):
    s = project_model(atlas, M, methods="crashing", workers=2, progress=False,
                      reducer_params=crashing(tmp_path, "abort", crash_safe=True))
    assert len(s["failed"]) == 1 and s["fallbacks"] == []
    L, h, method, why = s["failed"][0]
    assert "SIGABRT" in why and "retry on safe backends died too" in why
    done = atlas.layout_done(M, "crashing")
    assert done.sum() == done.size - 1 and not done[L, h]


def test_a_hung_head_is_stopped_at_the_time_limit(atlas, tmp_path):
    s = project_model(atlas, M, methods="crashing", layers=[0], workers=1, progress=False, head_timeout=20,
                      reducer_params=crashing(tmp_path, "hang"))
    assert s["failed"] == [] and len(s["fallbacks"]) == 1
    assert "no result within 20 s" in s["fallbacks"][0][3] and "during crashing" in s["fallbacks"][0][3]
    assert atlas.layout_done(M, "crashing")[0].all()


def test_the_cli_names_the_failed_head_in_one_line_without_a_traceback(atlas, tmp_path):
    """A real `attnatlas project` process: exit code 1, the head and cause named, no BrokenProcessPool, no
    traceback, no leaked-semaphore warning; the other heads are stored."""
    code = ("import sys, attnatlas.testing; from attnatlas.cli import main; sys.exit(main(sys.argv[1:]))")
    opts = f"{{\"how\": \"segv\", \"claim_file\": \"{tmp_path / 'c'}\", \"crash_safe\": true}}"
    out = subprocess.run([sys.executable, "-c", code, "project", str(atlas.path), "--method", "crashing",
                          "--workers", "1", "--quiet", "--reducer-options", f"crashing={opts}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr
    err = out.stderr
    assert "SIGSEGV" in err and "1 head/method(s) failed" in err
    for bad in ("Traceback", "BrokenProcessPool", "leaked semaphore", "resource_tracker"):
        assert bad not in err
    assert atlas.layout_done(M, "crashing").sum() == 5


def _crash_on(i: int) -> int:
    if i == 1:
        import ctypes

        ctypes.string_at(0)
    return i * 10


def test_pool_yields_every_result_and_one_death():
    got = dict(run_in_children(_crash_on, [(i,) for i in range(4)], workers=2))
    assert {i: v for i, v in got.items() if not isinstance(v, Died)} == {0: 0, 2: 20, 3: 30}
    assert isinstance(got[1], Died) and "SIGSEGV" in got[1].cause


def test_signal_cause_words():
    assert "out of memory" in signal_cause(-9) and "native" in signal_cause(-11)
    assert "code 3" in signal_cause(3)


def test_a_native_crash_on_dask_fails_only_its_head(tmp_path):
    """On a Dask cluster a segfault kills the worker process; the nanny starts a new one, the scheduler runs the
    head again, and every other head is laid out as usual: no head is lost and the run ends normally."""
    from attnatlas.scale.distributed import dask_client, project_distributed

    a = synthetic_atlas(tmp_path / "a", n_layers=1, n_heads=3, n_seq=6, seq_len=10)
    with dask_client("local", workers=2, threads_per_worker=1, processes=True) as client:
        s = project_distributed(client, a, M, methods="crashing", progress=False,
                                reducer_params=crashing(tmp_path, "segv"))
    assert (tmp_path / "claim-segv").exists()  # the crash happened
    assert s["failed"] == [] and a.layout_done(M, "crashing").all()
