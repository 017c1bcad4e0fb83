"""The synchronous zmqrun client: submit, wait, map, look up, cancel.

One DEALER socket per client (never one per job); every reply carries the
request number or job id it answers, so one receive path demultiplexes them
(pyzmq guidance: one socket per process, timeouts never cancel a recv).
Not thread-safe: use one Client per thread.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import os
import socket as _socket
import time
from typing import Any, Iterable

import orjson
import zmq

from . import protocol as P
from .execute import encode_json
from .model import JobRecord, new_job_id, parse_time


_HEADERS = {cmd: P.header(P.CLIENT, cmd) for cmd in (P.C_SUBMIT, P.C_WAIT, P.C_GET, P.C_LIST, P.C_CANCEL,
                                                      P.C_STATUS)}


class ZmqrunError(Exception):
    """Base class of zmqrun's errors."""


class RouterUnavailable(ZmqrunError, ConnectionError):
    """The router did not answer within the client's timeout (not running, unreachable, or overloaded)."""


class RequestRejected(ZmqrunError, ValueError):
    """The router refused a request (invalid job, unknown command); the message says why."""


class JobFailed(ZmqrunError):
    """A job ended in failure or was canceled.

    Attributes: ``job_id``, ``status`` (failure|canceled), ``type`` (the remote
    exception's type name, e.g. ``ZeroDivisionError``, or ``Timeout``,
    ``WorkerLost``, ``Canceled``), ``message`` and ``traceback`` (text).
    """

    def __init__(self, job_id: str, status: str, error: dict[str, Any]) -> None:
        self.job_id = job_id
        self.status = status
        self.type = str(error.get("type", "Error"))
        self.message = str(error.get("message", ""))
        self.traceback = str(error.get("traceback", ""))
        super().__init__(f"job {job_id} {status}: {self.type}: {self.message}")


class Job:
    """A handle on a submitted job: ``id``, :meth:`result`, :meth:`get`, :meth:`cancel`."""

    __slots__ = ("id", "_client")

    def __init__(self, job_id: str, client: "Client") -> None:
        self.id = job_id
        self._client = client

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result value.

        ``timeout`` in seconds (None: wait as long as it takes; the router's
        liveness is still checked every client timeout).  Raises
        :class:`JobFailed` if the job failed or was canceled, ``TimeoutError`` if
        ``timeout`` passes first, :class:`RouterUnavailable` if the router stops answering.
        """
        return self._client._wait_results([self.id], timeout)[0]

    def get(self) -> JobRecord:
        """The job's current record (see :meth:`Client.get`)."""
        return self._client.get(self.id)

    def cancel(self) -> "CancelResult":
        """Cancel the job (see :meth:`Client.cancel`)."""
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class CancelResult:
    """Outcome of a cancel request: ``canceled`` (bool), ``status`` (the job's status), ``message``."""

    __slots__ = ("canceled", "status", "message")

    def __init__(self, canceled: bool, status: str | None, message: str) -> None:
        self.canceled, self.status, self.message = canceled, status, message

    def __bool__(self) -> bool:
        return self.canceled

    def __repr__(self) -> str:
        return f"CancelResult(canceled={self.canceled}, status={self.status!r}, message={self.message!r})"


