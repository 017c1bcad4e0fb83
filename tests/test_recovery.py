"""Crash and corruption: kill -9 of the router and restart from the log, torn tails, mid-file
corruption, workers killed or stopped mid-job."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from conftest import FIBO, WORDS, Cluster, subprocess_env, wait_until, write_script
from zmqrun import JobFailed, joblog

DOUBLE = """\
def double(x):
    print(f"doubling {x}")
    return 2 * x
"""

SLOW = """\
import os
import time

def slow(seconds=3.0):
    time.sleep(seconds)
    return os.getpid()
"""


def segments(data_dir: Path) -> list[Path]:
    segs = sorted(data_dir.glob("seg-*.log"))
    assert segs, f"no segment in {data_dir}"
    return segs


def batch_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, body_len) of every batch in a segment, parsed independently of zmqrun.joblog's reader."""
    data = path.read_bytes()
    off = joblog.SEGMENT_HEADER_SIZE
    out = []
    while off < len(data):
        parsed = joblog.parse_batch_header(data, off)
        assert not isinstance(parsed, str), f"{path.name} at {off}: {parsed}"
        body_len = parsed[0]
        out.append((off, body_len))
        off += joblog.BATCH_HEADER_SIZE + body_len
    assert off == len(data)
    return out


def test_router_kill9_restart_keeps_every_job(zr: Cluster, tmp_path: Path) -> None:
    script_b = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    zr.start_router(heartbeat=0.2, fsync="always")
    c = zr.client()
    # Finished jobs, served by a dedicated worker that is then stopped.
    worker = zr.start_worker(WORDS, name="words-1", heartbeat=0.2)
    texts = ["a b a", "x y z x x", "one"]
    finished = [c.submit(WORDS, {"text": t, "top": 1}) for t in texts]
    results = [j.result(timeout=30) for j in finished]
    assert results[0] == {"words": 3, "distinct": 2, "top": [["a", 2]]}
    before = {j.id: c.get(j.id) for j in finished}
    assert all(r.logs.startswith("tokenized ") for r in before.values())
    assert worker.stop() == 0
    wait_until(lambda: zr.worker_names() == [], what="the worker to leave")
    # Queued jobs (no worker serves script_b) and scheduled ones (30 s ahead).
    queued = [c.submit(script_b, {"x": i}, priority=i % 2) for i in range(4)]
    scheduled = [c.submit(script_b, {"x": 100 + i}, delay=30) for i in range(2)]
    sched_for = {j.id: c.get(j.id).scheduled_for for j in scheduled}
    canceled = c.submit(script_b, {"x": -1})
    assert c.cancel(canceled.id).canceled
    counts = c.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["finished"]) == (4, 2, 4)

    router = zr.router_proc
    router.kill9()
    assert router.popen.returncode == -9
    zr.start_router(heartbeat=0.2, fsync="always", address=zr.address)

    c2 = zr.client()
    for j in finished:
        rec, old = c2.get(j.id), before[j.id]
        assert rec.status == "success"
        assert (rec.result, rec.logs, rec.worker, rec.attempts) == (old.result, old.logs, "words-1", 1)
        assert (rec.started_at, rec.finished_at, rec.created_at) == (old.started_at, old.finished_at, old.created_at)
    for i, j in enumerate(queued):
        rec = c2.get(j.id)
        assert (rec.status, rec.attempts, rec.started_at, rec.args) == ("queued", 0, None, {"x": i})
    for j in scheduled:
        rec = c2.get(j.id)
        assert rec.status == "queued" and rec.started_at is None
        assert rec.scheduled_for == sched_for[j.id]
    rec = c2.get(canceled.id)
    assert rec.status == "canceled" and rec.error["type"] == "Canceled"
    counts = c2.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["running"], counts["finished"]) == (4, 2, 0, 4)

    # A worker for script_b completes the queued jobs; the scheduled ones keep waiting.
    zr.start_worker(script_b, name="double-1", heartbeat=0.2)
    assert c2.wait([j.id for j in queued], timeout=30) == [0, 2, 4, 6]
    for j in queued:
        rec = c2.get(j.id)
        assert rec.worker == "double-1" and rec.attempts == 1 and rec.logs.startswith("doubling ")
    for j in scheduled:
        assert c2.get(j.id).status == "queued"
    assert c2.status()["counts"]["scheduled"] == 2
    assert c2.get(canceled.id).status == "canceled"  # never run


