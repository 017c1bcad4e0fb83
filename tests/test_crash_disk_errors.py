"""Crash tests: the job log's disk fails under a running router (EFBIG, EIO).

Whatever fails (a write past RLIMIT_FSIZE, an injected EIO on write or on fdatasync), the router
must:

- answer a client waiting on an acknowledgement with one readable line naming the job log failure
  (never an ACK for a job that is not durable, never a hang);
- stop with a non-zero exit code and a log line naming the failure (no traceback);
- after a restart on a healthy disk, know every job it acknowledged before the failure, and run it.

Only public surfaces are used: the router is the ``zmqrun`` CLI started through
tests/faulty_router.py (which sets a file-size limit or patches ``os`` first), workers, the
:class:`zmqrun.Client` and the CLI.  About 12 s in all.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Cluster, Proc, subprocess_env, write_script
from zmqrun import Client, RequestRejected, RouterUnavailable

DOUBLE = """\
def double(x):
    return x * 2
"""

FAULTY_ROUTER = [sys.executable, str(Path(__file__).with_name("faulty_router.py"))]
FSIZE_LIMIT = 64 * 1024  # bytes: a few hundred SUBMIT batches fit, then write() fails with EFBIG
MAX_SUBMITS = 5000  # bound on the submit loops: the failure must come long before
CLIENT_TIMEOUT = 5.0  # seconds


def submit_until_failure(c: Client, script: str, prefix: str, pace: float | None = None
                         ) -> tuple[dict[str, int], dict[str, int], Exception]:
    """Submit ``double(x)`` as ``<prefix>-<x>`` until something fails.

    Returns (acknowledged id -> x, tried id -> x, the error).  With ``pace`` (seconds), wait for
    each job's result and then idle that long, so the router also syncs when nobody waits.
    """
    acked: dict[str, int] = {}
    tried: dict[str, int] = {}
    for x in range(MAX_SUBMITS):
        jid = f"{prefix}-{x}"
        tried[jid] = x
        try:
            job = c.submit(script, {"x": x}, job_id=jid)
        except (RequestRejected, RouterUnavailable) as e:
            return acked, tried, e
        acked[jid] = x
        if pace is not None:
            try:
                assert job.result(timeout=CLIENT_TIMEOUT * 2) == 2 * x
            except RouterUnavailable as e:
                return acked, tried, e
            time.sleep(pace)
    pytest.fail(f"the job log did not fail within {MAX_SUBMITS} submits")


def assert_clear_log_error(e: Exception, why: str) -> None:
    """``e`` is the router's answer to a submit caught by the failure: one line naming it."""
    assert isinstance(e, RequestRejected), f"expected the router to refuse the submit, got {type(e).__name__}: {e}"
    text = str(e)
    assert "\n" not in text and "job log failed" in text and why in text, text


def submit_after_failure(c: Client, script: str, jid: str, why: str) -> None:
    """One more submit right after the failure: refused with the same error, or the router is gone."""
    try:
        c.submit(script, {"x": -1}, job_id=jid)
    except RequestRejected as e:
        assert_clear_log_error(e, why)
    except RouterUnavailable:
        pass
    else:
        pytest.fail("a router whose job log failed acknowledged a new job")


def assert_router_failed(router: Proc, why: str) -> None:
    """The router stops by itself with a non-zero code and a message naming the failure."""
    try:
        code = router.popen.wait(15)
    except Exception:  # noqa: BLE001 - a hang is the failure reported here
        pytest.fail(f"the router did not exit within 15 s after its job log failed:\n{router.output()}")
    out = router.output()
    assert code != 0, f"router exited with code 0 after a job log failure:\n{out}"
    assert "Traceback" not in out, f"the router crashed instead of stopping cleanly:\n{out}"
    failed = [line for line in out.splitlines() if "job log failed" in line]
    assert failed and why in failed[0], f"no message naming the failure ({why}):\n{out}"


def assert_kept_after_restart(zr: Cluster, address: str, script: str, acked: dict[str, int],
                              tried: dict[str, int], absent: list[str]) -> None:
    """Restart a plain router on the same data dir; every acknowledged job is there and runs."""
    zr.start_router(address=address)
    zr.start_worker(script, name="after-restart")
    c = zr.client(timeout=10)
    listed = [r.id for r in c.list_jobs(limit=10 * MAX_SUBMITS)]
    assert len(listed) == len(set(listed)), "a job is listed twice"
    assert set(listed) <= set(tried), f"jobs nobody submitted: {sorted(set(listed) - set(tried))[:5]}"
    present = set(listed)
    lost = [jid for jid in acked if jid not in present]
    assert not lost, f"{len(lost)} acknowledged job(s) lost: {lost[:10]}"
    for jid in absent:
        assert jid not in present, f"job {jid}, refused by the failing router, exists after the restart"
    assert c.wait(list(acked), timeout=60) == [2 * x for x in acked.values()]
    for jid, x in acked.items():
        rec = c.get(jid)
        assert (rec.status, rec.result) == ("success", 2 * x) and rec.attempts >= 1, rec


