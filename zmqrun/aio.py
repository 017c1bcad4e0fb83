"""The asyncio zmqrun client: the methods of :class:`zmqrun.Client` as coroutines.

One DEALER socket per client and one reader task that files every reply by its
request number and every pushed outcome by its job id, resolving the futures
the waiting coroutines hold; any number of coroutines may share one client.
Works under the default asyncio loop and under uvloop (it needs
``loop.add_reader``, so not under Windows' proactor loop).

The socket's file descriptor is ZeroMQ's edge-style signal, not a plain readable
socket: the reader drains every queued message before it waits again, and every
send re-checks ``EVENTS`` (a send can consume the signal of a message that
arrived meanwhile).  Validation, request bodies and reply parsing are the sync
client's own functions (:mod:`zmqrun.client`), so both raise the same errors.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Iterable

import zmq

from . import protocol as P
from .client import (Call, CancelResult, RequestRejected, ZmqrunError, cancel_request, check_map_options,
                     client_settings, encode_request, evict_unclaimed, get_request, id_list, job_dict, list_request,
                     no_answer, noack_submit, outcome_value, peer_identity, read_router_message, rejected_outcomes,
                     reply_body, run_job_dict, status_request, submit_request, unreachable, wait_request)
from .model import JobRecord

log = logging.getLogger("zmqrun.aio")

_READ_BATCH = 10_000  # messages filed per reader turn before it lets other tasks run


class AsyncJob:
    """A handle on a submitted job: ``id``, ``await job`` (its result), :meth:`result`, :meth:`get`, :meth:`cancel`."""

    __slots__ = ("id", "_client")

    def __init__(self, job_id: str, client: "AsyncClient") -> None:
        self.id = job_id
        self._client = client

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result value.

        ``timeout`` in seconds (None: as long as it takes; the router's liveness
        is still checked every client timeout).  Raises :class:`JobFailed` if the
        job failed or was canceled, ``TimeoutError`` if ``timeout`` passes first,
        :class:`RouterUnavailable` if the router stops answering.
        """
        return (await self._client._wait_outcomes([self.id], timeout))[0]

    def __await__(self) -> Any:
        """``await job`` is ``await job.result()``."""
        return self.result().__await__()

    async def get(self) -> JobRecord:
        """The job's current record (see :meth:`AsyncClient.get`)."""
        return await self._client.get(self.id)

    async def cancel(self) -> CancelResult:
        """Cancel the job (see :meth:`AsyncClient.cancel`)."""
        return await self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"


class _MapState:
    """One running map(): its outcomes by input position, how many arrived, its first refused job,
    and the event that wakes its loop.  The reader files outcomes here directly (no future per job)."""

    __slots__ = ("outcomes", "done", "rejected", "failed", "event")

    def __init__(self, n: int) -> None:
        self.outcomes: list[dict[str, Any] | None] = [None] * n
        self.done = 0
        self.rejected: dict[str, Any] | None = None
        self.failed: str | None = None  # set when the client closes or its reader stops
        self.event = asyncio.Event()

    def put(self, index: int, outcome: dict[str, Any]) -> None:
        self.outcomes[index] = outcome
        self.done += 1
        if outcome["status"] == "rejected" and self.rejected is None:
            self.rejected = outcome
        self.event.set()


