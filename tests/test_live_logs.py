"""Live logs: following a running job's output, on both paths, through the Client, AsyncClient and CLI.

One router with two workers for the whole module, both with ``--max-log-bytes 2000``: a dedicated
(warm) worker for ``lljobs.py:work`` and a normal (cold) worker that takes only jobs tagged ``cold``.
The test_router_* and test_unit_* tests drive the pieces in-process (no sockets, no timing).
Runs in about 20 s; the slow test (router kill -9 and warm child kill -9 mid-follow) about 11 s more.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
import zmq

from conftest import Cluster, subprocess_env, wait_until, write_script
from routerdriver import CLIENT, WORKER, Driver, FakeSocket
from zmqrun import AsyncClient, Client
from zmqrun import protocol as P
from zmqrun.livelogs import FollowState, JobOutput, LiveLog, dropped_marker

JOBS = """\
import sys
import time

def work(mode="tick", seconds=3.0, lines=0, every=0.0, size=10):
    if mode == "tick":              # a partial line, then a long sleep
        print("tick", end="")
        time.sleep(seconds)
        print(" tock")
    elif mode == "lines":           # numbered lines, paced
        for i in range(lines):
            print(f"line {i:04d}", file=sys.stderr if i % 7 == 0 else sys.stdout)
            time.sleep(every)
    elif mode == "flood":           # more than the cap at once, then time for it to stream
        for i in range(lines):
            print(f"{i:0{size - 1}d}")
        time.sleep(seconds)
    return mode
