"""Size limits: job args (client before sending, router in its ACK), job results (worker, warm and cold
paths: ResultTooLarge, the worker keeps serving), large result batches split below MAXMSGSIZE."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable

import orjson
import pytest
import zmq
import zmq.utils.monitor

from conftest import FIBO, Cluster, unused_address, write_script
from routerdriver import CLIENT, Driver
from zmqrun import AsyncClient, Client, JobFailed, RequestRejected
from zmqrun import protocol as P
from zmqrun import worker as worker_mod
from zmqrun.worker import Worker, result_too_large

BIG = """\
def warm(n):
    return "x" * n

def cold(n):
    return "y" * n
"""


def test_default_limits_are_documented_values() -> None:
    assert P.MAX_ARGS_BYTES == 64 * 1024 * 1024
    assert P.MAX_RESULT_BYTES == 64 * 1024 * 1024
    assert P.MAX_MESSAGE_SIZE == 256 * 1024 * 1024
    with Client(unused_address(), timeout=1) as c:
        assert c.max_args_bytes == P.MAX_ARGS_BYTES


def test_client_raises_value_error_for_args_over_its_limit_before_sending() -> None:
    # Nobody listens at this address: a request that were sent would end in RouterUnavailable after the
    # timeout, so a ValueError at once shows nothing was sent.
    with Client(unused_address(), timeout=30, max_args_bytes=1000) as c:
        for call in (lambda: c.submit("m:f", {"s": "a" * 1000}),
                     lambda: c.run("m:f", {"s": "a" * 1000}),
                     lambda: c.map("m:f", [{"s": "small"}, {"s": "a" * 1000}])):
            with pytest.raises(ValueError) as info:
                call()
            text = str(info.value)
            assert "\n" not in text
            assert "1,008 bytes" in text and "limit of 1,000 bytes" in text, text
    with pytest.raises(ValueError, match="max_args_bytes"):
        Client(unused_address(), max_args_bytes=0)


def test_async_client_raises_value_error_for_args_over_its_limit() -> None:
    async def main() -> None:
        async with AsyncClient(unused_address(), timeout=30, max_args_bytes=100) as c:
            with pytest.raises(ValueError, match="over the limit of 100 bytes"):
                await c.submit("m:f", {"s": "a" * 200})
            with pytest.raises(ValueError, match="over the limit of 100 bytes"):
                await c.map("m:f", [{"s": "a" * 200}])

    asyncio.run(main())


def test_router_rejects_a_job_over_its_args_limit_in_the_ack(tmp_path: Path) -> None:
    d = Driver(tmp_path, max_args_bytes=1000)
    try:
        jobs = [{"id": "small", "script": "s.py:f", "args": {"i": 1}},
                {"id": "big", "script": "s.py:f", "args": {"i": 2, "pad": "z" * 2000}}]
        before = d.router.log.last_seq
        d.router._handle([CLIENT, P.header(P.CLIENT, P.C_SUBMIT), orjson.dumps({"req": 7, "jobs": jobs})])
        d.router._commit()
        acks = [orjson.loads(f[1]) for ident, f in d.sock.sent if ident == CLIENT and f[0] == P.H_ACK]
        assert len(acks) == 1
        ack = acks[0]
        assert ack["req"] == 7 and ack["accepted"] == ["small"]
        assert [r["id"] for r in ack["rejected"]] == ["big"]
        err = ack["rejected"][0]["error"]
        assert "\n" not in err and "2,016 bytes" in err and "limit of 1,000 bytes" in err, err
        assert "big" not in d.router.queue.jobs and "small" in d.router.queue.jobs
        # One SUBMIT record (the small job) plus the dispatch of it; the big job is nowhere in the log.
        recs = [d.router.log.read_record(s) for s in range(before + 1, d.router.log.last_seq + 1)]
        assert b'"big"' not in b"".join(payload for _t, payload in recs)
    finally:
        d.close()


def test_router_args_limit_end_to_end(zr: Cluster) -> None:
    zr.start_router(extra=("--max-args-bytes", "1000"))
    c = zr.client()  # its own limit is the default: the router's answers
    with pytest.raises(RequestRejected) as info:
        c.submit("m:f", {"s": "a" * 2000})
    assert isinstance(info.value, ValueError)
    assert "over the router's limit of 1,000 bytes (--max-args-bytes)" in str(info.value)
    assert "\n" not in str(info.value)
    assert c.submit("m:f", {"s": "a" * 100}).id  # a small one is accepted


def test_map_with_return_exceptions_puts_a_refused_job_in_its_place(zr: Cluster) -> None:
    """map(return_exceptions=True): a job the router refuses (args over its lower limit) becomes a
    RequestRejected in its place while the others run (it raised for the whole call before: found by
    an attacker session)."""
    zr.start_router(extra=("--max-args-bytes", "1000"))
    zr.start_worker(FIBO, name="warm-map")
    c = zr.client()
    out = c.map(FIBO, [{"n": 5}, {"n": 6, "pad": "a" * 2000}, {"n": 7}], return_exceptions=True)
    assert out[0] == 5 and out[2] == 13
    assert isinstance(out[1], RequestRejected) and "--max-args-bytes" in str(out[1])


def test_router_refuses_bad_limit_options(zr: Cluster) -> None:
    proc = zr.cli("router", "--bind", unused_address(), "--data-dir", str(zr.tmp / "d"), "--max-args-bytes", "0",
                  address=False)
    assert proc.returncode == 2 and "--max-args-bytes" in proc.stderr
    proc = zr.cli("router", "--bind", unused_address(), "--data-dir", str(zr.tmp / "d"),
                  "--max-message-bytes", "100", address=False)
    assert proc.returncode == 2 and "--max-message-bytes" in proc.stderr


def test_result_over_the_worker_limit_fails_with_result_too_large(zr: Cluster) -> None:
    write_script(zr.tmp, "big.py", BIG)
    zr.start_router()
    zr.start_worker("big.py:warm", name="warm-big", extra=("--max-result-bytes", "1000"))
    zr.start_worker(None, name="cold-big", extra=("--max-result-bytes", "1000"))
    c = zr.client(timeout=30)
    for script in ("big.py:warm", "big.py:cold"):
        with pytest.raises(JobFailed) as info:
            c.run(script, {"n": 5000}, wait_timeout=60)
        e = info.value
        assert e.type == "ResultTooLarge", (script, e.type, e.message)
        assert "5,002 bytes" in e.message and "limit of 1,000 bytes" in e.message and "\n" not in e.message
        # The worker keeps serving: a result under the limit (998 bytes of JSON) comes back.
        assert c.run(script, {"n": 998}, wait_timeout=60) == ("x" if script.endswith("warm") else "y") * 998
        rec = c.get(e.job_id)
        assert rec.status == "failure" and rec.error["type"] == "ResultTooLarge"
    assert sorted(w["name"] for w in c.status()["workers"]) == ["cold-big", "warm-big"]


def test_result_too_large_leaves_failures_and_small_results_alone() -> None:
    ok = b'"status":"success","result":"abc"'
    assert result_too_large(ok, 5) is ok
    err = b'"status":"failure","error":{"type":"X","message":"' + b"m" * 100 + b'","traceback":""}'
    assert result_too_large(err, 5) is err  # an error report is not a result
    out = orjson.loads(b"{" + result_too_large(ok, 4) + b"}")
    assert out["status"] == "failure" and out["error"]["type"] == "ResultTooLarge"
    assert out["error"]["message"] == "result is 5 bytes as JSON, over this worker's limit of 4 bytes " \
                                      "(--max-result-bytes)"
    with pytest.raises(ValueError, match="max_result_bytes"):
        Worker(unused_address(), max_result_bytes=0)


class _Sock:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.frames.append(bytes(frame))


def test_large_result_batches_go_out_in_several_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_mod, "RESULT_MESSAGE_BYTES", 1000)
    w = Worker(unused_address())
    try:
        w.sock = _Sock()  # type: ignore[assignment]
        results = [orjson.dumps({"id": f"j{i}", "attempt": 1, "status": "success", "result": "r" * 380})
                   for i in range(7)]
        w._results = list(results)
        w._flush()
        bodies = [orjson.loads(f) for f in w.sock.frames if f != P.H_W_RESULT]  # type: ignore[attr-defined]
        assert len(bodies) == 4  # 2 + 2 + 2 + 1 results of ~420 bytes
        assert [b["batch"] for b in bodies] == [1, 2, 3, 4]
        assert [r["id"] for b in bodies for r in b["results"]] == [f"j{i}" for i in range(7)]
        assert all(len(orjson.dumps(b)) < 1000 + 200 for b in bodies)
        assert w._results == [] and len(w._unacked) == 4
    finally:
        w.ctx.term()


def test_a_frame_over_max_message_bytes_disconnects_its_sender(zr: Cluster) -> None:
    zr.start_router(extra=("--max-message-bytes", "100KiB"))  # 102,400 bytes
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        mon = d.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        d.connect(zr.address)
        events: list[int] = []

        def saw(event: int) -> bool:
            while mon.poll(100):
                events.append(zmq.utils.monitor.recv_monitor_message(mon)["event"])
            return event in events

        assert wait_for(lambda: saw(zmq.EVENT_CONNECTED))
        d.send_multipart([P.header(P.CLIENT, P.C_STATUS), b"z" * 200_000])
        assert wait_for(lambda: saw(zmq.EVENT_DISCONNECTED)), events
        # The peer reconnects by itself and is served: a request under the limit is answered.
        d.send_multipart([P.header(P.CLIENT, P.C_STATUS), orjson.dumps({"req": 5})])
        assert d.poll(15_000)
        head, body = d.recv_multipart()
        assert head == P.H_REPLY and orjson.loads(body)["req"] == 5
        d.disable_monitor()
        mon.close(0)
        d.close(0)
    finally:
        ctx.destroy(0)


def test_a_client_request_over_the_routers_lowered_limit_names_the_limit(zr: Cluster) -> None:
    """A router started with a lower --max-message-bytes drops the connection of a client whose submit is
    bigger; the client's error says so instead of only "did not answer" (found in a review)."""
    from zmqrun import RouterUnavailable

    zr.start_router(extra=("--max-message-bytes", "100KiB"))
    c = zr.client(timeout=2)
    with pytest.raises(RouterUnavailable, match=r"dropped the connection after this [\d,]+-byte request: is it "
                                                r"over the router's --max-message-bytes\?"):
        c.submit("nobody.serves:this", {"blob": "x" * 200_000})
    assert c.status()["counts"]["queued"] == 0  # the client still works, and nothing was accepted
    job = c.submit("nobody.serves:this", {"blob": "x" * 50_000})  # under the limit: accepted
    assert c.get(job.id).status == "queued"


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Call ``pred`` (which blocks briefly itself) until it is true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
    return False
