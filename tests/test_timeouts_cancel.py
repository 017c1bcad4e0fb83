"""Timeouts, cancel of running jobs, and liveness that a busy job cannot starve, on real processes.

A dedicated worker is a supervisor process plus a warm child that runs the jobs
(zmqrun.supervisor): the supervisor kills and re-warms the child for a timeout
or a cancel, and its heartbeats keep the worker registered while a job holds
the GIL.  Normal (cold) workers kill the job's process.  The test_router_* tests
drive the router in-process (no sockets, no timing).  Runs in about 25 s.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from conftest import Cluster, family_pids, pid_gone, read_pid, wait_until, write_script
from zmqrun import JobFailed
from zmqrun import protocol as P

JOBS = """\
import ctypes
import os
import threading
import time

def slow(seconds=30.0, marker=None):
    if marker:
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
    time.sleep(seconds)
    return os.getpid()

def hold_gil(seconds=2.0):
    # ctypes.pythonapi is a PyDLL: the GIL stays held for the whole C call, so no other
    # thread of this process (a heartbeat thread, this ticker) runs until it returns.
    ticks = [0]
    stop = threading.Event()

    def tick():
        while not stop.wait(0.01):
            ticks[0] += 1

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    time.sleep(0.1)
    before = ticks[0]
    t0 = time.monotonic()
    ctypes.pythonapi.usleep(int(seconds * 1e6))
    held = time.monotonic() - t0
    during = ticks[0] - before
    stop.set()
    return {"held": held, "ticks_during": during, "ticks_before": before}
