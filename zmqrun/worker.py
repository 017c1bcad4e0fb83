"""zmqrun workers: dedicated (warm, one script imported once) and normal (cold, a fresh process per job).

Protocol (Majordomo worker side, ZeroMQ Guide ch. 4; Paranoid Pirate
heartbeating, 6/PPP): the worker connects a DEALER, sends READY with its script
(or none: any script), its tags and its credit (free slots = concurrency +
prefetch), then receives JOBS batches and answers with RESULT batches; each
result returns one credit.  Heartbeats flow both ways; a router silent for
heartbeat x liveness seconds, or a DISCONNECT from it, makes the worker close
its socket, back off (1 s doubling to 32 s, with jitter) and register again.
So does a poll that returns more than the liveness window late (this process
was frozen: SIGSTOP, a suspended VM): the router has dropped the session, so
jobs buffered in its socket meanwhile are not run (two clock reads per poll).

Result retention: every RESULT batch is numbered and kept until the router
acknowledges it (``"acked": n`` in a JOBS or HEARTBEAT body, sent once the log
holds the batch durably).  After registering again (the router restarted, or
dropped this worker), the worker re-sends every result not acknowledged yet, so
jobs it finished while the router was down are reported, not run again; the
router drops reports it already has (by job id and attempt).

Execution:
- Dedicated (``zmqrun worker --dedicated``): this :class:`Worker` runs in the
  *child* process of a supervisor (:mod:`zmqrun.supervisor`), which keeps the
  registration alive with its own heartbeats, enforces timeouts and cancels by
  killing and re-warming the child, and reports what it killed.  The child
  tells the supervisor which job runs through a shared page
  (:mod:`zmqrun.board`): a few hundred nanoseconds per job, no message.
- Dedicated, concurrency 1: the job runs inline on the loop thread (no thread
  hop on the hot path).  Without a supervisor (a Worker built in-process), a
  heartbeat thread takes the socket under a lock while a job runs; a job that
  holds the GIL for longer than the liveness window can starve it, and
  timeouts are not enforced.
- Dedicated, concurrency N > 1: a thread pool of N; output capture is per thread.
- Normal: each job is ``python -m zmqrun._coldstart`` in a new session, with
  stdout and stderr merged into the job's logs and the outcome on a separate
  pipe; the job's timeout (or the worker's ``--timeout``) kills the process
  group, and so does a CANCEL from the router.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import os
import random
import select
import signal
import socket as _socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import orjson
import zmq

from . import protocol as P
from .board import JobBoard
from .execute import error_report, install_capture, run_captured, set_output_factory
from .livelogs import DEFAULT_MAX_LOG_BYTES, JobOutput, LogPump, check_max_log_bytes
from .model import valid_tag
from .allowlist import ERROR_TYPE, ScriptPolicy
from .scripts import load_function
from .security import CurveKeys, secret_suffix

log = logging.getLogger("zmqrun.worker")

RESULT_FLUSH_COUNT = 256  # results batched per RESULT message under load
RESULT_FLUSH_SECONDS = 0.002  # ... or after this long, whichever comes first
RESULT_MESSAGE_BYTES = 16 * 1024 * 1024  # results above this size together go out in several messages
# Jobs buffered beyond running ones on a warm worker.  Deep, because per-message
# costs dominate a fast job (measured: map throughput 45k jobs/s at 32, 80k at 256);
# --prefetch 0 suits long jobs that should spread across workers.
DEFAULT_DEDICATED_PREFETCH = 256
# Bytes of results kept for re-sending until the router acknowledges them (it does within a heartbeat);
# past this the oldest batches are dropped (the newest is always kept), and the router re-runs those
# jobs if it never got them.
MAX_UNACKED_BYTES = 256 * 1024 * 1024


def _result_bytes(job: dict[str, Any], frag: bytes, started: float, finished: float, logs: str,
                  _dumps: Callable[[Any], bytes] = orjson.dumps) -> bytes:
    # One join instead of ten concatenations (measured 0.54 µs against 0.88; a % format: 0.60); no logs (the
    # common case) costs no encoding.
    return b"".join((b'{"id":', _dumps(job["id"]), b',"attempt":', _dumps(job["attempt"]), b",", frag,
                     b',"logs":', _dumps(logs) if logs else b'""', b',"started_at":', _dumps(started),
                     b',"finished_at":', _dumps(finished), b"}"))


def _error_frag(kind: str, message: str) -> bytes:
    return b'"status":"failure","error":' + orjson.dumps({"type": kind, "message": message, "traceback": ""})


_SUCCESS = b'"status":"success","result":'


def check_max_result_bytes(value: Any) -> int:
    """``value`` as a worker's result limit in bytes; ValueError unless it is a positive integer."""
    if type(value) is not int or value < 1:
        raise ValueError(f"max_result_bytes must be a positive number of bytes, not {value!r}")
    return value