"""

CAP = 2000  # --max-log-bytes of both workers


@pytest.fixture(scope="module")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("livelogs"))
    try:
        write_script(cluster.tmp, "lljobs.py", JOBS)
        cluster.start_router()
        cluster.start_worker("lljobs.py:work", name="ll-warm", extra=("--max-log-bytes", str(CAP)))
        cluster.start_worker(None, name="ll-cold", concurrency=2,
                             extra=("--max-log-bytes", str(CAP), "--tag", "cold"))
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def zl(_cluster: Cluster, request: pytest.FixtureRequest) -> Cluster:
    request.node._zmqrun_cluster = _cluster
    return _cluster


PATHS = {"warm": ("lljobs.py:work", None, "ll-warm"), "cold": ("lljobs.py:work", "cold", "ll-cold")}


def _submit(c: Client, path: str, **args: Any) -> str:
    script, tag, _worker = PATHS[path]
    return c.submit(script, args, tag=tag).id


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_follow_shows_a_partial_line_while_the_job_runs(zl: Cluster, path: str) -> None:
    c = zl.client()
    jid = _submit(c, path, mode="tick", seconds=3.0)
    stream = c.logs(jid, follow=True)
    first = next(stream)
    # "tick" has no newline and the job sleeps 3 s after it: it must arrive while the job still runs.
    record = c.get(jid)
    assert first == "tick" and record.status == "running", (first, record.status, record.error)
    assert record.worker == PATHS[path][2]
    assert "".join(c.logs(jid)) == "tick"  # follow=False on a running job: what arrived so far
    rest = list(stream)  # ends when the job ends
    record = c.get(jid)
    assert record.status == "success"
    assert first + "".join(rest) == record.logs == "tick tock\n"
    assert "".join(c.logs(jid)) == record.logs  # follow=False on a finished job: the archived logs
    assert list(c.logs(jid, follow=True)) == [record.logs]  # following a finished job: its logs, then the end
    with pytest.raises(KeyError, match="no job nope-123"):
        list(c.logs("nope-123", follow=True))
    with pytest.raises(KeyError):
        list(c.logs("nope-123"))


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_lines_arrive_in_order_in_several_chunks(zl: Cluster, path: str) -> None:
    c = zl.client()
    jid = _submit(c, path, mode="lines", lines=60, every=0.02)
    chunks = list(c.logs(jid, follow=True))
    expected = "".join(f"line {i:04d}\n" for i in range(60))  # stdout and stderr interleaved in print order
    assert "".join(chunks) == expected == c.get(jid).logs
    assert len(chunks) >= 3, chunks  # streamed as it ran (about 1.2 s), not only at the end


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_cap_drops_output_with_a_marker_in_streamed_and_archived_logs(zl: Cluster, path: str) -> None:
    c = zl.client()
    jid = _submit(c, path, mode="flood", lines=1000, size=10, seconds=2.0)  # 10,000 bytes, cap 2000
    kept = "".join(f"{i:09d}\n" for i in range(200))  # exactly the cap
    stream = c.logs(jid, follow=True)
    first = next(stream)
    assert kept.startswith(first) and c.get(jid).status == "running"
    # Everything under the cap streams while the job still runs (it sleeps 2 s after printing).
    wait_until(lambda: "".join(c.logs(jid)) == kept, timeout=1.5, what="the capped output to stream")
    assert c.get(jid).status == "running"
    st = c.status()["live_logs"]
    assert 0 < st["chars"] <= CAP and st["followed_jobs"] >= 1  # the router holds at most the cap
    rest = "".join(stream)
    marker = dropped_marker(8000, CAP, kept)
    assert marker == "[zmqrun: 8000 bytes of output dropped (log cap 2000 bytes)]\n"
    assert first + rest == kept + marker == c.get(jid).logs  # the marker ends the stream and the archive
    wait_until(lambda: c.status()["live_logs"] == {"jobs": 0, "chars": 0, "followed_jobs": 0}, timeout=5,
               what="the router to drop the finished job's live output")


def test_cli_follow_prints_as_it_arrives_and_ctrl_c_exits_cleanly(zl: Cluster) -> None:
    c = zl.client()
    jid = _submit(c, "warm", mode="tick", seconds=2.0)
    argv = [sys.executable, "-m", "zmqrun", "jobs", "logs", jid, "--follow", "--address", zl.address]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=zl.tmp, env=subprocess_env())
    try:
        ready, _, _ = select.select([p.stdout], [], [], 15)
        assert ready, "nothing printed within 15 s"
        got = os.read(p.stdout.fileno(), 100)  # type: ignore[union-attr]
        assert got == b"tick" and c.get(jid).status == "running"
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert (p.returncode, got + out, err) == (0, b"tick tock\n", b"")

    jid = _submit(c, "warm", mode="tick", seconds=2.0)
    argv[5] = jid
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=zl.tmp, env=subprocess_env())
    try:
        ready, _, _ = select.select([p.stdout], [], [], 15)
        assert ready and os.read(p.stdout.fileno(), 100) == b"tick"  # type: ignore[union-attr]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    lines = err.decode().splitlines()
    assert p.returncode == 130 and out == b"\n" and len(lines) == 1, (p.returncode, out, err)
    assert lines[0] == f"zmqrun: stopped following job {jid}; it goes on"
    # It unsubscribed: the router no longer pushes this job's output anywhere.
    assert c.status()["live_logs"]["followed_jobs"] == 0
    assert c.job(jid).result(timeout=20) == "tick"


def test_async_client_follow(zl: Cluster) -> None:
    async def main() -> tuple[list[str], str, str]:
        async with AsyncClient(zl.address, timeout=10) as c:
            job = await c.submit("lljobs.py:work", {"mode": "lines", "lines": 40, "every": 0.03})
            chunks, first_status = [], ""
            async for chunk in c.logs(job.id, follow=True):
                if not chunks:
                    first_status = (await c.get(job.id)).status
                chunks.append(chunk)
            assert "".join([chunk async for chunk in c.logs(job.id)]) == "".join(chunks)
            return chunks, first_status, (await c.get(job.id)).logs

    chunks, first_status, logs = asyncio.run(asyncio.wait_for(main(), 60))
    assert first_status == "running"
    assert "".join(chunks) == logs == "".join(f"line {i:04d}\n" for i in range(40))
    assert len(chunks) >= 2


# -- in-process: the router's side, and the worker's and client's pieces ----------------------


def _driver(tmp_path: Path) -> Driver:
    d = Driver(tmp_path / "data")
    return d


def _logs_req(d: Driver, body: dict[str, Any], ident: bytes = CLIENT) -> None:
    d.router._handle([ident, P.header(P.CLIENT, P.C_LOGS), orjson.dumps({"req": 1, **body})])


def _chunk(d: Driver, *entries: list[Any]) -> None:
    d.router._handle([b"pump-1", P.header(P.WORKER, P.W_LOG), orjson.dumps({"logs": list(entries)})])


def _sent(d: Driver, ident: bytes = CLIENT) -> list[tuple[bytes, dict[str, Any]]]:
    out = [(frames[0], orjson.loads(frames[1])) for i, frames in d.sock.sent if i == ident]
    d.sock.sent[:] = [(i, f) for i, f in d.sock.sent if i != ident]
    return out


def test_router_relays_chunks_in_order_and_ends_the_stream_with_the_final_logs(tmp_path: Path) -> None:
    d = _driver(tmp_path)
    try:
        [jid] = d.submit(1)
        d.tick()
        assert d.running and d.running[0]["attempt"] == 1
        _logs_req(d, {"id": jid, "follow": True})
        assert _sent(d)[-1] == (P.H_REPLY, {"req": 1, "status": "running", "attempt": 1, "offset": 0, "text": "",
                                             "end": False})
        seq = d.router.log.last_seq
        _chunk(d, [jid, 1, 0, "ab"], [jid, 1, 2, "cd"], [jid, 1, 1, "bcde"], [jid, 0, 0, "stale attempt"],
               ["unknown-job", 1, 0, "x"])
        assert [b for h, b in _sent(d) if h == P.H_LOGS] == [
            {"id": jid, "attempt": 1, "offset": 0, "text": "ab"}, {"id": jid, "attempt": 1, "offset": 2, "text": "cd"},
            {"id": jid, "attempt": 1, "offset": 4, "text": "e"}]  # the overlap was cut, the stale chunks dropped
        assert d.router.log.last_seq == seq  # chunks are relayed, never written to the job log
        # A second client asking without follow gets what arrived so far; from a position, only the rest.
        _logs_req(d, {"id": jid}, ident=b"client-2")
        assert _sent(d, b"client-2")[-1][1]["text"] == "abcde"
        _logs_req(d, {"id": jid, "from": [1, 3]}, ident=b"client-2")
        assert _sent(d, b"client-2")[-1][1] | {"req": 0} == {"req": 0, "status": "running", "attempt": 1,
                                                              "offset": 3, "text": "de", "end": False}
        # The job ends: its result's logs hold everything; followers get the part past what streamed.
        body = {"worker": "w1", "results": [{"id": jid, "attempt": 1, "status": "success", "result": 1,
                                             "logs": "abcdefg\n", "started_at": 1.0, "finished_at": 2.0}]}
        d.router._handle([WORKER, P.header(P.WORKER, P.W_RESULT), orjson.dumps(body)])
        d.router._commit()
        ends = [b for h, b in _sent(d) if h == P.H_LOGS]
        assert ends == [{"id": jid, "attempt": 1, "offset": 5, "text": "fg\n", "end": True, "status": "success"}]
        assert d.router._live == {} and d.router._followers == {}
        _chunk(d, [jid, 1, 5, "late"])  # a chunk that overtook nothing: the job is done, it is dropped
        assert d.router._live == {} and not _sent(d)
        _logs_req(d, {"id": jid, "follow": True})
        assert _sent(d)[-1][1]["text"] == "abcdefg\n" and d.router._followers == {}
        _logs_req(d, {"id": "no-such-job"})
        assert _sent(d)[-1][1] == {"req": 1, "job": None}
    finally:
        d.close()


def test_router_follow_continues_with_the_next_attempt_and_forgets_gone_followers(tmp_path: Path) -> None:
    class Mandatory(FakeSocket):
        """ROUTER_MANDATORY: a send to a peer that is gone raises EHOSTUNREACH."""

        gone: set[bytes] = set()

        def send(self, frame: bytes, flags: int = 0) -> None:
            if not self._cur and frame in self.gone:
                raise zmq.ZMQError(errno.EHOSTUNREACH)
            super().send(frame, flags)

    d = _driver(tmp_path)
    d.sock = d.router.sock = Mandatory()  # type: ignore[assignment]
    try:
        [jid] = d.submit(1)
        d.tick()
        _logs_req(d, {"id": jid, "follow": True})
        _logs_req(d, {"id": jid, "follow": True}, ident=b"client-gone")
        _chunk(d, [jid, 1, 0, "first attempt\n"])
        pushed = _sent(d)
        # The worker goes: the job is queued again; its next attempt's output follows on the same stream.
        d.router._handle([WORKER, P.header(P.WORKER, P.W_DISCONNECT), b""])
        d.running.clear()
        d.router._handle([WORKER, P.header(P.WORKER, P.W_READY),
                          orjson.dumps({"script": "s.py:f", "credit": 8, "name": "w1"})])
        d.tick()
        assert d.running[0]["attempt"] == 2
        Mandatory.gone.add(b"client-gone")
        _chunk(d, [jid, 2, 0, "second"])
        assert d.router._followers[jid] == {CLIENT}  # the gone follower is forgotten, nothing raised
        state = FollowState()
        shown = "".join(p for h, b in pushed + _sent(d) for p in state.feed(b))
        assert shown == "first attempt\n[zmqrun: job attempt 2 starts here; the output above is from attempt 1]\nsecond"
        # A follower that leaves unsubscribes.
        _logs_req(d, {"id": jid, "stop": True})
        assert d.router._followers == {}
    finally:
        d.close()


def test_router_keeps_what_a_warm_job_streamed_when_its_supervisor_kills_it(tmp_path: Path) -> None:
    d = _driver(tmp_path)
    try:
        d.router._handle([b"worker-2", P.header(P.WORKER, P.W_READY),
                          orjson.dumps({"script": "t.py:f", "credit": 1, "name": "w2", "supervisor": "sup-2"})])
        d.router._handle([CLIENT, P.header(P.CLIENT, P.C_SUBMIT),
                          orjson.dumps({"req": 9, "jobs": [{"id": "slow-1", "script": "t.py:f", "timeout": 1}]})])
        d.router._commit()
        _chunk(d, ["slow-1", 1, 0, "working...\n"])
        # The supervisor killed the child at the timeout: its report has no logs (they died with the child).
        exited = {"worker": "worker-2", "reason": "timed out", "started": ["slow-1", 1], "in_order": True,
                  "results": [{"id": "slow-1", "attempt": 1, "status": "failure", "logs": "",
                               "error": {"type": "Timeout", "message": "killed", "traceback": ""},
                               "started_at": 1.0, "finished_at": 2.0}]}
        d.router._handle([b"sup-2", P.header(P.WORKER, P.W_SUP_EXITED), orjson.dumps(exited)])
        d.router._commit()
        job = d.router.archive.get("slow-1")
        assert job is not None and (job.status, job.error["type"], job.logs) == ("failure", "Timeout", "working...\n")
        assert d.router._live == {}
    finally:
        d.close()


def test_unit_job_output_caps_bytes_and_marks_what_it_dropped() -> None:
    out = JobOutput("j", 1, cap=10)
    assert out.write("héllo") == 5  # 6 bytes
    out.write("wörld")  # 6 bytes: 4 fit ("wör" is 4 bytes)
    out.write("more")
    assert out.text() == "héllowör\n[zmqrun: 6 bytes of output dropped (log cap 10 bytes)]\n"
    with pytest.raises(TypeError):
        out.write(b"bytes")  # type: ignore[arg-type]
    cold = JobOutput("j", 1, cap=5)
    for b in "ab€".encode(), "cd\n".encode():  # 5 + 3 bytes: the cap cuts after "ab€"
        cold.write_bytes(b)
    assert cold.text() == "ab€\n[zmqrun: 3 bytes of output dropped (log cap 5 bytes)]\n"
    # The pump's view: what was written since its last send, with its character offset.
    live = JobOutput("j", 1)
    live.write("one ")
    live.write("two ")
    off, text, n = live.take()  # type: ignore[misc]
    assert (off, text) == (0, "one two ")
    assert live.take() == (0, "one two ", n)  # not sent yet: the same text again
    live.sent_through(n, len(text))
    assert live.take() is None
    live.write("three")
    assert live.take()[:2] == (8, "three")  # type: ignore[index]


def test_unit_follow_state_cuts_repeats_and_marks_gaps() -> None:
    s = FollowState()
    assert s.feed({"attempt": 1, "offset": 0, "text": "abc"}) == ["abc"]
    assert s.feed({"attempt": 1, "offset": 1, "text": "bcde"}) == ["de"]  # asked again: the repeat is cut
    assert s.feed({"attempt": 1, "offset": 8, "text": "ij"}) == ["\n[zmqrun: 3 characters of output missed here]\n",
                                                                 "ij"]
    assert s.feed({"attempt": 0, "offset": 0, "text": "old"}) == []  # an older attempt
    assert s.position() == [1, 10]
    assert s.feed({"attempt": 1, "offset": 10, "text": "", "end": True, "status": "failure"}) == []
    assert s.ended and s.status == "failure"
    ll = LiveLog(3, 0)
    assert ll.add(0, "abc") == (0, "abc") and ll.add(1, "bc") is None and ll.add(2, "cdef") == (3, "def")
    assert ll.text_from(2) == (2, "cdef") and ll.text_from(99) == (6, "")
    assert ll.add(9, "xyz") == (9, "xyz") and ll.text_from(0) == (9, "xyz")  # a gap: kept from the gap on


# -- failures, on real processes (slow: about 15 s; run with -m slow) ------------------------------

LINES = """\
import time

