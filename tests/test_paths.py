"""End to end through real processes: the dedicated (warm) and normal (cold) paths, scheduling,
priority order, failures with tracebacks, and per-job log capture."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from conftest import FIBO, Cluster, Proc, write_script
from zmqrun import Client, JobFailed

CHATTER = """\
import sys

def chatter(tag="x"):
    print(f"out 1 {tag}")
    print(f"err 1 {tag}", file=sys.stderr)
    print(f"out 2 {tag}")
    print(f"err 2 {tag}", file=sys.stderr)
    print(f"out 3 {tag}")
    return tag
"""

MARKER = """\
import time

def marker(tag, n=25, pause=0.01):
    for i in range(n):
        print(f"{tag} line {i}")
        time.sleep(pause)
    return tag
"""

PID = """\
import os

def pid():
    return os.getpid()
"""

FAILING = """\
def explode(x):
    y = x * 2
    raise ValueError(f"boom {y}")  # RAISE-LINE

def fine(x):
    return x + 1
"""

SLEEPER = """\
import time

def nap(label, seconds=0.005):
    time.sleep(seconds)
    return label
"""


def parse_utc(text: str | None) -> dt.datetime:
    assert isinstance(text, str) and text.endswith("Z"), f"not a UTC ISO-8601 string ending in Z: {text!r}"
    value = dt.datetime.fromisoformat(text)
    assert value.utcoffset() == dt.timedelta(0), text
    return value


def test_dedicated_worker_end_to_end(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="warm-e2e")
    jobs = [client.submit(FIBO, {"n": n}) for n in (0, 1, 10, 20)]
    assert [j.result(timeout=30) for j in jobs] == [0, 1, 55, 6765]
    for job in jobs:
        rec = client.get(job.id)
        assert rec.id == job.id and rec.script == FIBO
        assert rec.status == "success"
        assert rec.worker == "warm-e2e"
        assert rec.attempts == 1
        assert rec.error is None
        created, started, finished = (parse_utc(t) for t in (rec.created_at, rec.started_at, rec.finished_at))
        assert started <= finished
        assert created - dt.timedelta(seconds=0.05) <= started  # one machine, one clock
        assert finished - created < dt.timedelta(seconds=30)
    # run() (submit + wait in one message) goes through the same path.
    assert client.run(FIBO, {"n": 15}, wait_timeout=30) == 610


def test_cold_worker_runs_each_job_in_a_fresh_process(router: Cluster, client: Client, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'pidjob.py', PID)}:pid"
    worker = router.start_worker(None, name="cold-e2e")
    first = client.submit(script).result(timeout=30)
    second = client.submit(script).result(timeout=30)
    assert isinstance(first, int) and isinstance(second, int)
    assert first != second
    assert worker.pid not in (first, second)
    assert os.getpid() not in (first, second)
    rec = client.get(client.list_jobs(status="success", limit=1)[0].id)
    assert rec.worker == "cold-e2e" and rec.attempts == 1
    # The same example code as a file spec also runs cold.
    demo_file = Path(__import__("zmqrun.examples.demo", fromlist=["x"]).__file__)
    assert client.submit(f"{demo_file}:fibo", {"n": 12}).result(timeout=30) == 144


def test_scheduled_job_waits_for_its_time(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="warm-sched")
    job = client.submit(FIBO, {"n": 7}, delay=1.5)
    rec = client.get(job.id)
    assert rec.status == "queued" and rec.started_at is None
    assert (parse_utc(rec.scheduled_for) - parse_utc(rec.created_at)).total_seconds() == pytest.approx(1.5, abs=0.01)
    counts = client.status()["counts"]
    assert counts["scheduled"] == 1 and counts["queued"] == 0 and counts["running"] == 0
    cli = router.cli("status")
    assert cli.returncode == 0, cli.stderr
    assert "scheduled 1" in cli.stdout
    assert job.result(timeout=8) == 13
    rec = client.get(job.id)
    waited = (parse_utc(rec.started_at) - parse_utc(rec.created_at)).total_seconds()
    assert waited >= 1.4, waited
    assert waited < 10, waited
    assert client.status()["counts"]["scheduled"] == 0


def test_priority_order_then_submission_order(router: Cluster, client: Client, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'sleeper.py', SLEEPER)}:nap"
    priorities = [0, 5, 0, 10, 5, -3, 10, 0, 5]
    jobs = [client.submit(script, {"label": i}, priority=p) for i, p in enumerate(priorities)]
    assert client.status()["counts"]["queued"] == len(jobs)
    router.start_worker(script, name="one-at-a-time", concurrency=1, prefetch=0)
    assert client.wait([j.id for j in jobs], timeout=30) == list(range(len(jobs)))
    records = [client.get(j.id) for j in jobs]
    started = sorted(records, key=lambda r: parse_utc(r.started_at))
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert [r.args["label"] for r in started] == expected
    assert all(r.worker == "one-at-a-time" and r.attempts == 1 for r in records)


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_failure_carries_type_message_and_traceback(router: Cluster, client: Client, tmp_path: Path,
                                                    path: str) -> None:
    write_script(tmp_path, "failing.py", FAILING)
    if path == "warm":
        # Started in tmp_path, a dedicated worker imports a module spec from there.
        bad, good = "failing:explode", "failing:fine"
        router.start_worker(bad, name="warm-fail", cwd=tmp_path)
        router.start_worker(good, name="warm-fine", cwd=tmp_path)
    else:
        bad, good = f"{tmp_path / 'failing.py'}:explode", f"{tmp_path / 'failing.py'}:fine"
        router.start_worker(None, name="cold-fail")
    job = client.submit(bad, {"x": 21})
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    err = info.value
    assert err.job_id == job.id and err.status == "failure"
    assert err.type == "ValueError"
    assert err.message == "boom 42"
    assert 'raise ValueError(f"boom {y}")  # RAISE-LINE' in err.traceback
    assert "failing.py" in err.traceback and "explode" in err.traceback
    # It starts at the job's own code: zmqrun's frames that called it are left out.
    first_frame = err.traceback.splitlines()[1]
    assert "failing.py" in first_frame and "execute.py" not in err.traceback, err.traceback
    rec = client.get(job.id)
    assert rec.status == "failure" and rec.error["type"] == "ValueError" and rec.result is None
    # The worker keeps serving: the same script again, and another one.
    with pytest.raises(JobFailed):
        client.submit(bad, {"x": 1}).result(timeout=30)
    assert client.submit(good, {"x": 1}).result(timeout=30) == 2
    assert client.status()["counts"]["running"] == 0


def test_warm_logs_keep_stdout_and_stderr_in_order(router: Cluster, client: Client, tmp_path: Path) -> None:
    write_script(tmp_path, "chatter.py", CHATTER)
    router.start_worker("chatter:chatter", name="warm-logs", cwd=tmp_path)
    job = client.submit("chatter:chatter", {"tag": "a"})
    assert job.result(timeout=30) == "a"
    assert client.get(job.id).logs == "out 1 a\nerr 1 a\nout 2 a\nerr 2 a\nout 3 a\n"
    # The next job's logs hold only its own output.
    job2 = client.submit("chatter:chatter", {"tag": "b"})
    job2.result(timeout=30)
    assert client.get(job2.id).logs == "out 1 b\nerr 1 b\nout 2 b\nerr 2 b\nout 3 b\n"


def test_concurrent_jobs_logs_do_not_mix(router: Cluster, client: Client, tmp_path: Path) -> None:
    write_script(tmp_path, "marker.py", MARKER)
    router.start_worker("marker:marker", name="warm-2", concurrency=2, cwd=tmp_path)
    n = 25
    a = client.submit("marker:marker", {"tag": "AAAA", "n": n})
    b = client.submit("marker:marker", {"tag": "BBBB", "n": n})
    assert client.wait([a.id, b.id], timeout=30) == ["AAAA", "BBBB"]
    ra, rb = client.get(a.id), client.get(b.id)
    # They really ran at the same time (otherwise the test proves nothing).
    assert parse_utc(ra.started_at) < parse_utc(rb.finished_at)
    assert parse_utc(rb.started_at) < parse_utc(ra.finished_at)
    assert ra.logs == "".join(f"AAAA line {i}\n" for i in range(n))
    assert rb.logs == "".join(f"BBBB line {i}\n" for i in range(n))


def test_cold_path_captures_prints(router: Cluster, client: Client, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'chatter.py', CHATTER)}:chatter"
    router.start_worker(None, name="cold-logs")
    job = client.submit(script, {"tag": "c"})
    assert job.result(timeout=30) == "c"
    logs = client.get(job.id).logs
    for line in ("out 1 c", "err 1 c", "out 2 c", "err 2 c", "out 3 c"):
        assert line in logs.splitlines(), logs


def test_cold_path_logs_keep_stdout_and_stderr_in_order(router: Cluster, client: Client, tmp_path: Path) -> None:
    """The record's ``logs`` is documented as stdout and stderr text in order, on both paths."""
    script = f"{write_script(tmp_path, 'chatter.py', CHATTER)}:chatter"
    router.start_worker(None, name="cold-order")
    job = client.submit(script, {"tag": "d"})
    assert job.result(timeout=30) == "d"
    assert client.get(job.id).logs == "out 1 d\nerr 1 d\nout 2 d\nerr 2 d\nout 3 d\n"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family_cpu_seconds(worker: Proc) -> float:
    """CPU of a worker and its live descendants (a dedicated worker's jobs run in its warm child)."""
    return sum(_cpu_seconds(pid) for pid in worker.family())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to read a process's CPU time")
def test_worker_with_busy_slots_waits_without_spinning(router: Cluster, client: Client, tmp_path: Path) -> None:
    """With every pool slot busy and more jobs buffered, the worker blocks instead of busy-looping
    (a spin starved the job threads of the GIL and halved --concurrency throughput)."""
    write_script(tmp_path, "nap.py", "import time\n\ndef nap(s):\n    time.sleep(s)\n    return s\n")
    worker = router.start_worker("nap:nap", name="pool-2", concurrency=2, cwd=tmp_path)
    assert len(worker.family()) == 2  # supervisor and warm child (the same child all along: no restart)
    before = _family_cpu_seconds(worker)
    jobs = [client.submit("nap:nap", {"s": 1.0}) for _ in range(4)]  # 2 run, 2 wait in the buffer
    assert client.wait([j.id for j in jobs], timeout=30) == [1.0] * 4
    used = _family_cpu_seconds(worker) - before
    # ~2 s of sleeping jobs; a spinning loop burns most of a core (>1.5 s), a blocking one a few ms.
    assert used < 0.5, f"worker used {used:.2f} s of CPU while its jobs slept"