def result_too_large(frag: bytes, limit: int) -> bytes:
    """``frag`` (an outcome fragment, see :func:`zmqrun.execute.run_job`) unchanged, unless it is a
    success whose result is over ``limit`` bytes as JSON: then a ``ResultTooLarge`` failure that gives
    the size and the limit.  The caller checks ``len(frag)`` first, so a small result costs one compare."""
    size = len(frag) - len(_SUCCESS)
    if size <= limit or not frag.startswith(_SUCCESS):
        return frag
    return _error_frag("ResultTooLarge", f"result is {size:,} bytes as JSON, over this worker's limit of "
                                         f"{limit:,} bytes (--max-result-bytes)")


def canceled_result(job: dict[str, Any], reason: str) -> bytes:
    """The encoded result of a job dropped before it started because the router canceled it.

    The router has already recorded the cancel; this report only returns the job's credit.
    """
    now = time.time()
    return _result_bytes(job, _error_frag("Canceled", reason), now, now, "")


def run_cold(job: dict[str, Any], python: str = sys.executable, env: dict[str, str] | None = None,
             timeout: float | None = None,
             on_start: Callable[[str, subprocess.Popen[bytes]], None] | None = None,
             output: JobOutput | None = None, max_result_bytes: int = P.MAX_RESULT_BYTES) -> bytes:
    """Run one job in a fresh Python process (the cold path); return its encoded result.

    ``timeout`` (seconds) applies when the job has none of its own.  ``on_start(job_id, proc)`` is
    called once the process exists (the worker keeps it to kill on a CANCEL).  ``output`` collects
    the process's stdout and stderr as they arrive (capped; the worker's live-log pump reads it);
    default a new :class:`~zmqrun.livelogs.JobOutput` with the default cap.  A result over
    ``max_result_bytes`` bytes as JSON becomes a ``ResultTooLarge`` failure.  Raises nothing
    for job-level problems: a crash, a timeout (kills the whole process group) or an unreadable
    outcome become a failure result.
    """
    started = time.time()
    timeout = job.get("timeout") or timeout
    out = output if output is not None else JobOutput(job["id"], job["attempt"])
    rfd, wfd = os.pipe()
    try:
        # -u: unbuffered stdout and stderr, so the job's logs keep the order it printed in.
        proc = subprocess.Popen([python, "-u", "-m", "zmqrun._coldstart", str(wfd), str(os.getpid())],
                                stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(wfd,),
                                start_new_session=True, env=env)
    except OSError as e:
        os.close(rfd)
        os.close(wfd)
        frag = b'"status":"failure","error":' + orjson.dumps(error_report(e))
        return _result_bytes(job, frag, started, time.time(), "")
    os.close(wfd)
    if on_start is not None:
        on_start(job["id"], proc)
    outcome = bytearray()
    reader = threading.Thread(target=_read_all, args=(rfd, outcome), daemon=True)
    reader.start()
    # The job's output is read as it comes (not at exit, as communicate() would), so it can stream.
    assert proc.stdout is not None and proc.stdin is not None
    out_reader = threading.Thread(target=_read_output, args=(proc.stdout, out), daemon=True)
    out_reader.start()
    _feed_stdin(proc.stdin, orjson.dumps({"script": job["script"], "args": job["args"]}))
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        timed_out = True
    reader.join(5)
    out_reader.join(5)  # bounded: a grandchild that keeps the pipe open does not hold the result back
    logs = out.text()
    if timed_out:
        frag = _error_frag("Timeout", f"job exceeded its timeout of {timeout:g} s and was killed")
    elif outcome:
        frag = result_too_large(bytes(outcome), max_result_bytes)
    else:
        frag = b'"status":"failure","error":' + orjson.dumps(
            {"type": "ProcessDied", "message": f"job process exited with code {proc.returncode} before reporting",
             "traceback": ""})
    return _result_bytes(job, frag, started, time.time(), logs)


def _read_all(fd: int, into: bytearray) -> None:
    with os.fdopen(fd, "rb") as f:
        into.extend(f.read())


def _read_output(pipe: Any, out: JobOutput) -> None:
    """Copy a cold job's stdout pipe into ``out`` as data arrives, until EOF."""
    fd = pipe.fileno()
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            out.write_bytes(data)
    except OSError:
        pass
    finally:
        pipe.close()