def test_file_size_limit_stops_router_cleanly_and_keeps_acknowledged_jobs(zr: Cluster, tmp_path: Path) -> None:
    """A real EFBIG: the router runs under RLIMIT_FSIZE and its log outgrows it."""
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    # SIGXFSZ is ignored by the router (CPython does so at startup, run_router explicitly), so the write fails.
    router = zr.start_router(env={"ZMQRUN_TEST_FSIZE": str(FSIZE_LIMIT)}, program=FAULTY_ROUTER)
    address = zr.address
    assert address is not None
    # No worker yet: every log write is a SUBMIT with a client waiting on its ACK.
    c = zr.client(timeout=CLIENT_TIMEOUT)
    acked, tried, err = submit_until_failure(c, script, "fsize")
    why = os.strerror(errno.EFBIG)
    assert len(acked) >= 20, f"the log failed after only {len(acked)} jobs: {err}"
    assert_clear_log_error(err, why)
    refused = list(tried)[-1]
    submit_after_failure(c, script, "fsize-after", why)
    assert_router_failed(router, why)
    assert sum(p.stat().st_size for p in (zr.data_dir).glob("seg-*.log")) <= FSIZE_LIMIT

    # A submit after the router stopped: one error line from the CLI, within its timeout.
    t0 = time.monotonic()
    cli = zr.cli("submit", script, "--args", '{"x": 1}', "--timeout-s", "1")
    assert cli.returncode == 1 and time.monotonic() - t0 < 15, cli
    assert cli.stderr.startswith("zmqrun: error:") and cli.stderr.count("\n") == 1, cli.stderr

    # The refused job's batch was cut off the log: it must not come back (nor the later one).
    tried["fsize-after"] = -1
    assert_kept_after_restart(zr, address, script, acked, tried, absent=[refused, "fsize-after"])


@pytest.mark.parametrize("fault", ["write:30", "fdatasync:30"])
def test_injected_eio_refuses_waiting_submits_and_keeps_acknowledged_jobs(zr: Cluster, tmp_path: Path,
                                                                          fault: str) -> None:
    """EIO from os.write or os.fdatasync/os.fsync after N good calls, with clients waiting on ACKs."""
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    router = zr.start_router(env={"ZMQRUN_TEST_FAULT": fault}, program=FAULTY_ROUTER)
    address = zr.address
    assert address is not None
    c = zr.client(timeout=CLIENT_TIMEOUT)
    acked, tried, err = submit_until_failure(c, script, "eio")
    why = os.strerror(errno.EIO)
    assert acked, f"the log failed before any job was acknowledged: {err}"
    assert_clear_log_error(err, why)
    # A failed write leaves nothing behind; after a failed sync the refused job may or may not exist.
    absent = [list(tried)[-1]] if fault.startswith("write") else []
    submit_after_failure(c, script, "eio-after", why)
    assert_router_failed(router, why)
    tried["eio-after"] = -1
    assert_kept_after_restart(zr, address, script, acked, tried, absent + ["eio-after"])


@pytest.mark.parametrize("after", [12, 13])
def test_injected_eio_on_any_sync_stops_router_cleanly(zr: Cluster, tmp_path: Path, after: int) -> None:
    """EIO from a sync while a worker runs jobs and the client pauses between them.

    The pauses make the router sync finished-job records nobody waits on (a lazy sync) between
    the syncs that acknowledge submits, so two consecutive fault counts hit both kinds of sync.
    Either way the router must stop cleanly and refuse the next submit with the error (after a
    lazy sync fails, that submit arrives within the router's grace period, long before it exits).
    """
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    router = zr.start_router(env={"ZMQRUN_TEST_FAULT": f"fdatasync:{after}"}, program=FAULTY_ROUTER)
    address = zr.address
    assert address is not None
    zr.start_worker(script, name="before-failure")
    c = zr.client(timeout=CLIENT_TIMEOUT)
    acked, tried, err = submit_until_failure(c, script, "sync", pace=0.05)
    why = os.strerror(errno.EIO)
    assert acked, f"the log failed before any job was acknowledged: {err}"
    assert_clear_log_error(err, why)
    submit_after_failure(c, script, "sync-after", why)
    assert_router_failed(router, why)
    tried["sync-after"] = -1
    assert_kept_after_restart(zr, address, script, acked, tried, absent=["sync-after"])


def test_log_file_operations_survive_running_out_of_descriptors_once(tmp_path: Path) -> None:
    """An attacker session exhausted the router's descriptors with unauthenticated connections; the
    job log then could not open its data directory to sync it and stopped the router.  The file layer
    keeps one descriptor in reserve and spends it on EMFILE: the log's next open still succeeds
    (run in a subprocess with a low RLIMIT_NOFILE)."""
    code = f"""
import errno, os, resource
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from zmqrun.fsio import RealFS
fs, d = RealFS(), Path({str(tmp_path)!r})
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError as e:
    assert e.errno == errno.EMFILE
fs.fsync_dir(d)                       # the spare descriptor makes room, then is taken back
fd = fs.create(d / "seg-2.log")       # ... and once more: the directory's fd was closed again
print("ok", fd > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=subprocess_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok True", out.stderr
