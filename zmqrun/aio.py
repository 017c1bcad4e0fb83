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
import time
from typing import Any, AsyncIterator, Iterable

import zmq

from . import protocol as P
from .client import (WAIT_SLICE, Call, CancelResult, ConnectionWatch, RequestRejected, ZmqrunError, cancel_request,
                     check_map_options, check_max_args_bytes, client_settings, encode_request, evict_unclaimed,
                     get_request, id_list, job_dict, list_request, logs_request, lost_submits, no_answer,
                     noack_submit, outcome_value,
                     read_router_message, rejected_outcomes, reply_body, retry_job_dict, run_job_dict,
                     setup_client_socket, status_request, submit_request, unfollow_body, unreachable)
from .livelogs import FollowState
from .model import JobRecord
from .security import CurveKeys

log = logging.getLogger("zmqrun.aio")

_READ_BATCH = 10_000  # messages filed per reader turn before it lets other tasks run


class AsyncJob:
    """A handle on a submitted job: ``id``, ``await job`` (its result), :meth:`result`, :meth:`get`, :meth:`cancel`,
    :meth:`logs`."""

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

    def logs(self, follow: bool = False) -> AsyncIterator[str]:
        """The job's output as an async iterator of text chunks (see :meth:`AsyncClient.logs`)."""
        return self._client.logs(self.id, follow)

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
    answer any request before raising :class:`RouterUnavailable`.  ``curve``:
    :class:`zmqrun.CurveKeys`, as for :class:`zmqrun.Client`.  Use it as
    ``async with AsyncClient(...) as c:`` or call ``await c.close()``.  The
    client binds to the event loop it is first used on.  Router restarts are
    ridden out as :class:`zmqrun.Client` does (requests sent again, waits asked again).
    """

    def __init__(self, address: str | None = None, timeout: float = 10.0, curve: CurveKeys | None = None, *,
                 max_args_bytes: int = P.MAX_ARGS_BYTES) -> None:
        self.address, self.timeout = client_settings(address, timeout)
        self.max_args_bytes = check_max_args_bytes(max_args_bytes)
        self._sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        setup_client_socket(self._sock, curve)
        self._conn = ConnectionWatch(self._sock)
        self._seen_conns = 1  # connections counted so far (the first one is no reconnection)
        self._reasking: asyncio.Task[None] | None = None
        self._reask_again = False
        self._sock.connect(self.address)
        self._fd: int = self._sock.FD
        self._req = itertools.count(1)
        self._replies: dict[int, asyncio.Future[tuple[int, dict[str, Any]]]] = {}  # req -> its reply
        self._noack: dict[int, list[str]] = {}  # req -> job ids of an "ack": false SUBMIT
        self._noack_jobs: dict[str, dict[str, Any]] = {}  # jobs sent without an ACK, until their outcome
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}  # job id -> its outcome, for waiters
        self._claims: dict[str, int] = {}  # job id -> number of waiters on its future
        self._outcomes: dict[str, dict[str, Any]] = {}  # outcomes nobody waited for yet
        self._map_slots: dict[str, tuple[_MapState, int]] = {}  # job id -> its running map() and position
        self._watching: set[str] = set()  # ids whose outcome the router will push to us
        self._follows: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}  # job id -> its followers' inboxes
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
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._conn.fd)
            except Exception:  # noqa: BLE001 - the loop may be closing
                pass
        if self._reasking is not None and not self._reasking.done():
            self._reasking.cancel()
        self._conn.close()
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
            loop.add_reader(self._conn.fd, self._conns)  # reconnections: see _conns
            self._conns()
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

    def _connection_down(self, started: float) -> bool:
        """True while the connection to the router is down (nothing can be asked then); raises
        RouterUnavailable once it has been down for the client timeout, as Client._should_reask: the
        socket monitor saw it drop, so a wait ends ~timeout after a router stops instead of after a
        quiet spell and a question that waits a timeout more (up to 2x).  ``started``: when the wait
        began (time.monotonic()); one that began after the drop gets a whole timeout of its own."""
        if self._closed:
            return False  # close() fails every pending wait itself
        self._conns()  # every read of the monitor goes through here
        return self._conn.still_down(started, self.address, self.timeout)

    def _conns(self) -> int:
        """Connections completed so far.  On a new one (the router may have restarted and forgotten who
        waits for what, or lost jobs sent without an ACK), ask it again about every awaited job, once,
        for all waiters (:meth:`_reask_all`).  Every read of the monitor goes through here, so none is
        missed."""
        n = self._conn.connections()
        if n > self._seen_conns:
            self._seen_conns = n
            self._watching.clear()  # nothing is known to be pushed to us any more: a later wait asks first
            if self._futures or self._noack_jobs:
                if self._reasking is None or self._reasking.done():
                    assert self._loop is not None
                    self._reasking = self._loop.create_task(self._reask_all())
                else:
                    self._reask_again = True
        return n

    async def _reask_all(self) -> None:
        """WAIT for every job a coroutine awaits and every job sent without an ACK (see :meth:`_reask`).
        Errors are left to the waiters' own liveness checks."""
        while True:
            self._reask_again = False
            ids = list(dict.fromkeys([*self._futures, *(j for j in self._noack_jobs if j not in self._outcomes)]))
            if ids:
                try:
                    await self._reask(ids)
                except Exception as e:  # noqa: BLE001 - each waiter checks the router itself after its timeout
                    log.debug("asking the router again after a reconnection failed: %r", e)
            if not self._reask_again:
                return

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
        if cmd == P.R_LOGS:
            for inbox in self._follows.get(body.get("id"), ()):
                inbox.put_nowait(body)
        elif cmd == P.R_RESULT:
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
                    raise unreachable(self.address, self.timeout, self._conn.unreachable_why()) from None
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

    async def _request(self, cmd: int, body: dict[str, Any], resend: bool = True) -> dict[str, Any]:
        """Send a request and return its reply body; one deadline (the client timeout) covers both.

        ``resend``: send it again if the client reconnects meanwhile (see :class:`zmqrun.Client`);
        only for idempotent requests.  A second answer finds no waiter and is dropped.
        """
        loop = self._started()
        req = next(self._req)
        body["req"] = req
        frames = encode_request(cmd, body)
        deadline = loop.time() + self.timeout
        fut: asyncio.Future[tuple[int, dict[str, Any]]] = loop.create_future()
        self._replies[req] = fut
        try:
            conns = self._conns()  # before the send (see Client._request)
            await self._send(frames, deadline)
            while not fut.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise no_answer(self.address, self.timeout)
                await asyncio.wait((fut,), timeout=min(left, WAIT_SLICE))
                if not fut.done() and resend and self._conns() > max(conns, 1):
                    conns = self._conn.count
                    try:
                        P.send_frames(self._sock, frames)
                    except zmq.Again:
                        conns -= 1  # not connected after all: try again at the next check
                    self._kick()
            return reply_body(*fut.result())
        finally:
            self._replies.pop(req, None)

    async def _call(self, call: Call, resend: bool = True) -> Any:
        cmd, body, parse = call
        return parse(await self._request(cmd, body, resend))

    async def _reask(self, ids: list[str]) -> None:
        """Ask the router for unfinished ``ids`` again (see :meth:`zmqrun.Client._reask`): jobs sent
        without an ACK that it does not know are submitted again, same ids.  Raises RouterUnavailable
        if the router is silent, ZmqrunError for other ids it does not know."""
        lost = lost_submits(await self._request(P.C_WAIT, {"ids": ids}), self._noack_jobs)
        if lost:
            req = next(self._req)
            self._noack[req] = [d["id"] for d in lost]
            await self._send(encode_request(P.C_SUBMIT, noack_submit(req, lost)))

    async def _wait_outcomes(self, ids: list[str], timeout: float | None,
                             return_exceptions: bool = False) -> list[Any]:
        loop = self._started()
        futs = [self._claim(jid) for jid in ids]
        try:
            unwatched = [j for j, f in zip(ids, futs) if not f.done() and j not in self._watching]
            if unwatched:
                await self._reask(unwatched)
                # The router pushes an outcome it already has before its reply: those are filed (and
                # unwatched) already; only the others will still come.
                asked = set(unwatched)
                self._watching.update(j for j, f in zip(ids, futs) if not f.done() and j in asked)
            deadline = None if timeout is None else loop.time() + timeout
            since, started = loop.time(), time.monotonic()
            pending = {f for f in futs if not f.done()}
            while pending:
                slice_s = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - loop.time())
                if deadline is not None and slice_s <= 0:
                    late = [j for j, f in zip(ids, futs) if not f.done()]
                    raise TimeoutError(f"job(s) {', '.join(late)} not finished within {timeout:g} s")
                _, pending = await asyncio.wait(pending, timeout=slice_s)
                if not pending:
                    break
                if self._connection_down(started):
                    continue  # nothing can be asked without a connection
                # A reconnection is handled for all waiters at once (_conns); a quiet spell while connected
                # asks whether the router is still there (raises RouterUnavailable if it does not answer).
                if loop.time() - max(since, self._last_rx) >= self.timeout:
                    await self._reask([j for j, f in zip(ids, futs) if not f.done()])
                    since = loop.time()
        finally:
            for jid, fut in zip(ids, futs):
                self._unclaim(jid, fut)
        return [outcome_value(jid, fut.result(), return_exceptions) for jid, fut in zip(ids, futs)]

    # -- jobs -----------------------------------------------------------------------------

    async def submit(self, script: str, args: dict[str, Any] | None = None, *, priority: int = 0,
                     scheduled_for: Any = None, delay: float | None = None, timeout: float | None = None,
                     job_id: str | None = None, retries: int = 0, backoff: Any = None,
                     tag: str | None = None) -> AsyncJob:
        """Submit one job; return an :class:`AsyncJob` once the router has made it durable.

        Arguments as :meth:`zmqrun.Client.submit` (idempotent the same way).  Raises ``TypeError`` for
        args orjson cannot encode (nothing is sent), ``ValueError`` for a bad option,
        :class:`RequestRejected` if the router refuses the job, :class:`RouterUnavailable` if it does
        not answer within the timeout.
        """
        return await self._submit_one(job_dict(script, args, priority, scheduled_for, delay, timeout, job_id,
                                               retries=retries, backoff=backoff, tag=tag,
                                               max_args_bytes=self.max_args_bytes))

    async def _submit_one(self, d: dict[str, Any]) -> AsyncJob:
        jid = await self._call(submit_request(d))
        self._watching.add(jid)
        return AsyncJob(jid, self)

    async def retry(self, job_id: str) -> AsyncJob:
        """Run a finished job again as a new job (see :meth:`zmqrun.Client.retry`).

        Raises ``KeyError`` for an unknown id, ``ValueError`` if the job has not finished, and what
        :meth:`submit` raises.
        """
        return await self._submit_one(retry_job_dict(await self.get(job_id), self.max_args_bytes))

    async def run(self, script: str, args: dict[str, Any] | None = None, *, wait_timeout: float | None = None,
                  **opts: Any) -> Any:
        """Submit one job and wait for its result (``wait_timeout`` seconds, None = no limit).

        Takes the options of :meth:`submit`; raises what :meth:`submit` and
        :meth:`AsyncJob.result` raise.  Sent with ``"ack": false``: the result,
        which comes only once the job is durable, acknowledges the submit too.
        """
        d = run_job_dict(script, args, opts, self.max_args_bytes)
        req = next(self._req)
        frames = encode_request(P.C_SUBMIT, noack_submit(req, [d]))
        self._noack[req] = [d["id"]]
        self._noack_jobs[d["id"]] = d
        self._watching.add(d["id"])
        try:
            await self._send(frames)
            return (await self._wait_outcomes([d["id"]], wait_timeout))[0]
        finally:
            self._noack.pop(req, None)
            self._noack_jobs.pop(d["id"], None)

    async def map(self, script: str, iterable: Iterable[dict[str, Any] | None], *, batch_size: int = 1000,
                  window: int = 10_000, priority: int = 0, timeout: float | None = None,
                  return_exceptions: bool = False, retries: int = 0, backoff: Any = None,
                  tag: str | None = None) -> list[Any]:
        """Run ``script`` once per args dict; return the results in input order.

        Pipelined like :meth:`zmqrun.Client.map`: ``batch_size`` jobs per
        message (sent with ``"ack": false``), up to ``window`` jobs in flight;
        ``retries``, ``backoff`` and ``tag`` apply to every job.
        Raises :class:`JobFailed` for the first failed job unless
        ``return_exceptions`` (then the JobFailed is put in its place),
        :class:`RequestRejected` as soon as the router refuses a job, and
        ``TypeError`` for unserializable args before anything is sent.
        """
        check_map_options(batch_size, window)
        all_jobs = [job_dict(script, a, priority, None, None, timeout, None, retries=retries, backoff=backoff,
                             tag=tag, max_args_bytes=self.max_args_bytes) for a in iterable]
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
        since, started = loop.time(), time.monotonic()
        noack = self._noack_jobs
        try:
            while state.done < n and state.rejected is None and state.failed is None:
                while sent < n and sent - state.done < window:
                    chunk = all_jobs[sent: sent + min(batch_size, window - (sent - state.done))]
                    req = next(self._req)
                    frames = encode_request(P.C_SUBMIT, noack_submit(req, chunk))
                    self._noack[req] = [d["id"] for d in chunk]
                    for d in chunk:
                        noack[d["id"]] = d
                    reqs.append(req)
                    # No ACK per message: each job's result (sent once it is durable) acknowledges it.
                    await self._send(frames)
                    sent += len(chunk)
                state.event.clear()
                if state.done >= n or state.rejected is not None or state.failed is not None:
                    break
                before = state.done
                try:
                    async with asyncio.timeout(WAIT_SLICE):
                        await state.event.wait()
                except TimeoutError:
                    pass
                if state.done > before:
                    since = loop.time()
                elif self._connection_down(started):
                    pass  # nothing can be asked without a connection (it raises after the timeout)
                elif loop.time() - max(since, self._last_rx) >= self.timeout:
                    # Only the jobs already sent: the router does not know the others yet.  (A
                    # reconnection is handled for all waiters at once: _conns.)
                    await self._reask([ids[i] for i in range(sent) if state.outcomes[i] is None])
                    since = loop.time()
        finally:
            for req in reqs:
                self._noack.pop(req, None)
            for jid in ids:
                noack.pop(jid, None)
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
        return await self._call(cancel_request(job_id, reason), resend=False)

    async def status(self) -> dict[str, Any]:
        """Router status: ``workers`` [{name, script, credit, in_flight}], ``counts`` {queued, scheduled,
        running, finished}."""
        return await self._call(status_request())

    async def logs(self, job_id: str, follow: bool = False) -> AsyncIterator[str]:
        """A job's output as an async iterator of text chunks: ``async for chunk in c.logs(id, follow=True)``.

        As :meth:`zmqrun.Client.logs` (same chunks, markers and errors); the request is sent when the
        iteration starts.  Leaving the loop early (``break``) unsubscribes once the generator is closed
        (at once in ``async for``'s ``aclose``, else when it is garbage-collected).
        """
        if not follow:
            body = await self._call(logs_request(job_id, False))
            if body.get("text"):
                yield body["text"]
            return
        loop = self._started()
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        inboxes = self._follows.setdefault(job_id, [])
        inboxes.append(inbox)
        state = FollowState()
        try:
            seen = self._conns()
            for piece in state.feed(await self._call(logs_request(job_id, True))):
                yield piece
            since = loop.time()
            while not state.ended:
                try:
                    msg = await asyncio.wait_for(inbox.get(), WAIT_SLICE)
                except TimeoutError:
                    msg = None
                if msg is not None:
                    since = loop.time()
                    for piece in state.feed(msg):
                        yield piece
                    continue
                if self._reader is not None and self._reader.done():
                    raise ZmqrunError("the client's reader task has stopped")
                conns = self._conns()
                if conns > seen or loop.time() - max(since, self._last_rx) >= self.timeout:
                    # Reconnected (the router may have restarted) or quiet: subscribe again from where we are.
                    seen = conns
                    for piece in state.feed(await self._call(logs_request(job_id, True, state.position()))):
                        yield piece
                    since = loop.time()
        finally:
            inboxes.remove(inbox)
            if not inboxes:
                del self._follows[job_id]
                if not state.ended and not self._closed:
                    body = unfollow_body(job_id)
                    body["req"] = next(self._req)  # its reply finds no waiter and is dropped
                    try:
                        P.send_frames(self._sock, encode_request(P.C_LOGS, body))
                    except zmq.ZMQError:
                        pass