def _feed_stdin(pipe: Any, data: bytes) -> None:
    """Write the job to the child's stdin and close it; never blocks the caller for long: a payload
    larger than a pipe's buffer is written by a thread (the child reads it first thing)."""
    def feed() -> None:
        try:
            pipe.write(data)
        except (BrokenPipeError, OSError):
            pass  # the child died first: its exit code tells
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    if len(data) <= 60_000:  # fits in an empty pipe (64 KiB on Linux): no blocking
        feed()
    else:
        threading.Thread(target=feed, daemon=True).start()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def check_worker_options(concurrency: int, heartbeat: float, timeout: float | None, tags: tuple[str, ...],
                         untagged: bool | None) -> tuple[list[str], bool]:
    """Validate the options a worker and its supervisor share; return (tags without repeats, whether
    untagged jobs are taken too: by default only when there is no tag).  Raises ValueError."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if not (math.isfinite(heartbeat) and 0.01 <= heartbeat <= 60):
        raise ValueError(f"heartbeat must be 0.01 to 60 seconds, not {heartbeat!r}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    bad = [t for t in tags if not valid_tag(t)]
    if bad:
        raise ValueError(f"invalid tag {bad[0]!r}: 1-64 characters of A-Z a-z 0-9 _ . : -, starting with a "
                         f"letter or digit")
    unique = list(dict.fromkeys(tags))  # job tags the worker takes (worker groups)
    return unique, (not unique if untagged is None else untagged)

class Worker:
    """One worker process's runtime.

    ``connect``: the router endpoint.  ``script``: a script spec to serve warm
    (dedicated worker) or None (normal worker, cold path, any script).
    ``concurrency``: jobs run at once.  ``prefetch``: extra jobs the router may
    send ahead (credit = concurrency + prefetch).  ``heartbeat`` in seconds.
    ``timeout``: seconds a job without its own timeout may run (None: no limit);
    enforced on the cold path and, for a dedicated worker, by its supervisor.
    ``board``, ``identity``, ``supervisor``: set by :mod:`zmqrun.supervisor` for
    its child (the shared job board, this child's routing id, the supervisor's).
    ``tags``: the job tags this worker takes (worker groups); ``untagged``: whether it
    also takes untagged jobs (default: only when it has no tags).  ``curve``:
    :class:`zmqrun.security.CurveKeys` to connect to a router that uses CURVE.
    ``scripts``: a normal worker's roots (directories or module prefixes, see
    :mod:`zmqrun.allowlist`; default: the working directory).  ``max_result_bytes``: a
    job whose result is larger as JSON ends ``failure`` with ``ResultTooLarge``.  ``max_log_bytes``:
    bytes of output kept per job (the rest is dropped and counted in a marker at the
    end of its logs; see :mod:`zmqrun.livelogs`).  Raises ValueError for an invalid tag,
    root or limit.
    Raises :class:`zmqrun.scripts.ScriptError` from :meth:`start` if the script
    cannot be imported (before READY).
    """

    def __init__(self, connect: str, script: str | None = None, concurrency: int = 1,
                 prefetch: int | None = None, heartbeat: float = P.HEARTBEAT_INTERVAL,
                 liveness: int = P.HEARTBEAT_LIVENESS, name: str | None = None, timeout: float | None = None,
                 board: JobBoard | None = None, identity: str | None = None,
                 supervisor: str | None = None, tags: tuple[str, ...] = (), untagged: bool | None = None,
                 curve: CurveKeys | None = None, scripts: Sequence[str] | None = None,
                 max_result_bytes: int = P.MAX_RESULT_BYTES, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.tags, self.untagged = check_worker_options(concurrency, heartbeat, timeout, tags, untagged)
        self.max_result_bytes = check_max_result_bytes(max_result_bytes)
        self.max_log_bytes = check_max_log_bytes(max_log_bytes)
        # Running jobs' output, read by the live-log pump: pool threads' jobs by id, and the inline job's in a
        # one-item list (a store per job instead of a dict insert and delete).
        self._outputs: dict[str, JobOutput] = {}
        self._inline_output: list[JobOutput | None] = [None]
        self._pump = LogPump(connect, self._outputs, self._inline_output,
                             on_error=lambda e: log.warning("live logs stopped: %r", e),
                             secure=curve.apply if curve is not None else None)
        self.connect = connect
        self.script = script
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else (DEFAULT_DEDICATED_PREFETCH if script else 0)
        if self.prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self.credit = concurrency + self.prefetch
        self.heartbeat = heartbeat
        self.liveness = liveness
        nonce = os.urandom(3).hex()
        self.name = name or f"w-{_socket.gethostname()}-{os.getpid()}-{nonce}"
        self.identity = (identity or self.name).encode()[:255]
        self.curve = curve
        if curve is not None and identity is None:  # unguessable routing id (see zmqrun.security)
            self.identity = self.name.encode()[:200] + b"~" + secret_suffix().encode()
        # Normal worker: the scripts it may run (zmqrun.allowlist); a dedicated worker runs only its own.
        self.policy = ScriptPolicy(scripts) if script is None else None
        self._watch: Any = None  # with CURVE: the connection watch while waiting for the router
        self.timeout = timeout
        self.board = board
        self.supervisor = supervisor
        self._cancel_seq = 0  # the board's cancel list last read
        self._canceled: frozenset[str] = frozenset()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # cold path: job id -> its running process
        self._cancel_ids: set[str] = set()  # cold path: canceled while running or starting
        self._slot_of = threading.local()  # pool threads: their board slot
        self._slots_taken = itertools.count()
        self._result_prefix = (b'{"worker":' + orjson.dumps(self.name[:200]).replace(b"%", b"%%")
                               + b',"batch":%d,"results":[')
        self._result_body = self._result_prefix + b'%b]}'  # batch number, results joined by commas
        self._batch = 0  # RESULT messages numbered for the router's acknowledgements
        self._unacked: collections.deque[tuple[int, list[bytes], int]] = collections.deque()  # (n, results, bytes)
        self._unacked_bytes = 0
        self.func: Callable[..., Any] | None = None
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self._sock_lock = threading.Lock()
        self._in_job = False
        self._heartbeat_thread = False  # an inline worker without a supervisor heartbeats from a thread
        self._last_send = 0.0
        self._running = True
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._handed_back: list[str] = []  # ids of jobs dropped unstarted on stop, named in DISCONNECT
        self._results: list[bytes] = []
        self._done: collections.deque[bytes] = collections.deque()  # from pool threads
        self._active = 0  # jobs running in pool threads
        # Jobs running in pool threads (id -> attempt), named in READY so that a router that restarted, or
        # dropped this worker, gives them back to it instead of queueing them again (they would run twice).
        self._running_jobs: dict[str, int] = {}
        # [id, attempt] of jobs buffered but not started when a session ended (dropped then): named in the next
        # READY so the router queues them again without charging the attempt; cleared once a router heard it.
        self._dropped: list[list[Any]] = []
        # This process's id for the router: a DISPATCH record names it, so a restarted router can tell that
        # a job leased to this worker name which its READY does not mention never reached it (lost with
        # the old connection) and queue it again uncounted.  False once unacknowledged results were
        # dropped (MAX_UNACKED_BYTES): READY can then no longer name every job it received.
        self.incarnation = os.urandom(8).hex()
        self._received_complete = True
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._inline = script is not None and concurrency == 1

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Check the address, import the script (dedicated) and start helpers.

        Raises ValueError for an endpoint ZeroMQ cannot parse and ScriptError
        for a script that cannot be imported, both before any READY.
        """
        P.check_endpoint(self.connect)
        if self.curve is not None:
            self.curve.load()  # SecurityError (a ValueError) now rather than at each connection
        if self.script is not None:
            self.func = load_function(self.script)
            install_capture()
        if self.board is not None:
            self.board.set_serving()
        self._pump.start()
        if not self._inline:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="zmqrun-job")
        elif self.board is None:  # supervised: the supervisor's heartbeats cover long jobs
            self._heartbeat_thread = True
            threading.Thread(target=self._heartbeat_during_jobs, name="zmqrun-heartbeat", daemon=True).start()

    def stop(self, *_: Any) -> None:
        """Stop taking jobs; the loop finishes what runs, reports it, sends DISCONNECT and exits."""
        self._running = False

    def run(self) -> int:
        """Serve until stopped; reconnect with backoff whenever the router is lost. Returns an exit code.

        Backoff (Paranoid Pirate): 1 s doubling to 32 s, times a random 0.5-1.0
        jitter; reset once a session has heard from the router.
        """
        backoff = P.RECONNECT_INITIAL
        try:
            while self._running:
                outcome, heard = self._session()
                if outcome == "stopped":
                    break
                if heard:
                    backoff = P.RECONNECT_INITIAL
                    self._dropped.clear()  # that router read our READY
                if outcome in ("disconnect", "dropped this frozen worker"):
                    delay = 0.05  # the router asked us to re-register (or would have): it is alive
                else:
                    delay = backoff * (0.5 + 0.5 * random.random())
                    backoff = min(backoff * 2, P.RECONNECT_MAX)
                log.warning("router %s; registering again in %.1f s", outcome, delay)
                end = time.monotonic() + delay
                while self._running and time.monotonic() < end:
                    time.sleep(min(0.1, end - time.monotonic()))
        finally:
            log.info("worker %s stopping", self.name)
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pump.stop()
            self.ctx.term()
        return 0

    # -- one connection -------------------------------------------------------------------

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        P.configure_peer_socket(sock, self.identity, linger_ms=1000)
        if self.curve is not None:
            self.curve.apply(sock)
            from .client import ConnectionWatch

            self._watch = ConnectionWatch(sock)  # names a refused CURVE key in the warning below
        sock.connect(self.connect)
        return sock

    def _send(self, frames: list[bytes]) -> bool:
        """Send without ever blocking; False if there is no connection to the router (IMMEDIATE=1).

        A message that cannot go out is dropped: the router re-queues the jobs
        of a worker it loses, so nothing is lost, at worst run again.
        """
        try:
            P.send_frames(self.sock, frames)  # type: ignore[arg-type]
        except zmq.Again:
            return False
        self._last_send = time.monotonic()
        return True

    def _session(self) -> tuple[str, bool]:
        """One registration: returns (outcome, heard from the router); outcome is 'stopped',
        'disconnect' (the router asked us to re-register), 'went silent', or 'dropped this frozen
        worker' (this process did not run for longer than the liveness window: the router has given
        up on it)."""
        self.sock = sock = self._open()
        # Jobs buffered but not started are dropped with the old session (the router may have restarted, or
        # given them to another worker); the READY below names them, so they are not charged an attempt.
        self._dropped.extend([job["id"], job["attempt"]] for job in self._pending)
        self._pending.clear()
        # Results the last router never acknowledged go out again right after READY.
        self._results = [r for _, batch, _ in self._unacked for r in batch] + self._results
        self._unacked.clear()
        self._unacked_bytes = 0
        # IMMEDIATE=1: READY waits until a connection to the router exists.
        started, next_warning = time.monotonic(), 5.0
        refused = False
        while self._running and not sock.poll(100, zmq.POLLOUT):
            waited = time.monotonic() - started
            if self._watch is not None and not refused and (why := self._watch.failure()):
                refused = True
                log.error("cannot connect to the router at %s: %s; still trying", self.connect, why)
            if waited >= next_warning:
                why = self._watch.failure() if self._watch is not None else None
                log.warning("no router reachable at %s yet (%.0f s)%s; still trying", self.connect, waited,
                            f": {why}" if why else "")
                next_warning += 30.0
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if not self._running:
            sock.close(0)
            return "stopped", False
        self._sock_lock.acquire()
        try:
            # Built now, after the wait for a connection: "running" names the jobs still running at this moment.
            running = [[i, a] for i, a in list(self._running_jobs.items())]
            ready_msg = {"script": self.script, "credit": self.credit, "heartbeat": self.heartbeat,
                         "name": self.name, "pid": os.getpid(), "supervisor": self.supervisor,
                         "tags": self.tags, "untagged": self.untagged, "running": running,
                         "unstarted": self._dropped, "incarnation": self.incarnation}
            if self._received_complete:
                # With "running" and "unstarted": every job this process received that the router may
                # still count as running (results it re-sends now, or that pool threads finished; read
                # after "running", see _run_pooled).  Any other job leased to it never reached it.
                try:
                    ready_msg["received"] = [orjson.loads(r)["id"] for r in (*self._results, *list(self._done))]
                except (ValueError, KeyError, TypeError):  # never expected; without the list nothing is given back
                    log.warning("could not list the results to re-send; the router will wait out its lease")
            ready = orjson.dumps(ready_msg)
            self._send([P.H_W_READY, ready])
            if self._results:
                log.info("re-sending %d result(s) the router has not acknowledged", len(self._results))
                self._flush()
            log.info("worker %s registered with %s: %s, credit %d", self.name, self.connect,
                     self.script or f"scripts under {self.policy.describe()} (cold path)",  # type: ignore[union-attr]
                     self.credit)
            return self._serve(sock)
        finally:
            self._sock_lock.release()
            sock.close(linger=500)

    def _serve(self, sock: zmq.Socket) -> tuple[str, bool]:
        # An OS poll on the socket's ZMQ_FD (readable when libzmq has commands for it) and the wake pipe,
        # not zmq.Poller: zmq_poll first polls with timeout 0 and asks EVENTS again (2 system calls,
        # plus 2 in libzmq's command check) although has_input just asked, and costs pyzmq a Python
        # call chain.  Safe because EVENTS (has_input) is always asked right before blocking: it
        # processes pending commands, so a message that arrives afterwards signals the FD again.
        poller = select.poll()
        poller.register(sock.getsockopt(zmq.FD), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        monotonic, window = time.monotonic, self.heartbeat * self.liveness
        router_expires = monotonic() + window
        heard = False
        while True:
            if not self._running and not self._pending and self._active == 0:
                self._flush()
                back, self._handed_back = self._handed_back, []
                self._send([P.H_W_DISCONNECT, orjson.dumps({"unstarted": back})] if back else [P.H_W_DISCONNECT])
                return "stopped", heard
            # Skip the poll only when there is work to start right now; with every pool
            # slot busy we must block (on the socket or the wake pipe), never spin.
            can_start = self._pending and (self._inline or self._active < self.concurrency)
            ready = False  # a message is known to be waiting: recv_ready need not ask EVENTS first
            if can_start:
                events = {}
            elif P.has_input(sock):
                events, ready = {}, True
            else:
                polled = monotonic()
                wait = max(0.0, self._last_send + self.heartbeat - polled)
                until, timeout_ms = polled + wait, int(wait * 1000) + 1
                while True:
                    events = dict(poller.poll(timeout_ms))
                    if self._wake_r in events:
                        break
                    # The FD also wakes for libzmq's internal commands: as zmq_poll does, only a message (or
                    # the wake pipe, or the timeout) ends the wait.  Waking early with none would judge a
                    # router silent before the answer to what we just sent could come.
                    if P.has_input(sock):
                        ready = True
                        break
                    left = until - monotonic()
                    if left <= 0:
                        break
                    timeout_ms = int(left * 1000) + 1
                if monotonic() - polled > wait + window:
                    # This process was frozen (SIGSTOP, a suspended VM) or starved for longer than the
                    # router waits for a heartbeat: it has given up on this session and re-queued our
                    # jobs.  Jobs buffered in the socket meanwhile must not run: register again (S9).
                    return "dropped this frozen worker", heard
            msgs = P.recv_ready(sock, 10_000, ready)
            if msgs:
                heard = True
                router_expires = monotonic() + window
                for frames in msgs:
                    verdict = self._on_message(frames)
                    if verdict:
                        return verdict, heard
            elif monotonic() > router_expires:
                # Checked only after draining: the router's heartbeats queue up unread
                # while a long inline job runs, and must count before we judge it silent.
                return "went silent", heard
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            while self._done:
                self._results.append(self._done.popleft())
                self._active -= 1
            if self._pending and self._running:
                if self._inline:
                    self._run_inline()
                else:
                    board = self.board
                    while self._pending and self._active < self.concurrency:
                        job = self._pending.popleft()
                        if board is not None:
                            if self._is_canceled(job):
                                continue
                            board.handed(job["id"], job["attempt"])
                        self._active += 1
                        self._running_jobs[job["id"]] = job["attempt"]
                        self._pool.submit(self._run_pooled, job)  # type: ignore[union-attr]
            elif self._pending:
                # Stopping: unstarted jobs go back via DISCONNECT, named so their attempt is not counted.
                self._handed_back.extend(job["id"] for job in self._pending)
                self._pending.clear()
            if self._results:
                self._flush()
            if monotonic() - self._last_send >= self.heartbeat:
                self._send([P.H_W_HEARTBEAT])

    def _on_message(self, frames: list[bytes]) -> str | None:
        if frames and frames[0] == P.H_JOBS:  # the message of every job: one compare instead of the checks below
            msg = orjson.loads(frames[1])
            self._pending.extend(msg["jobs"])
            acked = msg.get("acked")
            if acked is not None:
                self._acked(acked)
            return None
        if len(frames) < 1 or len(frames[0]) != 5 or frames[0][:4] != P.ROUTER:
            log.warning("ignoring a malformed message from the router")
            return None
        cmd = frames[0][4]  # not R_JOBS: its header is H_JOBS, taken above
        if cmd == P.R_HEARTBEAT:
            if len(frames) > 1 and frames[1]:
                msg = orjson.loads(frames[1])
                if isinstance(msg, dict):
                    self._acked(msg.get("acked"))
        elif cmd == P.R_DISCONNECT:
            return "disconnect"
        elif cmd == P.R_CANCEL:
            self._on_cancel(orjson.loads(frames[1]))
        elif cmd == P.R_ERROR:
            log.error("router error: %s", orjson.loads(frames[1]).get("error"))
        return None

    def _flush(self) -> None:
        results = self._results
        if not results:
            return
        if len(results) > 1 and sum(map(len, results)) > RESULT_MESSAGE_BYTES:
            self._flush_split()
            return
        self._results = []
        batch = self._batch = self._batch + 1
        # The worker's name rides along so the router can log this body as is (the archive needs it).
        body = self._result_body % (batch, b",".join(results))
        # Sent first: the bookkeeping below can wait until the result is on its way (the latency path).
        try:
            self._send([P.H_W_RESULT, body])
        finally:
            # Kept until acknowledged, sent or not (with no router connected the send is dropped).
            self._unacked.append((batch, results, len(body)))
            self._unacked_bytes += len(body)
            while self._unacked_bytes > MAX_UNACKED_BYTES and len(self._unacked) > 1:
                self._unacked_bytes -= self._unacked.popleft()[2]
                self._received_complete = False
                log.warning("over %d bytes of results not acknowledged by the router: dropped the oldest",
                            MAX_UNACKED_BYTES)

    def _flush_split(self) -> None:
        """Send the buffered results as several RESULT messages of about RESULT_MESSAGE_BYTES each, so
        that a few large results never add up to a message over the router's MAXMSGSIZE."""
        pending, chunk, size = self._results, [], 0
        for r in pending:
            if chunk and size + len(r) > RESULT_MESSAGE_BYTES:
                self._results = chunk
                self._flush()
                chunk, size = [], 0
            chunk.append(r)
            size += len(r)
        self._results = chunk
        self._flush()

    def _on_cancel(self, msg: Any) -> None:
        """CANCEL from the router: drop the job if it waits in the buffer; on the cold path, kill its process.

        A warm job that already runs in-process cannot be interrupted here (a
        supervised worker's CANCEL goes to its supervisor instead); its result is
        then dropped by the router.
        """
        jid = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(jid, str):
            return
        reason = str(msg.get("reason") or "canceled")
        for job in self._pending:
            if job.get("id") == jid:
                self._pending.remove(job)
                self._results.append(canceled_result(job, reason))
                return
        if self.script is None:
            if len(self._cancel_ids) > 10_000:
                self._cancel_ids.clear()
            self._cancel_ids.add(jid)
            proc = self._procs.get(jid)
            if proc is not None:
                log.info("killing job %s: %s", jid, reason)
                _kill_group(proc)

    def _cold_started(self, job_id: str, proc: subprocess.Popen[bytes]) -> None:
        self._procs[job_id] = proc
        if job_id in self._cancel_ids:  # the CANCEL overtook the process start
            _kill_group(proc)

    def _is_canceled(self, job: dict[str, Any]) -> bool:
        """Supervised child: True (and the job's credit reported back) if the supervisor listed it as canceled."""
        board = self.board
        if board.cancel_seq() != self._cancel_seq:  # type: ignore[union-attr]
            got = board.canceled()  # type: ignore[union-attr]
            if got is not None:
                self._cancel_seq, self._canceled = got
        if self._canceled and job["id"] in self._canceled:
            self._results.append(canceled_result(job, "canceled before it started"))
            return True
        return False

    def _acked(self, batch: Any) -> None:
        """The router holds every RESULT batch up to number ``batch`` durably: forget those results."""
        if type(batch) is not int:
            return
        unacked = self._unacked
        while unacked and unacked[0][0] <= batch:
            self._unacked_bytes -= unacked.popleft()[2]

    # -- execution ------------------------------------------------------------------------

    def _run_inline(self) -> None:
        """Run buffered jobs on this thread; flush results when the buffer empties or a batch fills.

        Supervised: before each job, check the board's cancel list (one word
        read) and record the job's start and deadline on the board (its end:
        one word).  Results still buffered die with a child the supervisor
        kills; those jobs then run again (at-least-once).  Flushing before every
        job that has a timeout would avoid that, but costs batching: measured
        3x lower map throughput on a worker with --timeout.
        """
        func, script = self.func, self.script
        board, default_timeout = self.board, self.timeout
        current, hb = self._inline_output, self._heartbeat_thread
        set_output_factory(self._inline_output_for)
        cap = self.max_result_bytes + len(_SUCCESS)
        first_unflushed = 0.0
        try:
            while self._pending and self._running:  # stopping: unstarted jobs go back to the router
                job = self._pending.popleft()
                if job["script"] != script:
                    self._results.append(self._not_allowed(job))
                    if len(self._results) == 1:
                        first_unflushed = time.monotonic()
                    continue
                if board is not None:
                    # The cancel list is looked at only when the supervisor changed it (one word read inline).
                    if (board.cancel_seq() != self._cancel_seq or self._canceled) and self._is_canceled(job):
                        continue
                    board.begin(0, job["id"], job["attempt"], job.get("timeout") or default_timeout)
                if not hb:  # no other thread uses the socket: no lock to hand over (the common, supervised case)
                    try:
                        frag, started, finished, logs = run_captured(func, job["args"], job)  # type: ignore[arg-type]
                    finally:
                        current[0] = None
                        if board is not None:
                            board.end(0)
                else:
                    self._in_job = True
                    self._sock_lock.release()  # the heartbeat thread may use the socket meanwhile
                    try:
                        frag, started, finished, logs = run_captured(func, job["args"], job)  # type: ignore[arg-type]
                    finally:
                        current[0] = None
                        self._sock_lock.acquire()
                        self._in_job = False
                if len(frag) > cap:
                    frag = result_too_large(frag, cap - len(_SUCCESS))
                results = self._results
                results.append(_result_bytes(job, frag, started, finished, logs))
                if not self._pending:  # the buffer emptied: out now, before this loop and the caller's unwind
                    self._flush()
                elif len(results) == 1:  # a first result never fills a batch (RESULT_FLUSH_COUNT and _SECONDS > 0)
                    first_unflushed = time.monotonic()
                elif len(results) >= RESULT_FLUSH_COUNT or time.monotonic() - first_unflushed >= RESULT_FLUSH_SECONDS:
                    self._flush()
        finally:  # a stale factory would give this thread's later jobs (an in-process caller's) to this worker
            set_output_factory(None)

    def _inline_output_for(self, job: dict[str, Any]) -> JobOutput:
        """The output buffer of the inline job, made at its first write (see execute.run_captured)."""
        out = self._inline_output[0] = JobOutput(job["id"], job["attempt"], self.max_log_bytes)
        return out

    def _pooled_output_for(self, job: dict[str, Any]) -> JobOutput:
        """The output buffer of a pool thread's job, made at its first write."""
        out = self._outputs[job["id"]] = JobOutput(job["id"], job["attempt"], self.max_log_bytes)
        return out

    def _run_pooled(self, job: dict[str, Any]) -> None:
        board = self.board
        slot = -1
        try:
            why = self._why_not(job)
            if why is not None:
                data = _result_bytes(job, _error_frag(ERROR_TYPE, why), time.time(), time.time(), "")
            elif self.func is not None:
                set_output_factory(self._pooled_output_for)
                if board is not None:
                    slot = getattr(self._slot_of, "slot", -1)
                    if slot < 0:
                        slot = self._slot_of.slot = next(self._slots_taken)
                    board.begin(slot, job["id"], job["attempt"], job.get("timeout") or self.timeout)
                frag, started, finished, logs = run_captured(self.func, job["args"], job)
                frag = result_too_large(frag, self.max_result_bytes)
                data = _result_bytes(job, frag, started, finished, logs)
            else:
                try:
                    out = self._outputs[job["id"]] = JobOutput(job["id"], job["attempt"], self.max_log_bytes)
                    data = run_cold(job, timeout=self.timeout, on_start=self._cold_started, output=out,
                                    max_result_bytes=self.max_result_bytes)
                finally:
                    self._procs.pop(job["id"], None)
                    self._cancel_ids.discard(job["id"])
        except BaseException as e:  # noqa: BLE001 - never lose a job's report
            data = _result_bytes(job, b'"status":"failure","error":' + orjson.dumps(error_report(e)),
                                 time.time(), time.time(), "")
        finally:
            self._outputs.pop(job["id"], None)
            if slot >= 0:
                board.end(slot)  # type: ignore[union-attr]
        self._done.append(data)
        # Out of "running" only once its result is in _done: a READY built meanwhile names it in one of them.
        self._running_jobs.pop(job["id"], None)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def _why_not(self, job: dict[str, Any]) -> str | None:
        """None if this worker may run ``job``'s script; else why not (a ``ScriptNotAllowed`` failure)."""
        if self.policy is not None:
            return self.policy.why_not(job["script"])
        if job["script"] != self.script:
            return f"this dedicated worker runs only {self.script}, not {job['script']}"
        return None

    def _not_allowed(self, job: dict[str, Any]) -> bytes:
        now = time.time()
        return _result_bytes(job, _error_frag(ERROR_TYPE, self._why_not(job) or "not allowed"), now, now, "")

    def _heartbeat_during_jobs(self) -> None:
        """Send HEARTBEATs while the loop thread runs a long inline job (it holds no socket then)."""
        while True:
            time.sleep(self.heartbeat / 2)
            if self._in_job and time.monotonic() - self._last_send >= self.heartbeat:
                with self._sock_lock:
                    if self._in_job and self.sock is not None:
                        try:
                            self.sock.send_multipart([P.H_W_HEARTBEAT], zmq.NOBLOCK)
                            self._last_send = time.monotonic()
                        except zmq.ZMQError:
                            pass


def run_worker(connect: str, script: str | None = None, **kw: Any) -> int:
    """Run a worker in this process until SIGTERM/SIGINT; return its exit code."""
    w = Worker(connect, script, **kw)
    w.start()

    def stop(*_: Any) -> None:
        if w._running and (w._active or w._pending):  # said at once: a long job would leave a Ctrl-C unanswered
            log.warning("stopping: running jobs finish and are reported first, then the worker leaves "
                        "(kill -9 %d to stop now: its jobs go back to the queue)", os.getpid())
        w.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.set_wakeup_fd(w._wake_w)  # a signal wakes the poll at once: prompt shutdown
    return w.run()
