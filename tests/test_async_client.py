"""AsyncClient end to end against a real router and a dedicated worker, under asyncio and under uvloop."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
import pytest
import zmq

import zmqrun
from conftest import FIBO, Cluster, unused_address, write_script
from zmqrun import AsyncClient, AsyncJob, JobFailed, RequestRejected, RouterUnavailable, ZmqrunError
from zmqrun.model import parse_time

NOBODY = "nobody.serves.this:main"


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


Run = Callable[..., Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def arun(request: pytest.FixtureRequest) -> Run:
    """``arun(coro_fn, *args)``: run ``coro_fn(*args)`` on a fresh event loop of the param's kind, bounded at 60 s."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory, loop_type = uvloop.new_event_loop, uvloop.Loop
    else:
        factory, loop_type = None, asyncio.BaseEventLoop

    def run(coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def bounded() -> Any:
            assert isinstance(asyncio.get_running_loop(), loop_type)
            async with asyncio.timeout(60):
                return await coro_fn(*args)

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(bounded())

    return run


def test_submit_await_run_wait_and_job_handles(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            job = await c.submit(FIBO, {"n": 10})
            assert isinstance(job, AsyncJob) and isinstance(job.id, str)
            assert await job == 55
            # A second read asks the router again (the pushed outcome was consumed by the first).
            assert await job.result(timeout=30) == 55
            assert await c.run(FIBO, {"n": 12}, wait_timeout=30) == 144
            other = await c.submit(FIBO, {"n": 7})
            rec = await job.get()
            assert rec.status == "success" and rec.result == 55 and rec.script == FIBO
            async with AsyncClient(shared.address, timeout=10) as c2:
                # Handles by id from another client, and wait() in order.  The jobs are finished, so
                # the router pushes their outcomes at once: nothing may wait for the 10 s liveness check.
                assert await c2.job(other.id) == 13
                assert await c2.wait([other.id, job.id], timeout=5) == [13, 55]
                assert await c2.job(other.id).result(timeout=5) == 13
        assert c._reader is not None and c._reader.done()

    arun(main)


def test_gather_of_100_submits_and_concurrent_awaits(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            jobs = await asyncio.gather(*(c.submit(FIBO, {"n": i % 20}) for i in range(100)))
            assert len({j.id for j in jobs}) == 100
            assert await asyncio.gather(*jobs) == [fib(i % 20) for i in range(100)]
            # Results awaited in reverse order of submission, with 50 concurrent runs interleaved.
            runs = await asyncio.gather(*(c.run(FIBO, {"n": i % 20}) for i in range(50)),
                                        *(j.result(timeout=30) for j in reversed(jobs)))
            assert runs[:50] == [fib(i % 20) for i in range(50)]
            assert runs[50:] == [fib(i % 20) for i in reversed(range(100))]
            # One job awaited by five coroutines at once: each gets the value.
            job = await c.submit(FIBO, {"n": 15})
            assert await asyncio.gather(*(job.result(timeout=30) for _ in range(5))) == [610] * 5

    arun(main)


def test_map_of_hundreds_pipelines_in_order(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            # Watch what goes out: jobs per SUBMIT and jobs in flight (sent minus outcomes filed).
            sent_batches: list[int] = []
            in_flight: list[int] = []
            filed = 0
            send, deliver = c._send, c._deliver

            async def spy_send(frames: list[bytes], deadline: float | None = None) -> None:
                await send(frames, deadline)
                if frames[0][4] == zmqrun.protocol.C_SUBMIT:
                    sent_batches.append(len(orjson.loads(frames[1])["jobs"]))
                    in_flight.append(sum(sent_batches) - filed)

            def spy_deliver(jid: str, outcome: dict[str, Any]) -> None:
                nonlocal filed
                filed += 1
                deliver(jid, outcome)

            c._send, c._deliver = spy_send, spy_deliver  # type: ignore[method-assign]
            n = 300
            results = await c.map(FIBO, ({"n": i % 15} for i in range(n)), batch_size=16, window=64)
            assert results == [fib(i % 15) for i in range(n)]
            assert sum(sent_batches) == n and max(sent_batches) <= 16
            assert len(sent_batches) >= math.ceil(n / 16)
            assert max(in_flight) <= 64  # the window holds
            assert max(in_flight) > 16  # more than one batch in flight: pipelined, not lock-step
            c._send, c._deliver = send, deliver  # type: ignore[method-assign]
            # Failures: raised (the first in input order) or returned in place.
            with pytest.raises(JobFailed) as info:
                await c.map(FIBO, [{"n": 3}, {"n": "x"}, {"n": None}])
            assert info.value.type == "TypeError" and "str" in info.value.message
            out = await c.map(FIBO, [{"n": 5}, {"n": "x"}, {"n": 6}], return_exceptions=True)
            assert out[0] == 5 and out[2] == 8
            assert isinstance(out[1], JobFailed) and out[1].type == "TypeError"
            assert await c.map(FIBO, []) == []

    arun(main)


def test_job_failed_carries_remote_type_message_and_traceback(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            with pytest.raises(JobFailed) as info:
                await c.run(FIBO, {"n": "x"}, wait_timeout=30)
            err = info.value
            assert err.status == "failure" and err.type == "TypeError"
            assert "'<' not supported" in err.message
            assert "Traceback" in err.traceback and "fibo" in err.traceback
            job = await c.submit(FIBO, {"n": [1]})
            with pytest.raises(JobFailed) as info2:
                await job
            assert info2.value.job_id == job.id and info2.value.type == "TypeError"
            assert isinstance(info2.value, zmqrun.ZmqrunError)

    arun(main)


def test_get_list_cancel_of_a_delayed_job_and_status(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            before = (await c.status())["counts"]["scheduled"]
            job = await c.submit(FIBO, {"n": 3}, delay=60, priority=2)
            rec = await c.get(job.id)
            assert rec.status == "queued" and rec.priority == 2 and rec.args == {"n": 3}
            assert rec.scheduled_for is not None and rec.created_at is not None
            assert parse_time(rec.scheduled_for) >= parse_time(rec.created_at) + 55
            listed = await c.list_jobs(status="queued", script=FIBO)
            assert job.id in [r.id for r in listed]
            st = await c.status()
            assert st["counts"]["scheduled"] == before + 1
            assert "warm-shared" in [w["name"] for w in st["workers"]]
            res = await job.cancel()
            assert res.canceled is True and res.status == "canceled"
            with pytest.raises(JobFailed) as info:
                await job.result(timeout=10)
            assert info.value.status == "canceled" and info.value.type == "Canceled"
            again = await c.cancel(job.id, reason="twice")
            assert again.canceled is False and again.status == "canceled"
            assert (await c.get(job.id)).status == "canceled"
            assert (await c.status())["counts"]["scheduled"] == before
            unknown = await c.cancel("no-such-job")
            assert unknown.canceled is False and unknown.status is None
            with pytest.raises(KeyError):
                await c.get("no-such-job")
            assert [r.id for r in await c.list_jobs(status="canceled", limit=1)] == [job.id]

    arun(main)


def test_result_timeout_and_rejected_jobs(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            job = await c.submit(NOBODY)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await job.result(timeout=0.5)
            assert 0.4 <= time.monotonic() - t0 < 5
            assert (await job.cancel()).canceled
            # Refused by the router: with an ACK (submit) and without one (run, map).
            with pytest.raises(RequestRejected, match="job id"):
                await c.submit(FIBO, job_id="-bad id")
            with pytest.raises(RequestRejected, match="job id"):
                await c.run(FIBO, job_id="-bad id", wait_timeout=10)
            with pytest.raises(RequestRejected):
                await c.map(FIBO, [{"n": 1}], timeout=-1)
            assert await c.run(FIBO, {"n": 4}) == 3  # the client is still fine

    arun(main)


def test_close_cancels_the_reader_and_fails_pending_waits(shared: Cluster, arun: Run) -> None:
    async def main() -> None:
        c = AsyncClient(shared.address, timeout=10)
        job = await c.submit(NOBODY)
        waiter = asyncio.create_task(job.result())
        mapper = asyncio.create_task(c.map(NOBODY, [{"i": i} for i in range(3)]))
        await asyncio.sleep(0.3)
        assert not waiter.done() and not mapper.done()
        reader = c._reader
        t0 = time.monotonic()
        await c.close()
        assert time.monotonic() - t0 < 2
        assert reader is not None and reader.done()
        for task in (waiter, mapper):
            with pytest.raises(ZmqrunError, match="closed"):
                await task
        with pytest.raises(ZmqrunError, match="closed"):
            await c.status()
        await c.close()  # twice is fine
        async with AsyncClient(shared.address, timeout=10) as c2:
            left = await c2.list_jobs(status="queued", script=NOBODY)
            assert job.id in [r.id for r in left] and len(left) == 4
            assert all([(await c2.cancel(r.id)).canceled for r in left])

    arun(main)


def test_unreachable_or_silent_router_raises_router_unavailable(arun: Run) -> None:
    async def main() -> None:
        address = unused_address()
        async with AsyncClient(address, timeout=1) as c:
            t0 = time.monotonic()
            with pytest.raises(RouterUnavailable) as info:
                await c.submit(FIBO, {"n": 1})
            assert 0.5 <= time.monotonic() - t0 < 5
            assert isinstance(info.value, ConnectionError) and address in str(info.value)
        # A peer that accepts the connection but never answers.
        silent = zmq.Context.instance().socket(zmq.ROUTER)
        silent.setsockopt(zmq.LINGER, 0)
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        try:
            c = AsyncClient(f"tcp://127.0.0.1:{port}", timeout=0.6)
            # status: no reply within the timeout; run: no outcome, then no reply to the liveness check.
            for call in (c.status, lambda: c.run(FIBO, {"n": 1})):
                t0 = time.monotonic()
                with pytest.raises(RouterUnavailable):
                    await call()
                assert 0.3 <= time.monotonic() - t0 < 5
            await c.close()
            # Closing fails a request still waiting for its answer at once, not after the timeout.
            c = AsyncClient(f"tcp://127.0.0.1:{port}", timeout=30)
            pending = asyncio.create_task(c.status())
            await asyncio.sleep(0.2)
            assert not pending.done()
            t0 = time.monotonic()
            await c.close()
            with pytest.raises(ZmqrunError, match="closed"):
                await pending
            assert time.monotonic() - t0 < 2
        finally:
            silent.close(0)

    arun(main)


def test_arguments_are_checked_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch, arun: Run) -> None:
    # The address is unreachable: anything sent would end in RouterUnavailable after the timeout instead.
    async def main() -> None:
        async with AsyncClient(unused_address(), timeout=1) as c:
            with pytest.raises(TypeError):
                await c.submit(FIBO, {"s": {1, 2}})
            with pytest.raises(TypeError):
                await c.map(FIBO, [{"n": 1}, {"n": object()}])
            with pytest.raises(TypeError, match="unexpected options"):
                await c.run(FIBO, {"n": 1}, colour="red")
            with pytest.raises(ValueError, match="finite"):
                await c.submit(FIBO, delay=float("nan"))
            with pytest.raises(ValueError, match="priority"):
                await c.submit(FIBO, priority=2**40)
            with pytest.raises(ValueError, match="at least 1"):
                await c.map(FIBO, [{}], batch_size=0)
            with pytest.raises(ValueError, match="limit"):
                await c.list_jobs(limit=0)
            monkeypatch.setattr(zmqrun.protocol, "MAX_MESSAGE_SIZE", 4096)
            with pytest.raises(ValueError, match="exceeds the router's message limit"):
                await c.submit(FIBO, {"blob": "x" * 10_000})
            with pytest.raises(ValueError, match="exceeds the router's message limit"):
                await c.run(FIBO, {"blob": "x" * 10_000})

    t0 = time.monotonic()
    arun(main)
    assert time.monotonic() - t0 < 1
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient(unused_address(), timeout=0)
    with pytest.raises(ValueError, match="invalid router address"):
        AsyncClient("nonsense", timeout=1)


def test_map_with_jobs_not_yet_sent_survives_a_quiet_spell(router: Cluster, tmp_path: Path) -> None:
    """Window 1, jobs longer than the client timeout: the liveness check asks only about sent jobs."""
    write_script(tmp_path, "slowjob.py", "import time\n\ndef main(s):\n    time.sleep(s)\n    return s\n")
    router.start_worker("slowjob.py:main", cwd=tmp_path, prefetch=0)

    async def main() -> list[Any]:
        async with AsyncClient(router.address, timeout=0.5) as c:
            return await c.map("slowjob.py:main", [{"s": 0.8}, {"s": 0.8}], window=1)

    assert asyncio.run(main()) == [0.8, 0.8]


def test_unread_outcomes_stay_bounded_and_evicted_results_are_fetched_again(shared: Cluster, arun: Run) -> None:
    """Outcomes nobody awaits yet are capped at ``max_unclaimed``; an evicted job's result still comes
    (the router answers from its archive), and a running map's outcomes are never evicted."""
    async def main() -> None:
        async with AsyncClient(shared.address, timeout=10) as c:
            c.max_unclaimed = 5
            jobs = [await c.submit(FIBO, {"n": i % 10}) for i in range(30)]
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while loop.time() < end and not all([(await j.get()).status == "success" for j in jobs]):
                await asyncio.sleep(0.05)
            await c.status()  # one more round trip: every pushed outcome has been filed
            assert len(c._outcomes) <= 5
            assert await asyncio.gather(*jobs) == [fib(i % 10) for i in range(30)]
            assert await c.map(FIBO, [{"n": i % 10} for i in range(50)], batch_size=7) == \
                [fib(i % 10) for i in range(50)]

    arun(main)


def test_an_async_wait_raises_router_unavailable_about_one_timeout_after_the_router_stops(
        zr: Cluster, arun: Run) -> None:
    """As Client (test_client.py): an awaited result whose router is killed (-9) 0.5 s into the wait
    raises RouterUnavailable about one client timeout (3 s) after the kill, not after a quiet spell and
    a question that waits a timeout more (up to 2x: 5.5 s before).  About 5 s per loop kind."""
    from zmqrun import RouterUnavailable

    zr.start_router()
    router = zr.router_proc

    async def main() -> tuple[float, list[float]]:
        async with AsyncClient(zr.address, timeout=3) as c:
            job = await c.submit("nobody.serves:this")  # no worker: it stays queued, the wait hears nothing

            async def stop() -> float:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(router.kill9)
                return time.monotonic()

            async def raised_at(aw: Awaitable[Any]) -> float:
                with pytest.raises(RouterUnavailable, match="within 3 s"):
                    await aw
                return time.monotonic()

            stopper = asyncio.ensure_future(stop())
            raised = await asyncio.gather(raised_at(job.result(timeout=60)),
                                          raised_at(c.map("nobody.serves:this", [{}, {}])))
            return await stopper, raised

    stopped, raised = arun(main)
    for what, t in zip(("result()", "map()"), raised):
        assert 2.5 < t - stopped < 4.6, f"{what}: RouterUnavailable {t - stopped:.2f} s after the router stopped"
