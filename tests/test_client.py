"""The Python Client against a real router: map, cancel, get, idempotent job ids, timeouts."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from conftest import FIBO, Cluster, wait_until, write_script
from zmqrun import Client, JobFailed, RequestRejected
from zmqrun import protocol as P
from zmqrun.client import ConnectionWatch

ECHO = "zmqrun.examples.demo:main"
FAIL = "zmqrun.examples.demo:fail"
NOBODY = "nobody.serves.this:main"


def test_map_returns_results_in_input_order(router: Cluster, client: Client) -> None:
    # Two workers running two jobs each: completion order differs from input order.
    router.start_worker(ECHO, name="echo-1", concurrency=2, prefetch=8)
    router.start_worker(ECHO, name="echo-2", concurrency=2, prefetch=8)
    n = 500
    t0 = time.monotonic()
    results = client.map(ECHO, ({"i": i, "pad": "x" * (i % 7)} for i in range(n)), batch_size=64, window=200)
    assert results == [{"echo": {"i": i, "pad": "x" * (i % 7)}} for i in range(n)]
    assert time.monotonic() - t0 < 60
    workers = {r.worker for r in client.list_jobs(status="success", limit=n)}
    assert workers == {"echo-1", "echo-2"}
    assert client.status()["counts"]["finished"] == n


def test_map_failures_raise_or_are_returned(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-map")
    router.start_worker(FAIL, name="fail-map")
    with pytest.raises(JobFailed) as info:
        client.map(FAIL, [{"message": "first"}, {"message": "second"}])
    assert info.value.type == "ValueError" and info.value.message == "first"
    out = client.map(FIBO, [{"n": 5}, {"n": "not a number"}, {"n": 6}], return_exceptions=True)
    assert out[0] == 5 and out[2] == 8
    assert isinstance(out[1], JobFailed) and out[1].type == "TypeError"


def test_cancel_queued_and_scheduled_jobs(router: Cluster, client: Client) -> None:
    queued = client.submit(NOBODY, {"a": 1})
    scheduled = client.submit(FIBO, {"n": 3}, delay=60)
    for job in (queued, scheduled):
        res = client.cancel(job.id, reason="changed my mind")
        assert res.canceled is True and bool(res) is True and res.status == "canceled"
        with pytest.raises(JobFailed) as info:
            job.result(timeout=5)
        assert info.value.status == "canceled" and info.value.type == "Canceled"
        assert "changed my mind" in info.value.message
        rec = client.get(job.id)
        assert rec.status == "canceled" and rec.finished_at is not None and rec.started_at is None
    # Canceling again: nothing changes.
    again = queued.cancel()
    assert again.canceled is False and again.status == "canceled"
    counts = client.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["finished"]) == (0, 0, 2)
    # A canceled scheduled job never runs, even with a worker for it.
    router.start_worker(FIBO, name="fibo-cancel")
    assert client.run(FIBO, {"n": 4}, wait_timeout=30) == 3
    assert client.get(scheduled.id).status == "canceled"


def test_cancel_finished_and_unknown_jobs(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-done")
    job = client.submit(FIBO, {"n": 8})
    assert job.result(timeout=30) == 21
    res = client.cancel(job.id)
    assert res.canceled is False and not res
    assert res.status == "success" and "finished" in res.message
    rec = client.get(job.id)
    assert rec.status == "success" and rec.result == 21 and rec.error is None
    unknown = client.cancel("no-such-job-id")
    assert unknown.canceled is False and unknown.status is None


def test_a_closed_client_says_so(router: Cluster) -> None:
    """(Found by a new-user session: pyzmq's "Socket operation on non-socket" came out instead.)"""
    from zmqrun import ZmqrunError

    c = Client(router.address, timeout=5)
    job = c.submit(NOBODY)
    c.close()
    c.close()  # twice is fine
    for call in (lambda: c.run(NOBODY), lambda: c.submit(NOBODY), lambda: c.get(job.id), c.status,
                 lambda: job.result(timeout=1), lambda: c.wait([job.id], timeout=1), lambda: c.map(NOBODY, [{}])):
        with pytest.raises(ZmqrunError, match="this Client is closed"):
            call()


def test_a_wait_started_after_the_connection_dropped_gets_a_whole_timeout(zr: Cluster) -> None:
    """(Found by a new-user session.) After a RouterUnavailable, a new result() call made as the router
    restarts raised within 0.5 s (its timeout counted from the old drop); it now waits its own timeout,
    so a retry rides out the restart and gets the result."""
    from zmqrun import RouterUnavailable

    zr.start_router()
    address = zr.address
    c = zr.client(timeout=3)
    job = c.submit(FIBO, {"n": 12})  # no worker yet: it stays queued
    zr.router_proc.kill9()
    with pytest.raises(RouterUnavailable):
        job.result(timeout=60)

    def restart() -> None:
        zr.start_router(address=address)
        zr.start_worker(FIBO, name="warm-late", wait=False)

    restarter = threading.Timer(0.5, restart)  # the retry below starts while the router is still down
    restarter.start()
    try:
        assert job.result(timeout=30) == 144
    finally:
        restarter.join(30)


def test_get_unknown_id_raises_key_error(client: Client) -> None:
    with pytest.raises(KeyError):
        client.get("0192f1c2-0000-7000-8000-000000000000")
    with pytest.raises(KeyError):
        client.get("nope")


def test_resubmitting_a_job_id_creates_no_second_job(router: Cluster, client: Client) -> None:
    first = client.submit(NOBODY, {"v": 1}, job_id="my-job-1")
    second = client.submit(NOBODY, {"v": 2}, job_id="my-job-1")
    assert first.id == second.id == "my-job-1"
    jobs = client.list_jobs()
    assert [j.id for j in jobs] == ["my-job-1"]
    assert client.get("my-job-1").args == {"v": 1}
    assert client.status()["counts"]["queued"] == 1
    # Same after it finished: the resubmit returns the original outcome and runs nothing.
    router.start_worker(FIBO, name="fibo-idem")
    job = client.submit(FIBO, {"n": 10}, job_id="fib-10")
    assert job.result(timeout=30) == 55
    other = Client(router.address, timeout=10)
    try:
        again = other.submit(FIBO, {"n": 11}, job_id="fib-10")
        assert again.result(timeout=10) == 55
        assert other.run(FIBO, {"n": 12}, job_id="fib-10", wait_timeout=10) == 55
    finally:
        other.close()
    rec = client.get("fib-10")
    assert rec.attempts == 1 and rec.args == {"n": 10}
    assert len(client.list_jobs(script=FIBO)) == 1


def test_result_timeout_raises_timeout_error(client: Client) -> None:
    job = client.submit(NOBODY)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 5
    assert client.get(job.id).status == "queued"


def test_job_handle_from_another_client(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-handle")
    job = client.submit(FIBO, {"n": 9})
    other = router.client()
    assert other.job(job.id).result(timeout=30) == 34
    assert other.wait([job.id], timeout=5) == [34]


def test_unread_outcomes_stay_bounded_and_evicted_results_are_fetched_again(router: Cluster,
                                                                            client: Client) -> None:
    """A producer that submits and never reads results keeps at most ``max_unclaimed`` outcomes;
    an evicted job's result() still works (the router answers from its archive)."""
    router.start_worker("zmqrun.examples.demo:main")
    client.max_unclaimed = 5
    jobs = [client.submit("zmqrun.examples.demo:main", {"i": i}) for i in range(30)]
    # Wait until every job finished, pumping the pushed outcomes through status() calls.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.status()["counts"]["finished"] < 30:
        time.sleep(0.05)
    client.status()
    assert len(client._outcomes) <= 5
    assert [j.result(timeout=10) for j in jobs] == [{"echo": {"i": i}} for i in range(30)]
    # map's own outcomes are never evicted, whatever the cap.
    assert client.map("zmqrun.examples.demo:main", [{"i": i} for i in range(50)]) == \
        [{"echo": {"i": i}} for i in range(50)]


def test_map_with_jobs_not_yet_sent_survives_a_quiet_spell(router: Cluster, tmp_path: Path) -> None:
    """Window 1, jobs longer than the client timeout: the liveness check asks only about sent jobs
    (asking about unsent ones made the router answer "unknown" and map() raise)."""
    write_script(tmp_path, "slowjob.py", "import time\n\ndef main(s):\n    time.sleep(s)\n    return s\n")
    router.start_worker("slowjob.py:main", cwd=tmp_path, prefetch=0)
    c = router.client(timeout=0.5)
    assert c.map("slowjob.py:main", [{"s": 0.8}, {"s": 0.8}], window=1) == [0.8, 0.8]


# -- the one-job wait (run(), Job.result()) against a scripted router socket: no router process --------


class _ScriptedRouter:
    """A ROUTER socket on loopback that answers each job of a client SUBMIT with ``answer(request, job)``,
    a list of messages (each a list of frames), from a thread; stopped by :meth:`close`."""

    def __init__(self, answer: Any) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, header, body = self.sock.recv_multipart()
            if header == P.header(P.CLIENT, P.C_SUBMIT):
                request = orjson.loads(body)
                for job in request["jobs"]:
                    for msg in self.answer(request, job):
                        self.sock.send_multipart([ident, *msg])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


def _result_msg(job_id: str, value: Any) -> list[bytes]:
    return [P.H_RESULT, orjson.dumps({"results": [{"id": job_id, "status": "success", "result": value}]})]


def test_run_skips_malformed_and_other_messages_before_its_result() -> None:
    """The one-job wait reads one message at a time: a 3-frame message, a 1-frame one, a result of
    another job and an unknown reply come first, whole (no frame is read as part of the next message),
    then the job's result."""
    router = _ScriptedRouter(lambda request, job: [
        [P.H_RESULT, b"{}", b"extra frame"],
        [b"lone"],
        _result_msg("someone-else", 0),
        [P.H_REPLY, orjson.dumps({"req": 10_000})],
        _result_msg(job["id"], {"n": job["args"]["n"]}),
    ])
    try:
        with Client(router.address, timeout=5) as c:
            for n in range(3):
                assert c.run("m:f", {"n": n}, wait_timeout=10) == {"n": n}
            assert c.job("someone-else").result(timeout=1) == 0  # filed while run() waited
    finally:
        router.close()


def test_run_reports_a_refused_job_and_times_out_when_nothing_comes() -> None:
    def answer(request: dict[str, Any], job: dict[str, Any]) -> list[list[bytes]]:
        if job["script"] != "refused:f":
            return []  # silent
        return [[P.H_ACK, orjson.dumps({"req": request["req"], "rejected": [{"id": job["id"], "error": "no such script"}]})]]

    router = _ScriptedRouter(answer)
    try:
        with Client(router.address, timeout=5) as c:
            with pytest.raises(RequestRejected, match="no such script"):
                c.run("refused:f")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                c.run("silent:f", wait_timeout=0.7)  # longer than one wait slice (0.5 s)
            assert 0.6 < time.monotonic() - t0 < 5
    finally:
        router.close()


def test_connection_watch_counts_a_reconnection_after_idle_checks() -> None:
    """connections() skips the EVENTS check while the monitor's FD shows nothing new: a connection
    completed after such idle checks (a router back on the same address) is still counted."""
    ctx = zmq.Context.instance()
    first = ctx.socket(zmq.ROUTER)
    first.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{first.bind_to_random_port('tcp://127.0.0.1')}"
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RECONNECT_IVL, 50)
    watch = ConnectionWatch(dealer)
    second = None
    try:
        dealer.connect(address)
        wait_until(lambda: watch.connections() == 1, timeout=10, what="the first connection")
        assert [watch.connections() for _ in range(3)] == [1, 1, 1]  # idle checks
        first.close(0)
        second = ctx.socket(zmq.ROUTER)
        second.setsockopt(zmq.LINGER, 0)
        wait_until(lambda: _bound(second, address), timeout=10, what="the address to be free again")
        wait_until(lambda: watch.connections() == 2, timeout=10, what="the reconnection to be counted")
    finally:
        watch.close()
        dealer.close(0)
        first.close(0)
        if second is not None:
            second.close(0)


def _bound(sock: zmq.Socket, address: str) -> bool:
    try:
        sock.bind(address)
    except zmq.ZMQError:
        return False
    return True


def test_a_negative_or_non_numeric_wait_timeout_is_refused(router: Cluster) -> None:
    c = router.client()
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="wait timeout"):
            c.run(ECHO, {"text": "x"}, wait_timeout=bad)
        with pytest.raises(ValueError, match="wait timeout"):
            c.wait(["a", "b"], timeout=bad)


