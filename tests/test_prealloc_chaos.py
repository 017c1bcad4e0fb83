"""The zeros the job log writes ahead of its active segment (joblog.PREALLOC_CHUNK), with real routers.

- ``kill -9`` under load, again and again (small segments, so rolls happen in between): after each kill
  every sealed segment ends at its last batch and whatever follows the active segment's last batch is
  zeros; ``zmqrun log check`` finds no corruption; the restarted router warns about the zero tail naming
  file, offset and bytes, and keeps every acknowledged job.  A clean stop (SIGTERM) leaves every segment
  cut back to its last batch and the data dir healthy.
- A crash that leaves a zero tail is no reason to seal the recovered segment on restart (the zeros are
  not replayed data).
- A router whose segment cannot grow (RLIMIT_FSIZE: EFBIG, like a full disk for the log) stops with a
  one-line error, and a restart without the limit loses no acknowledged job.

Only public surfaces: router and worker processes, :class:`zmqrun.Client`, ``zmqrun log check``; the
segment files are read with :func:`zmqrun.joblog.read_segment` to see where the last batch ends.
The seed of the kill loop is printed; rerun with ``ZMQRUN_CRASH_SEED=<seed>``.  Default runs take
~10-15 s in all on the project's 2-core machine; ``-m slow`` runs a 60-cycle loop per fsync mode (~1-2 min each).
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import Cluster, Submitter, write_script
from zmqrun import Client
from zmqrun.joblog import read_segment
from zmqrun.logcheck import check

DOUBLE = """\
def double(x, pad=""):
    return x * 2