def _torn(kind: str) -> bytes:
    batch = joblog.encode_batch(10_000, [(joblog.SUBMIT, b'{"at": 1, "jobs": []}' * 4)])
    if kind == "header-prefix":
        return batch[:20]
    if kind == "body-prefix":
        return batch[: joblog.BATCH_HEADER_SIZE + 10]
    if kind == "zeros":
        return bytes(300)
    data = random.Random(20261129).randbytes(300)
    assert joblog.later_valid_batch(b"\0" + data, 0) is None
    return data


@pytest.mark.parametrize("kind", ["header-prefix", "body-prefix", "zeros", "garbage"])
def test_torn_tail_is_truncated_on_restart(zr: Cluster, kind: str) -> None:
    zr.start_router()
    c = zr.client()
    jobs = [c.submit(FIBO, {"n": i}) for i in range(3)]
    assert zr.router_proc.stop() == 0
    seg = segments(zr.data_dir)[-1]
    good_size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(_torn(kind))

    zr.start_router()
    c = zr.client()
    for i, j in enumerate(jobs):
        rec = c.get(j.id)
        assert rec.status == "queued" and rec.args == {"n": i}
    out = zr.router_proc.output()
    # Zeros hold no record (every crash leaves the zeros written ahead): an INFO line, not a warning.
    level = "INFO" if kind == "zeros" else "WARNING"
    warning = [line for line in out.splitlines() if seg.name in line and level in line]
    assert warning, out
    assert re.search(rf"\boffset {good_size}\b", warning[0]), warning[0]
    assert seg.stat().st_size == good_size  # cut back to the last good batch (nothing written since)
    # Appends after the cut must be readable: a new job survives one more restart.
    extra = c.submit(FIBO, {"n": 9})
    assert zr.router_proc.stop() == 0
    zr.start_router()
    c = zr.client()
    assert [c.get(j.id).status for j in [*jobs, extra]] == ["queued"] * 4
    assert "torn tail" not in zr.router_proc.output()


@pytest.mark.parametrize("where", ["body", "body_len"])
def test_mid_file_corruption_refuses_to_start(zr: Cluster, where: str) -> None:
    zr.start_router()
    c = zr.client()
    for i in range(4):  # one submit per round trip: one batch each
        c.submit(FIBO, {"n": i})
    assert zr.router_proc.stop() == 0
    seg = segments(zr.data_dir)[-1]
    batches = batch_offsets(seg)
    assert len(batches) >= 3, batches
    off, body_len = batches[1]
    data = bytearray(seg.read_bytes())
    pos = off + joblog.BATCH_HEADER_SIZE + body_len // 2 if where == "body" else off + 8
    data[pos] ^= 0x40
    seg.write_bytes(bytes(data))
    files_before = {p.name: p.read_bytes() for p in zr.data_dir.iterdir() if p.name != "LOCK"}

    proc = subprocess.run([sys.executable, "-m", "zmqrun", "router", "--bind", "tcp://127.0.0.1:0",
                           "--data-dir", str(zr.data_dir)], capture_output=True, text=True, timeout=20,
                          env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode not in (0, None), proc.stderr
    msg = [line for line in proc.stderr.splitlines() if seg.name in line]
    assert msg, proc.stderr
    assert re.search(rf"\boffset {off}\b", msg[0]), msg[0]
    files_after = {p.name: p.read_bytes() for p in zr.data_dir.iterdir() if p.name != "LOCK"}
    assert files_after == files_before


def test_worker_killed_mid_job_is_requeued_to_another(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'slow.py', SLOW)}:slow"
    zr.start_router(heartbeat=0.2)
    c = zr.client()
    a = zr.start_worker(script, name="worker-A", heartbeat=0.2)
    job = c.submit(script, {"seconds": 3.0})
    wait_until(lambda: c.get(job.id).status == "running", timeout=10, what="the job to start on A")
    assert c.get(job.id).worker == "worker-A"
    b = zr.start_worker(script, name="worker-B", heartbeat=0.2)
    time.sleep(0.3)
    killed_at = time.monotonic()
    a.kill9()
    # The router notices within a few heartbeats and hands the job to B.
    wait_until(lambda: c.get(job.id).worker == "worker-B", timeout=5, what="the job to move to worker B")
    assert time.monotonic() - killed_at < 5
    assert job.result(timeout=20) in b.family()  # its warm child ran it
    rec = c.get(job.id)
    assert rec.status == "success"
    assert rec.attempts == 2
    assert rec.worker == "worker-B"
    assert "worker-A" not in zr.worker_names()


