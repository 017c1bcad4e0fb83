"""The dedicated worker's supervisor: liveness, timeouts and cancels that a job cannot block.

``zmqrun worker --dedicated SCRIPT`` runs this small process.  It starts a warm
CHILD process (:mod:`zmqrun._warmchild`) that imports the script once and talks
to the router for jobs and results exactly as any worker does, so the per-job
path has no extra hop.  The supervisor never runs user code; it:

- keeps the child's registration alive: HEARTBEAT (``W_SUP_HEARTBEAT``) from its
  own DEALER every heartbeat interval.  The child's READY names the
  supervisor's routing id, and the router counts the supervisor's heartbeats
  for the child.  A job that holds the GIL for minutes, or is stuck in C code,
  cannot starve them: they come from another process.
- watches the child's job board (:mod:`zmqrun.board`, shared memory the child
  writes at job start and end) every :data:`TICK` seconds, and wakes exactly at
  the deadline of a running job it has seen.  When a running job passes its
  deadline (its ``timeout``, else the worker's ``--timeout``), or the router
  sent CANCEL for it, the supervisor SIGKILLs the child's process group,
  reports the outcome (``W_SUP_EXITED``: failure ``Timeout``, or nothing for a
  cancel, which the router has already recorded) and starts a fresh child
  (re-warm: interpreter start plus the script's import).  So a timeout fires on
  time once the job is seen, and a job whose timeout is shorter than one tick
  is killed at most one tick after it started.
- notices at once a child that died on its own (Linux: a pidfd in its poll;
  elsewhere within one tick) and reports it, so the router re-queues its jobs
  without waiting for heartbeat expiry.

The report also says which job the child had started last, so the router puts
jobs it had sent ahead but the child never started back in the queue without
counting an attempt.  With ``--concurrency N > 1`` a timeout or cancel restarts
the whole child: the other jobs running in it are re-queued (attempt counted).

Liveness lag (what the router sees): a child that dies is reported at once
(one message); a worker whose supervisor dies (kill -9,
machine loss) is dropped heartbeat x liveness after its last heartbeat (3 s by
default, checked every heartbeat: at most 4 s); a child that is alive but
busy is never declared dead, however long its job runs.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket as _socket
import subprocess
import sys
import time
from typing import Any, Literal

import orjson
import zmq

from . import protocol as P
from .board import JobBoard, SlotState
from .security import CurveKeys, secret_suffix
from .livelogs import DEFAULT_MAX_LOG_BYTES, check_max_log_bytes
from .worker import check_max_result_bytes, check_worker_options

log = logging.getLogger("zmqrun.supervisor")

CONFIG_ENV = "ZMQRUN_WARM_CHILD_CONFIG"  # the warm child's settings, as JSON (see _spawn)

TICK = 0.1  # seconds between looks at the job board for jobs that started (their deadlines, cancels)
CRASH_WINDOW = 2.0  # seconds: a child that dies sooner after starting counts as a crash loop
CRASH_BACKOFF_MAX = 5.0  # seconds between restarts of a child that keeps dying
CANCELS_KEPT = 64  # canceled job ids remembered (newest)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Run a dedicated worker as supervisor + warm child until stopped; see the module docstring.

    Arguments as for :class:`zmqrun.worker.Worker`; ``timeout`` in seconds (None:
    jobs without their own timeout may run forever).  Raises ValueError for an
    invalid argument; :meth:`run` returns the process exit code (2 if the
    script cannot be imported).
    """

    def __init__(self, connect: str, script: str, concurrency: int = 1, prefetch: int | None = None,
                 heartbeat: float = P.HEARTBEAT_INTERVAL, liveness: int = P.HEARTBEAT_LIVENESS,
                 name: str | None = None, timeout: float | None = None, log_level: str = "info",
                 tags: tuple[str, ...] = (), untagged: bool | None = None, curve: CurveKeys | None = None,
                 max_result_bytes: int = P.MAX_RESULT_BYTES, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.tags, self.untagged = check_worker_options(concurrency, heartbeat, timeout, tags, untagged)
        self.max_result_bytes = check_max_result_bytes(max_result_bytes)
        self.max_log_bytes = check_max_log_bytes(max_log_bytes)
        self.connect = connect
        self.script = script
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.timeout = timeout
        self.log_level = log_level
        self.name = (name or f"w-{_socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")[:200]
        # Routing ids are 1-255 bytes: derive them from at most 200 bytes of the name (whole characters).
        self._id_base = self.name.encode()[:200].decode("utf-8", "ignore") or "w"
        self.curve = curve
        if curve is not None:
            curve.load()  # SecurityError (a ValueError) now, not in the child
            self._id_base += "~" + secret_suffix()  # unguessable routing ids (see zmqrun.security)
        self.identity = f"{self._id_base}/supervisor".encode()
        self.board = JobBoard.create(concurrency)
        self.child: subprocess.Popen[bytes] | None = None
        self.child_identity = ""
        self.generation = 0
        self._child_started = 0.0
        self._crashes = 0
        self._served = False  # some child imported the script
        self._canceled: dict[str, tuple[int, str]] = {}  # job id -> (attempt, reason); newest last
        self._stopping = 0  # signals received
        self._forwarded = 0  # of which passed on to the child
        self._exit_code = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self._last_beat = 0.0

    # -- signals --------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        """Signal-safe.  First call: the child finishes its running job and leaves (SIGTERM); second: kill it."""
        self._stopping += 1

    def _forward_stop(self) -> None:
        """Pass a stop request on to the child (from the loop, not the signal handler)."""
        if self._forwarded == self._stopping:
            return
        first = self._forwarded == 0
        self._forwarded = self._stopping
        child = self.child
        if child is not None and child.returncode is None:
            # Said at once: a long job would otherwise leave a Ctrl-C without any answer until it ends.
            if first:
                log.warning("stopping: the running job(s) finish and are reported first; signal again "
                            "(Ctrl-C) to kill them now (they go back to the queue)")
            else:
                log.warning("stopping now: killing the warm process; its running jobs go back to the queue")
            try:
                if self._stopping == 1:
                    os.kill(child.pid, signal.SIGTERM)
                else:
                    os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- child ----------------------------------------------------------------------------

    def _spawn(self) -> None:
        self.generation += 1
        self.child_identity = self._id_base if self.generation == 1 else f"{self._id_base}#{self.generation}"
        self.board.reset()
        if self._canceled:
            self.board.set_canceled(list(self._canceled))
        cfg = {"connect": self.connect, "script": self.script, "concurrency": self.concurrency,
               "prefetch": self.prefetch, "heartbeat": self.heartbeat, "liveness": self.liveness,
               "name": self.name, "identity": self.child_identity, "supervisor": self.identity.decode(),
               "timeout": self.timeout, "board_fd": self.board.fd, "parent_pid": os.getpid(),
               "log_level": self.log_level, "tags": self.tags, "untagged": self.untagged,
               "curve": self.curve.as_dict() if self.curve is not None else None,
               "max_result_bytes": self.max_result_bytes, "max_log_bytes": self.max_log_bytes}
        # The config travels in the environment, not argv: /proc/PID/cmdline is world-readable and the
        # routing ids in it must stay secret (with CURVE they guard against a handover; zmqrun.security).
        env = {**os.environ, CONFIG_ENV: orjson.dumps(cfg).decode()}
        self.child = subprocess.Popen([sys.executable, "-m", "zmqrun._warmchild"], env=env,
                                      pass_fds=(self.board.fd,), stdin=subprocess.DEVNULL, start_new_session=True)
        self._child_started = time.monotonic()
        log.debug("worker %s: started process %d (%s)", self.name, self.child.pid, self.child_identity)

    def _kill_child(self) -> int:
        child = self.child
        assert child is not None
        try:
            os.killpg(child.pid, signal.SIGKILL)  # its own session: the job's subprocesses go too
        except (ProcessLookupError, PermissionError):
            child.kill()
        return child.wait()

    def _running(self) -> list[SlotState]:
        """Jobs running in the child now (slots being written at this instant are skipped until the next tick)."""
        out = []
        for i in range(self.concurrency):
            st = self.board.read(i)
            if st is not None and st.running:
                out.append(st)
        return out

    def _started_last(self) -> tuple[str, int] | Literal[False] | None:
        """The job the (dead) child started last: (id, attempt), None if none, False if unknown."""
        if self.concurrency == 1:
            if self.board.slot_written(0) == 0:
                return None
            st = self.board.read(0)
            return False if st is None else (st.job_id, st.attempt)
        return self.board.last_handed()

    def _report_exit(self, reason: str, results: list[dict[str, Any]]) -> None:
        """Tell the router the child ended (it re-queues the child's other jobs)."""
        msg: dict[str, Any] = {"worker": self.child_identity, "reason": reason, "results": results,
                               "in_order": self.concurrency == 1}
        started = self._started_last()
        if started is not False:
            msg["started"] = list(started) if started else None
        self._send([P.H_W_SUP_EXITED, orjson.dumps(msg)])

    def _check_jobs(self) -> float | None:
        """Kill the child if a running job passed its deadline or was canceled; report; re-warm.

        Returns the earliest deadline (time.monotonic seconds) of the jobs still running, or None.
        """
        now = time.monotonic()
        running = self._running()
        timed_out = [st for st in running if st.deadline and now >= st.deadline]
        canceled = [st for st in running if self._canceled.get(st.job_id, (None,))[0] == st.attempt]
        if not timed_out and not canceled:
            return min((st.deadline for st in running if st.deadline), default=None)
        pid = self.child.pid  # type: ignore[union-attr]
        code = self._kill_child()
        # The child is dead: the board is final.  Report only jobs still running at the kill.
        final = {(st.job_id, st.attempt): st for st in self._running()}
        results = []
        end = time.time()
        for st in timed_out:
            if (st.job_id, st.attempt) in final:
                results.append({"id": st.job_id, "attempt": st.attempt, "status": "failure",
                                "error": {"type": "Timeout", "message": f"job exceeded its timeout of {st.timeout:g} s "
                                          "and was killed (the warm worker process was restarted)", "traceback": ""},
                                "logs": "", "started_at": st.started, "finished_at": end})
        what = [f"job {st.job_id} timed out" for st in timed_out] + \
               [f"job {st.job_id} was canceled ({self._canceled[st.job_id][1]})" for st in canceled]
        reason = f"worker process {pid} restarted: {'; '.join(what)}"
        log.warning("worker %s: %s (%s)", self.name, reason, _describe_exit(code))
        self._report_exit(reason, results)
        if not self._stopping:
            self._spawn()
        return None

    def _child_exited(self, code: int) -> bool:
        """The child ended by itself.  Returns True if the supervisor should exit too."""
        pid = self.child.pid  # type: ignore[union-attr]
        if self._stopping:
            if code != 0 and self.sock is not None:  # killed by a second signal: say so, jobs go back now
                self._report_exit(f"worker process {pid} stopped ({_describe_exit(code)})", [])
            return True
        if not self.board.is_serving():
            # It never got as far as importing the script: the error is on stderr already.
            if not self._served or code == 2:
                log.debug("worker %s: process %d ended before serving (%s)", self.name, pid, _describe_exit(code))
                self._exit_code = code if code > 0 else 1
                return True
        else:
            self._served = True
        reason = f"worker process {pid} died ({_describe_exit(code)})"
        log.warning("worker %s: %s; starting a new one", self.name, reason)
        if self.sock is not None:
            self._report_exit(reason, [])
        if time.monotonic() - self._child_started < CRASH_WINDOW:
            self._crashes += 1
            delay = min(CRASH_BACKOFF_MAX, 0.1 * 2 ** self._crashes) * (0.5 + 0.5 * random.random())
            self._sleep(delay)
            if self._stopping:
                return True
        else:
            self._crashes = 0
        self._spawn()
        return False

    # -- router ---------------------------------------------------------------------------

    def _open(self) -> None:
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.DEALER)
        P.configure_peer_socket(sock, self.identity, linger_ms=500)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.connect)
        self.sock = sock

    def _send(self, frames: list[bytes]) -> None:
        if self.sock is None:
            return
        # Counted when tried: a send that fails (the router is down) waits a whole interval too, instead
        # of being retried at every wake-up (that busy loop took most of a core during an outage).
        self._last_beat = time.monotonic()
        try:
            P.send_frames(self.sock, frames)
        except zmq.ZMQError:
            pass  # no connection (IMMEDIATE): the router re-queues by heartbeat expiry instead

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) < 1 or len(frames[0]) != 5 or frames[0][:4] != P.ROUTER:
            return
        if frames[0][4] != P.R_CANCEL or len(frames) < 2:
            return  # heartbeats and DISCONNECTs are for the child
        try:
            msg = orjson.loads(frames[1])
            jid, attempt = msg["id"], msg["attempt"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not isinstance(jid, str) or not isinstance(attempt, int):
            return
        log.info("worker %s: cancel of job %s (attempt %d): %s", self.name, jid, attempt, msg.get("reason"))
        self._canceled.pop(jid, None)
        self._canceled[jid] = (attempt, str(msg.get("reason") or "canceled"))
        while len(self._canceled) > CANCELS_KEPT:
            del self._canceled[next(iter(self._canceled))]
        # Not started yet: the child skips it.  Running: the next check kills the child.
        self.board.set_canceled(list(self._canceled))

    # -- loop -----------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT via :meth:`stop`); return the exit code."""
        self._spawn()
        try:
            # Until the first child has imported the script, say nothing to the router: a script that
            # does not import stops the worker with the child's error, as a plain worker would.
            while not self.board.is_serving():
                if self._stopping:
                    return 0  # the child is killed below
                code = self.child.poll()  # type: ignore[union-attr]
                if code is not None:
                    if self._child_exited(code):
                        return self._exit_code
                    continue
                time.sleep(0.005)
            self._served = True
            self._open()
            return self._loop()
        finally:
            child = self.child
            if child is not None and child.poll() is None:
                self._kill_child()
            if self.sock is not None:
                self.sock.close(linger=200)
            if self.ctx is not None:
                self.ctx.term()
            self.board.close()

    def _loop(self) -> int:
        sock = self.sock
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        pidfd, watched = -1, None
        deadline: float | None = None
        try:
            while True:
                if self._stopping:
                    self._forward_stop()
                code = self.child.poll()  # type: ignore[union-attr]
                if code is not None and self._child_exited(code):
                    return self._exit_code
                if watched is not self.child:  # a new child: wake the moment it exits
                    if pidfd >= 0:
                        poller.unregister(pidfd)
                        os.close(pidfd)
                        pidfd = -1
                    watched = self.child
                    if hasattr(os, "pidfd_open"):
                        try:
                            pidfd = os.pidfd_open(watched.pid)  # type: ignore[union-attr]
                            poller.register(pidfd, zmq.POLLIN)
                        except OSError:  # kernel without pidfds: found within one tick instead
                            pidfd = -1
                now = time.monotonic()
                wake = min(now + TICK, self._last_beat + self.heartbeat)
                if deadline is not None:
                    wake = min(wake, deadline)
                events = dict(poller.poll(max(0, int((wake - now) * 1000) + 1)))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
                for frames in P.recv_ready(sock, 1000):
                    self._on_message(frames)
                deadline = self._check_jobs() if self.child.poll() is None else None  # type: ignore[union-attr]
                if time.monotonic() - self._last_beat >= self.heartbeat:
                    self._send([P.H_W_SUP_HEARTBEAT])
        finally:
            if pidfd >= 0:
                os.close(pidfd)


def run_supervised(connect: str, script: str, **kw: Any) -> int:
    """Run a dedicated worker (supervisor + warm child) in this process until SIGTERM/SIGINT; return its exit code."""
    sup = Supervisor(connect, script, **kw)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    signal.set_wakeup_fd(sup._wake_w)
    return sup.run()
