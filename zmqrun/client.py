"""The synchronous zmqrun client: submit, wait, map, look up, cancel.

One DEALER socket per client (never one per job); every reply carries the
request number or job id it answers, so one receive path demultiplexes them
(pyzmq guidance: one socket per process, timeouts never cancel a recv).
Not thread-safe: use one Client per thread.
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import math
import os
import select
import socket as _socket
import time
from typing import Any, Callable, Container, Iterable, Iterator

import orjson
import zmq

from . import protocol as P
from .execute import encode_json
from .livelogs import FollowState
from .model import MAX_PRIORITY, MAX_RETRIES, JobRecord, new_job_id, parse_backoff, parse_time, valid_tag
from .security import CurveKeys, secret_suffix


_HEADERS = {cmd: P.header(P.CLIENT, cmd) for cmd in (P.C_SUBMIT, P.C_WAIT, P.C_GET, P.C_LIST, P.C_CANCEL,
                                                      P.C_STATUS, P.C_LOGS)}


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
    """A handle on a submitted job: ``id``, :meth:`result`, :meth:`get`, :meth:`cancel`, :meth:`logs`."""

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
        return self._client._wait_one(self.id, timeout)

    def get(self) -> JobRecord:
        """The job's current record (see :meth:`Client.get`)."""
        return self._client.get(self.id)

    def cancel(self) -> "CancelResult":
        """Cancel the job (see :meth:`Client.cancel`)."""
        return self._client.cancel(self.id)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """The job's output as text chunks (see :meth:`Client.logs`)."""
        return self._client.logs(self.id, follow)

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


# -- socket-free request building and reply reading, shared with zmqrun.aio.AsyncClient -----------
# Each request function validates its arguments (raising before anything is sent) and returns
# (command, body, parse): the caller sends ``body`` with a fresh "req", awaits the reply and hands
# it to ``parse``, which returns the method's value or raises its error.

Call = tuple[int, dict[str, Any], Callable[[dict[str, Any]], Any]]


def id_list(job_ids: Iterable[str]) -> list[str]:
    """``job_ids`` as a list; a lone string is refused (it would be read as one id per character)."""
    if isinstance(job_ids, (str, bytes)):
        raise TypeError("wait() takes a list of job ids; for one job use job(id).result() or wait([id])")
    return list(job_ids)


def client_settings(address: str | None, timeout: Any) -> tuple[str, float]:
    """The router address (``address``, else ``$ZMQRUN_ADDRESS``, else the default) and the checked timeout.

    Raises ValueError for a timeout that is not a positive number of seconds or an address ZeroMQ
    cannot parse.
    """
    address = address or os.environ.get("ZMQRUN_ADDRESS") or P.DEFAULT_ADDRESS
    if not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7:
        raise ValueError(f"client timeout must be a positive number of seconds, not {timeout!r}")
    P.check_endpoint(address)
    return address, timeout


def peer_identity(secure: bool = False) -> bytes:
    """A new client routing id (host, pid and 4 random bytes; at most 200 bytes).  ``secure`` (with CURVE):
    128 random bits instead, so that no other peer can claim it (see :mod:`zmqrun.security`)."""
    if secure:
        return f"c-{secret_suffix()}".encode()
    return f"c-{_socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}".encode()[:200]


def setup_client_socket(sock: zmq.Socket, curve: CurveKeys | None) -> None:
    """Apply the client DEALER options (and CURVE keys if ``curve``); closes ``sock`` and raises
    SecurityError (a ValueError) if a key file cannot be read."""
    P.configure_peer_socket(sock, peer_identity(curve is not None), linger_ms=500)
    if curve is not None:
        if not isinstance(curve, CurveKeys):
            sock.close(0)
            raise TypeError("curve must be zmqrun.CurveKeys(secret_file, router_key_file) or None")
        try:
            curve.apply(sock)
        except Exception:
            sock.close(0)
            raise


def unreachable(address: str, timeout: float, why: str | None = None) -> RouterUnavailable:
    """The error for a router that no connection reached within ``timeout`` seconds (``why``: a failed
    handshake, see :meth:`ConnectionWatch.failure`)."""
    return RouterUnavailable(f"no zmqrun router reachable at {address} within {timeout:g} s"
                             + (f": {why}" if why else ""))


def no_answer(address: str, timeout: float) -> RouterUnavailable:
    """The error for a router that did not answer a request within ``timeout`` seconds."""
    return RouterUnavailable(f"the zmqrun router at {address} did not answer within {timeout:g} s")


def encode_request(cmd: int, body: dict[str, Any]) -> list[bytes]:
    """The frames of client command ``cmd`` with ``body``.

    Raises ValueError if the body exceeds the router's message limit (its MAXMSGSIZE would drop
    the connection without a word, S5), TypeError if orjson cannot encode it.
    """
    frames = [_HEADERS[cmd], orjson.dumps(body)]
    if len(frames[1]) > P.MAX_MESSAGE_SIZE - 64:
        raise ValueError(f"request of {len(frames[1]):,} bytes exceeds the router's message limit of "
                         f"{P.MAX_MESSAGE_SIZE:,} bytes; send smaller args (or smaller map batches)")
    return frames


def read_router_message(frames: list[bytes]) -> tuple[int, dict[str, Any]] | None:
    """(command, body) of a router message, or None for anything else (ignored).

    Raises orjson.JSONDecodeError if the body is not JSON.
    """
    if len(frames) != 2 or len(frames[0]) != 5 or frames[0][:4] != P.ROUTER:
        return None
    return frames[0][4], orjson.loads(frames[1])