@pytest.mark.parametrize("kill", ["sigkill", "sigterm"])
def test_a_wait_raises_router_unavailable_about_one_timeout_after_the_router_stops(zr: Cluster, kill: str) -> None:
    """A waiting result() whose router stops 0.5 s into the wait raises RouterUnavailable about one client
    timeout (3 s) after the stop: the socket monitor saw the connection drop.  (It took a quiet spell of
    the timeout and then a question that waited a timeout more: ~5.7 s here, found by a new-user session.)"""
    from zmqrun import RouterUnavailable

    zr.start_router()
    c = zr.client(timeout=3)
    job = c.submit("nobody.serves:this")  # no worker: it stays queued, the wait hears nothing
    router = zr.router_proc
    stopped: list[float] = []

    def stop() -> None:
        time.sleep(0.5)
        if kill == "sigkill":
            router.kill9()
        else:
            router.stop()
        stopped.append(time.monotonic())

    t = threading.Thread(target=stop)
    t.start()
    try:
        with pytest.raises(RouterUnavailable, match="within 3 s"):
            job.result(timeout=60)
        raised = time.monotonic()
    finally:
        t.join(15)
    assert stopped, "the router was not stopped"
    assert 2.5 < raised - stopped[0] < 4.6, f"RouterUnavailable {raised - stopped[0]:.2f} s after the router stopped"