def test_router_kill9_while_a_job_runs_is_reported_by_its_worker_after_restart(zr: Cluster,
                                                                              tmp_path: Path) -> None:
    """The worker stays up across the router's crash and registers again by itself; the job that was
    running is leased to it meanwhile (not dispatched again), and the result it finished while the
    router was away is re-sent and recorded: the job ran once."""
    script = f"{write_script(tmp_path, 'slow.py', SLOW)}:slow"
    zr.start_router(heartbeat=0.2)
    c = zr.client()
    worker = zr.start_worker(script, name="survivor", heartbeat=0.2)
    job = c.submit(script, {"seconds": 1.0})
    wait_until(lambda: c.get(job.id).status == "running", timeout=10, what="the job to start")
    zr.router_proc.kill9()
    zr.start_router(heartbeat=0.2, address=zr.address)
    c2 = zr.client()
    rec = c2.get(job.id)
    assert rec.status in ("queued", "running") and rec.attempts >= 1
    zr.wait_worker("survivor", proc=worker, timeout=10)
    assert c2.job(job.id).result(timeout=20) in worker.family()
    rec = c2.get(job.id)
    assert rec.status == "success" and rec.attempts == 1 and rec.worker == "survivor"
    assert c2.status()["late_results"] == 1  # accepted as the report of a leased job
    assert worker.alive()


STARTED = """\
import os
import time

def slow(seconds, marker):
    open(marker, "w").close()
    time.sleep(seconds)
    return os.getpid()
"""


def test_worker_sigterm_finishes_the_running_job_then_leaves(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'started.py', STARTED)}:slow"
    zr.start_router()
    c = zr.client()
    worker = zr.start_worker(script, name="graceful")  # heartbeat 0.5 s: expiry would take 1.5 s
    marker = tmp_path / "started"
    job = c.submit(script, {"seconds": 0.4, "marker": str(marker)})
    # "running" at the router means dispatched; the SIGTERM must come once the worker really runs it.
    wait_until(marker.exists, timeout=10, interval=0.01, what="the job to start on the worker")
    family = worker.family()  # the worker and its warm child, which runs the job
    worker.popen.terminate()
    assert worker.popen.wait(10) == 0
    rec = c.get(job.id)
    assert rec.status == "success" and rec.attempts == 1 and rec.worker == "graceful"
    assert job.result(timeout=5) in family
    # It said goodbye (DISCONNECT): deregistered at once, not after heartbeat expiry.
    assert "graceful" not in zr.worker_names()
    # And it said at once why it did not exit yet (a Ctrl-C on a long job used to get no answer).
    assert "stopping: the running job(s) finish and are reported first" in worker.output()


def test_normal_worker_sigterm_says_it_finishes_the_running_job_first(zr: Cluster, tmp_path: Path) -> None:
    write_script(tmp_path, "started.py", STARTED)
    zr.start_router()
    c = zr.client()
    worker = zr.start_worker(None, name="graceful-cold", cwd=tmp_path)
    marker = tmp_path / "started"
    job = c.submit("started.py:slow", {"seconds": 1.5, "marker": str(marker)})
    wait_until(marker.exists, timeout=30, interval=0.01, what="the job to start on the worker")
    worker.popen.terminate()
    wait_until(lambda: "stopping: running jobs finish and are reported first" in worker.output(), timeout=1,
               interval=0.02, what="the worker to say why it does not exit yet")
    assert worker.popen.wait(10) == 0
    assert c.get(job.id).status == "success"


def test_worker_sigterm_hands_back_prefetched_jobs(zr: Cluster, tmp_path: Path) -> None:
    """SIGTERM stops a warm worker after its running job; jobs it had buffered but not started go back
    to the queue and run on another worker, instead of delaying the shutdown."""
    script = f"{write_script(tmp_path, 'slow.py', SLOW)}:slow"
    zr.start_router()
    c = zr.client()
    first = c.submit(script, {"seconds": 1.0})
    rest = [c.submit(script, {"seconds": 0.5}) for _ in range(5)]
    # Queued before the worker registers, all six reach it in one JOBS batch: five wait in its buffer.
    a = zr.start_worker(script, name="leaving", prefetch=10)
    wait_until(lambda: c.get(first.id).status == "running", timeout=10, interval=0.02, what="the first job")
    a_family = a.family()
    a.popen.terminate()
    assert a.popen.wait(10) == 0  # without the hand-back it would run all 5 more (2.5 s) first
    assert c.get(first.id).worker == "leaving" and first.result(timeout=5) in a_family
    b = zr.start_worker(script, name="staying")
    pids = c.wait([j.id for j in rest], timeout=30)
    assert len(set(pids)) == 1 and pids[0] in b.family()
    assert {c.get(j.id).worker for j in rest} == {"staying"}
    # The stopping worker named them in its DISCONNECT: handed back unstarted, so no attempt was lost
    # (a rolling restart must not use up the attempts of queued jobs; found by a chaos session).
    assert [c.get(j.id).attempts for j in rest] == [1] * 5