def _finite_seconds(value: Any, name: str) -> float:
    """``value`` as float seconds; ValueError unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


def _encode_args(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise TypeError(f"job args must be a dict of keyword arguments, not {type(args).__name__}")
    encode_json(args, "job args")  # raises TypeError (sets, objects, NaN, non-string keys) before any send
    return args


class Client:
    """A connection to a zmqrun router.

    ``address``: router endpoint (default ``$ZMQRUN_ADDRESS`` or
    tcp://127.0.0.1:5555).  ``timeout``: seconds to wait for the router to
    answer any request before raising :class:`RouterUnavailable`.  Usable as a
    context manager; :meth:`close` releases the socket.
    """

    def __init__(self, address: str | None = None, timeout: float = 10.0) -> None:
        self.address = address or os.environ.get("ZMQRUN_ADDRESS") or P.DEFAULT_ADDRESS
        if not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7:
            raise ValueError(f"client timeout must be a positive number of seconds, not {timeout!r}")
        P.check_endpoint(self.address)
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        ident = f"c-{_socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}".encode()[:200]
        P.configure_peer_socket(self._sock, ident, linger_ms=500)
        self._sock.connect(self.address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._req = itertools.count(1)
        self._replies: dict[int, tuple[int, dict[str, Any]]] = {}
        self._outcomes: dict[str, dict[str, Any]] = {}
        self._watching: set[str] = set()
        self._pending_submits: dict[int, str] = {}  # req -> job id of "ack": false submits
        self._claimed: set[str] = set()  # ids a running wait()/map() will collect: never evicted
        self.max_unclaimed = 100_000  # outcomes kept for jobs nobody waits on yet (oldest evicted first)
        self._arrived: list[str] = []  # ids whose outcome arrived since last cleared (for map)
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (bounded linger: never hangs)."""
        if not self._closed:
            self._closed = True
            self._sock.close(linger=500)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, cmd: int, body: dict[str, Any]) -> None:
        frames = [_HEADERS[cmd], orjson.dumps(body)]
        if len(frames[1]) > P.MAX_MESSAGE_SIZE - 64:
            # The router's MAXMSGSIZE would drop the connection without a word (S5): refuse it here.
            raise ValueError(f"request of {len(frames[1]):,} bytes exceeds the router's message limit of "
                             f"{P.MAX_MESSAGE_SIZE:,} bytes; send smaller args (or smaller map batches)")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                P.send_frames(self._sock, frames)
                return
            except zmq.Again:
                # IMMEDIATE=1: no connection to the router yet.
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                    raise RouterUnavailable(f"no zmqrun router reachable at {self.address} "
                                            f"within {self.timeout:g} s") from None

    def _pump(self, timeout_s: float) -> bool:
        """Receive and file every message that arrives within ``timeout_s``; False if none did."""
        sock = self._sock
        if not P.has_input(sock) and not self._poller.poll(max(0, int(timeout_s * 1000))):
            return False
        msgs = P.recv_ready(sock, 100_000)
        for frames in msgs:
            if len(frames) != 2 or len(frames[0]) != 5 or frames[0][:4] != P.ROUTER:
                continue  # not a router message: ignore
            cmd = frames[0][4]
            body = orjson.loads(frames[1])
            if cmd == P.R_RESULT:
                for r in body["results"]:
                    self._outcomes[r["id"]] = r
                    self._arrived.append(r["id"])
                if len(self._outcomes) - len(self._claimed) > self.max_unclaimed:
                    self._evict_unclaimed()
            elif cmd in (P.R_ACK, P.R_REPLY, P.R_ERROR):
                req = body.get("req")
                jid = self._pending_submits.pop(req, None) if isinstance(req, int) else None
                if jid is not None:
                    # A reply to an "ack": false submit only comes when the job was refused.
                    error = body.get("error") or (body.get("rejected") or [{}])[0].get("error", "rejected")
                    self._outcomes[jid] = {"id": jid, "status": "rejected",
                                           "error": {"type": "RequestRejected", "message": str(error)}}
                elif isinstance(req, int):
                    self._replies[req] = (cmd, body)
                elif cmd == P.R_ERROR:
                    raise RequestRejected(f"router error: {body.get('error')}")
        return bool(msgs)

    def _evict_unclaimed(self) -> None:
        """Drop the oldest outcomes nobody is waiting on, so a producer that never reads results stays
        bounded.  Safe: a later ``result()`` of an evicted id asks the router again (WAIT), which
        answers from its archive."""
        target = self.max_unclaimed * 9 // 10
        for jid in [j for j in self._outcomes if j not in self._claimed]:
            if len(self._outcomes) <= target:
                break
            del self._outcomes[jid]
            self._watching.discard(jid)

    def _request(self, cmd: int, body: dict[str, Any]) -> dict[str, Any]:
        req = next(self._req)
        body["req"] = req
        self._send(cmd, body)
        return self._await_reply(req)

    def _await_reply(self, req: int) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while req not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0 or (not self._pump(left) and req not in self._replies and time.monotonic() >= deadline):
                raise RouterUnavailable(f"the zmqrun router at {self.address} did not answer within "
                                        f"{self.timeout:g} s")
        cmd, body = self._replies.pop(req)
        if cmd == P.R_ERROR:
            raise RequestRejected(str(body.get("error")))
        return body

    # -- jobs -----------------------------------------------------------------------------

    @staticmethod
    def _job_dict(script: str, args: Any, priority: int, scheduled_for: Any, delay: float | None,
                  timeout: float | None, job_id: str | None) -> dict[str, Any]:
        if not isinstance(script, str) or not script:
            raise ValueError("script must be a non-empty string like package.module:function")
        if type(priority) is not int or not -(2**31) < priority < 2**31:
            raise ValueError(f"priority must be an integer from -2147483647 to 2147483647, not {priority!r}")
        d: dict[str, Any] = {"id": new_job_id() if job_id is None else job_id, "script": script, "args": _encode_args(args),
                             "priority": priority}
        # Checked here because orjson would send NaN and infinity as null, which reads as "not given".
        if scheduled_for is not None:
            d["scheduled_for"] = _finite_seconds(parse_time(scheduled_for), "scheduled_for")
        if delay is not None:
            if isinstance(delay, _dt.timedelta):
                delay = delay.total_seconds()
            d["delay"] = _finite_seconds(delay, "delay")
        if timeout is not None:
            d["timeout"] = _finite_seconds(timeout, "timeout")
        return d

    def submit(self, script: str, args: dict[str, Any] | None = None, *, priority: int = 0,
               scheduled_for: Any = None, delay: float | None = None, timeout: float | None = None,
               job_id: str | None = None) -> Job:
        """Submit one job; return once the router has made it durable.

        ``script``: ``package.module:function`` or ``path/file.py:function``.
        ``args``: JSON-serializable dict passed as keyword arguments.
        ``priority``: higher runs first.  ``scheduled_for``: epoch seconds, a
        datetime or ISO-8601 string (UTC); ``delay``: seconds from now on the
        router's clock.  ``timeout``: seconds the job may run.  ``job_id``: your
        own id (resubmitting a known id does not create a second job).

        Raises ``TypeError`` for args orjson cannot encode (nothing is sent),
        :class:`RequestRejected` if the router refuses the job,
        :class:`RouterUnavailable` if it does not answer within the timeout.
        """
        d = self._job_dict(script, args, priority, scheduled_for, delay, timeout, job_id)
        body = self._request(P.C_SUBMIT, {"jobs": [d], "notify": True})
        if body["rejected"]:
            raise RequestRejected(f"job rejected: {body['rejected'][0]['error']}")
        self._watching.add(d["id"])
        return Job(d["id"], self)

    def run(self, script: str, args: dict[str, Any] | None = None, *, wait_timeout: float | None = None,
            **opts: Any) -> Any:
        """Submit one job and wait for its result (``wait_timeout`` seconds, None = no limit).

        Takes the options of :meth:`submit`; raises what :meth:`submit` and
        :meth:`Job.result` raise.  The router sends no separate ACK: the result
        comes only once the job is durable, so it acknowledges the submit too.
        """
        d = self._job_dict(script, args, opts.pop("priority", 0), opts.pop("scheduled_for", None),
                           opts.pop("delay", None), opts.pop("timeout", None), opts.pop("job_id", None))
        if opts:
            raise TypeError(f"run() got unexpected options: {', '.join(opts)}")
        req = next(self._req)
        self._send(P.C_SUBMIT, {"req": req, "jobs": [d], "notify": True, "ack": False})
        self._watching.add(d["id"])
        self._pending_submits[req] = d["id"]
        try:
            return self._wait_results([d["id"]], wait_timeout)[0]
        finally:
            self._pending_submits.pop(req, None)

    def map(self, script: str, iterable: Iterable[dict[str, Any] | None], *, batch_size: int = 1000,
            window: int = 10_000, priority: int = 0, timeout: float | None = None,
            return_exceptions: bool = False) -> list[Any]:
        """Run ``script`` once per args dict; return the results in input order.

        Pipelined: jobs go out ``batch_size`` per message with up to ``window``
        jobs in flight, so throughput is not bounded by round trips.  Raises
        :class:`JobFailed` for the first failed job unless
        ``return_exceptions`` (then the JobFailed is put in its place), and
        ``TypeError`` for unserializable args before anything is sent.
        """
        if batch_size < 1 or window < 1:
            raise ValueError("batch_size and window must be at least 1")
        all_jobs = [self._job_dict(script, a, priority, None, None, timeout, None) for a in iterable]
        ids = [d["id"] for d in all_jobs]
        remaining = set(ids)
        self._watching.update(ids)
        self._claimed.update(ids)
        try:
            return self._map_loop(all_jobs, ids, remaining, batch_size, window, return_exceptions)
        finally:
            self._claimed.difference_update(ids)

    def _map_loop(self, all_jobs: list[dict[str, Any]], ids: list[str], remaining: set[str], batch_size: int,
                  window: int, return_exceptions: bool) -> list[Any]:
        reqs: set[int] = set()  # our SUBMITs: sent with "ack": false, so a reply means a refusal
        sent = 0
        quiet_since = time.monotonic()
        self._arrived.clear()
        while remaining:
            in_flight = sent - (len(ids) - len(remaining))
            while sent < len(all_jobs) and in_flight < window:
                chunk = all_jobs[sent: sent + min(batch_size, window - in_flight)]
                req = next(self._req)
                # No ACK per message: each job's result (sent once it is durable) acknowledges it,
                # which halves the messages of a per-job pipeline (batch_size=1).
                self._send(P.C_SUBMIT, {"req": req, "jobs": chunk, "notify": True, "ack": False})
                reqs.add(req)
                sent += len(chunk)
                in_flight += len(chunk)
            if self._pump(min(self.timeout, 0.5)):
                quiet_since = time.monotonic()
            if self._replies:
                for req in [r for r in reqs if r in self._replies]:
                    cmd, body = self._replies.pop(req)
                    if cmd == P.R_ERROR:
                        raise RequestRejected(str(body.get("error")))
                    if body.get("rejected"):
                        raise RequestRejected(f"job rejected: {body['rejected'][0]['error']}")
            remaining.difference_update(self._arrived)
            self._arrived.clear()
            if time.monotonic() - quiet_since >= self.timeout:
                self._check_alive(list(remaining))  # raises RouterUnavailable if the router is gone
                quiet_since = time.monotonic()
        return self._collect(ids, return_exceptions)

    def _collect(self, ids: list[str], return_exceptions: bool) -> list[Any]:
        out = []
        for jid in ids:
            o = self._outcomes.pop(jid)
            self._watching.discard(jid)
            if o["status"] == "success":
                out.append(o.get("result"))
            elif o["status"] == "rejected":
                raise RequestRejected(f"job rejected: {o['error']['message']}")
            else:
                err = JobFailed(jid, o["status"], o.get("error") or {})
                if not return_exceptions:
                    raise err
                out.append(err)
        return out

    def _check_alive(self, ids: list[str]) -> None:
        """Re-register interest in unfinished ids; raises RouterUnavailable if the router is silent."""
        missing = [i for i in ids if i not in self._outcomes]
        body = self._request(P.C_WAIT, {"ids": missing})
        if body.get("unknown"):
            raise ZmqrunError(f"the router does not know job(s) {', '.join(body['unknown'][:5])}")

    def _wait_results(self, ids: list[str], timeout: float | None) -> list[Any]:
        self._claimed.update(ids)
        try:
            return self._wait_loop(ids, timeout)
        finally:
            self._claimed.difference_update(ids)

    def _wait_loop(self, ids: list[str], timeout: float | None) -> list[Any]:
        missing = [i for i in ids if i not in self._outcomes]
        if missing and not all(i in self._watching for i in missing):
            self._check_alive(missing)
            self._watching.update(missing)
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet_since = time.monotonic()
        self._arrived.clear()
        while any(i not in self._outcomes for i in ids):
            slice_s = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
            if deadline is not None and slice_s <= 0:
                raise TimeoutError(f"job(s) {', '.join(i for i in ids if i not in self._outcomes)} "
                                   f"not finished within {timeout:g} s")
            if self._pump(slice_s):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.timeout:
                self._check_alive(ids)  # raises RouterUnavailable if the router is gone
                quiet_since = time.monotonic()
        return self._collect(ids, False)

    def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Any]:
        """Wait for several jobs by id; return their results in order (raises like :meth:`Job.result`)."""
        return self._wait_results(list(job_ids), timeout)

    def job(self, job_id: str) -> Job:
        """A :class:`Job` handle for an existing id (e.g. from another process)."""
        return Job(job_id, self)

    def get(self, job_id: str) -> JobRecord:
        """The full record of a live or finished job.  Raises ``KeyError`` if the router does not know the id."""
        body = self._request(P.C_GET, {"id": job_id})
        if body.get("job") is None:
            raise KeyError(f"no job {job_id}")
        return JobRecord.from_wire(body["job"])

    def list_jobs(self, status: str | None = None, script: str | None = None, limit: int = 50) -> list[JobRecord]:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be a positive integer, not {limit!r}")
        """Jobs newest first, filtered by ``status`` and ``script``; at most ``limit`` (logs and args omitted)."""
        body = self._request(P.C_LIST, {"status": status, "script": script, "limit": limit})
        return [JobRecord.from_wire(d) for d in body["jobs"]]

    def cancel(self, job_id: str, reason: str | None = None) -> CancelResult:
        """Cancel a queued or scheduled job.  A running or finished job is not changed (``canceled`` False, with why)."""
        body = self._request(P.C_CANCEL, {"id": job_id, "reason": reason})
        return CancelResult(bool(body.get("canceled")), body.get("status"), str(body.get("message", "")))

    def status(self) -> dict[str, Any]:
        """Router status: ``workers`` [{name, script, credit, in_flight}], ``counts`` {queued, scheduled, running, finished}."""
        st = self._request(P.C_STATUS, {})
        st.pop("req", None)
        return st
