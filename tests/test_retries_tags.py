"""Retries with backoff, tags (worker groups), ``jobs retry``, idempotent submits across a router
restart, and the router restart scenario S4 (failure-scenarios.md).

The first tests drive a real :class:`zmqrun.router.Router` in-process (tests/routerdriver.py: no
sockets, exact control of what the worker reports and when the router "crashes"); the rest run
router and worker processes on loopback.  Timings are checked with generous lower bounds only
("not before the backoff"); every wait is bounded.  About 40-50 s in all on the project's 2-core
machine.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import Cluster, Proc, log_records, wait_until, write_script
from routerdriver import CLIENT, WORKER, Driver
from zmqrun import Client, JobFailed, protocol as P
from zmqrun.joblog import FINISH, REQUEUE, SUBMIT

# -- in-process: the router's rules ----------------------------------------------------------------


def report(d: Driver, results: list[dict[str, Any]], batch: int | None = None, ident: bytes = WORKER) -> None:
    """The simulated worker sends a RESULT batch: dicts with id, attempt, and ok (bool) or error."""
    out = []
    for r in results:
        item = {"id": r["id"], "attempt": r["attempt"], "logs": r.get("logs", ""), "started_at": time.time(),
                "finished_at": time.time()}
        if r.get("ok"):
            item.update(status="success", result=r.get("result", "ok"))
        else:
            item.update(status="failure", error={"type": r.get("type", "ValueError"), "message": "boom",
                                                 "traceback": "Traceback: ..."})
        out.append(item)
    body: dict[str, Any] = {"worker": "w1", "results": out}
    if batch is not None:
        body["batch"] = batch
    d.router._handle([ident, P.header(P.WORKER, P.W_RESULT), orjson.dumps(body)])


def submit_with(d: Driver, jid: str, **extra: Any) -> None:
    d._req += 1
    job = {"id": jid, "script": "s.py:f", "args": {"i": 1}, **extra}
    d.router._handle([CLIENT, P.header(P.CLIENT, P.C_SUBMIT), orjson.dumps({"req": d._req, "jobs": [job]})])


def held(d: Driver, jid: str) -> dict[str, Any]:
    """The JOBS entry the simulated worker holds for ``jid`` (and forget it)."""
    [job] = [j for j in d.running if j["id"] == jid]
    d.running.remove(job)
    return job



def test_failed_attempts_are_retried_recorded_and_only_the_final_outcome_is_pushed(tmp_path: Path) -> None:
    d = Driver(tmp_path, segment_bytes=1 << 20)
    submit_with(d, "flaky", retries=2, backoff=0)  # constant 0 s: due again at once
    submit_with(d, "slow-retry", retries=3, backoff={"kind": "constant", "seconds": 600})
    d.tick()
    assert d.acked == {"flaky", "slow-retry"}
    report(d, [{"id": "flaky", "attempt": 1}, {"id": "slow-retry", "attempt": 1}], batch=1)
    d.running.clear()
    before = time.time()
    d.tick()
    assert d.finished == {}, "a retried failure must not reach the client"
    slow = d.router.queue.jobs["slow-retry"]
    assert slow.status == "queued" and slow.scheduled_for >= before + 600 - 1
    assert [e["attempt"] for e in slow.attempt_errors] == [1]
    assert [j["id"] for j in d.running] == ["flaky"]  # due at once: dispatched again, attempt 2
    assert d.running[0]["attempt"] == 2
    report(d, [{"id": "flaky", "attempt": 2, "type": "KeyError"}], batch=2)
    d.running.clear()
    d.tick()
    report(d, [{"id": "flaky", "attempt": 3, "ok": True, "result": 42}], batch=3)
    # A duplicate of attempt 1's failure (a worker re-sending after a reconnect) changes nothing.
    report(d, [{"id": "slow-retry", "attempt": 1}], batch=4)
    d.running.clear()
    d.tick()
    assert list(d.finished) == ["flaky"]  # one outcome pushed: the final one
    assert (d.finished["flaky"]["status"], d.finished["flaky"]["result"]) == ("success", 42)
    job = d.router.archive.get("flaky")
    assert (job.status, job.attempts, job.result) == ("success", 3, 42)
    assert [(e["attempt"], e["error"]["type"], e["worker"]) for e in job.attempt_errors] == \
        [(1, "ValueError", "w1"), (2, "KeyError", "w1")]
    assert len(d.router.queue.jobs["slow-retry"].attempt_errors) == 1
    d.close()

    # The log: each retry is a REQUEUE "retry" record written before any FINISH of the same batch.
    kinds = [(t, rec.get("retry")) for t, rec in log_records(tmp_path) if t in (REQUEUE, FINISH)]
    assert kinds[0] == (REQUEUE, True)
    # Replay rebuilds the same state: the finished job with its attempt errors, the waiting one with its
    # error and its time; and a lookup that reads the records back from disk agrees.
    again = Driver(tmp_path, segment_bytes=1 << 20)
    job = again.router.archive.get("flaky")
    assert [e["attempt"] for e in job.attempt_errors] == [1, 2] and job.attempts == 3
    slow = again.router.queue.jobs["slow-retry"]
    assert slow.status == "queued" and slow.scheduled_for >= before + 599
    assert [e["attempt"] for e in slow.attempt_errors] == [1]
    loc = again.router.archive.locate("flaky")
    rebuilt = again.router.archive.rebuild("flaky", *loc)
    assert [e["error"]["type"] for e in rebuilt.attempt_errors] == ["ValueError", "KeyError"]
    assert rebuilt.result == 42 and rebuilt.wire()["attempt_errors"] == job.attempt_errors
    # Canceling the waiting job keeps its attempt errors in the archive (its terminal record has them).
    assert again.router.queue.jobs["slow-retry"].retries == 3
    again.router._handle([CLIENT, P.header(P.CLIENT, P.C_CANCEL), orjson.dumps({"req": 99, "id": "slow-retry"})])
    again.tick()
    again.close()
    third = Driver(tmp_path, segment_bytes=1 << 20)
    canceled = third.router.archive.rebuild("slow-retry", *third.router.archive.locate("slow-retry"))
    assert canceled.status == "canceled" and [e["attempt"] for e in canceled.attempt_errors] == [1]
    third.close()


def test_after_a_restart_running_jobs_are_leased_and_their_workers_late_reports_count(tmp_path: Path) -> None:
    d = Driver(tmp_path, segment_bytes=1 << 20, recovery_lease=60)
    ids = d.submit(3)
    d.tick()
    assert {j["id"] for j in d.running} == set(ids)
    a, b, c = (held(d, jid) for jid in ids)
    d.close()  # the router "crashes" with three jobs running

    d2 = Driver(tmp_path, segment_bytes=1 << 20, recovery_lease=60)  # its READY: the worker registered again
    q = d2.router.queue
    assert set(q.leases) == set(ids) and all(q.jobs[j].status == "running" for j in ids)
    d2.tick()
    assert d2.running == [], "leased jobs are not dispatched again"
    # The worker re-sends what it finished while the router was down (and one report twice).
    report(d2, [{"id": a["id"], "attempt": 1, "ok": True, "result": "a"},
                {"id": b["id"], "attempt": 1, "ok": True, "result": "b"},
                {"id": a["id"], "attempt": 1, "ok": True, "result": "again"}], batch=5)
    d2.tick()
    assert d2.router.archive.get(a["id"]).result == "a" and d2.router.archive.get(b["id"]).result == "b"
    assert d2.router.late_results == 2 and d2.router.stats["stale_results"] == 1
    assert set(q.leases) == {c["id"]}
    # The batch is acknowledged in a heartbeat once the log holds it durably (the FINISH record is
    # written but not yet synced: nobody waits on it, so the lazy sync takes it within 10 ms).
    d2.router._beat(time.monotonic())
    beats = [frames for ident, frames in d2.sock.sent if ident == WORKER and frames[0] == P.H_R_HEARTBEAT]
    assert beats == [[P.H_R_HEARTBEAT]]
    d2.router.log.sync_due(time.monotonic() + 1)
    d2.router._beat(time.monotonic())
    beats = [frames for ident, frames in d2.sock.sent if ident == WORKER and frames[0] == P.H_R_HEARTBEAT]
    assert len(beats) == 2 and orjson.loads(beats[-1][1]) == {"acked": 5}
    d2.sock.sent.clear()
    # The lease of the job nobody reported ends: back to the queue (logged), dispatched as attempt 2.
    q.leases[c["id"]] = 0.0
    d2.router._beat(time.monotonic())
    d2.tick()
    assert [(j["id"], j["attempt"]) for j in d2.running] == [(c["id"], 2)]
    report(d2, [{"id": c["id"], "attempt": 1, "ok": True}])  # its old attempt comes too late
    d2.tick()
    assert c["id"] in q.jobs and d2.router.stats["stale_results"] == 2
    report(d2, [{"id": c["id"], "attempt": 2, "ok": True, "result": "c"}])
    d2.tick()
    assert d2.router.archive.get(c["id"]).attempts == 2
    d2.close()
    finishes = collections.Counter(r["id"] for t, rec in log_records(tmp_path) if t == FINISH for r in rec["results"])
    requeues = [rec for t, rec in log_records(tmp_path) if t == REQUEUE]
    assert len(requeues) == 1 and requeues[0]["jobs"][0][:2] == [c["id"], 1]
    assert "no worker reported" in requeues[0]["jobs"][0][2]
    d3 = Driver(tmp_path, segment_bytes=1 << 20)
    assert all(d3.router.archive.get(j).status == "success" for j in ids)
    assert {jid: d3.router.archive.get(jid).result for jid in ids} == {a["id"]: "a", b["id"]: "b", c["id"]: "c"}
    assert not d3.router.queue.jobs
    d3.close()
    assert finishes[a["id"]] >= 1  # logged with the batch; replay took only the first report


def test_a_lost_workers_late_report_settles_its_queued_job_once(tmp_path: Path) -> None:
    d = Driver(tmp_path, segment_bytes=1 << 20)
    submit_with(d, "j1", retries=1, backoff={"kind": "constant", "seconds": 300})
    d.tick()
    job = held(d, "j1")
    d.router._lose_worker(WORKER, "worker missed heartbeats")  # back in the queue, attempt 1 still open
    assert d.router.queue.jobs["j1"].status == "queued"
    d.router._handle([WORKER, P.header(P.WORKER, P.W_READY), orjson.dumps({"script": "s.py:f", "credit": 0 + 1,
                                                                           "name": "w1"})])
    # Its failure arrives after all (twice: a re-sent batch): retried once.
    report(d, [{"id": "j1", "attempt": job["attempt"]}, {"id": "j1", "attempt": job["attempt"]}])
    d.tick()
    j1 = d.router.queue.jobs["j1"]
    assert [e["attempt"] for e in j1.attempt_errors] == [1] and j1.scheduled_for > time.time() + 200
    assert d.running == [], "the backoff holds although the job had a ready entry from the requeue"
    report(d, [{"id": "j1", "attempt": 1}])  # the same report again: attempt 1 is closed
    d.tick()
    assert len(d.router.queue.jobs["j1"].attempt_errors) == 1
    d.close()
    d2 = Driver(tmp_path, segment_bytes=1 << 20)
    j1 = d2.router.queue.jobs["j1"]
    assert j1.status == "queued" and [e["attempt"] for e in j1.attempt_errors] == [1]
    d2.close()


def test_lost_attempts_and_failed_attempts_are_counted_apart(tmp_path: Path) -> None:
    """--max-attempts counts attempts whose worker was lost, not failed attempts that were retried;
    a job failing with WorkerLost keeps its earlier attempt errors (in its final REQUEUE record)."""
    ready = [WORKER, P.header(P.WORKER, P.W_READY), orjson.dumps({"script": "s.py:f", "credit": 8, "name": "w1"})]
    d = Driver(tmp_path, segment_bytes=1 << 20, max_attempts=2)
    submit_with(d, "w", retries=1, backoff=0)
    d.tick()
    report(d, [{"id": "w", "attempt": held(d, "w")["attempt"]}])  # attempt 1 fails: retried at once
    d.tick()
    assert held(d, "w")["attempt"] == 2
    d.router._lose_worker(WORKER, "worker missed heartbeats")  # attempt 2 lost: the first lost attempt
    d.tick()
    assert d.finished == {} and d.router.queue.jobs["w"].status == "queued"
    d.router._handle(ready)
    d.tick()
    assert held(d, "w")["attempt"] == 3
    d.router._lose_worker(WORKER, "worker missed heartbeats")  # the second lost attempt: max_attempts
    d.tick()
    assert list(d.finished) == ["w"] and d.finished["w"]["error"]["type"] == "WorkerLost"
    d.close()
    again = Driver(tmp_path, segment_bytes=1 << 20, max_attempts=2)
    job = again.router.archive.rebuild("w", *again.router.archive.locate("w"))
    assert (job.status, job.attempts, job.error["type"]) == ("failure", 3, "WorkerLost")
    assert [(e["attempt"], e["error"]["type"]) for e in job.attempt_errors] == [(1, "ValueError")]
    again.close()


def test_the_new_fields_survive_a_snapshot(tmp_path: Path) -> None:
    from zmqrun.archive import job_from_state, state_of
    from zmqrun.queue import Job

    job = Job("s1", "s.py:f", {"a": 1}, 2, 1000.0, None, 999.0, 1)
    assert len(state_of(job)) == 12  # a job without the optional fields: the plain row, no extras element
    job.tag, job.retries, job.retry_of = "gpu", 2, "s0"
    job.backoff = {"kind": "constant", "seconds": 1.0, "jitter": 0.0}
    job.attempt_errors = [{"attempt": 1, "error": {"type": "E", "message": "m", "traceback": ""}, "worker": "w"}]
    row = state_of(job)
    assert set(row[12]) == {"tag", "retries", "backoff", "retry_of", "attempt_errors"}
    back = job_from_state(orjson.loads(orjson.dumps(row)))
    assert back.wire() == job.wire()


def test_tags_and_retry_options_are_validated_and_kept(tmp_path: Path) -> None:
    d = Driver(tmp_path, segment_bytes=1 << 20)
    submit_with(d, "t1", tag="gpu", retries=2)
    submit_with(d, "bad-tag", tag="no spaces")
    submit_with(d, "bad-retries", retries=-1)
    submit_with(d, "bad-backoff", retries=1, backoff="exponential:1,speed=3")
    d.router._commit()
    acks = [orjson.loads(f[1]) for ident, f in d.sock.sent if f[0] == P.H_ACK]
    d.tick()
    assert d.acked == {"t1"}
    errors = {r["id"]: r["error"] for body in acks for r in body["rejected"]}
    assert set(errors) == {"bad-tag", "bad-retries", "bad-backoff"}
    assert "tag" in errors["bad-tag"] and "retries" in errors["bad-retries"] and "speed" in errors["bad-backoff"]
    t1 = d.router.queue.jobs["t1"]
    assert t1.tag == "gpu" and t1.retries == 2 and t1.backoff["kind"] == "exponential"  # the default backoff
    assert d.running == []  # the simulated worker is untagged
    d.close()
    d2 = Driver(tmp_path, segment_bytes=1 << 20)
    t1 = d2.router.queue.jobs["t1"]
    assert (t1.tag, t1.retries, t1.backoff) == ("gpu", 2, {"kind": "exponential", "seconds": 1.0, "factor": 2.0,
                                                            "max": 3600.0, "jitter": 0.1})
    d2.close()


# -- processes ------------------------------------------------------------------------------------

FLAKY = """\
import os
import time