class AsyncClient:
    """An asyncio connection to a zmqrun router, with the methods of :class:`zmqrun.Client` as coroutines.

    ``address``: router endpoint (default ``$ZMQRUN_ADDRESS`` or
    tcp://127.0.0.1:5555).  ``timeout``: seconds to wait for the router to
    answer any request before raising :class:`RouterUnavailable`.  Use it as
    ``async with AsyncClient(...) as c:`` or call ``await c.close()``.  The
    client binds to the event loop it is first used on.
    """

    def __init__(self, address: str | None = None, timeout: float = 10.0) -> None:
        self.address, self.timeout = client_settings(address, timeout)
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        P.configure_peer_socket(self._sock, peer_identity(), linger_ms=500)
        self._sock.connect(self.address)
        self._fd: int = self._sock.FD
        self._req = itertools.count(1)
        self._replies: dict[int, asyncio.Future[tuple[int, dict[str, Any]]]] = {}  # req -> its reply
        self._noack: dict[int, list[str]] = {}  # req -> job ids of an "ack": false SUBMIT
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}  # job id -> its outcome, for waiters
        self._claims: dict[str, int] = {}  # job id -> number of waiters on its future
        self._outcomes: dict[str, dict[str, Any]] = {}  # outcomes nobody waited for yet
        self._map_slots: dict[str, tuple[_MapState, int]] = {}  # job id -> its running map() and position
        self._watching: set[str] = set()  # ids whose outcome the router will push to us
        self.max_unclaimed = 100_000  # outcomes kept for jobs nobody waits on yet (oldest evicted first)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._readable: asyncio.Event | None = None
        self._last_rx = 0.0  # loop time of the last message from the router
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------

    async def __aenter__(self) -> "AsyncClient":
        self._started()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader task, fail every pending wait with :class:`ZmqrunError`, and close the socket
        (bounded linger: never hangs)."""
        if self._closed:
            return
        self._closed = True
        reader = self._reader
        if reader is not None and not reader.done():
            reader.cancel()
            try:
                same_loop = asyncio.get_running_loop() is reader.get_loop()
            except RuntimeError:
                same_loop = False
            if same_loop:
                await asyncio.wait((reader,))  # the reader never blocks but on its event: ends at once
        self._fail_all("the client was closed")
        self._sock.close(linger=500)

    def _started(self) -> asyncio.AbstractEventLoop:
        """The client's event loop; starts the reader on first use.  Raises ZmqrunError once closed (or if
        the reader stopped) and RuntimeError from another loop."""
        if self._closed:
            raise ZmqrunError("the client is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._readable = asyncio.Event()
            loop.add_reader(self._fd, self._readable.set)
            self._last_rx = loop.time()
            self._reader = loop.create_task(self._read_loop(), name=f"zmqrun-client-reader {self.address}")
        elif loop is not self._loop:
            raise RuntimeError("an AsyncClient is bound to the event loop it was first used on")
        elif self._reader is not None and self._reader.done():
            raise ZmqrunError("the client's reader task has stopped; make a new client")
        return loop

    async def _read_loop(self) -> None:
        assert self._loop is not None and self._readable is not None
        loop, sock, readable, route = self._loop, self._sock, self._readable, self._route
        try:
            while True:
                msgs = P.recv_ready(sock, _READ_BATCH)
                if msgs:
                    self._last_rx = loop.time()
                    for frames in msgs:
                        try:
                            route(frames)
                        except Exception:  # noqa: BLE001 - one bad message must not stop the reader
                            log.warning("ignored a malformed message from the router", exc_info=True)
                    if len(msgs) == _READ_BATCH:
                        await asyncio.sleep(0)
                    continue
                readable.clear()
                if P.has_input(sock):  # reading EVENTS re-arms the FD signal: check once more before waiting
                    continue
                await readable.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._fail_all(f"the client's reader stopped: {e!r}")
            raise
        finally:
            try:
                loop.remove_reader(self._fd)
            except Exception:  # noqa: BLE001 - the loop may already be closing
                pass

    def _fail_all(self, why: str) -> None:
        """Fail every pending request, job wait and map() with ZmqrunError(why)."""
        for state, _ in list(self._map_slots.values()):
            state.failed = why
            state.event.set()
        self._map_slots.clear()
        futs: list[asyncio.Future[Any]] = [*self._replies.values(), *self._futures.values()]
        for fut in futs:
            if not fut.done():
                fut.set_exception(ZmqrunError(why))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody awaits it any more
        self._replies.clear()
        self._futures.clear()
        self._claims.clear()

    def _route(self, frames: list[bytes]) -> None:
        """File one message: outcomes to their job's future (or the unclaimed cache), replies to their request."""
        msg = read_router_message(frames)
        if msg is None:
            return  # not a router message: ignore
        cmd, body = msg
        if cmd == P.R_RESULT:
            for r in body["results"]:
                self._deliver(r["id"], r)
            if len(self._outcomes) > self.max_unclaimed:
                evict_unclaimed(self._outcomes, self._watching, (), self.max_unclaimed)
        elif cmd in (P.R_ACK, P.R_REPLY, P.R_ERROR):
            req = body.get("req")
            if isinstance(req, int):
                ids = self._noack.pop(req, None)
                if ids is not None:
                    # A reply to an "ack": false submit only comes when jobs were refused.
                    for jid, outcome in rejected_outcomes(ids, cmd, body).items():
                        self._deliver(jid, outcome)
                    return
                fut = self._replies.pop(req, None)
                if fut is not None and not fut.done():
                    fut.set_result((cmd, body))
            elif cmd == P.R_ERROR:
                text = f"router error: {body.get('error')}"
                pending = [f for f in self._replies.values() if not f.done()]
                self._replies.clear()
                for fut in pending:
                    fut.set_exception(RequestRejected(text))
                if not pending:
                    log.warning("%s", text)

    def _deliver(self, jid: str, outcome: dict[str, Any]) -> None:
        slot = self._map_slots.pop(jid, None)
        if slot is not None:
            self._watching.discard(jid)
            slot[0].put(slot[1], outcome)
            return
        fut = self._futures.pop(jid, None)
        if fut is None:
            self._outcomes[jid] = outcome
            return
        self._claims.pop(jid, None)
        self._watching.discard(jid)  # the router pushes an outcome once: a later wait asks again
        if not fut.done():
            fut.set_result(outcome)

    def _claim(self, jid: str) -> asyncio.Future[dict[str, Any]]:
        """A future of ``jid``'s outcome for one waiter (resolved at once if the outcome is already here)."""
        fut = self._futures.get(jid)
        if fut is None:
            assert self._loop is not None
            fut = self._loop.create_future()
            outcome = self._outcomes.pop(jid, None)
            if outcome is not None:
                self._watching.discard(jid)
                fut.set_result(outcome)
                return fut
            self._futures[jid] = fut
        self._claims[jid] = self._claims.get(jid, 0) + 1
        return fut

    def _unclaim(self, jid: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        """A waiter gave up on ``fut``: forget it once nobody waits, so a later outcome goes to the cache."""
        if fut.done() or self._futures.get(jid) is not fut:
            return
        n = self._claims.get(jid, 0) - 1
        if n > 0:
            self._claims[jid] = n
        else:
            self._claims.pop(jid, None)
            del self._futures[jid]

    def _kick(self) -> None:
        """After a send: wake the reader if a message is waiting (the send may have consumed the FD signal)."""
        if self._readable is not None and P.has_input(self._sock):
            self._readable.set()

    async def _send(self, frames: list[bytes], deadline: float | None = None) -> None:
        """Send ``frames``; while no connection exists (IMMEDIATE) retry until ``deadline`` (loop time, default
        now + timeout), then raise RouterUnavailable."""
        loop = self._started()
        try:
            P.send_frames(self._sock, frames)
        except zmq.Again:
            if deadline is None:
                deadline = loop.time() + self.timeout
            pause = 0.001
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise unreachable(self.address, self.timeout) from None
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
                if self._closed:
                    raise ZmqrunError("the client is closed") from None
                try:
                    P.send_frames(self._sock, frames)
                    break
                except zmq.Again:
                    pass
        self._kick()

    async def _request(self, cmd: int, body: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its reply body; one deadline (the client timeout) covers both."""
        loop = self._started()
        req = next(self._req)
        body["req"] = req
        frames = encode_request(cmd, body)
        deadline = loop.time() + self.timeout
        fut: asyncio.Future[tuple[int, dict[str, Any]]] = loop.create_future()
        self._replies[req] = fut
        try:
            await self._send(frames, deadline)
            await asyncio.wait((fut,), timeout=max(0.0, deadline - loop.time()))
            if not fut.done():
                raise no_answer(self.address, self.timeout)
            return reply_body(*fut.result())
        finally:
            self._replies.pop(req, None)

    async def _call(self, call: Call) -> Any:
        cmd, body, parse = call
        return parse(await self._request(cmd, body))

    async def _check_alive(self, ids: list[str]) -> None:
        """Re-register interest in unfinished ids; raises RouterUnavailable if the router is silent."""
        await self._call(wait_request(ids))

    async def _wait_outcomes(self, ids: list[str], timeout: float | None,
                             return_exceptions: bool = False) -> list[Any]:
        loop = self._started()
        futs = [self._claim(jid) for jid in ids]
        try:
            unwatched = [j for j, f in zip(ids, futs) if not f.done() and j not in self._watching]
            if unwatched:
                await self._check_alive(unwatched)
                # The router pushes an outcome it already has before its reply: those are filed (and
                # unwatched) already; only the others will still come.
                asked = set(unwatched)
                self._watching.update(j for j, f in zip(ids, futs) if not f.done() and j in asked)
            deadline = None if timeout is None else loop.time() + timeout
            since = loop.time()
            pending = {f for f in futs if not f.done()}
            while pending:
                slice_s = self.timeout if deadline is None else min(self.timeout, deadline - loop.time())
                if deadline is not None and slice_s <= 0:
                    late = [j for j, f in zip(ids, futs) if not f.done()]
                    raise TimeoutError(f"job(s) {', '.join(late)} not finished within {timeout:g} s")
                _, pending = await asyncio.wait(pending, timeout=slice_s)
                if pending and loop.time() - max(since, self._last_rx) >= self.timeout:
                    await self._check_alive([j for j, f in zip(ids, futs) if not f.done()])
                    since = loop.time()
        finally:
            for jid, fut in zip(ids, futs):
                self._unclaim(jid, fut)
        return [outcome_value(jid, fut.result(), return_exceptions) for jid, fut in zip(ids, futs)]

    # -- jobs -----------------------------------------------------------------------------

    async def submit(self, script: str, args: dict[str, Any] | None = None, *, priority: int = 0,
                     scheduled_for: Any = None, delay: float | None = None, timeout: float | None = None,
                     job_id: str | None = None) -> AsyncJob:
        """Submit one job; return an :class:`AsyncJob` once the router has made it durable.

        Arguments as :meth:`zmqrun.Client.submit`.  Raises ``TypeError`` for args
        orjson cannot encode (nothing is sent), :class:`RequestRejected` if the
        router refuses the job, :class:`RouterUnavailable` if it does not answer
        within the timeout.
        """
        jid = await self._call(submit_request(job_dict(script, args, priority, scheduled_for, delay, timeout,
                                                       job_id)))
        self._watching.add(jid)
        return AsyncJob(jid, self)

    async def run(self, script: str, args: dict[str, Any] | None = None, *, wait_timeout: float | None = None,
                  **opts: Any) -> Any:
        """Submit one job and wait for its result (``wait_timeout`` seconds, None = no limit).

        Takes the options of :meth:`submit`; raises what :meth:`submit` and
        :meth:`AsyncJob.result` raise.  Sent with ``"ack": false``: the result,
        which comes only once the job is durable, acknowledges the submit too.
        """
        d = run_job_dict(script, args, opts)
        req = next(self._req)
        frames = encode_request(P.C_SUBMIT, noack_submit(req, [d]))
        self._noack[req] = [d["id"]]
        self._watching.add(d["id"])
        try:
            await self._send(frames)
            return (await self._wait_outcomes([d["id"]], wait_timeout))[0]
        finally:
            self._noack.pop(req, None)

    async def map(self, script: str, iterable: Iterable[dict[str, Any] | None], *, batch_size: int = 1000,
                  window: int = 10_000, priority: int = 0, timeout: float | None = None,
                  return_exceptions: bool = False) -> list[Any]:
        """Run ``script`` once per args dict; return the results in input order.

        Pipelined like :meth:`zmqrun.Client.map`: ``batch_size`` jobs per
        message (sent with ``"ack": false``), up to ``window`` jobs in flight.
        Raises :class:`JobFailed` for the first failed job unless
        ``return_exceptions`` (then the JobFailed is put in its place),
        :class:`RequestRejected` as soon as the router refuses a job, and
        ``TypeError`` for unserializable args before anything is sent.
        """
        check_map_options(batch_size, window)
        all_jobs = [job_dict(script, a, priority, None, None, timeout, None) for a in iterable]
        loop = self._started()
        ids = [d["id"] for d in all_jobs]
        n = len(ids)
        state = _MapState(n)
        slots = self._map_slots
        for i, jid in enumerate(ids):
            slots[jid] = (state, i)
        self._watching.update(ids)
        reqs: list[int] = []
        sent = 0
        since = loop.time()
        try:
            while state.done < n and state.rejected is None and state.failed is None:
                while sent < n and sent - state.done < window:
                    chunk = all_jobs[sent: sent + min(batch_size, window - (sent - state.done))]
                    req = next(self._req)
                    frames = encode_request(P.C_SUBMIT, noack_submit(req, chunk))
                    self._noack[req] = [d["id"] for d in chunk]
                    reqs.append(req)
                    # No ACK per message: each job's result (sent once it is durable) acknowledges it.
                    await self._send(frames)
                    sent += len(chunk)
                state.event.clear()
                if state.done >= n or state.rejected is not None or state.failed is not None:
                    break
                before = state.done
                try:
                    async with asyncio.timeout(self.timeout):
                        await state.event.wait()
                except TimeoutError:
                    pass
                if state.done > before:
                    since = loop.time()
                elif loop.time() - max(since, self._last_rx) >= self.timeout:
                    # Only the jobs already sent: the router does not know the others yet.
                    await self._check_alive([ids[i] for i in range(sent) if state.outcomes[i] is None])
                    since = loop.time()
        finally:
            for req in reqs:
                self._noack.pop(req, None)
            if state.done < n:
                for i, jid in enumerate(ids):
                    if state.outcomes[i] is None and slots.get(jid, (None,))[0] is state:
                        del slots[jid]
        if state.failed is not None:
            raise ZmqrunError(state.failed)
        if state.rejected is not None:
            raise RequestRejected(f"job rejected: {state.rejected['error']['message']}")
        return [outcome_value(jid, o, return_exceptions) for jid, o in zip(ids, state.outcomes)]  # type: ignore[arg-type]

    async def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Any]:
        """Wait for several jobs by id; return their results in order (raises like :meth:`AsyncJob.result`)."""
        return await self._wait_outcomes(id_list(job_ids), timeout)

    def job(self, job_id: str) -> AsyncJob:
        """An :class:`AsyncJob` handle for an existing id (e.g. from another process); sends nothing."""
        return AsyncJob(job_id, self)

    async def get(self, job_id: str) -> JobRecord:
        """The full record of a live or finished job.  Raises ``KeyError`` if the router does not know the id."""
        return await self._call(get_request(job_id))

    async def list_jobs(self, status: str | None = None, script: str | None = None,
                        limit: int = 50) -> list[JobRecord]:
        """Jobs newest first, filtered by ``status`` and ``script``; at most ``limit`` (logs and args omitted).

        Raises ValueError unless ``limit`` is a positive integer.
        """
        return await self._call(list_request(status, script, limit))

    async def cancel(self, job_id: str, reason: str | None = None) -> CancelResult:
        """Cancel a queued, scheduled or running job (see :meth:`zmqrun.Client.cancel`).

        A finished job is not changed (``canceled`` False, with why).
        """
        return await self._call(cancel_request(job_id, reason))

    async def status(self) -> dict[str, Any]:
        """Router status: ``workers`` [{name, script, credit, in_flight}], ``counts`` {queued, scheduled,
        running, finished}."""
        return await self._call(status_request())