def _finite_seconds(value: Any, name: str) -> float:
    """``value`` as float seconds; ValueError unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


def _encode_args(args: Any, max_args_bytes: int = P.MAX_ARGS_BYTES) -> dict[str, Any]:
    if args is None:
        return {}
    if type(args) is dict and not args:
        return args  # no keyword arguments (e.g. a no-op job): nothing to check, no encoding to measure
    if not isinstance(args, dict):
        raise TypeError(f"job args must be a dict of keyword arguments, not {type(args).__name__}")
    data = encode_json(args, "job args")  # raises TypeError (sets, objects, NaN, non-string keys) before any send
    if len(data) > max_args_bytes:
        raise ValueError(args_too_large(len(data), max_args_bytes))
    return args


def args_too_large(size: int, limit: int) -> str:
    """The one-line error for job args of ``size`` bytes (as JSON) over ``limit`` bytes."""
    return (f"job args are {size:,} bytes as JSON, over the limit of {limit:,} bytes (max_args_bytes; the router's "
            f"--max-args-bytes); pass large data by reference (a path or URL) instead")


def check_max_args_bytes(value: Any) -> int:
    """``value`` as the client's args limit in bytes; ValueError unless it is a positive integer."""
    if type(value) is not int or value < 1:
        raise ValueError(f"max_args_bytes must be a positive number of bytes, not {value!r}")
    return value


def job_dict(script: str, args: Any, priority: int, scheduled_for: Any, delay: Any, timeout: float | None,
             job_id: str | None, *, retries: int = 0, backoff: Any = None, tag: str | None = None,
             retry_of: str | None = None, max_args_bytes: int = P.MAX_ARGS_BYTES) -> dict[str, Any]:
    """One job as sent in a SUBMIT (a new id unless ``job_id``); the options of :meth:`Client.submit`.

    Raises ValueError for a bad script, priority, time, retry count, backoff or tag, or args over
    ``max_args_bytes`` bytes as JSON; TypeError for args orjson cannot encode.
    """
    if not isinstance(script, str) or not script:
        raise ValueError("script must be a non-empty string like package.module:function")
    if type(priority) is not int or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}, not {priority!r}")
    d: dict[str, Any] = {"id": new_job_id() if job_id is None else job_id, "script": script, "args": _encode_args(args, max_args_bytes),
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
    if retries:
        if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"retries must be an integer from 0 to {MAX_RETRIES}, not {retries!r}")
        d["retries"] = retries
    if backoff is not None:
        d["backoff"] = parse_backoff(backoff)
    if tag is not None:
        if not valid_tag(tag):
            raise ValueError(f"invalid tag {tag!r}: 1-64 characters of A-Z a-z 0-9 _ . : -, starting with a "
                             f"letter or digit")
        d["tag"] = tag
    if retry_of is not None:
        d["retry_of"] = retry_of
    return d


def retry_job_dict(record: JobRecord, max_args_bytes: int = P.MAX_ARGS_BYTES) -> dict[str, Any]:
    """A new job (new id) that re-runs the finished job ``record`` with its script, args and options
    (priority, timeout, tag, retries, backoff), due now.  Raises ValueError unless the job finished."""
    if record.status not in ("success", "failure", "canceled"):
        raise ValueError(f"job {record.id} is {record.status}: only a finished job can be retried")
    return job_dict(record.script, record.args, record.priority, None, None, record.timeout, None,
                    retries=record.retries, backoff=record.backoff, tag=record.tag, retry_of=record.id,
                    max_args_bytes=max_args_bytes)


def run_job_dict(script: str, args: Any, opts: dict[str, Any], max_args_bytes: int = P.MAX_ARGS_BYTES) -> dict[str, Any]:
    """The job of a ``run()`` call: :func:`job_dict` with ``opts`` (the submit options).

    Raises TypeError for an option submit does not take, else what :func:`job_dict` raises.
    """
    if not opts:  # the common case: the defaults, without eight pops and keyword passing
        return job_dict(script, args, 0, None, None, None, None, max_args_bytes=max_args_bytes)
    d = job_dict(script, args, opts.pop("priority", 0), opts.pop("scheduled_for", None), opts.pop("delay", None),
                 opts.pop("timeout", None), opts.pop("job_id", None), retries=opts.pop("retries", 0),
                 backoff=opts.pop("backoff", None), tag=opts.pop("tag", None), max_args_bytes=max_args_bytes)
    if opts:
        raise TypeError(f"run() got unexpected options: {', '.join(opts)}")
    return d


def check_wait_timeout(timeout: Any) -> None:
    """Raise ValueError unless ``timeout`` (seconds to wait for results) is None or a number >= 0."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise ValueError(f"a wait timeout must be None (no limit) or a number of seconds >= 0, not {timeout!r}")


def check_map_options(batch_size: int, window: int) -> None:
    """Raise ValueError unless ``batch_size`` and ``window`` (jobs) are at least 1."""
    if batch_size < 1 or window < 1:
        raise ValueError("batch_size and window must be at least 1")


def noack_submit(req: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """A SUBMIT body with ``"ack": false``: each job's result (sent once it is durable) acknowledges it,
    and the router answers the request only to refuse jobs (see :func:`rejected_outcomes`)."""
    return {"req": req, "jobs": jobs, "notify": True, "ack": False}


def lost_submits(wait_reply: dict[str, Any], noack_jobs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs to submit again after a WAIT: those the router says it does not know (``unknown``) that
    this client sent without an ACK (their SUBMIT was lost with a router that restarted).  Raises
    ZmqrunError if it does not know another one."""
    unknown = wait_reply.get("unknown") or []
    lost = [noack_jobs[j] for j in unknown if j in noack_jobs]
    if len(lost) < len(unknown):
        others = [j for j in unknown if j not in noack_jobs]
        raise ZmqrunError(f"the router does not know job(s) {', '.join(others[:5])}")
    return lost


def reply_body(cmd: int, body: dict[str, Any]) -> dict[str, Any]:
    """The body of a reply; raises RequestRejected if the router answered with an ERROR."""
    if cmd == P.R_ERROR:
        raise RequestRejected(str(body.get("error")))
    return body