"""

HB = 0.2  # --heartbeat for router and workers: liveness window 3 x 0.2 = 0.6 s


def _jobs(tmp_path: Path) -> Path:
    return write_script(tmp_path, "tcjobs.py", JOBS)




def test_warm_timeout_kills_rewarms_and_requeues_unstarted_jobs(zr: Cluster, tmp_path: Path) -> None:
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    w = zr.start_worker(slow, name="warm-t", heartbeat=HB)
    marker = tmp_path / "long.pid"
    long = c.submit(slow, {"seconds": 30, "marker": str(marker)}, timeout=0.5)
    # Sent ahead to the same worker (prefetch), waiting behind the long job in its child.
    quick = [c.submit(slow, {"seconds": 0}) for _ in range(2)]
    old_child = read_pid(marker)
    assert old_child in w.family() and old_child != w.pid  # the job runs in the child, not the supervisor
    with pytest.raises(JobFailed) as info:
        long.result(timeout=20)
    failed_at = time.monotonic()
    assert info.value.status == "failure" and info.value.type == "Timeout"
    assert "0.5 s" in info.value.message
    rec = c.get(long.id)
    assert rec.status == "failure" and rec.attempts == 1 and rec.worker == "warm-t"
    wait_until(lambda: pid_gone(old_child), timeout=5, what="the timed-out child to be killed")
    # The jobs it never started run on the re-warmed child, their attempt not counted.
    pids = c.wait([j.id for j in quick], timeout=20)
    serving_again = time.monotonic() - failed_at
    assert len(set(pids)) == 1 and pids[0] != old_child and pids[0] in w.family()
    for j in quick:
        r = c.get(j.id)
        assert r.status == "success" and r.attempts == 1 and r.worker == "warm-t"
    # Serving again within a second plus the child's start and import (generous bound: shared CI cores).
    assert serving_again < 10, serving_again
    print(f"warm worker serving again {serving_again:.2f} s after the timeout")
    assert c.status()["workers"][0]["in_flight"] == 0


def test_worker_default_timeout_on_both_paths(zr: Cluster, tmp_path: Path) -> None:
    path = _jobs(tmp_path)
    zr.start_router(heartbeat=HB)
    c = zr.client()
    zr.start_worker(f"{path}:slow", name="warm-default", heartbeat=HB, extra=("--timeout", "0.5"))
    zr.start_worker(None, name="cold-default", heartbeat=HB, extra=("--timeout", "0.5"))
    warm_killed = c.submit(f"{path}:slow", {"seconds": 30})
    cold_killed = c.submit(f"{path}:hold_gil", {"seconds": 30})  # no dedicated worker: the cold one runs it
    # A job's own timeout wins over the worker's default.
    cold_ok = c.submit(f"{path}:hold_gil", {"seconds": 0.8}, timeout=20)
    for job in (warm_killed, cold_killed):
        with pytest.raises(JobFailed) as info:
            job.result(timeout=30)
        assert info.value.type == "Timeout" and "0.5 s" in info.value.message
    assert cold_ok.result(timeout=30)["held"] >= 0.8
    # Once the warm worker is back (re-warmed), it is preferred for its script over the cold one.
    zr.wait_worker("warm-default", timeout=10)
    warm_ok = c.submit(f"{path}:slow", {"seconds": 0.8}, timeout=20)
    assert isinstance(warm_ok.result(timeout=30), int)
    assert c.get(warm_ok.id).worker == "warm-default" and c.get(cold_ok.id).worker == "cold-default"


def test_cancel_running_warm_job(zr: Cluster, tmp_path: Path) -> None:
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    w = zr.start_worker(slow, name="warm-c", heartbeat=HB)
    marker = tmp_path / "cancel-me.pid"
    job = c.submit(slow, {"seconds": 30, "marker": str(marker)})
    child = read_pid(marker)
    res = c.cancel(job.id, reason="testing cancel")
    assert res.canceled is True and res.status == "canceled" and "warm-c" in res.message
    with pytest.raises(JobFailed) as info:
        job.result(timeout=10)
    assert info.value.status == "canceled" and info.value.type == "Canceled"
    # Who and why, and that it was interrupted.
    assert "testing cancel" in info.value.message and f"(pid {os.getpid()})" in info.value.message
    assert "interrupted while running on warm-c" in info.value.message
    wait_until(lambda: pid_gone(child), timeout=5, what="the canceled job's process to be killed")
    rec = c.get(job.id)
    assert rec.status == "canceled" and rec.attempts == 1
    # Cancel again: already finished.
    assert c.cancel(job.id).canceled is False
    nxt = c.submit(slow, {"seconds": 0}).result(timeout=20)
    assert nxt != child and nxt in w.family()
    wait_until(lambda: c.status()["workers"][0]["in_flight"] == 0, timeout=5, what="the worker's credit back")


def test_cancel_running_cold_job_kills_its_process_and_frees_the_slot(zr: Cluster, tmp_path: Path) -> None:
    path = _jobs(tmp_path)
    zr.start_router(heartbeat=HB)
    c = zr.client()
    zr.start_worker(None, name="cold-c", heartbeat=HB)  # concurrency 1, no prefetch: one job at a time
    marker = tmp_path / "cold.pid"
    job = c.submit(f"{path}:slow", {"seconds": 30, "marker": str(marker)})
    pid = read_pid(marker)
    proc = zr.cli("jobs", "cancel", job.id, "--reason", "from the CLI")
    assert proc.returncode == 0, proc.stderr
    assert f"canceled {job.id}" in proc.stdout
    wait_until(lambda: pid_gone(pid), timeout=5, what="the cold job's process to be killed")
    rec = c.get(job.id)
    assert rec.status == "canceled" and rec.error["type"] == "Canceled"
    assert "from the CLI" in rec.error["message"] and "canceled by" in rec.error["message"]
    # Its only slot is free again: the next job runs on the same worker.
    nxt = c.submit(f"{path}:slow", {"seconds": 0})
    assert isinstance(nxt.result(timeout=30), int)
    assert c.get(nxt.id).worker == "cold-c"


def test_cancel_of_a_job_waiting_in_the_worker_skips_it_without_a_restart(zr: Cluster, tmp_path: Path) -> None:
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    zr.start_worker(slow, name="warm-skip", heartbeat=HB, prefetch=1)  # credit 2
    first_marker, second_marker = tmp_path / "first.pid", tmp_path / "second.pid"
    first = c.submit(slow, {"seconds": 1.5, "marker": str(first_marker)})
    second = c.submit(slow, {"seconds": 0, "marker": str(second_marker)})
    child = read_pid(first_marker)
    assert c.get(second.id).status == "running"  # dispatched: waiting in the child's buffer
    assert c.cancel(second.id, reason="not needed").canceled
    assert first.result(timeout=20) == child  # not interrupted: same process, first attempt
    assert c.get(first.id).attempts == 1
    assert not second_marker.exists()  # never ran
    assert c.submit(slow, {"seconds": 0}).result(timeout=20) == child  # no restart
    # The skipped job returned its credit.
    wait_until(lambda: c.status()["workers"][0]["in_flight"] == 0, timeout=5, what="the worker's credit back")


def test_gil_holding_job_longer_than_the_liveness_window_is_not_redispatched(zr: Cluster, tmp_path: Path) -> None:
    path = _jobs(tmp_path)
    zr.start_router(heartbeat=HB)
    c = zr.client()
    zr.start_worker(f"{path}:hold_gil", name="warm-gil", heartbeat=HB)
    job = c.submit(f"{path}:hold_gil", {"seconds": 2.0})  # > 3 x liveness window of 0.6 s
    out = job.result(timeout=30)
    # The job really held the GIL: a thread of its process made no progress meanwhile.
    assert out["held"] >= 1.9 and out["ticks_before"] >= 3 and out["ticks_during"] <= 1, out
    rec = c.get(job.id)
    assert rec.status == "success" and rec.attempts == 1 and rec.worker == "warm-gil"
    assert "missed heartbeats" not in zr.router_proc.output()
    assert [w["name"] for w in c.status()["workers"]] == ["warm-gil"]


@pytest.mark.parametrize("victim", ["worker", "child"])
def test_killed_worker_mid_job_runs_it_on_another(zr: Cluster, tmp_path: Path, victim: str) -> None:
    """kill -9 of the whole worker (supervisor; its child dies with it) is found by heartbeat expiry;
    kill -9 of only the child is reported by the supervisor at once."""
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    a = zr.start_worker(slow, name="worker-A", heartbeat=HB, prefetch=0)
    marker = tmp_path / "a.pid"
    job = c.submit(slow, {"seconds": 1.0, "marker": str(marker)})
    child = read_pid(marker)
    b = zr.start_worker(slow, name="worker-B", heartbeat=HB, prefetch=0)
    if victim == "worker":
        a.kill9()
    else:
        os.kill(child, 9)
    wait_until(lambda: pid_gone(child), timeout=5, what="A's child to be gone")
    assert job.result(timeout=20) in family_pids(b.pid)
    rec = c.get(job.id)
    assert rec.status == "success" and rec.attempts == 2 and rec.worker == "worker-B"
    out = zr.router_proc.output()
    if victim == "worker":
        # Found by heartbeat expiry, or sooner by a send to its closed connection (ROUTER_MANDATORY).
        assert "(worker-A): 1 running job(s) back to the queue" in out
        assert "died" not in out
        wait_until(lambda: "worker-A" not in zr.worker_names(), timeout=5, what="A to be dropped")
    else:
        assert f"worker process {child} died (killed by SIGKILL)" in out
        assert "missed heartbeats" not in out
        assert a.alive()
        # A re-warmed and registered again under its name; both serve.
        wait_until(lambda: zr.worker_names().count("worker-A") == 1, timeout=10, what="A's new child")


def test_timeout_with_concurrency_restarts_the_child_and_requeues_its_other_job(zr: Cluster, tmp_path: Path) -> None:
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    w = zr.start_worker(slow, name="warm-pool", heartbeat=HB, concurrency=2, prefetch=0)
    killer = c.submit(slow, {"seconds": 30, "marker": str(tmp_path / "k.pid")}, timeout=1.0)
    other = c.submit(slow, {"seconds": 2.0, "marker": str(tmp_path / "o.pid")})
    child = read_pid(tmp_path / "k.pid")
    assert read_pid(tmp_path / "o.pid") == child  # both run in the same child, on two threads
    with pytest.raises(JobFailed) as info:
        killer.result(timeout=20)
    assert info.value.type == "Timeout"
    # The other job was running in the killed child: it runs again (attempt counted) on the new one.
    pid = other.result(timeout=20)
    assert pid != child and pid in w.family()
    assert c.get(other.id).attempts == 2


# -- the router's side of supervision, driven in-process (no sockets, no timing) --------------------


def _supervised_driver(data_dir: Path):
    from routerdriver import WORKER, Driver

    d = Driver(data_dir, credit=4)
    d.router._handle([WORKER, P.header(P.WORKER, P.W_READY),
                      orjson.dumps({"script": "s.py:f", "credit": 4, "name": "w1", "supervisor": "sup-1"})])
    return d


def test_router_records_a_supervisor_report_and_requeues_unstarted_jobs_uncounted(tmp_path: Path) -> None:
    from routerdriver import WORKER, Driver

    d = _supervised_driver(tmp_path / "data")
    r = d.router
    ids = d.submit(4)
    d.tick()
    assert [j["id"] for j in d.running] == ids and all(j["attempt"] == 1 for j in d.running)
    # The supervisor's heartbeat keeps the worker alive; an unknown supervisor's is ignored, unanswered.
    w = r.queue.workers[WORKER]
    w.expires_at = 0.0
    r._handle([b"sup-1", P.header(P.WORKER, P.W_SUP_HEARTBEAT)])
    r._handle([b"sup-other", P.header(P.WORKER, P.W_SUP_HEARTBEAT)])
    assert w.expires_at > 0.0 and d.sock.sent == []
    # A report naming the worker from another supervisor changes nothing.
    exited = {"worker": WORKER.decode(), "reason": "worker process 7 restarted: job timed out",
              "results": [{"id": ids[1], "attempt": 1, "status": "failure", "logs": "",
                           "error": {"type": "Timeout", "message": "over 1 s", "traceback": ""}}],
              "started": [ids[1], 1], "in_order": True}
    r._handle([b"sup-other", P.header(P.WORKER, P.W_SUP_EXITED), orjson.dumps(exited)])
    assert WORKER in r.queue.workers and r.stats["stale_exits"] == 1
    # Job 0's result was lost with the child (it ran: counted); job 1 timed out; 2 and 3 never started.
    r._handle([b"sup-1", P.header(P.WORKER, P.W_SUP_EXITED), orjson.dumps(exited)])
    d.tick()
    assert WORKER not in r.queue.workers and r._supervised == {}
    assert d.finished[ids[1]]["status"] == "failure" and d.finished[ids[1]]["error"]["type"] == "Timeout"
    jobs = r.queue.jobs
    assert [(jobs[i].status, jobs[i].attempts) for i in (ids[0], ids[2], ids[3])] == \
        [("queued", 1), ("queued", 0), ("queued", 0)]
    d.close()
    # The log replays to the same state.
    again = Driver(tmp_path / "data", credit=4)
    jobs = again.router.queue.jobs
    assert [(jobs[i].status, jobs[i].attempts) for i in (ids[0], ids[2], ids[3])] == \
        [("queued", 1), ("queued", 0), ("queued", 0)]
    assert again.router.archive.get(ids[1]).error["type"] == "Timeout"
    again.close()


def test_router_cancels_a_running_job_and_keeps_its_credit_until_the_worker_lets_go(tmp_path: Path) -> None:
    from routerdriver import CLIENT, WORKER

    d = _supervised_driver(tmp_path / "data")
    r = d.router
    ids = d.submit(1)
    d.tick()
    r._handle([CLIENT, P.header(P.CLIENT, P.C_CANCEL), orjson.dumps({"req": 99, "id": ids[0], "reason": "why",
                                                                       "by": "tester"})])
    sent = {(ident, frames[0]): orjson.loads(frames[1]) for ident, frames in d.sock.sent}
    assert sent[(b"sup-1", P.H_R_CANCEL)] == {"id": ids[0], "attempt": 1, "reason": "canceled by tester: why"}
    d.tick()
    assert d.finished[ids[0]]["status"] == "canceled"
    job = r.archive.get(ids[0])
    assert job.status == "canceled" and job.error["message"] == \
        "canceled by tester: why (interrupted while running on w1)"
    assert r.queue.workers[WORKER].in_flight == {ids[0]: 1}  # the worker still holds it
    # The worker's (dropped) report for it returns the credit.
    r._handle([WORKER, P.header(P.WORKER, P.W_RESULT), orjson.dumps({"worker": "w1", "results": [
        {"id": ids[0], "attempt": 1, "status": "failure", "logs": "",
         "error": {"type": "Canceled", "message": "x", "traceback": ""}}]})])
    assert r.queue.workers[WORKER].in_flight == {}
    assert r.archive.get(ids[0]).status == "canceled"
    d.close()


@pytest.mark.parametrize("started, in_order, uncounted", [
    (1, False, {2, 3}),      # a pool child: the jobs after the one it started last never started
    (None, False, {0, 1, 2, 3}),  # it started none
    ("gone", False, set()),  # it started one that already reported: a pool cannot tell, all count
    ("gone", True, {0, 1, 2, 3}),  # one job at a time: every job left came after it
    ("unknown", True, set()),  # no "started" (the board was being written): all count
])
def test_router_tells_unstarted_jobs_from_started_ones(tmp_path: Path, started: object, in_order: bool,
                                                       uncounted: set[int]) -> None:
    from routerdriver import WORKER

    d = _supervised_driver(tmp_path / "data")
    r = d.router
    ids = d.submit(4)
    d.tick()
    msg: dict[str, object] = {"worker": WORKER.decode(), "reason": "child died", "results": [], "in_order": in_order}
    if started == "gone":
        msg["started"] = ["an-id-that-reported-already", 1]
    elif started != "unknown":
        msg["started"] = None if started is None else [ids[started], 1]  # type: ignore[index]
    r._handle([b"sup-1", P.header(P.WORKER, P.W_SUP_EXITED), orjson.dumps(msg)])
    assert {i: r.queue.jobs[jid].attempts for i, jid in enumerate(ids)} == \
        {i: 0 if i in uncounted else 1 for i in range(4)}
    assert all(r.queue.jobs[jid].status == "queued" for jid in ids)
    d.close()


def test_second_sigterm_kills_the_running_job_and_hands_it_back(zr: Cluster, tmp_path: Path) -> None:
    slow = f"{_jobs(tmp_path)}:slow"
    zr.start_router(heartbeat=HB)
    c = zr.client()
    w = zr.start_worker(slow, name="warm-stop", heartbeat=HB)
    marker = tmp_path / "stop.pid"
    job = c.submit(slow, {"seconds": 30, "marker": str(marker)})
    child = read_pid(marker)
    w.popen.terminate()
    time.sleep(0.3)
    assert w.alive() and not pid_gone(child)  # first signal: it finishes the running job
    w.popen.terminate()
    assert w.popen.wait(10) == 0
    assert pid_gone(child)
    wait_until(lambda: c.get(job.id).status == "queued", timeout=5, what="the job back in the queue")
    assert f"worker process {child} stopped (killed by SIGKILL)" in zr.router_proc.output()
    assert c.cancel(job.id).canceled


def test_job_that_kills_its_warm_process_each_time_ends_worker_lost(zr: Cluster, tmp_path: Path) -> None:
    """Each crash of the child is reported at once and the job re-queued (attempt counted), until
    --max-attempts (3); the supervisor starts a new child each time and the worker keeps serving."""
    p = write_script(tmp_path, "poison.py", "import os\n\ndef main(die=True):\n    if die:\n"
                                            "        os._exit(9)\n    return os.getpid()\n")
    zr.start_router(heartbeat=HB)
    c = zr.client()
    w = zr.start_worker(f"{p}:main", name="poisoned", heartbeat=HB)
    job = c.submit(f"{p}:main", {"die": True})
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.type == "WorkerLost" and "died (exit code 9)" in info.value.message
    assert c.get(job.id).attempts == 3
    assert "missed heartbeats" not in zr.router_proc.output()
    assert c.submit(f"{p}:main", {"die": False}).result(timeout=20) in w.family()