"""
MAX_ATTEMPTS = ("--max-attempts", "1000")  # router crashes re-dispatch jobs; WorkerLost is not under test here
ZERO_WARNING = re.compile(r"(seg-\d+\.log): (\d+) zero bytes after offset (\d+)")


def segment_tails(data_dir: Path) -> list[tuple[str, int, bytes]]:
    """(name, offset after the last good batch, the bytes after it) for every segment, oldest first."""
    out = []
    for path in sorted(data_dir.glob("seg-*.log")):
        data = path.read_bytes()
        _records, end, _problem = read_segment(path, data, None)
        out.append((path.name, end, data[end:]))
    return out


def assert_healthy(data_dir: Path, where: str, warnings_ok: bool = True) -> None:
    rep = check(data_dir)
    try:
        assert not rep.errors, f"log check finds corruption {where}: {[str(f) for f in rep.errors]}"
        assert warnings_ok or not rep.findings, f"log check warns {where}: {[str(f) for f in rep.findings]}"
    finally:
        rep.close()


def kill_loop(zr: Cluster, tmp_path: Path, cycles: int, fsync: str) -> None:
    seed = int(os.environ.get("ZMQRUN_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    where = f"(seed {seed}, fsync {fsync})"
    print(f"prealloc kill -9 loop {where}, {cycles} cycles")
    extra = ("--segment-mb", "0.25", *MAX_ATTEMPTS)
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    zr.start_router(fsync=fsync, extra=extra)
    address = zr.address
    assert address is not None
    zr.start_worker(script, name="prealloc-worker")
    submitter = Submitter(address, script, prefix="p", timeout=0.2, args=lambda x: {"x": x, "pad": "p" * (x % 500)})
    submitter.start()
    zero_tails = 0
    try:
        for cycle in range(cycles):
            time.sleep(rng.uniform(0.1, 0.4))
            router = zr.router_proc
            assert router is not None and router.alive(), f"router died on its own {where}:\n{router.output()}"
            router.kill9()
            tails = segment_tails(zr.data_dir)
            for name, end, rest in tails[:-1]:
                assert not rest, f"cycle {cycle}: sealed {name} has {len(rest)} bytes after its last batch at {end} {where}"
            name, end, rest = tails[-1]
            assert rest.count(0) == len(rest), f"cycle {cycle}: {name} ends in non-zero bytes after offset {end} {where}"
            assert_healthy(zr.data_dir, f"after kill {cycle} {where}")
            zr.start_router(fsync=fsync, address=address, extra=extra)
            new = zr.router_proc
            assert new is not None
            warned = ZERO_WARNING.search(new.output())
            if rest:
                zero_tails += 1
                assert warned, f"cycle {cycle}: no warning about {len(rest)} zero bytes in {name} {where}"
                assert warned.groups() == (name, str(len(rest)), str(end)), (warned.groups(), name, len(rest), end)
            else:
                assert warned is None, f"cycle {cycle}: a zero-tail warning for a segment without one {where}"
    finally:
        submitter.stopping.set()
        submitter.join(10)
    assert not submitter.errors, f"submit errors {where}: {submitter.errors[:5]}"
    # Most kills must have found the zeros written ahead (a kill right after a roll may find none).
    assert zero_tails >= cycles // 2, f"a zero tail after only {zero_tails} of {cycles} kills {where}"

    c = zr.client(timeout=10)
    missing, wrong = [], []
    deadline = time.monotonic() + 60
    for job_id, x in submitter.acked.items():
        try:
            rec = c.get(job_id)
            while rec.status in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.05)
                rec = c.get(job_id)
        except KeyError:
            missing.append(job_id)
            continue
        if rec.status != "success" or rec.result != 2 * x:
            wrong.append((job_id, rec.status, rec.result))
    assert not missing, f"{len(missing)} acknowledged job(s) lost {where}: {missing[:10]}"
    assert not wrong, f"{len(wrong)} acknowledged job(s) not done right {where}: {wrong[:5]}"

    router = zr.router_proc
    assert router is not None
    for p in zr.procs:  # clean stop: the worker first, then the router
        if p is not router:
            p.stop()
    assert router.stop() == 0, f"router exit {router.popen.returncode} on SIGTERM {where}:\n{router.output()[-2000:]}"
    tails = segment_tails(zr.data_dir)
    assert len(tails) > 2, "the loop must have rolled segments"
    cut = [(name, end, len(rest)) for name, end, rest in tails if rest]
    assert not cut, f"segments not cut back to their last batch after SIGTERM {where}: {cut}"
    assert_healthy(zr.data_dir, f"after SIGTERM {where}", warnings_ok=False)
    print(f"{cycles} kills, {zero_tails} zero tails dropped on restart, {len(submitter.acked)} jobs acknowledged, "
          f"{len(tails)} segments")


def test_kill9_leaves_only_zeros_ahead_and_restart_drops_them(zr: Cluster, tmp_path: Path) -> None:
    kill_loop(zr, tmp_path, cycles=6, fsync="always")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_kill9_leaves_only_zeros_ahead_long(zr: Cluster, tmp_path: Path, fsync: str) -> None:
    kill_loop(zr, tmp_path, cycles=60, fsync=fsync)


def test_restart_after_a_crash_keeps_the_recovered_segment_active(zr: Cluster, tmp_path: Path) -> None:
    """The zeros written ahead (up to ~1.25 MiB) are no replayed data: a restart after a kill -9 whose
    segment holds a few KiB of records must not seal it and start another (nor snapshot) as if a whole
    segment had been replayed."""
    extra = ("--segment-mb", "0.5")
    zr.start_router(extra=extra)
    address = zr.address
    with Client(address, timeout=10) as c:
        ids = [c.submit("zmqrun.examples.demo:fibo", {"n": i}).id for i in range(20)]
    zr.router_proc.kill9()
    (name, end, rest), = segment_tails(zr.data_dir)
    assert rest and rest.count(0) == len(rest) and end < 64 * 1024  # a few KiB of records, then zeros
    zr.start_router(address=address, extra=extra)
    assert [p.name for p in sorted(zr.data_dir.glob("seg-*.log"))] == [name], "the recovered segment was sealed"
    assert not list(zr.data_dir.glob("snap-*")), "a snapshot after replaying a few KiB"
    with Client(address, timeout=10) as c:
        assert all(c.get(i).id == i for i in ids)


def test_router_stops_when_its_segment_cannot_grow_and_loses_no_acknowledged_job(zr: Cluster, tmp_path: Path
                                                                                  ) -> None:
    """EFBIG (a file-size limit: the log's view of a full disk) while zeros are written ahead: the failed
    top-up is ignored, the write that fails stops the router with one error line (exit 3), the segment
    has no partial batch and a restart without the limit knows every acknowledged job."""
    limit = 1_500_000  # bytes: past the first top-up of zeros, before the 64 MiB roll
    launcher = write_script(tmp_path, "limited_router.py", (
        "import resource, sys, runpy\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.argv = ['zmqrun', *sys.argv[1:]]\n"
        "runpy.run_module('zmqrun', run_name='__main__')\n"))
    zr.start_router(program=[sys.executable, str(launcher)])
    router, address = zr.router_proc, zr.address
    acked, refusal = [], None
    with Client(address, timeout=10) as c:
        for i in range(5000):  # ~1.1 KiB a record: the limit is hit after ~1300
            try:
                acked.append(c.submit("zmqrun.examples.demo:fibo", {"n": 1, "pad": "x" * 1000}).id)
            except Exception as e:  # noqa: BLE001 - what the refusal is, is asserted below
                refusal = e
                break
    assert refusal is not None, "the router took 5000 jobs past a file-size limit"
    assert "File too large" in str(refusal), refusal
    assert router.popen.wait(15) == 3
    errors = [line for line in router.output().splitlines() if "ERROR" in line]
    assert any("job log failed" in line and "File too large" in line for line in errors), errors
    (_name, end, rest), = segment_tails(zr.data_dir)
    assert not rest, f"{len(rest)} bytes after the last batch (a partial batch or zeros) at {end}"
    assert end <= limit
    assert_healthy(zr.data_dir, "after the failure", warnings_ok=False)
    zr.start_router(address=address)  # no limit now
    with Client(address, timeout=10) as c:
        missing = []
        for job_id in acked:
            try:
                c.get(job_id)
            except KeyError:
                missing.append(job_id)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged jobs lost: {missing[:5]}"