def check_submit_reply(body: dict[str, Any]) -> None:
    """Raise RequestRejected if the ACK of a SUBMIT refused a job."""
    if body.get("rejected"):
        raise RequestRejected(f"job rejected: {body['rejected'][0]['error']}")


def rejected_outcomes(ids: list[str], cmd: int, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Outcomes (status "rejected") for the jobs of an ``"ack": false`` SUBMIT that the router refused.

    ``ids``: the request's job ids; ``cmd`` and ``body``: the router's answer (an ACK listing the
    refused jobs, or an ERROR refusing the whole request).
    """
    def outcome(jid: str, error: Any) -> dict[str, Any]:
        return {"id": jid, "status": "rejected", "error": {"type": "RequestRejected", "message": str(error)}}

    if cmd == P.R_ERROR or not body.get("rejected"):
        return {jid: outcome(jid, body.get("error") or "rejected") for jid in ids}
    mine = set(ids)
    out = {r["id"]: outcome(r["id"], r.get("error", "rejected")) for r in body["rejected"]
           if isinstance(r, dict) and r.get("id") in mine}
    if not out and len(ids) == 1:
        out[ids[0]] = outcome(ids[0], body["rejected"][0].get("error", "rejected"))
    return out


def outcome_value(job_id: str, outcome: dict[str, Any], return_exceptions: bool) -> Any:
    """A job's result value from its outcome; raises RequestRejected for a refused job and JobFailed for a
    failed or canceled one (unless ``return_exceptions``: then that exception is returned)."""
    if outcome["status"] == "success":
        return outcome.get("result")
    if outcome["status"] == "rejected":
        rejected = RequestRejected(f"job rejected: {outcome['error']['message']}")
        if not return_exceptions:
            raise rejected
        return rejected
    err = JobFailed(job_id, outcome["status"], outcome.get("error") or {})
    if not return_exceptions:
        raise err
    return err


def evict_unclaimed(outcomes: dict[str, Any], watching: set[str], claimed: Container[str],
                    max_unclaimed: int) -> None:
    """Drop the oldest outcomes not in ``claimed`` until at most 90 % of ``max_unclaimed`` remain.

    Safe: a later ``result()`` of an evicted id asks the router again (WAIT), which answers from its archive.
    """
    target = max_unclaimed * 9 // 10
    for jid in [j for j in outcomes if j not in claimed]:
        if len(outcomes) <= target:
            break
        del outcomes[jid]
        watching.discard(jid)


def submit_request(job: dict[str, Any]) -> Call:
    """SUBMIT of one job (from :func:`job_dict`) with an ACK; parses to the job id or raises RequestRejected."""
    def parse(body: dict[str, Any]) -> str:
        check_submit_reply(body)
        return job["id"]

    return P.C_SUBMIT, {"jobs": [job], "notify": True}, parse


def get_request(job_id: str) -> Call:
    """GET of one job; parses to its JobRecord or raises KeyError if the router does not know the id."""
    def parse(body: dict[str, Any]) -> JobRecord:
        if body.get("job") is None:
            raise KeyError(f"no job {job_id}")
        return JobRecord.from_wire(body["job"])

    return P.C_GET, {"id": job_id}, parse


def list_request(status: str | None, script: str | None, limit: int) -> Call:
    """LIST of jobs; raises ValueError unless ``limit`` is a positive integer.  Parses to JobRecords."""
    if type(limit) is not int or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    return (P.C_LIST, {"status": status, "script": script, "limit": limit},
            lambda body: [JobRecord.from_wire(d) for d in body["jobs"]])


def canceler() -> str:
    """Who cancels, as recorded in the job's error: ``user@host (pid N)``."""
    try:
        import getpass

        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "?"
    return f"{user}@{_socket.gethostname()} (pid {os.getpid()})"


def cancel_request(job_id: str, reason: str | None) -> Call:
    """CANCEL of one job (the router records who, see :func:`canceler`, and why); parses to a CancelResult."""
    return (P.C_CANCEL, {"id": job_id, "reason": reason, "by": canceler()},
            lambda body: CancelResult(bool(body.get("canceled")), body.get("status"), str(body.get("message", ""))))


def logs_request(job_id: str, follow: bool, position: list[int] | None = None) -> Call:
    """LOGS of one job (from ``position`` [attempt, characters] on, if given; with ``follow``, subscribe to
    its pushes); parses to the reply body ({status, attempt, offset, text, end}) or raises KeyError for an
    id the router does not know, TypeError for an id that is not a string."""
    if not isinstance(job_id, str):
        raise TypeError(f"job id must be a string, not {type(job_id).__name__}")

    def parse(body: dict[str, Any]) -> dict[str, Any]:
        if "job" in body and body["job"] is None:
            raise KeyError(f"no job {job_id}")
        return body

    return P.C_LOGS, {"id": job_id, "follow": follow, "from": position}, parse


def unfollow_body(job_id: str) -> dict[str, Any]:
    """The C_LOGS body that ends a follow of ``job_id`` (the router stops pushing to this client)."""
    return {"id": job_id, "stop": True}


def status_request() -> Call:
    """STATUS; parses to the status dict (without the request number)."""
    def parse(body: dict[str, Any]) -> dict[str, Any]:
        body.pop("req", None)
        return body

    return P.C_STATUS, {}, parse


# How a client rides out a router restart: a socket monitor counts completed connections (ZMTP
# handshakes).  A count that grew while a request waits for its answer means the router may have
# restarted and lost the request: it is sent again (requests are idempotent: a SUBMIT carries its job
# ids).  A count that grew while results are awaited means the new router does not know who waits:
# the client asks again (WAIT), and submits again, same ids, jobs sent without an ACK that the new
# router does not know.
WAIT_SLICE = 0.5  # seconds a waiting client sleeps at most between checks of its connection


_CONNECT_RETRIED = int(zmq.EVENT_CONNECT_RETRIED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_RCVTIMEO = int(zmq.RCVTIMEO)


class ConnectionWatch:
    """Counts the connections a DEALER completed (ZMTP handshakes), through a socket monitor.

    :meth:`connections` reads the events queued so far without blocking.  The monitor must be set
    up before the socket connects (so the first connection counts too).  Not thread-safe.
    """

    _ids = itertools.count(1)

    _FAILED = {int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "the handshake with the router failed (is --router-key "
               "the router's public key?)",
               int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "the handshake with the router failed (does it use CURVE "
               "and this client not, or the other way round? is --router-key the router's key?)",
               int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "the router refused this client's CURVE key"}

    def __init__(self, sock: zmq.Socket) -> None:
        endpoint = f"inproc://zmqrun-monitor-{os.getpid()}-{next(self._ids)}-{os.urandom(4).hex()}"
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
        for e in self._FAILED:
            events |= e
        sock.monitor(endpoint, events)
        self._sock = sock
        self._mon = sock.context.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(endpoint)
        self.fd: int = self._mon.FD  # readable (edge-style, as any ZeroMQ socket's) when events may wait
        self.count = 0
        self.retried = 0  # connection attempts that failed (refused, unreachable, unresolved host)
        self._failure: str | None = None  # the last failed handshake, until one succeeds
        # time.monotonic() when the connection dropped (the router stopped or its process died: the kernel
        # closes its end), None while connected or before the first connection
        self.down_since: float | None = None
        # See connections(): a poll of the FD, where select.poll exists (not on Windows).
        self._fd_poll = select.poll() if hasattr(select, "poll") else None
        if self._fd_poll is not None:
            self._fd_poll.register(self.fd, select.POLLIN)
        self._drained = False  # the last connections() read every event (nothing queued for us since)

    def connections(self) -> int:
        """How many connections the socket completed so far (counting the events read now)."""
        # Once per wait on the hot path.  After a drain that ended with no input, libzmq queues a
        # command for the monitor socket (its FD turns readable) as soon as a new event is written, so
        # an FD that is not readable means no new event: one poll syscall, where getsockopt(EVENTS)
        # processes commands with a poll and a getpid and looks the option up in pyzmq's enum (~1 µs more).
        if self._drained and self._fd_poll is not None and not self._fd_poll.poll(0):
            return self.count
        self._drained = False
        mon = self._mon
        while P.has_input(mon):  # plain ints, no enum arithmetic
            frames = mon.recv_multipart(zmq.NOBLOCK)
            event = int.from_bytes(frames[0][:2], "little") if frames and frames[0] else 0
            if event == _CONNECT_RETRIED:
                self.retried += 1
                continue
            if event == _DISCONNECTED:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                continue
            why = self._FAILED.get(event)
            if why is None:
                self.count += 1
                self._failure = None
                self.down_since = None
            else:
                self._failure = why
        self._drained = True
        return self.count

    def still_down(self, since: float, address: str, timeout: float) -> bool:
        """True while the connection to the router is down (it dropped, none came back); raises
        RouterUnavailable once it has been down for ``timeout`` seconds, counted from the drop or from
        ``since`` (time.monotonic(), e.g. when the caller's wait began), whichever is later.  Reads only
        what :meth:`connections` last read: callers read the monitor first."""
        down = self.down_since
        if down is None:
            return False
        if time.monotonic() - max(down, since) >= timeout:
            raise unreachable(address, timeout, self.unreachable_why()
                              or "the connection to the router dropped and none came back")
        return True

    def unreachable_why(self) -> str | None:
        """Why no connection to the router exists, for the error after a timeout: a failed handshake, or
        every connection attempt failing (nothing listening, a host that does not resolve or route)."""
        why = self.failure()
        if why is None and self.count == 0 and self.retried:
            why = ("every connection attempt failed (connection refused, or the host does not resolve or "
                   "cannot be reached): is a router running at that address?")
        return why

    def failure(self) -> str | None:
        """Why the last handshake with the router failed (e.g. an unknown CURVE key), if it did; None after a
        success."""
        self.connections()
        return self._failure

    def close(self) -> None:
        """Stop monitoring (call before closing the socket)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)


class Client:
    """A connection to a zmqrun router.

    ``address``: router endpoint (default ``$ZMQRUN_ADDRESS`` or
    tcp://127.0.0.1:5555).  ``timeout``: seconds to wait for the router to
    answer any request before raising :class:`RouterUnavailable`.  ``curve``:
    :class:`zmqrun.CurveKeys` (your secret key file, the router's public key
    file) to connect to a router that uses CURVE; a refused key raises
    RouterUnavailable naming the failed handshake.  Usable as a
    context manager; :meth:`close` releases the socket.

    Router restarts: a request whose answer was lost with a router that
    restarted is sent again once the client reconnects (within ``timeout``),
    and a waiting :meth:`Job.result` (or ``run``, ``map``, ``wait``) asks the
    new router again, so it completes once the router is back.
    """

    def __init__(self, address: str | None = None, timeout: float = 10.0, curve: CurveKeys | None = None, *,
                 max_args_bytes: int = P.MAX_ARGS_BYTES) -> None:
        self.address, self.timeout = client_settings(address, timeout)
        self.max_args_bytes = check_max_args_bytes(max_args_bytes)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        setup_client_socket(self._sock, curve)
        self._conn = ConnectionWatch(self._sock)
        self._seen_conns = 1  # connections counted by _reconnected (the first one is no reconnection)
        self._sock.connect(self.address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._rcvtimeo = -1  # the socket's RCVTIMEO in ms, as _recv_one last set it (libzmq's default: -1)
        self._req = itertools.count(1)
        self._replies: dict[int, tuple[int, dict[str, Any]]] = {}
        self._abandoned: set[int] = set()  # requests sent twice and answered: a second answer is dropped
        self._outcomes: dict[str, dict[str, Any]] = {}
        self._watching: set[str] = set()
        self._pending_submits: dict[int, list[str]] = {}  # req -> job ids of an "ack": false submit
        self._noack_jobs: dict[str, dict[str, Any]] = {}  # jobs sent without an ACK, until their outcome
        self._claimed: set[str] = set()  # ids a running wait()/map() will collect: never evicted
        self.max_unclaimed = 100_000  # outcomes kept for jobs nobody waits on yet (oldest evicted first)
        self._arrived: list[str] = []  # ids whose outcome arrived since last cleared (for map)
        self._follows: dict[str, list[collections.deque[dict[str, Any]]]] = {}  # job id -> its followers' inboxes
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (bounded linger: never hangs)."""
        if not self._closed:
            self._closed = True
            self._conn.close()
            self._sock.close(linger=500)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, cmd: int, body: dict[str, Any]) -> None:
        frames = encode_request(cmd, body)
        try:
            P.send_frames(self._sock, frames)  # connected, the common case: no deadline to compute
        except zmq.Again:
            self._send_frames(frames, time.monotonic() + self.timeout)

    def _check_open(self) -> None:
        """Raise ZmqrunError if :meth:`close` was called (instead of pyzmq's "Socket operation on non-socket")."""
        if self._closed:
            raise ZmqrunError("this Client is closed; make a new one")

    def _send_frames(self, frames: list[bytes], deadline: float) -> None:
        while True:
            try:
                P.send_frames(self._sock, frames)
                return
            except zmq.Again:
                # IMMEDIATE=1: no connection to the router yet.
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(int(left * 1000) + 1, zmq.POLLOUT):
                    raise unreachable(self.address, self.timeout, self._conn.unreachable_why()) from None

    def _pump(self, timeout_s: float) -> bool:
        """Receive and file every message that arrives within ``timeout_s``; False if none did."""
        sock = self._sock
        if not P.has_input(sock) and not self._poller.poll(max(0, int(timeout_s * 1000))):
            return False
        msgs = P.recv_ready(sock, 100_000)
        self._file(msgs)
        return bool(msgs)

    def _recv_one(self, timeout_s: float) -> bool:
        """Receive and file the next message, waiting up to ``timeout_s`` seconds for it; False if none came.

        For a wait on one job: a blocking recv (RCVTIMEO) sleeps in libzmq's own poll of its mailbox,
        where :meth:`_pump` (an EVENTS check, zmq_poll's two passes with an EVENTS check each, and the
        EVENTS check that ends its drain; each check a poll and a getpid) cost 6 more poll syscalls per
        ``run()`` (strace, warm path).  Messages are not drained: the caller loops, and a message
        already queued is returned without a syscall.
        """
        sock = self._sock
        ms = max(0, int(timeout_s * 1000))
        if ms != self._rcvtimeo:
            sock.setsockopt(_RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            # copy=False: the Frame carries libzmq's MORE flag, read in C; a getsockopt(RCVMORE) per
            # frame costs ~0.8 µs in pyzmq (it looks the option up in an enum first).
            frame = sock.recv(copy=False)
        except zmq.Again:
            return False
        frames = [frame.bytes]
        while frame.more:  # the rest of a message is there with its first frame
            frame = sock.recv(P.NOBLOCK, copy=False)
            frames.append(frame.bytes)
        if len(frames) == 2 and frames[0] == P.H_RESULT:
            self._file_results(orjson.loads(frames[1])["results"])  # the common case, read directly
        else:
            self._file((frames,))
        return True

    def _file_results(self, results: list[dict[str, Any]]) -> None:
        """File the outcomes of a RESULT message; evict the oldest unclaimed ones past ``max_unclaimed``."""
        outcomes, arrived = self._outcomes, self._arrived
        for r in results:
            outcomes[r["id"]] = r
            arrived.append(r["id"])
        if len(outcomes) - len(self._claimed) > self.max_unclaimed:
            self._evict_unclaimed()

    def _file(self, msgs: Iterable[list[bytes]]) -> None:
        """File router messages (frames each): outcomes, log chunks for followers, request replies.

        Raises RequestRejected for a router ERROR that answers no request, orjson.JSONDecodeError for a
        body that is not JSON.
        """
        for frames in msgs:
            msg = read_router_message(frames)
            if msg is None:
                continue  # not a router message: ignore
            cmd, body = msg
            if cmd == P.R_RESULT:
                self._file_results(body["results"])
            elif cmd == P.R_LOGS:
                for inbox in self._follows.get(body.get("id"), ()):
                    inbox.append(body)
            elif cmd in (P.R_ACK, P.R_REPLY, P.R_ERROR):
                req = body.get("req")
                ids = self._pending_submits.pop(req, None) if isinstance(req, int) else None
                if ids is not None:
                    # A reply to an "ack": false submit only comes when jobs were refused.
                    refused = rejected_outcomes(ids, cmd, body)
                    self._outcomes.update(refused)
                    self._arrived.extend(refused)
                elif isinstance(req, int):
                    if req in self._abandoned:
                        self._abandoned.discard(req)  # the second answer of a request sent twice
                    else:
                        self._replies[req] = (cmd, body)
                elif cmd == P.R_ERROR:
                    raise RequestRejected(f"router error: {body.get('error')}")

    def _evict_unclaimed(self) -> None:
        """Drop the oldest outcomes nobody is waiting on, so a producer that never reads results stays bounded."""
        evict_unclaimed(self._outcomes, self._watching, self._claimed, self.max_unclaimed)

    def _should_reask(self, quiet_since: float) -> bool:
        """Between two waits for results: True if the awaited jobs should be asked about again (WAIT): a new
        connection completed (the router may have restarted and forgotten that we wait), or the router
        was silent for the client timeout since ``quiet_since`` (monotonic seconds) while connected (is
        it still there?).  Raises RouterUnavailable once the connection has been down for the client
        timeout (the socket monitor saw it drop and none come back): ~timeout after a router stops,
        instead of a quiet spell and then a question that waits a timeout more (a new-user session
        measured up to 2x).  A call that starts while the connection is down (``quiet_since`` is at or
        after the drop) gets a whole timeout of its own: a retry right after a RouterUnavailable waits
        for a restarting router instead of failing at once."""
        reconnected = self._reconnected()
        if self._conn.still_down(quiet_since, self.address, self.timeout):
            return False  # nothing can be asked without a connection: wait for one (or the timeout)
        return reconnected or time.monotonic() - quiet_since >= self.timeout

    def _reconnected(self) -> bool:
        """True if the client completed a new connection since the last call: the router may have
        restarted, and then no longer knows which outcomes to push to us (``_watching`` is cleared)."""
        n = self._conn.connections()
        if n <= self._seen_conns:
            return False
        self._seen_conns = n
        self._watching.clear()
        return True

    def _request(self, cmd: int, body: dict[str, Any], resend: bool = True) -> dict[str, Any]:
        """Send a request and return its reply body within the client timeout.

        ``resend``: send it again (same request number) if the client reconnects meanwhile, i.e.
        the router may have restarted and lost it; only for idempotent requests.
        """
        self._check_open()
        req = next(self._req)
        body["req"] = req
        frames = encode_request(cmd, body)
        deadline = time.monotonic() + self.timeout
        # Sampled before the send: a reconnection that completes after it may have cost the request.
        conns = max(self._conn.connections(), 1)
        self._send_frames(frames, deadline)
        resent = False
        try:
            while req not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    size = sum(map(len, frames))
                    if size > 1024 and resent:
                        # Sent again on a new connection and still no answer: a router drops the connection
                        # of a peer whose message exceeds its MAXMSGSIZE, which looks like silence from
                        # here, so say which limit may be the cause.
                        raise RouterUnavailable(
                            f"the zmqrun router at {self.address} did not answer within {self.timeout:g} s and "
                            f"dropped the connection after this {size:,}-byte request: is it over the "
                            f"router's --max-message-bytes?")
                    raise no_answer(self.address, self.timeout)
                if self._pump(min(left, WAIT_SLICE)) and req in self._replies:
                    break
                if resend and self._conn.connections() > conns:
                    conns = self._conn.count
                    try:
                        P.send_frames(self._sock, frames)
                        resent = True
                    except zmq.Again:
                        conns -= 1  # not connected after all: try again at the next check
            return reply_body(*self._replies.pop(req))
        finally:
            if resent:
                self._abandoned.add(req)

    def _call(self, call: Call, resend: bool = True) -> Any:
        cmd, body, parse = call
        return parse(self._request(cmd, body, resend))

    # -- jobs -----------------------------------------------------------------------------

    def submit(self, script: str, args: dict[str, Any] | None = None, *, priority: int = 0,
               scheduled_for: Any = None, delay: float | None = None, timeout: float | None = None,
               job_id: str | None = None, retries: int = 0, backoff: Any = None, tag: str | None = None) -> Job:
        """Submit one job; return once the router has made it durable.

        ``script``: ``package.module:function`` or ``path/file.py:function``.
        ``args``: JSON-serializable dict passed as keyword arguments.
        ``priority``: higher runs first.  ``scheduled_for``: epoch seconds, a
        datetime or ISO-8601 string (UTC); ``delay``: seconds from now on the
        router's clock.  ``timeout``: seconds the job may run.  ``job_id``: your
        own id (resubmitting a known id does not create a second job).
        ``retries``: a failed attempt is run again up to this many times, after
        ``backoff`` (seconds for a constant wait, or ``"exponential:1,factor=2,max=60,jitter=0.1"``,
        or a dict: see :func:`zmqrun.model.parse_backoff`; default exponential from 1 s).
        ``tag``: run only on workers started with ``--tag TAG``.

        The submit is idempotent (the job id is chosen here): if the client
        reconnects before the router's ACK (a router restart), it sends the same
        job again, and the router creates no second job.

        Raises ``TypeError`` for args orjson cannot encode (nothing is sent),
        ``ValueError`` for a bad option, :class:`RequestRejected` if the router
        refuses the job, :class:`RouterUnavailable` if it does not answer within the timeout.
        """
        d = job_dict(script, args, priority, scheduled_for, delay, timeout, job_id, retries=retries,
                     backoff=backoff, tag=tag, max_args_bytes=self.max_args_bytes)
        return self._submit_one(d)

    def _submit_one(self, d: dict[str, Any]) -> Job:
        jid = self._call(submit_request(d))
        self._watching.add(jid)
        return Job(jid, self)

    def retry(self, job_id: str) -> Job:
        """Run a finished job again as a new job (new id, due now) with the same script, args and
        options (priority, timeout, tag, retries, backoff); its record names the original in ``retry_of``.

        Raises ``KeyError`` for an unknown id, ``ValueError`` if the job has not finished, and what
        :meth:`submit` raises.
        """
        return self._submit_one(retry_job_dict(self.get(job_id), self.max_args_bytes))

    def run(self, script: str, args: dict[str, Any] | None = None, *, wait_timeout: float | None = None,
            **opts: Any) -> Any:
        """Submit one job and wait for its result (``wait_timeout`` seconds, None = no limit).

        Takes the options of :meth:`submit`; raises what :meth:`submit` and
        :meth:`Job.result` raise.  The router sends no separate ACK: the result
        comes only once the job is durable, so it acknowledges the submit too.
        """
        check_wait_timeout(wait_timeout)  # before anything is sent
        self._check_open()
        d = run_job_dict(script, args, opts, self.max_args_bytes)
        jid = d["id"]
        req = next(self._req)
        self._noack_jobs[jid] = d
        self._pending_submits[req] = [jid]
        try:
            self._send(P.C_SUBMIT, noack_submit(req, [d]))
            self._watching.add(jid)
            return self._wait_one(jid, wait_timeout)
        finally:
            self._pending_submits.pop(req, None)
            self._noack_jobs.pop(jid, None)

    def map(self, script: str, iterable: Iterable[dict[str, Any] | None], *, batch_size: int = 1000,
            window: int = 10_000, priority: int = 0, timeout: float | None = None,
            return_exceptions: bool = False, retries: int = 0, backoff: Any = None,
            tag: str | None = None) -> list[Any]:
        """Run ``script`` once per args dict; return the results in input order.

        Pipelined: jobs go out ``batch_size`` per message with up to ``window``
        jobs in flight, so throughput is not bounded by round trips.  ``retries``,
        ``backoff`` and ``tag`` apply to every job (see :meth:`submit`).  Raises
        :class:`JobFailed` for the first failed job (:class:`RequestRejected` for one the router
        refused) unless ``return_exceptions`` (then that exception is put in its place), and
        ``TypeError`` for unserializable args before anything is sent.
        """
        check_map_options(batch_size, window)
        self._check_open()
        all_jobs = [job_dict(script, a, priority, None, None, timeout, None, retries=retries, backoff=backoff,
                             tag=tag, max_args_bytes=self.max_args_bytes) for a in iterable]
        ids = [d["id"] for d in all_jobs]
        remaining = set(ids)
        self._watching.update(ids)
        self._claimed.update(ids)
        try:
            return self._map_loop(all_jobs, ids, remaining, batch_size, window, return_exceptions)
        finally:
            self._claimed.difference_update(ids)
            for jid in ids:
                self._noack_jobs.pop(jid, None)

    def _map_loop(self, all_jobs: list[dict[str, Any]], ids: list[str], remaining: set[str], batch_size: int,
                  window: int, return_exceptions: bool) -> list[Any]:
        reqs: dict[int, list[str]] = {}  # our SUBMITs (ids): sent with "ack": false, so a reply means a refusal
        sent = 0
        quiet_since = time.monotonic()
        self._arrived.clear()
        noack = self._noack_jobs
        while remaining:
            in_flight = sent - (len(ids) - len(remaining))
            while sent < len(all_jobs) and in_flight < window:
                chunk = all_jobs[sent: sent + min(batch_size, window - in_flight)]
                req = next(self._req)
                # No ACK per message: each job's result (sent once it is durable) acknowledges it,
                # which halves the messages of a per-job pipeline (batch_size=1).
                self._send(P.C_SUBMIT, noack_submit(req, chunk))
                for d in chunk:
                    noack[d["id"]] = d
                reqs[req] = [d["id"] for d in chunk]
                sent += len(chunk)
                in_flight += len(chunk)
            if self._pump(min(self.timeout, WAIT_SLICE)):
                quiet_since = time.monotonic()
            if self._replies:
                for req in [r for r in reqs if r in self._replies]:
                    cmd, body = self._replies.pop(req)
                    if not return_exceptions:
                        check_submit_reply(reply_body(cmd, body))
                        continue
                    for jid, o in rejected_outcomes(reqs[req], cmd, body).items():  # each in its place
                        self._outcomes[jid] = o
                        self._arrived.append(jid)
            remaining.difference_update(self._arrived)
            self._arrived.clear()
            if not remaining:
                break
            if self._should_reask(quiet_since):
                # Only the jobs already sent: the router does not know the others yet.  Raises
                # RouterUnavailable if the router is gone; submits again jobs a restarted router lost.
                self._reask([i for i in ids[:sent] if i in remaining])
                quiet_since = time.monotonic()
        return self._collect(ids, return_exceptions)

    def _collect(self, ids: list[str], return_exceptions: bool) -> list[Any]:
        out = []
        for jid in ids:
            o = self._outcomes.pop(jid)
            self._watching.discard(jid)
            out.append(outcome_value(jid, o, return_exceptions))
        return out

    def _reask(self, ids: list[str]) -> None:
        """Ask the router for unfinished ``ids`` again (WAIT): it pushes the outcomes it has and watches
        the rest for us.  Jobs this client sent without an ACK that the router does not know (their
        SUBMIT was lost with a router that restarted) are submitted again, same ids.  Raises
        RouterUnavailable if the router is silent, ZmqrunError for other ids it does not know."""
        ids = [i for i in ids if i not in self._outcomes]
        if not ids:
            return
        lost = lost_submits(self._request(P.C_WAIT, {"ids": ids}), self._noack_jobs)
        if lost:
            req = next(self._req)
            self._pending_submits[req] = [d["id"] for d in lost]
            self._send(P.C_SUBMIT, noack_submit(req, lost))

    def _wait_results(self, ids: list[str], timeout: float | None) -> list[Any]:
        if len(ids) == 1:
            return [self._wait_one(ids[0], timeout)]
        self._claimed.update(ids)
        try:
            return self._wait_loop(ids, timeout)
        finally:
            self._claimed.difference_update(ids)

    def _wait_one(self, jid: str, timeout: float | None) -> Any:
        """The result of job ``jid`` (what ``_wait_results([jid], timeout)[0]`` returns, raising the same).

        :meth:`_wait_loop` for one id, step for step (a reask first if ``jid`` is not watched, then after a
        reconnection or a quiet spell of the client timeout; TimeoutError after ``timeout`` seconds), with
        less work per job: the next message is most likely the result, so each step waits for one
        message in a blocking recv (:meth:`_recv_one`), and no generator or list is built per check.
        """
        check_wait_timeout(timeout)
        self._check_open()
        outcomes = self._outcomes
        self._claimed.add(jid)
        try:
            self._reconnected()
            if jid not in outcomes and jid not in self._watching:
                self._reask([jid])
                self._watching.add(jid)
            now = time.monotonic()
            deadline = None if timeout is None else now + timeout
            quiet_since = now
            self._arrived.clear()
            while jid not in outcomes:
                slice_s = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
                if deadline is not None and slice_s <= 0:
                    raise TimeoutError(f"job(s) {jid} not finished within {timeout:g} s")
                if self._recv_one(slice_s):
                    if jid in outcomes:
                        break
                    quiet_since = time.monotonic()
                if self._should_reask(quiet_since):
                    # As in _wait_loop: the router may have restarted (and forgotten that we wait), or gone.
                    self._reask([jid])
                    if jid not in outcomes:
                        self._watching.add(jid)
                    quiet_since = time.monotonic()
            self._watching.discard(jid)
            return outcome_value(jid, outcomes.pop(jid), False)
        finally:
            self._claimed.discard(jid)

    def _wait_loop(self, ids: list[str], timeout: float | None) -> list[Any]:
        check_wait_timeout(timeout)
        self._check_open()
        self._reconnected()
        missing = [i for i in ids if i not in self._outcomes]
        if missing and not all(i in self._watching for i in missing):
            self._reask(missing)
            self._watching.update(missing)
        deadline = None if timeout is None else time.monotonic() + timeout
        quiet_since = time.monotonic()
        self._arrived.clear()
        while any(i not in self._outcomes for i in ids):
            slice_s = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
            if deadline is not None and slice_s <= 0:
                raise TimeoutError(f"job(s) {', '.join(i for i in ids if i not in self._outcomes)} "
                                   f"not finished within {timeout:g} s")
            if self._pump(slice_s):
                quiet_since = time.monotonic()
            if all(i in self._outcomes for i in ids):
                break
            if self._should_reask(quiet_since):
                # A new connection: the router may have restarted and forgotten that we wait.  A quiet
                # spell: is the router still there?  Raises RouterUnavailable if it is gone.
                self._reask(ids)
                self._watching.update(i for i in ids if i not in self._outcomes)
                quiet_since = time.monotonic()
        return self._collect(ids, False)

    def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Any]:
        """Wait for several jobs by id; return their results in order (raises like :meth:`Job.result`).

        Raises TypeError if ``job_ids`` is a single string (a list of ids is expected)."""
        return self._wait_results(id_list(job_ids), timeout)

    def job(self, job_id: str) -> Job:
        """A :class:`Job` handle for an existing id (e.g. from another process)."""
        return Job(job_id, self)

    def get(self, job_id: str) -> JobRecord:
        """The full record of a live or finished job.  Raises ``KeyError`` if the router does not know the id."""
        return self._call(get_request(job_id))

    def list_jobs(self, status: str | None = None, script: str | None = None, limit: int = 50) -> list[JobRecord]:
        """Jobs newest first, filtered by ``status`` and ``script``; at most ``limit`` (logs and args omitted).

        Raises ValueError unless ``limit`` is a positive integer.
        """
        return self._call(list_request(status, script, limit))

    def cancel(self, job_id: str, reason: str | None = None) -> CancelResult:
        """Cancel a queued, scheduled or running job; ``reason`` (text) and who canceled end up in its error.

        A running job is stopped: a cold job's process is killed; a warm job's worker
        process is killed and started again (see the README, Workers).  A finished job
        is not changed (``canceled`` False, with why).
        """
        return self._call(cancel_request(job_id, reason), resend=False)

    def status(self) -> dict[str, Any]:
        """Router status: ``workers`` [{name, script, credit, in_flight, tags, untagged}], ``counts`` {queued,
        scheduled, running, finished}."""
        return self._call(status_request())

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        """A job's output (stdout and stderr) as an iterator of text chunks (not lines: a chunk may hold
        several lines or part of one).

        ``follow=False``: the logs now, as one chunk (none if empty): a finished job's archived logs, a
        running job's output streamed so far (see the README, Live logs), nothing for a queued job.
        ``follow=True``: that, then the output as the job prints it (each chunk within about 0.1-0.2 s),
        ending when the job ends; the last chunk completes the job's final logs, so the chunks joined are
        its archived logs.  If the job's attempt ends (worker lost, or a failed attempt retried) the next
        attempt's output follows after a one-line ``[zmqrun: job attempt N starts here ...]`` marker; a
        gap (output the router missed, e.g. it restarted mid-job) is marked the same way.  A router
        restart is ridden out: the follow asks the new router again and goes on.

        A generator: the request is sent on the first ``next()``.  Raises ``KeyError`` for an id the
        router does not know, :class:`RouterUnavailable` if the router stops answering (checked every
        client timeout).  Closing it early (``break``, ``close()``) unsubscribes.
        """
        if not follow:
            body = self._call(logs_request(job_id, False))
            if body.get("text"):
                yield body["text"]
            return
        inbox: collections.deque[dict[str, Any]] = collections.deque()
        inboxes = self._follows.setdefault(job_id, [])
        inboxes.append(inbox)
        state = FollowState()
        try:
            self._reconnected()
            yield from state.feed(self._call(logs_request(job_id, True)))
            quiet_since = time.monotonic()
            while not state.ended:
                if not inbox and self._pump(WAIT_SLICE):
                    quiet_since = time.monotonic()
                while inbox and not state.ended:
                    yield from state.feed(inbox.popleft())
                if state.ended:
                    break
                if self._reconnected() or time.monotonic() - quiet_since >= self.timeout:
                    # A new connection (the router may have restarted and forgotten us) or a quiet spell
                    # (is the router still there?): subscribe again from where we are.
                    yield from state.feed(self._call(logs_request(job_id, True, state.position())))
                    quiet_since = time.monotonic()
        finally:
            inboxes.remove(inbox)
            if not inboxes:
                del self._follows[job_id]
                if not state.ended and not self._closed:
                    self._unfollow(job_id)

    def _unfollow(self, job_id: str) -> None:
        """Tell the router to stop pushing ``job_id``'s output here (best effort; its reply is dropped)."""
        req = next(self._req)
        body = unfollow_body(job_id)
        body["req"] = req
        try:
            P.send_frames(self._sock, encode_request(P.C_LOGS, body))
            self._abandoned.add(req)
        except zmq.ZMQError:
            pass  # no connection: a router that restarted does not know us anyway