def flaky(key, fail_times, folder):
    # Fails the first ``fail_times`` calls for ``key``; counts calls in a file.
    path = os.path.join(folder, key)
    n = 0
    if os.path.exists(path):
        with open(path) as f:
            n = int(f.read() or 0)
    with open(path, "w") as f:
        f.write(str(n + 1))
    print(f"call {n + 1} of {key}")
    if n < fail_times:
        raise RuntimeError(f"{key} failed on call {n + 1}")
    return {"key": key, "calls": n + 1}
"""

SLEEPY = """\
import os
import time

def sleepy(label, seconds, folder):
    with open(os.path.join(folder, label), "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(seconds)
    return label
"""

DOUBLE = """\
def double(x):
    return 2 * x
"""


def start_tagged_worker(zr: Cluster, script: str, name: str, *flags: str) -> Proc:
    assert zr.address
    p = zr.spawn(f"worker-{name}", ["worker", "--connect", zr.address, "--name", name, "--dedicated", script,
                                    "--heartbeat", "0.5", *flags])
    zr.wait_worker(name, proc=p)
    return p


def test_retries_wait_for_their_backoff_and_attempt_errors_survive_a_router_restart(zr: Cluster,
                                                                                    tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'flaky.py', FLAKY)}:flaky"
    calls = tmp_path / "calls"
    calls.mkdir()
    zr.start_router(heartbeat=0.2)
    zr.start_worker(script, name="flaky-w", heartbeat=0.2)
    c = zr.client()
    folder = str(calls)
    # Constant backoff 0.8 s: fails twice, succeeds on the third attempt.
    ok = c.submit(script, {"key": "ok", "fail_times": 2, "folder": folder}, retries=3, backoff=0.8)
    # Exponential 0.4 s x3 without jitter (waits 0.4 s, then 1.2 s): fails every time, two retries.
    bad = c.submit(script, {"key": "bad", "fail_times": 99, "folder": folder}, retries=2,
                   backoff="exponential:0.4,factor=3,jitter=0")
    assert ok.result(timeout=30) == {"key": "ok", "calls": 3}  # the waiting client saw only the final outcome
    with pytest.raises(JobFailed) as info:
        bad.result(timeout=30)
    assert info.value.type == "RuntimeError" and "call 3" in info.value.message

    def check(rec: Any, waits: list[float], final_status: str) -> None:
        assert rec.status == final_status and rec.attempts == len(waits) + 1
        errs = rec.attempt_errors
        assert [e["attempt"] for e in errs] == list(range(1, len(waits) + 1))
        assert all(e["error"]["type"] == "RuntimeError" and e["worker"] == "flaky-w" for e in errs)
        starts = [e["started_at"] for e in errs[1:]] + [rec.started_at]
        for e, start, wait in zip(errs, starts, waits):
            gap = _ts(start) - _ts(e["finished_at"])
            assert gap >= wait - 0.05, f"attempt {e['attempt'] + 1} started {gap:.3f} s after a failure, " \
                                       f"before its backoff of {wait} s"

    check(c.get(ok.id), [0.8, 0.8], "success")
    check(c.get(bad.id), [0.4, 1.2], "failure")
    assert (calls / "ok").read_text() == "3" and (calls / "bad").read_text() == "3"
    before = {j.id: c.get(j.id) for j in (ok, bad)}

    # A job waiting in its backoff when the router is killed keeps its error and its retry time.
    pending = c.submit(script, {"key": "pending", "fail_times": 1, "folder": folder}, retries=1, backoff=3)
    wait_until(lambda: c.get(pending.id).attempt_errors, timeout=10, what="the first attempt to fail")
    first = c.get(pending.id)
    assert first.status == "queued" and first.attempts == 1
    zr.router_proc.kill9()
    zr.start_router(heartbeat=0.2, address=zr.address)
    c2 = zr.client()
    for jid, rec in before.items():
        after = c2.get(jid)
        assert after.attempt_errors == rec.attempt_errors and after.status == rec.status
    rec = c2.get(pending.id)
    assert rec.status == "queued" and rec.scheduled_for == first.scheduled_for
    assert rec.attempt_errors == first.attempt_errors
    assert c2.job(pending.id).result(timeout=30) == {"key": "pending", "calls": 2}
    done = c2.get(pending.id)
    assert done.attempts == 2 and [e["attempt"] for e in done.attempt_errors] == [1]
    assert _ts(done.started_at) >= _ts(first.attempt_errors[0]["finished_at"]) + 3 - 0.05
    # jobs show prints the attempts.
    out = zr.cli("jobs", "show", bad.id)
    assert out.returncode == 0, out.stderr
    assert "retries:       2 (backoff exponential from 0.4 s, x3" in out.stdout
    shown = [line for line in out.stdout.splitlines() if line.startswith(("  #1 ", "  #2 "))]
    assert len(shown) == 2 and all("on flaky-w: RuntimeError: bad failed on call" in line for line in shown)


def _ts(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()  # Python 3.11+ reads the trailing Z


def test_tagged_jobs_run_only_on_workers_with_their_tag(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    zr.start_router()
    start_tagged_worker(zr, script, "plain")
    start_tagged_worker(zr, script, "gpu-1", "--tag", "gpu")
    start_tagged_worker(zr, script, "cpu-1", "--tag", "cpu", "--tag", "big")
    c = zr.client()
    gpu = [c.submit(script, {"x": i}, tag="gpu") for i in range(6)]
    big = [c.submit(script, {"x": i}, tag="big") for i in range(4)]
    plain = [c.submit(script, {"x": i}) for i in range(6)]
    nobody = c.submit(script, {"x": 1}, tag="tpu")
    assert c.wait([j.id for j in gpu + big + plain], timeout=30) == \
        [2 * i for i in range(6)] + [2 * i for i in range(4)] + [2 * i for i in range(6)]
    assert {c.get(j.id).worker for j in gpu} == {"gpu-1"}
    assert {c.get(j.id).worker for j in big} == {"cpu-1"}
    assert {c.get(j.id).worker for j in plain} == {"plain"}
    assert c.get(gpu[0].id).tag == "gpu" and c.get(plain[0].id).tag is None
    time.sleep(0.5)
    assert c.get(nobody.id).status == "queued"  # no tpu worker: it waits
    workers = {w["name"]: w for w in c.status()["workers"]}
    assert (workers["cpu-1"]["tags"], workers["cpu-1"]["untagged"]) == (["big", "cpu"], False)
    assert (workers["plain"]["tags"], workers["plain"]["untagged"]) == ([], True)
    # The CLI: --tag on submit and a worker that also takes untagged jobs.
    start_tagged_worker(zr, script, "tpu-1", "--tag", "tpu", "--untagged")
    assert nobody.result(timeout=20) == 2 and c.get(nobody.id).worker == "tpu-1"
    out = zr.cli("submit", script, "--args", '{"x": 21}', "--tag", "gpu", "--wait", "--wait-timeout", "20")
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    out = zr.cli("status")
    assert "tags tpu +untagged" in out.stdout and "tags big,cpu" in out.stdout
    bad = zr.cli("submit", script, "--tag", "not a tag")
    assert bad.returncode == 1 and "invalid tag" in bad.stderr


def test_jobs_retry_reruns_a_finished_job_as_a_new_one(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'flaky.py', FLAKY)}:flaky"
    calls = tmp_path / "calls"
    calls.mkdir()
    zr.start_router()
    c = zr.client()
    args = {"key": "k", "fail_times": 1, "folder": str(calls)}
    job = c.submit(script, args, priority=3, timeout=60, tag="t1", retries=0)
    queued = zr.cli("jobs", "retry", job.id)
    assert queued.returncode == 1 and "only a finished job can be retried" in queued.stderr
    start_tagged_worker(zr, script, "t1-worker", "--tag", "t1")
    with pytest.raises(JobFailed):
        job.result(timeout=20)
    out = zr.cli("jobs", "retry", job.id)
    assert out.returncode == 0, out.stderr
    new_id = out.stdout.strip()
    assert new_id and new_id != job.id
    assert c.job(new_id).result(timeout=20) == {"key": "k", "calls": 2}
    new, old = c.get(new_id), c.get(job.id)
    assert (new.script, new.args, new.priority, new.timeout, new.tag) == (old.script, old.args, 3, 60, "t1")
    assert new.retry_of == job.id and old.status == "failure" and new.attempts == 1
    assert f"retry_of:      {job.id}" in zr.cli("jobs", "show", new_id).stdout
    # Client.retry of a successful job, and --wait on the CLI.
    again = c.retry(new_id)
    assert again.result(timeout=20) == {"key": "k", "calls": 3} and c.get(again.id).retry_of == new_id
    out = zr.cli("jobs", "retry", again.id, "--wait", "--wait-timeout", "20")
    assert out.returncode == 0 and orjson.loads(out.stdout) == {"key": "k", "calls": 4}, out.stderr
    missing = zr.cli("jobs", "retry", "no-such-job")
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr


DYING_ROUTER = """\
# Runs the zmqrun CLI; the router SIGKILLs itself right before it sends its first ACK, after the log
# write and sync it waited for (the SUBMIT is durable, the client never hears so).
import os
import signal
import sys

from zmqrun import protocol as P
from zmqrun.router import Router

real_send = Router._send


def send(self, ident, frames):
    if frames[0] == P.H_ACK:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_send(self, ident, frames)


Router._send = send
from zmqrun.cli import main

sys.argv[0] = "zmqrun"
main()
"""


def test_a_submit_whose_ack_was_lost_is_sent_again_without_a_second_job(zr: Cluster, tmp_path: Path) -> None:
    dying = write_script(tmp_path, "dying_router.py", DYING_ROUTER)
    router = zr.start_router(program=[sys.executable, str(dying)])
    address = zr.address
    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            with Client(address, timeout=20) as c:
                outcome["job"] = c.submit(script, {"x": 5}, job_id="idem-1")
                outcome["result"] = outcome["job"].result(timeout=20)
        except Exception as e:  # noqa: BLE001 - reported by the test
            outcome["error"] = e

    t = threading.Thread(target=submit, daemon=True)
    t.start()
    router.popen.wait(15)
    assert router.popen.returncode == -signal.SIGKILL, router.output()
    subs = [rec for t_, rec in log_records(zr.data_dir) if t_ == SUBMIT]
    assert [j["id"] for rec in subs for j in rec["jobs"]] == ["idem-1"], "the SUBMIT was durable before the kill"
    assert "job" not in outcome and "error" not in outcome  # still waiting for its ACK
    zr.start_router(address=address)  # the plain router, same data dir and address
    zr.start_worker(script, name="double-w")
    t.join(30)
    assert not t.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))
    assert outcome["job"].id == "idem-1" and outcome["result"] == 10
    c = zr.client()
    jobs = c.list_jobs()
    assert [r.id for r in jobs] == ["idem-1"] and jobs[0].attempts == 1
    zr.router_proc.stop()
    subs = [j["id"] for t_, rec in log_records(zr.data_dir) if t_ == SUBMIT for j in rec["jobs"]]
    assert subs == ["idem-1"], "the resent SUBMIT must not be recorded as a second job"


def test_run_and_submit_sent_to_a_stopped_router_are_sent_again_to_its_successor(zr: Cluster,
                                                                                  tmp_path: Path) -> None:
    """Connected clients send while the router is frozen (SIGSTOP), then it is killed: the requests never
    reach its log.  The clients send them again once they reconnect to the new router: submit() (its
    ACK never came), run() (no ACK: its WAIT finds the job unknown and submits it again, same id) and
    an AsyncClient submit."""
    import asyncio

    from zmqrun import AsyncClient

    script = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"
    router = zr.start_router()
    address = zr.address
    zr.start_worker(script, name="double-w")
    got: dict[str, Any] = {}
    connected = threading.Barrier(4, timeout=20)
    go = threading.Event()

    def submit() -> None:
        try:
            with Client(address, timeout=20) as c:
                c.status()  # connected, handshake done
                connected.wait()
                go.wait(20)
                got["submit"] = c.submit(script, {"x": 1}, job_id="frozen-submit").result(timeout=20)
        except Exception as e:  # noqa: BLE001
            got["submit-error"] = e

    def run() -> None:
        try:
            with Client(address, timeout=20) as c:
                c.status()
                connected.wait()
                go.wait(20)
                got["run"] = c.run(script, {"x": 2}, job_id="frozen-run", wait_timeout=20)
        except Exception as e:  # noqa: BLE001
            got["run-error"] = e

    def run_async() -> None:
        async def main() -> Any:
            async with AsyncClient(address, timeout=20) as c:
                await c.status()
                await asyncio.to_thread(connected.wait)
                await asyncio.to_thread(go.wait, 20)
                job = await c.submit(script, {"x": 3}, job_id="frozen-async")
                return await job.result(timeout=20)

        try:
            got["async"] = asyncio.run(main())
        except Exception as e:  # noqa: BLE001
            got["async-error"] = e

    threads = [threading.Thread(target=f, daemon=True) for f in (submit, run, run_async)]
    for t in threads:
        t.start()
    connected.wait()
    os.kill(router.pid, signal.SIGSTOP)
    try:
        go.set()
        time.sleep(1.0)  # the requests go out into the frozen router's socket buffers
        assert not got
    finally:
        router.kill9()
    zr.start_router(address=address)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert got == {"submit": 2, "run": 4, "async": 6}, got
    c = zr.client()
    for jid in ("frozen-submit", "frozen-run", "frozen-async"):
        rec = c.get(jid)
        assert rec.status == "success" and rec.attempts == 1


def test_s4_router_kill9_with_queued_running_and_delayed_jobs(zr: Cluster, tmp_path: Path) -> None:
    """S4: the router holds 10 queued, 2 running and 5 delayed jobs; kill -9, restart within 2 s.
    Queued and delayed jobs are rebuilt from the log, delayed ones fire on time; the running ones are
    reported by their worker after it registers again (run once), the workers register again with no
    manual step, and a client's waiting result() calls complete once the router is back."""
    sleepy = f"{write_script(tmp_path, 'sleepy.py', SLEEPY)}:sleepy"
    double = f"{write_script(tmp_path, 'double.py', DOUBLE)}:double"  # for the delayed jobs
    later = f"{write_script(tmp_path, 'later.py', DOUBLE)}:double"  # for the queued ones: no worker yet
    runs = tmp_path / "runs"
    runs.mkdir()
    zr.start_router(heartbeat=0.2)
    address = zr.address
    zr.start_worker(sleepy, name="sleepy-w", concurrency=2, prefetch=0, heartbeat=0.2)
    zr.start_worker(double, name="double-w", heartbeat=0.2)
    c = zr.client()
    running = [c.submit(sleepy, {"label": f"run-{i}", "seconds": 1.5, "folder": str(runs)}) for i in range(2)]
    wait_until(lambda: all(c.get(j.id).status == "running" for j in running), timeout=10, interval=0.02,
               what="both sleepy jobs to run")
    queued = [c.submit(later, {"x": i}) for i in range(10)]  # no worker for them yet: they wait
    delayed = [c.submit(double, {"x": 100 + i}, delay=4.0) for i in range(5)]
    sched = {j.id: c.get(j.id).scheduled_for for j in delayed}
    counts = c.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["running"]) == (10, 5, 2)

    waiter: dict[str, Any] = {}

    def wait_all() -> None:  # a client blocked in result() across the restart
        try:
            # Timeout 30 s: its periodic liveness check would come too late; it must ask the new router
            # again because it reconnected.
            with Client(address, timeout=30) as w:
                waiter["results"] = w.wait([j.id for j in running + queued + delayed], timeout=40)
                waiter["done"] = time.monotonic()
        except Exception as e:  # noqa: BLE001
            waiter["error"] = e

    def wait_async() -> None:  # and an AsyncClient whose coroutines await each job
        import asyncio

        from zmqrun import AsyncClient

        async def main() -> list[Any]:
            async with AsyncClient(address, timeout=30) as ac:
                return await asyncio.gather(*(ac.job(j.id).result(timeout=40) for j in running + delayed))

        try:
            waiter["async"] = asyncio.run(main())
            waiter["async-done"] = time.monotonic()
        except Exception as e:  # noqa: BLE001
            waiter["async-error"] = e

    t = threading.Thread(target=wait_all, daemon=True)
    t.start()
    ta = threading.Thread(target=wait_async, daemon=True)
    ta.start()
    time.sleep(0.3)
    killed = time.monotonic()
    zr.router_proc.kill9()
    zr.start_router(heartbeat=0.2, address=address)
    assert time.monotonic() - killed < 2.0 + 3.0  # restarted at once (bounded by process start-up)
    zr.start_worker(later, name="later-w", heartbeat=0.2)
    t.join(45)
    ta.join(10)
    assert not t.is_alive() and not ta.is_alive()
    assert "error" not in waiter and "async-error" not in waiter, waiter
    assert waiter["results"] == ["run-0", "run-1"] + [2 * i for i in range(10)] + [2 * (100 + i) for i in range(5)]
    # The last jobs were due ~3.7 s after the kill: the waiting client heard of them soon after.
    assert waiter["done"] - killed < 15, f"the waiting client finished {waiter['done'] - killed:.1f} s after the kill"
    assert waiter["async"] == ["run-0", "run-1"] + [2 * (100 + i) for i in range(5)]
    assert waiter["async-done"] - killed < 15, f"the async waiters finished {waiter['async-done'] - killed:.1f} s late"

    c2 = zr.client()
    for j in running:  # finished by their worker and reported after it registered again: run once
        rec = c2.get(j.id)
        assert rec.status == "success" and rec.attempts == 1 and rec.worker == "sleepy-w"
    assert sorted(p.name for p in runs.iterdir()) == ["run-0", "run-1"]
    assert all(len((runs / f"run-{i}").read_text().split()) == 1 for i in range(2)), "a running job ran twice"
    for j in delayed:  # fired on time (on the worker that registered again by itself): not before, not long after
        rec = c2.get(j.id)
        assert rec.worker == "double-w"
        assert rec.scheduled_for == sched[j.id]
        lag = _ts(rec.started_at) - _ts(rec.scheduled_for)
        assert -0.05 <= lag < 2.0, f"delayed job started {lag:.3f} s after its time"
    listed = c2.list_jobs(limit=100)
    ids = [r.id for r in listed]
    assert len(ids) == len(set(ids)) == 17 and all(r.status == "success" for r in listed)
    zr.router_proc.stop()
    finishes = collections.Counter(r["id"] for t_, rec in log_records(zr.data_dir) if t_ == FINISH
                                   for r in rec["results"])
    assert set(finishes) == set(ids)
    # Recorded once each: a second FINISH of a job could only be a worker's duplicate that replay drops;
    # the archive, rebuilt from the log, holds each job once (checked through the listing above).
    assert all(n == 1 for n in finishes.values()), finishes
