"""Crash test: kill -9 the router again and again under a steady stream of submits.

A real router process (``--fsync always``) serves one dedicated worker; a client thread submits
jobs one by one and records every id whose ``submit()`` returned (acknowledged).  Meanwhile the
router is SIGKILLed at a random moment 20-300 ms after it answers and restarted on the same data
dir and address; the worker reconnects by itself.  A submit that fails while the router is down
is not counted (its job may or may not exist afterwards; both are fine).

After the loop, with the router running, every acknowledged job must finish and then:

- ``Client.get`` knows every acknowledged id, with status success, the right result and
  ``attempts >= 1``;
- the job listing holds each id at most once, only ids the test submitted, every one finished
  successfully, and agrees with the router's counts.

Only public surfaces are used (router and worker processes, :class:`zmqrun.Client`), so the test
stays valid whatever the log's internals become.  The seed is printed (and named in every
failure); rerun a failure with ``ZMQRUN_CRASH_SEED=<seed>``.  The default run does 50 kill
cycles (~20-30 s on the project's 2-core machine); ``-m slow`` runs 300 (~4 min).
"""

from __future__ import annotations

import collections
import os
import random
import time
from pathlib import Path

import pytest

from conftest import Cluster, Submitter, wait_until, write_script

DOUBLE = """\
def double(x):
    return x * 2
"""

SUBMIT_TIMEOUT = 0.1  # seconds: a submit to a dead router fails fast (RouterUnavailable); an ACK takes ~1 ms
FINISH_TIMEOUT = 90.0  # seconds for every acknowledged job to finish after the last restart
MAX_ATTEMPTS = 1000  # --max-attempts: router crashes re-dispatch jobs; WorkerLost is not under test here


def kill_loop(zr: Cluster, tmp_path: Path, cycles: int) -> None:
    seed = int(os.environ.get("ZMQRUN_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"kill -9 loop: seed {seed} (rerun with ZMQRUN_CRASH_SEED={seed}), {cycles} cycles")
    where = f"(seed {seed})"
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    t0 = time.monotonic()
    zr.start_router(fsync="always", extra=("--max-attempts", str(MAX_ATTEMPTS)))
    address = zr.address
    assert address is not None
    zr.start_worker(script, name="crash-worker")

    submitter = Submitter(address, script, prefix="k9", timeout=SUBMIT_TIMEOUT)
    submitter.start()
    try:
        acked_at_kill = []
        for _ in range(cycles):
            time.sleep(rng.uniform(0.02, 0.3))
            router = zr.router_proc
            assert router is not None and router.alive(), f"router died on its own {where}:\n{router.output()}"
            router.kill9()
            acked_at_kill.append(len(submitter.acked))
            zr.start_router(fsync="always", address=address, extra=("--max-attempts", str(MAX_ATTEMPTS)))
        t_loop = time.monotonic() - t0
    finally:
        submitter.stopping.set()
        submitter.join(10)
    assert not submitter.is_alive(), f"the submitter thread did not stop {where}"
    assert not submitter.errors, f"unexpected submit errors {where}: {submitter.errors[:5]}"
    acked = submitter.acked
    # The loop must have exercised something: acknowledged work in most router lifetimes.
    grew = sum(1 for a, b in zip([0] + acked_at_kill, acked_at_kill) if b > a)
    assert grew >= cycles // 2, f"jobs were acknowledged in only {grew} of {cycles} router lifetimes {where}"

    c = zr.client(timeout=10)

    def all_finished() -> bool:
        counts = c.status()["counts"]
        return counts["queued"] == 0 and counts["running"] == 0 and counts["scheduled"] == 0

    wait_until(all_finished, timeout=FINISH_TIMEOUT, interval=0.2,
               what=f"every job to finish after the last restart {where}")

    missing, wrong = [], []
    attempts = []
    for job_id, x in acked.items():
        try:
            rec = c.get(job_id)
        except KeyError:
            missing.append(job_id)
            continue
        attempts.append(rec.attempts)
        if rec.status != "success" or rec.result != 2 * x or rec.attempts < 1 or rec.finished_at is None:
            wrong.append((job_id, rec.status, rec.result, rec.attempts, rec.error))
    assert not missing, f"{len(missing)} acknowledged job(s) lost {where}: {missing[:10]}"
    assert not wrong, f"{len(wrong)} acknowledged job(s) not done right {where}: {wrong[:5]}"

    total = c.status()["counts"]["finished"]
    limit = max(10 * len(submitter.tried), 1000)
    listed = c.list_jobs(limit=limit)
    ids = [r.id for r in listed]
    dups = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    assert not dups, f"job(s) listed more than once {where}: {dups[:10]}"
    assert len(listed) < limit, "the listing was cut at its limit: raise the limit"
    assert len(listed) == total, f"listing has {len(listed)} jobs, status counts {total} finished {where}"
    phantoms = [i for i in ids if i not in submitter.tried]
    assert not phantoms, f"job(s) the test never submitted {where}: {phantoms[:10]}"
    assert set(acked) <= set(ids), f"acknowledged jobs absent from the listing {where}"
    bad = [(r.id, r.status, r.attempts) for r in listed
           if r.status != "success" or r.result != 2 * submitter.tried[r.id] or r.attempts < 1]
    assert not bad, f"listed job(s) not done right {where}: {bad[:5]}"

    elapsed = time.monotonic() - t0
    print(f"kill -9 loop: {cycles} kills in {t_loop:.1f} s, {elapsed:.1f} s in all; acknowledgements in {grew} "
          f"of {cycles} killed router lifetimes; "
          f"{len(submitter.tried)} submits tried, {len(acked)} acknowledged, {submitter.unavailable} refused "
          f"while down, {len(listed) - len(acked)} unacknowledged but durable; "
          f"attempts max {max(attempts, default=0)}, jobs run more than once {sum(a > 1 for a in attempts)}")


def test_router_kill9_loop_loses_no_acknowledged_job(zr: Cluster, tmp_path: Path) -> None:
    kill_loop(zr, tmp_path, cycles=50)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_router_kill9_loop_long(zr: Cluster, tmp_path: Path) -> None:
    kill_loop(zr, tmp_path, cycles=300)