def test_inline_jobs_longer_than_liveness_keep_the_worker_registered(zr: Cluster, tmp_path: Path) -> None:
    """A dedicated worker whose jobs each run longer than heartbeat x liveness (0.6 s here) stays
    connected: its supervisor's heartbeats cover the jobs, nothing is re-queued, every job runs once."""
    script = f"{write_script(tmp_path, 'slow.py', SLOW)}:slow"
    zr.start_router(heartbeat=0.2)
    c = zr.client()
    worker = zr.start_worker(script, name="long-jobs", heartbeat=0.2)  # default prefetch: all 3 sent at once
    jobs = [c.submit(script, {"seconds": 0.9}) for _ in range(3)]
    pids = c.wait([j.id for j in jobs], timeout=30)
    assert len(set(pids)) == 1 and pids[0] in worker.family()
    assert [c.get(j.id).attempts for j in jobs] == [1, 1, 1]
    router_log = zr.router_proc.output()
    assert router_log.count("worker long-jobs ready") == 1, "the worker registered more than once"
    assert "back to the queue" not in router_log
    assert zr.worker_names() == ["long-jobs"]


def test_job_fails_with_worker_lost_after_max_attempts(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'slow.py', SLOW)}:slow"
    zr.start_router(heartbeat=0.2, extra=("--max-attempts", "1"))
    c = zr.client()
    worker = zr.start_worker(script, name="doomed", heartbeat=0.2)
    job = c.submit(script, {"seconds": 5.0})
    wait_until(lambda: c.get(job.id).status == "running", timeout=10, what="the job to start")
    worker.kill9()
    with pytest.raises(JobFailed) as info:
        job.result(timeout=10)
    assert info.value.type == "WorkerLost" and "doomed" in info.value.message
    rec = c.get(job.id)
    assert rec.status == "failure" and rec.attempts == 1


def test_duplicate_id_in_one_submit_batch_is_one_job_before_and_after_restart(zr: Cluster) -> None:
    """Two jobs with the same id in one SUBMIT: the second is a resubmit of the first (no second job),
    and the job the router serves before a restart is the job it recovers after it."""
    zr.start_router()
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(zr.address)
        jobs = [{"id": "dup-1", "script": "nobody:main", "args": {"v": 1}},
                {"id": "dup-1", "script": "nobody:main", "args": {"v": 2}}]
        sock.send_multipart([b"ZRC1\x01", orjson.dumps({"req": 1, "jobs": jobs, "notify": False})])
        assert sock.poll(5000)
        head, body = sock.recv_multipart()
        assert head == b"ZRR1\x21", (head, body)
        sock.close(0)
    finally:
        ctx.term()
    c = zr.client()
    before = c.get("dup-1")
    assert len(c.list_jobs()) == 1
    assert before.args == {"v": 1}, "the first submission of an id wins; a repeat is idempotent"
    assert zr.router_proc.stop() == 0
    zr.start_router(address=zr.address)
    after = zr.client().get("dup-1")
    assert after.args == before.args


def _cpu_seconds(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_idle_dedicated_worker_stays_idle_while_the_router_is_down(zr: Cluster) -> None:
    """Regression (found by a new user): the supervisor re-sent its heartbeat at every 1 ms wake-up once
    a send failed, so an idle dedicated worker took ~65% of a core while the router was down.  Over
    3 s of outage its processes now use a small fraction of that (generous bound: 0.9 s of CPU)."""
    zr.start_router()
    w = zr.start_worker(FIBO, name="idle-warm")
    zr.router_proc.stop()
    time.sleep(0.5)
    pids = w.family()
    assert len(pids) == 2, pids  # supervisor and warm child
    before = _cpu_seconds(pids)
    time.sleep(3.0)
    used = _cpu_seconds(pids) - before
    assert w.alive() and used < 0.9, f"{used:.2f} s of CPU in 3 s with the router down"