def lines(n=10, every=0.5):
    for i in range(n):
        print(f"line {i}", flush=True)
        time.sleep(every)
    return n
"""


@pytest.mark.slow
def test_follow_rides_out_a_router_restart_and_goes_on_with_the_next_attempt(zr: Cluster, tmp_path: Path) -> None:
    write_script(tmp_path, "lines.py", LINES)
    router = zr.start_router()
    address = zr.address
    worker = zr.start_worker("lines.py:lines", name="ll-lines")
    c = zr.client(timeout=10)
    expected = "".join(f"line {i}\n" for i in range(10))

    # kill -9 of the router mid-job, right after a chunk arrived (the next one is 0.5 s away): the follow
    # subscribes again to the new router, and the worker's pump goes on sending to it; nothing is missed.
    jid = c.submit("lines.py:lines", {"n": 10, "every": 0.5}).id
    got, restarted = [], False
    for chunk in c.logs(jid, follow=True):
        got.append(chunk)
        if not restarted and "line 2\n" in chunk:
            router.kill9()
            router = zr.start_router(address=address)
            restarted = True
    assert restarted and "".join(got) == expected == c.get(jid).logs
    assert c.get(jid).attempts == 1

    # kill -9 of the warm child mid-job: the job runs again (attempt 2) and the follow shows it after a marker.
    jid = c.submit("lines.py:lines", {"n": 4, "every": 0.5}).id
    shown = ""
    for chunk in c.logs(jid, follow=True):
        shown += chunk
        if shown == "line 0\nline 1\n":
            (child,) = worker.family() - {worker.pid}
            os.kill(child, signal.SIGKILL)
    record = c.get(jid)
    assert (record.status, record.attempts) == ("success", 2)
    assert shown == ("line 0\nline 1\n[zmqrun: job attempt 2 starts here; the output above is from attempt 1]\n"
                     + record.logs) and record.logs == "line 0\nline 1\nline 2\nline 3\n"
