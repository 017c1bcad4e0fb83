"""The zmqrun router: one ROUTER endpoint for clients and workers (Majordomo, ZeroMQ Guide ch. 4).

It owns the job queue, dispatches due jobs to workers with free credit, and
appends every state change to the job log (:mod:`zmqrun.joblog`) before
acknowledging it.  The loop is a blocking ``zmq.Poller`` on the ROUTER socket
with a timeout for heartbeats, scheduled jobs and lazy syncs; each wake-up
drains the socket until EAGAIN, so one dispatch pass, one log write and at most
one fdatasync serve every message that arrived (group commit).

Durability and ordering:

- A client's SUBMIT is acknowledged (ACK) only once its SUBMIT record is
  durable for the fsync mode (``always``: after fdatasync).  Outgoing messages
  that wait for durability sit in a FIFO gated by log sequence number.
- Dispatch to a worker is *not* gated: the worker runs while the sync is in
  flight (the sync overlaps the worker hop).  A job that runs but whose SUBMIT
  never became durable was never acknowledged, so nothing acknowledged is lost.
- A result is pushed to waiting clients once the job's SUBMIT is durable, not
  its FINISH record: after a power loss (or a kill -9 before the write) in that
  window, the job runs again on restart.  This is the at-least-once contract.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import random
import signal
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson
import zmq

from . import protocol as P
from ._coldstart import _die_with_parent
from .archive import Archive, ArchiveDamaged, job_from_state, state_of, submitted_as
from .livelogs import LiveLog
from .joblog import (CANCEL, DEFAULT_SEGMENT_BYTES, DISPATCH, FINISH, REQUEUE, SUBMIT, FsyncPolicy, JobLog,
                     LogCorruption, Segment)
from .segindex import SegmentIndex, encode_index, index_name, write_index
from .snapshot import list_snapshots, load_latest, write_snapshot
from .model import (CANCELED, DEFAULT_BACKOFF, FINISHED, MAX_PRIORITY, MAX_RETRIES, QUEUED, RUNNING, STATUSES, SUCCESS,
                    parse_backoff, valid_job_id, valid_tag)
from .queue import (Job, JobQueue, WorkerSlot, apply_cancel, apply_lost, apply_result, attempt_open, job_from,
                    retry_delay)
from .scripts import ScriptError, split_spec
from .security import (RoleGuard, RouterCurve, check_bind, key_table, make_authenticator, recv_ready_auth,
                       setup_router_socket)

log = logging.getLogger("zmqrun.router")

DEFAULT_MAX_ATTEMPTS = 3
BACKLOG_RETRY = 0.005  # seconds between retries of messages held for peers at their HWM
# A finished job whose args or result took more than this (bytes per job in its message) is not kept
# in the archive's recent-jobs cache (S5): lookups read it back from the log instead.
BIG_JOB_BYTES = 64 * 1024
MAX_BACKLOG = 1_000_000  # messages held per peer at its HWM; beyond that the oldest are dropped (counted)
LEASE_CANCEL_TTL = 3600.0  # seconds a stop for a canceled leased job waits for its worker to register again
MAX_LEASE_CANCELS = 10_000  # such stops kept per worker name
_MORE, _LAST = P.MORE_NOBLOCK, P.NOBLOCK
MAX_DRAIN = 5000  # messages handled per wake-up before the loop services the log and timers
FAILED_GRACE = 1.0  # seconds a router whose log failed answers requests with the error before it exits


class BadRequest(ValueError):
    """A client request that is well-framed but invalid; its text goes back to the client."""


LIST_REBUILD_BUDGET = 100_000  # older finished jobs a LIST may read back from the log (~10 µs each here)
MAX_ERROR_CHARS = 500  # an error sent back is cut to this many characters (it may quote what was sent)


def _clip(text: str) -> str:
    """``text`` as one line of at most MAX_ERROR_CHARS (errors quote values a peer sent, which may be huge
    or hold line breaks)."""
    if "\n" in text or "\r" in text:
        text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


MAX_DELAY = 10 * 365 * 86400.0  # seconds: ten years ahead is the latest a job may be scheduled
MAX_TIMEOUT = 30 * 86400.0  # seconds
_NUMBER = (int, float)


def _finite(x: Any) -> bool:
    return type(x) in _NUMBER and math.isfinite(x)


@functools.lru_cache(maxsize=4096)
def _check_script(script: str) -> str | None:
    """None if ``script`` is a well-formed spec, else why not (cached: a handful of scripts serve most jobs)."""
    try:
        split_spec(script)
    except ScriptError as e:
        return str(e)
    return None


def normalize_job(raw: Any, now: float) -> dict[str, Any]:
    """Validate one submitted job dict and return its canonical form; raise BadRequest with one readable line.

    Input keys: ``id`` (str), ``script`` (str), ``args`` (object or null),
    ``priority`` (int), ``scheduled_for`` (epoch seconds or null), ``delay``
    (seconds or null, relative to the router's clock; not both), ``timeout``
    (seconds or null), and optionally ``tag`` (str), ``retries`` (int, 0-1000),
    ``backoff`` (see :func:`zmqrun.model.parse_backoff`; default
    :data:`zmqrun.model.DEFAULT_BACKOFF` when retries are asked for) and
    ``retry_of`` (a job id).  Times must be finite and at most ten years ahead,
    timeouts at most 30 days.  The optional keys appear in the output only when
    set, so the common job's SUBMIT record stays as small as before.  On the hot
    path of every submit: ``type(x) is`` checks (which also keep bools out of
    ints) and one compiled regex for the id.
    """
    if type(raw) is not dict:
        raise BadRequest("each job must be a JSON object")
    get = raw.get
    jid = get("id")
    if not valid_job_id(jid):
        shown = repr(jid) if len(repr(jid)) <= 80 else repr(jid)[:80] + "..."
        raise BadRequest(f"invalid job id {shown}: 1-64 characters of A-Z a-z 0-9 _ . : -, "
                         f"starting with a letter or digit")
    script = get("script")
    if type(script) is not str or not 0 < len(script) <= 1024:
        raise BadRequest("script must be a non-empty string (package.module:function or path/file.py:function)")
    why = _check_script(script)
    if why is not None:
        raise BadRequest(why)
    args = get("args")
    if args is None:
        args = {}
    elif type(args) is not dict:
        raise BadRequest("args must be a JSON object (passed as keyword arguments)")
    priority = get("priority", 0)
    if type(priority) is not int or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}")
    sched, delay, timeout = get("scheduled_for"), get("delay"), get("timeout")
    if delay is not None:
        if sched is not None:
            raise BadRequest("give delay or scheduled_for, not both")
        if not _finite(delay) or not 0 <= delay <= MAX_DELAY:
            raise BadRequest(f"delay must be a number of seconds from 0 to {MAX_DELAY:.0f}")
        sched = now + delay
    elif sched is None:
        sched = now
    elif not _finite(sched) or not 0 <= sched <= now + MAX_DELAY:
        raise BadRequest("scheduled_for must be epoch seconds between 1970 and ten years from now")
    if timeout is not None and (not _finite(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        raise BadRequest(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:.0f}")
    d = {"id": jid, "script": script, "args": args, "priority": priority, "scheduled_for": float(sched),
         "timeout": timeout, "created_at": now}
    if "tag" in raw or "retries" in raw or "backoff" in raw or "retry_of" in raw:
        _job_options(raw, d)
    return d


def _job_options(raw: dict[str, Any], d: dict[str, Any]) -> None:
    """Validate the optional job keys of ``raw`` into ``d`` (see :func:`normalize_job`)."""
    tag, retries, backoff, retry_of = raw.get("tag"), raw.get("retries"), raw.get("backoff"), raw.get("retry_of")
    if tag is not None:
        if not valid_tag(tag):
            raise BadRequest(f"invalid tag {tag!r}: 1-64 characters of A-Z a-z 0-9 _ . : -, starting with a "
                             f"letter or digit")
        d["tag"] = tag
    if retries is not None and retries != 0:
        if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
            raise BadRequest(f"retries must be an integer from 0 to {MAX_RETRIES}")
        d["retries"] = retries
    if backoff is not None or retries:
        try:
            d["backoff"] = parse_backoff(backoff) if backoff is not None else dict(DEFAULT_BACKOFF)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    if retry_of is not None:
        if not valid_job_id(retry_of):
            raise BadRequest("retry_of must be a job id")
        d["retry_of"] = retry_of


class Router:
    """The router process state: socket, queue, archive and log.

    ``bind``: a ZeroMQ endpoint (tcp://127.0.0.1:5555, ipc://...).  ``data_dir``:
    where the log lives.  ``heartbeat`` (seconds) x ``liveness`` bounds how long
    a silent worker is kept.  ``max_attempts``: lost attempts (worker gone, lease
    ended) before a job fails with WorkerLost.  ``recovery_lease``: seconds a job
    that was running when the router stopped waits, after a restart, for its
    worker to register again and report it (default heartbeat x liveness + 1 s).
    ``sndhwm``: the ROUTER socket's SNDHWM in messages per peer (0: none, the default; a peer whose
    queue is full makes sends wait in the router's own per-peer backlog, never dropped).
    Raises :class:`zmqrun.joblog.LogCorruption` or
    :class:`zmqrun.joblog.LogLocked` on start if the log cannot be used.
    """

    def __init__(self, bind: str, data_dir: str | os.PathLike[str], fsync: str | FsyncPolicy = "always",
                 heartbeat: float = P.HEARTBEAT_INTERVAL, liveness: int = P.HEARTBEAT_LIVENESS,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_message_size: int = P.MAX_MESSAGE_SIZE,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, retain_days: float | None = None,
                 retain_bytes: int | None = None, background_checkpoints: bool = True,
                 recovery_lease: float | None = None, sndhwm: int = 0, curve: RouterCurve | None = None,
                 insecure: bool = False, max_args_bytes: int = P.MAX_ARGS_BYTES) -> None:
        if not (math.isfinite(heartbeat) and 0.01 <= heartbeat <= 60) or not 1 <= liveness <= 100:
            raise ValueError("heartbeat must be 0.01 to 60 seconds and liveness 1 to 100")
        self.bind = bind
        self.data_dir = Path(data_dir)
        self.policy = fsync if isinstance(fsync, FsyncPolicy) else FsyncPolicy.parse(fsync)
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_attempts = max_attempts
        # After a restart, jobs that were running are leased this long (seconds) to the workers that ran
        # them: a worker notices the restart, registers again and re-sends its results meanwhile.
        self.recovery_lease = (heartbeat * liveness + P.RECONNECT_INITIAL if recovery_lease is None
                               else recovery_lease)
        if not (math.isfinite(self.recovery_lease) and 0 <= self.recovery_lease <= 3600):
            raise ValueError("recovery_lease must be 0 to 3600 seconds")
        self._rng = random.Random()  # retry jitter
        if type(max_message_size) is not int or max_message_size < 1024:
            raise ValueError(f"the maximum message size must be at least 1024 bytes, not {max_message_size!r} "
                             f"(--max-message-bytes)")
        if type(max_args_bytes) is not int or max_args_bytes < 1:
            raise ValueError(f"the maximum args size must be a positive number of bytes, not {max_args_bytes!r} "
                             f"(--max-args-bytes)")
        self.max_message_size = max_message_size
        self.max_args_bytes = max_args_bytes  # a job's args as JSON; a larger one is rejected in the ACK
        if segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        if retain_days is not None and not (math.isfinite(retain_days) and retain_days > 0):
            raise ValueError("retain_days must be a positive number of days")
        if retain_bytes is not None and retain_bytes <= 0:
            raise ValueError("retain_bytes must be a positive number of bytes")
        self.segment_bytes = segment_bytes
        self.retain_days = retain_days
        self.retain_bytes = retain_bytes
        # Index files and snapshots are written by a forked child (Redis BGSAVE) so the loop never waits
        # on them; tests of crash points run them inline instead.
        self.background_checkpoints = background_checkpoints
        self.queue = JobQueue()
        self.log: JobLog = None  # type: ignore[assignment]  # opened by open(), after the bind
        self.archive: Archive = None  # type: ignore[assignment]  # finished jobs, looked up from the log
        self._to_index: list[Segment] = []  # sealed segments waiting for their index file
        self._child: tuple[int, list[Segment], int | None] | None = None  # (pid, segments, snapshot seq)
        self._snap_bytes = 0  # size of the last snapshot's live state, estimated
        # What checkpoints cost the loop (fork, then opening the index files and retention), in ms of the
        # loop thread's CPU and of wall time (on an oversubscribed machine wall time also counts the time
        # the loop was descheduled, which would have delayed any iteration).
        self.checkpoints = {"count": 0, "snapshots": 0, "max_pause_ms": 0.0, "total_pause_ms": 0.0,
                            "max_wall_ms": 0.0, "total_wall_ms": 0.0}
        self._bytes_since_snap = 0  # bytes of segments sealed since the last snapshot
        self._wake_r, self._wake_w = os.pipe()  # signal.set_wakeup_fd: a signal wakes the poll at once
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._gated: collections.deque[tuple[int, bytes, list[bytes]]] = collections.deque()
        if not 0 <= sndhwm <= 10_000_000:
            raise ValueError("sndhwm must be 0 (no limit) to 10000000 messages")
        self.sndhwm = sndhwm
        # Messages to peers whose send queue was at its HWM (EAGAIN), in order; retried every iteration.
        self._backlog: dict[bytes, collections.deque[list[bytes]]] = {}
        self._big: set[str] = set()  # live jobs with large args or result: not cached once finished (S5)
        # Stops for canceled jobs that were leased after a restart to a worker (by name) that has not
        # registered again yet: sent when it does (name -> [(monotonic time, CANCEL body)]).
        self._lease_cancels: dict[str, list[tuple[float, bytes]]] = {}
        # Jobs leased after a restart -> the worker incarnation their DISPATCH record names: that worker's
        # READY lists every job it received, so the others it was leased never reached it (see _ready).
        self._lease_incarnation: dict[str, str] = {}
        self._records_at_start = 0  # log records replayed at start: status counts this process's apart
        self._supervised: dict[bytes, bytes] = {}  # supervisor routing id -> its worker's (see zmqrun.supervisor)
        self._running = False
        self._dirty = False
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.endpoint = bind
        self.stats = collections.Counter()
        # Live logs (zmqrun.livelogs): output streamed by running jobs, and who follows which job.
        self._live: dict[str, LiveLog] = {}
        self._followers: dict[str, set[bytes]] = {}
        self.late_results = 0  # reports accepted from a worker that registered again (see _results)
        # CURVE (zmqrun.security): the ZAP handler, and the role check of every message's key.
        self.curve, self.insecure = curve, insecure
        self._auth: Any = None
        self._guard: RoleGuard | None = None

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild the queue and archive: load the newest snapshot, then replay the segments after it.

        Raises :class:`LogCorruption` on mid-log damage (see :mod:`zmqrun.joblog`).
        """
        jlog = self.log
        segs = jlog.scan_segments()
        snap = load_latest(jlog.fs, self.data_dir, quarantine=True)
        after, states = snap if snap is not None else (0, [])
        # Covered: wholly at or before the snapshot (by where the next segment starts, or by the segment's
        # own index when the next one is missing, so that the gap check below names the right file).
        covered = [seg for i, seg in enumerate(segs[:-1]) if after and (
            segs[i + 1].first_seq <= after + 1 or (seg.index is not None and seg.index.last_seq <= after))]
        unindexed = [seg for seg in covered if seg.index is None]
        if unindexed:
            if segs[0].first_seq != 1:
                raise LogCorruption(unindexed[0].path, 0, "its index file is missing or damaged and older "
                                    "segments were removed by retention, so it cannot be rebuilt by replay")
            log.warning("index of %s missing or damaged: replaying the whole log to rebuild it",
                        unindexed[0].path.name)
            after, states = 0, []
        elif after:
            # Covered segments are not read, but a missing one is still a sequence gap (nothing is dropped
            # silently): each must end, by its index, right before the next begins.
            for seg, nxt in zip(covered, segs[1:]):
                if seg.index.last_seq + 1 != nxt.first_seq:  # type: ignore[union-attr]
                    raise LogCorruption(nxt.path, 0, f"sequence gap: segment starts at {nxt.first_seq}, expected "
                                        f"{seg.index.last_seq + 1} (the end of {seg.path.name} by its index)")  # type: ignore[union-attr]
        jobs = self.queue.jobs
        for d in states:
            job = job_from_state(d)
            jobs[job.id] = job
            if len(d) > 12 and (inc := d[12].get("inc")) is not None:
                self._lease_incarnation[job.id] = inc  # a running job's worker process (see _give_back_unreceived)
        self.archive = archive = Archive(jlog)
        n = 0
        for seq, rtype, payload in jlog.recover(after):
            n += 1
            rec = orjson.loads(payload)
            if rtype == SUBMIT:
                if len(payload) > BIG_JOB_BYTES * len(rec["jobs"]):
                    self._big.update(d["id"] for d in rec["jobs"])
                for d in rec["jobs"]:
                    live = jobs.get(d["id"])
                    if live is not None:
                        live.submit_seq = seq  # a SUBMIT logged again (see _relog_submits)
                    elif not archive.contains(d["id"]):
                        job = job_from(d)
                        job.submit_seq = seq
                        jobs[job.id] = job
            elif rtype == DISPATCH:
                inc = rec.get("inc")
                for jid, attempt in rec["jobs"]:
                    job = jobs.get(jid)
                    if job is not None:
                        job.status, job.attempts, job.worker, job.started_at = RUNNING, attempt, rec["worker"], rec["at"]
                        if inc is None:
                            self._lease_incarnation.pop(jid, None)
                        else:
                            self._lease_incarnation[jid] = inc
            elif rtype == FINISH:
                if len(payload) > BIG_JOB_BYTES * len(rec["results"]):
                    self._big.update(r.get("id") for r in rec["results"]
                                     if isinstance(r, dict) and type(r.get("id")) is str)
                for r in rec["results"]:
                    # Logs written before junk entries were filtered out may hold any JSON here.
                    job = jobs.get(r.get("id")) if isinstance(r, dict) and type(r.get("id")) is str else None
                    # The live path's acceptance rule: the running attempt, or a late report of the
                    # attempt a job that was put back last ran (see Router._results).
                    if job is not None and ((job.status == RUNNING and r.get("attempt") == job.attempts)
                                            or attempt_open(job, r.get("attempt"))):
                        apply_result(job, r)
                        self._archive_replayed(jobs.pop(job.id), seq)
            elif rtype == CANCEL:
                job = jobs.get(rec["id"])
                if job is not None:
                    apply_cancel(job, rec)
                    self._archive_replayed(jobs.pop(job.id), seq)
            elif rtype == REQUEUE:
                retry = rec.get("retry")
                for jid, attempt, reason, *rest in rec["jobs"]:
                    job = jobs.get(jid)
                    if job is not None and job.attempts == attempt:
                        if retry:  # [id, attempt, reason, scheduled_for, attempt error]
                            if job.status == RUNNING or attempt_open(job, attempt):
                                job.attempt_errors = [*(job.attempt_errors or ()), rest[1]]
                                job.status, job.worker, job.scheduled_for = QUEUED, None, rest[0]
                        elif rec.get("final"):
                            apply_lost(job, reason, rec["at"])
                            self._archive_replayed(jobs.pop(job.id), seq)
                        else:
                            job.status, job.worker = QUEUED, None
                            self._lease_incarnation.pop(jid, None)
                            if rec.get("unstarted"):
                                job.attempts = attempt - 1  # never started: the dispatch did not count
        now = time.time()
        live = sorted(jobs.values(), key=lambda j: j.submit_seq)
        jobs.clear()
        incarnations = self._lease_incarnation
        self._lease_incarnation = {job.id: incarnations[job.id] for job in live
                                   if job.status == RUNNING and job.id in incarnations}
        leased = 0
        for job in live:
            job.order = self.queue.next_order()
            if job.status == RUNNING:
                # Its worker may still be running it or hold its result: leased, not dispatched again,
                # until the lease ends (then it is queued again, see _beat).
                leased += 1
                self.queue.lease(job, now + self.recovery_lease)
            else:
                self.queue.add(job, now)
        # Replayed segments that are sealed get their index now; a long replay is cut short next
        # time by a snapshot (which needs a segment boundary, so the active segment is sealed too).
        jlog.start(roll=jlog.replayed_bytes >= self.segment_bytes)
        self._to_index = [seg for seg in jlog.segments[:-1] if seg.index is None]
        jlog.sealed.clear()  # start() may have sealed the replayed tail: it is in _to_index already
        self._bytes_since_snap = jlog.replayed_bytes
        if self._to_index:
            self._checkpoint(background=False)
        was = "was" if leased == 1 else "were"
        running = (f"{leased} {was} running: leased for {self.recovery_lease:g} s to their workers to report, "
                   f"queued again if none does" if leased else "none was running")
        self._records_at_start = jlog.last_seq
        log.info("recovered from %s and %d log records (%.1f MB): %d live jobs (%s), %d finished",
                 f"snapshot at {after}" if after else "the start of the log", n, jlog.replayed_bytes / 1e6,
                 len(live), running, archive.count())

    def _archive_replayed(self, job: Job, seq: int) -> None:
        # Only live dispatched jobs keep their incarnation during replay (a million finished ones must not
        # pile up in the dict: the router's RSS after a restart is a bench target).
        self._lease_incarnation.pop(job.id, None)
        self.archive.add(job, seq, self.log.segment_of(seq))
        self.archive.trim()  # the replayed records are on disk: the full jobs need not stay in memory
        if self._big:
            self._forget_big([job], seq)

    # -- checkpoints: segment index files, snapshots, retention --------------------------

    def _checkpoint(self, background: bool | None = None) -> None:
        """Write the index of every sealed segment waiting for one and, when due, a snapshot.

        Called right after a log flush that sealed a segment, so the live state
        in memory is exactly the state at the last written record (the sealed
        segment's last record): the snapshot covers it.  A snapshot is due when
        the bytes sealed since the last one reach max(segment size, last snapshot
        size) (Redis' auto-aof-rewrite rule).  In the background the work runs in
        a forked child that shares the parent's memory copy-on-write.
        """
        if self._child is not None or not self._to_index:
            return
        segs, self._to_index = self._to_index, []
        jlog = self.log
        at_boundary = segs[-1] is jlog.segments[-2] and segs[-1].last_seq == jlog.last_seq
        snap_seq = segs[-1].last_seq if at_boundary and self._bytes_since_snap >= self._snap_bytes else None
        entries = [self.archive.entries_of(seg) for seg in segs]
        if self.background_checkpoints if background is None else background:
            parent = os.getpid()
            t0 = (time.perf_counter(), time.thread_time())
            pid = os.fork()
            if pid == 0:  # the child: write files, touch no socket, leave without cleanup
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    # A router killed mid-checkpoint takes its child along (a crash at any point of the
                    # checkpoint is recoverable), so no orphan keeps the data dir's lock.
                    _die_with_parent(parent)
                    self._write_checkpoint(segs, entries, snap_seq)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(code)
            self._child = (pid, segs, snap_seq)
            self._paused(t0)
            return
        try:
            self._write_checkpoint(segs, entries, snap_seq)
        except OSError as e:
            log.error("checkpoint failed (%s); the log itself is intact, retrying at the next roll", e)
            self._to_index = segs + self._to_index
            return
        self._checkpoint_done(segs, snap_seq)

    def _write_checkpoint(self, segs: list[Segment], entries: list[dict[str, tuple[int, int]]],
                          snap_seq: int | None) -> None:
        fs, now = self.log.fs, time.time()
        for seg, ents in zip(segs, entries):
            min_submit = min((s for s, _e in ents.values()), default=seg.last_seq + 1)  # type: ignore[operator]
            data = encode_index(seg.first_seq, seg.last_seq, ((k, s, e) for k, (s, e) in ents.items()),  # type: ignore[arg-type]
                                seg.batches, min_submit, now)  # type: ignore[arg-type]
            write_index(fs, self.data_dir / index_name(seg.first_seq), data)
        if snap_seq is not None:
            incs = self._running_incarnations()
            write_snapshot(fs, self.data_dir, snap_seq,
                           [state_of(j, incs.get(j.id) if j.status == RUNNING else None)
                            for j in self.queue.jobs.values()], now)

    def _running_incarnations(self) -> dict[str, str]:
        """Job id -> the worker incarnation it was dispatched to, for every job a worker slot holds or a
        lease after a restart names: a snapshot keeps them, so a restart from it can still tell which
        leased jobs never reached a worker that registers again (the DISPATCH records are not replayed)."""
        out = dict(self._lease_incarnation)
        for w in self.queue.workers.values():
            if w.incarnation is not None:
                for jid in w.in_flight:
                    out[jid] = w.incarnation
        return out

    def _reap_child(self, block: bool = False) -> None:
        assert self._child is not None
        pid, segs, snap_seq = self._child
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 1
        if done == 0:
            return
        self._child = None
        if os.waitstatus_to_exitcode(status) != 0:
            log.error("checkpoint child failed (exit %s); the log itself is intact, retrying at the next roll",
                      os.waitstatus_to_exitcode(status))
            self._to_index = segs + self._to_index
            return
        t0 = (time.perf_counter(), time.thread_time())
        self._checkpoint_done(segs, snap_seq, verify=False)
        self._paused(t0)

    def _paused(self, t0: tuple[float, float]) -> None:
        wall, cpu = (time.perf_counter() - t0[0]) * 1000, (time.thread_time() - t0[1]) * 1000
        c = self.checkpoints
        c["total_pause_ms"] += cpu
        c["max_pause_ms"] = max(c["max_pause_ms"], cpu)
        c["total_wall_ms"] += wall
        c["max_wall_ms"] = max(c["max_wall_ms"], wall)

    def _checkpoint_done(self, segs: list[Segment], snap_seq: int | None, verify: bool = True) -> None:
        self.checkpoints["count"] += 1
        self.checkpoints["snapshots"] += snap_seq is not None
        for seg in segs:
            seg.index = SegmentIndex(self.data_dir / index_name(seg.first_seq), verify=verify)
            seg.batches = None
            self.archive.indexed(seg)
        if snap_seq is not None:
            self._bytes_since_snap = 0
            self._snap_bytes = 200 * len(self.queue.jobs)  # bytes per live job, roughly
            self._apply_retention()

    def _apply_retention(self) -> None:
        """With a retention option, remove whole old segments (log-format.md section 7): those past
        ``retain_days`` or beyond ``retain_bytes``, and those no finished job needs.  Never one the older kept snapshot does not
        cover (so falling back to it still works).  A live job's SUBMIT does not pin its segment (a job
        delayed for years would keep everything after it): the snapshots hold live jobs, and
        :meth:`_finish_batch` logs the SUBMIT again when such a job finishes."""
        if self.retain_days is None and self.retain_bytes is None:
            return  # keep everything: then a lost index file can always be rebuilt by replaying from seq 1
        jlog = self.log
        snaps = list_snapshots(jlog.fs, self.data_dir)
        if len(snaps) < 2:
            return
        horizon = snaps[-2]
        sealed = [seg for seg in jlog.segments[:-1] if seg.index is not None]
        total = sum(seg.size for seg in jlog.segments)
        now = time.time()
        for i, seg in enumerate(sealed):
            idx = seg.index
            assert idx is not None and seg.last_seq is not None
            if seg.last_seq > horizon:
                return
            later_min = min([s.index.min_submit_seq for s in sealed[i + 1:]] +  # type: ignore[union-attr]
                            self.archive.open_min_submit(), default=jlog.last_seq + 1)
            expired = (self.retain_days is not None and idx.sealed_at < now - self.retain_days * 86400) or \
                      (self.retain_bytes is not None and total > self.retain_bytes)
            unneeded = idx.n_entries == 0 and seg.last_seq < later_min
            if not (expired or unneeded):
                return
            log.info("retention: removing %s (%d finished jobs, %d bytes)", seg.path.name, idx.n_entries, seg.size)
            jlog.drop_segment(seg)
            self.archive.expire_through(seg.last_seq)
            total -= seg.size

    # -- socket -------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the ROUTER socket, then replay the log and open it for appends.

        Binding first means a busy port fails before anything touches the data
        dir, and peers that connect during recovery just wait in the socket.
        """
        check_bind(self.bind, self.curve is not None, self.insecure)
        if P.ipc_in_use(self.bind):
            raise zmq.ZMQError(zmq.EADDRINUSE)  # as a busy TCP port: "cannot bind ...: Address already in use"
        self.ctx = zmq.Context()
        s = self.ctx.socket(zmq.ROUTER)
        if self.curve is not None:
            self._start_curve(s)
        # ROUTER_MANDATORY: a send to an unknown or gone peer raises EHOSTUNREACH
        # instead of being dropped silently (S1), so a dispatch to a dead worker
        # is re-queued at once.
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ROUTER_HANDOVER: a peer that reconnects with the same identity takes
        # over its old pipe instead of being refused (S2); attempts fence stale results.
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # LINGER bounded: close never hangs on an unreachable peer (S8).
        s.setsockopt(zmq.LINGER, 1000)
        # MAXMSGSIZE: an oversize message disconnects its sender instead of exhausting memory (S5).
        s.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        # HWM 0: credit bounds what we queue to workers; results to clients are
        # bounded by what those clients submitted.  A finite HWM would make
        # libzmq drop or block (EAGAIN) behind our back.
        # (A finite --sndhwm is honoured: a full peer queue parks messages in self._backlog, see _send.)
        s.setsockopt(zmq.SNDHWM, self.sndhwm)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        # IPV6 for an IPv6 address only (tcp://[::1]:PORT; with it on, an IPv4 bind reports itself as
        # [::ffff:127.0.0.1] in LAST_ENDPOINT and status).  HANDSHAKE_IVL: a
        # connection that has not finished its ZMTP (and CURVE) handshake in 5 s is dropped (libzmq's
        # default is 30 s), so half-open junk connections cannot hold the router's descriptors for long.
        s.setsockopt(zmq.IPV6, int("[" in self.bind))
        s.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        try:
            s.bind(self.bind)
        except zmq.ZMQError:
            s.close(0)
            if self._auth is not None:
                self._auth.stop()
            raise
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock = s
        try:
            fresh = not any(self.data_dir.iterdir())
        except OSError:
            fresh = True  # missing: JobLog makes it (any other problem: JobLog's error names it)
        self.log = JobLog(self.data_dir, self.policy, self.segment_bytes)
        if fresh:  # a router started in the wrong directory (the default data dir is relative) says so
            log.info("data dir %s is new: starting with an empty job log", self.data_dir.resolve())
        self.recover()

    def _start_curve(self, s: zmq.Socket) -> None:
        """CURVE server on ``s`` with the ZAP handler started first (libzmq lets any key in while none
        runs); raises SecurityError for unusable key files."""
        assert self.curve is not None and self.ctx is not None
        try:
            table = key_table(self.curve)
            setup_router_socket(s, self.curve)
        except Exception:
            s.close(0)
            raise
        self._auth = make_authenticator(self.ctx, table)
        self._guard = RoleGuard()
        roles = collections.Counter(uid.partition(":")[0] for uid in table.values())
        log.info("CURVE on: %d client key(s), %d worker key(s), %d with both roles", roles["c"], roles["w"],
                 roles["cw"])

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish its current iteration and shut down (signal-safe)."""
        self._running = False

    def serve(self) -> int:
        """Run the loop until :meth:`stop` or a log failure; return the process exit code."""
        if self.sock is None:
            self.open()
        assert self.sock is not None
        sock, jlog = self.sock, self.log
        # zmq_poll itself, not zmq.Poller.poll: the wrapper's argument handling costs ~0.6 µs a wake-up.
        poll, poll_items = zmq.zmq_poll, [(sock, zmq.POLLIN), (self._wake_r, zmq.POLLIN)]
        self._running = True
        next_beat = time.monotonic() + self.heartbeat
        mode = self.policy.mode + (f"={self.policy.interval * 1000:g}ms" if self.policy.mode == "interval" else "")
        log.info("zmqrun router listening on %s (data dir %s, fsync %s)", self.endpoint, self.data_dir.resolve(), mode)
        code = 0
        while self._running:
            now, mono = time.time(), time.monotonic()
            wait = next_beat - mono
            promoted, next_due = self.queue.promote_due(now)
            if promoted:
                self._dirty = True
            if next_due is not None:
                wait = min(wait, next_due - now)
            sync_at = jlog.sync_due(mono)
            if jlog.failure is not None:  # a lazy sync failed: stop before taking any request
                code = self._fail_log()
                break
            if sync_at is not None:
                wait = min(wait, sync_at - mono)
            if self._dirty or self.archive.retired:
                wait = 0
            elif self._backlog:
                wait = min(wait, BACKLOG_RETRY)  # a ROUTER cannot poll one peer for POLLOUT: retry soon
            try:
                ready = poll(poll_items, max(0, int(wait * 1000) + (wait > 0)))
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:
                    continue
                raise
            if ready:
                # zmq_poll listed the socket (first, if at all) only with a whole message waiting: the drain
                # need not ask EVENTS before its first recv.
                self._drain(sock, ready[0][0] is sock)
                if len(ready) > 1 or ready[0][0] == self._wake_r:
                    os.read(self._wake_r, 512)  # a signal arrived: drain its byte(s)
            if not self._commit():
                code = self._fail_log()
                break
            if mono >= next_beat:
                self._beat(mono)
                next_beat = mono + self.heartbeat
        self._shutdown()
        return code

    def _commit(self) -> bool:
        """The second half of a loop iteration, after the drain: dispatch, write the log, send what
        waited on it, checkpoint.  Returns False if the log failed.  (Crash tests drive the router
        through :meth:`_handle` and this method, without a socket loop.)"""
        jlog = self.log
        if self._dirty:
            self._dirty = False
            self._dispatch(time.time())  # writes this iteration's records before it sends a job
        # The rest written (DISPATCH records, results) and, if an ACK or result waits on it, one fdatasync
        # for the whole iteration.
        jlog.flush(need_durable=bool(self._gated))
        if jlog.failure is not None:
            return False
        if self._gated:
            self._flush_gated()
        if self._backlog:
            self._flush_backlog()
        self.archive.trim()
        if self.archive.retired:
            t0 = (time.perf_counter(), time.thread_time())
            self.archive.release()
            self._paused(t0)
        if jlog.sealed:  # a segment was sealed just now: the state in memory is at its boundary
            self._to_index.extend(jlog.sealed)
            self._bytes_since_snap += sum(seg.size for seg in jlog.sealed)
            jlog.sealed.clear()
            self._checkpoint()
        if self._child is not None:
            self._reap_child()
            if self._child is None and self._to_index:
                self._checkpoint()  # segments sealed while the child ran: index them now (no snapshot)
        return True

    def _drain(self, sock: zmq.Socket, ready: bool = False) -> None:
        if self._guard is not None:
            return self._drain_authenticated(sock)
        msgs = P.recv_ready(sock, MAX_DRAIN, ready)
        handle = self._handle
        for frames in msgs:
            handle(frames)
        if len(msgs) == MAX_DRAIN:
            self._dirty = True  # more may be waiting; the next poll returns at once

    def _drain_authenticated(self, sock: zmq.Socket) -> None:
        """:meth:`_drain` with CURVE: each message's key must have the role its command needs (see
        :mod:`zmqrun.security`); a refused one gets an ERROR and changes nothing."""
        msgs = recv_ready_auth(sock, MAX_DRAIN)
        guard = self._guard
        handle, permits = self._handle, guard.permits  # type: ignore[union-attr]
        for frames, uid in msgs:
            if len(frames) >= 2 and len(frames[1]) == 5 and not permits(uid, frames[1]):
                why = guard.allowed(uid, frames[1][:4], frames[1][4])  # type: ignore[union-attr]
                self.stats["role_refused"] += 1
                self._error(frames[0], _request_id(frames[2]) if len(frames) > 2 else None, why or "role")
                continue
            handle(frames)
        if len(msgs) == MAX_DRAIN:
            self._dirty = True

    def _shutdown(self) -> None:
        log.info("router stopping: flushing the job log")
        if self._child is not None:
            self._reap_child(block=True)  # a checkpoint in progress is small and bounded: let it finish
        self.log.close()
        if self.log.failure is None:
            self._flush_gated()
        if self.sock is not None:
            self.sock.close(linger=200)
        if self._auth is not None:
            self._auth.stop()
        if self.ctx is not None:
            self.ctx.term()
        log.info("router stopped")

    def _fail_log(self) -> int:
        err = f"job log failed ({self.log.failure}); the router accepts no more work and stops"
        log.error(err)
        for _seq, ident, frames in self._gated:
            if frames[0] == P.H_ACK:
                req = orjson.loads(frames[1]).get("req")
                self._send(ident, [P.H_ERROR, orjson.dumps({"req": req, "error": err})])
        self._gated.clear()
        self._refuse_requests(err, FAILED_GRACE)
        return 3

    def _refuse_requests(self, err: str, seconds: float) -> None:
        """Answer every client request with ERROR ``err`` for ``seconds`` (until SIGTERM), then return.

        The ERRORs just sent must be read before our socket closes: a DEALER with IMMEDIATE drops
        unread input when its connection goes.  Requests that arrive meanwhile get the same error
        instead of a timeout.
        """
        sock = self.sock
        end = time.monotonic() + seconds
        while self._running and (left := end - time.monotonic()) > 0:
            try:
                if not sock.poll(min(100, int(left * 1000) + 1), zmq.POLLIN):  # type: ignore[union-attr]
                    continue
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:
                    continue
                raise
            for frames in P.recv_ready(sock, MAX_DRAIN):
                if len(frames) == 3 and frames[1][:4] == P.CLIENT:
                    try:
                        req = orjson.loads(frames[2]).get("req")
                    except (orjson.JSONDecodeError, AttributeError):
                        req = None
                    self._error(frames[0], req, err)

    # -- sending ------------------------------------------------------------------------

    def _send(self, ident: bytes, frames: list[bytes]) -> bool:
        """Send now; False if the peer is gone (ROUTER_MANDATORY raised EHOSTUNREACH on the first frame).

        A peer whose queue is at the socket's SNDHWM (EAGAIN, S1) is not gone: the message waits in
        the router's backlog for that peer, in order, and is sent again every loop iteration.
        """
        if self._backlog and ident in self._backlog:
            return self._hold(ident, frames)  # behind what already waits for this peer
        send = P.sender(self.sock)  # type: ignore[arg-type]
        try:
            # Plain ints, not pyzmq's enum flags: enum arithmetic costs µs per frame here.
            send(ident, _MORE)
            for f in frames[:-1]:
                send(f, _MORE)
            send(frames[-1], _LAST)
            return True
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return False
            if e.errno == zmq.EAGAIN:
                return self._hold(ident, frames)
            raise

    def _hold(self, ident: bytes, frames: list[bytes]) -> bool:
        """Keep a message for a peer at its HWM (see :meth:`_send`); True."""
        q = self._backlog.get(ident)
        if q is None:
            q = self._backlog[ident] = collections.deque()
        q.append(frames)
        self.stats["sends_held_at_hwm"] += 1
        if len(q) > MAX_BACKLOG:
            q.popleft()
            self.stats["held_sends_dropped"] += 1
        return True

    def _flush_backlog(self) -> None:
        """Send what waits for peers that were at their HWM, in order, until one is full again.  A peer
        found gone meanwhile loses its backlog; a registered worker among them is lost (jobs re-queued)."""
        send = self.sock.send  # type: ignore[union-attr]
        for ident, q in list(self._backlog.items()):
            gone = False
            while q:
                frames = q[0]
                try:
                    send(ident, _MORE)
                except zmq.ZMQError as e:
                    if e.errno == zmq.EAGAIN:
                        break
                    if e.errno != zmq.EHOSTUNREACH:
                        raise
                    gone = True
                    break
                for f in frames[:-1]:
                    send(f, _MORE)
                send(frames[-1], _LAST)
                q.popleft()
            if gone or not q:
                del self._backlog[ident]
            if gone:
                w = self.queue.workers.get(ident)
                if w is not None:
                    self._unreachable(w)

    def _send_gated(self, seq: int, ident: bytes, frames: list[bytes]) -> None:
        """Send once log record ``seq`` is durable; keep FIFO order with earlier gated sends."""
        if not self._gated and seq <= self.log.durable_seq:
            self._send(ident, frames)
        else:
            self._gated.append((seq, ident, frames))

    def _flush_gated(self) -> None:
        durable = self.log.durable_seq
        gated = self._gated
        while gated and gated[0][0] <= durable:
            _, ident, frames = gated.popleft()
            self._send(ident, frames)

    # -- message handling ---------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        if not 2 <= len(frames) <= 3 or len(frames[1]) != 5:
            self.stats["malformed"] += 1
            self._error(ident, None, "malformed message: expected two frames, [header (5 bytes), JSON body]")
            return
        head = frames[1]
        kind, cmd = head[:4], head[4]
        body = frames[2] if len(frames) > 2 else b""
        try:
            if kind == P.WORKER:
                self._worker_msg(ident, cmd, body)
            elif kind == P.CLIENT:
                self._client_msg(ident, cmd, body)
            elif kind[:3] in (P.WORKER[:3], P.CLIENT[:3]):
                self._error(ident, None, f"protocol version mismatch: this router speaks {P.CLIENT.decode()} "
                                         f"and {P.WORKER.decode()}, the peer sent {kind!r}; upgrade the peer or the router")
            else:
                self._error(ident, None, "malformed message: unknown peer kind (not a zmqrun client or worker)")
        except (BadRequest, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            self.stats["bad_request"] += 1
            self._error(ident, _request_id(body), f"bad request: {e}" if not isinstance(e, BadRequest) else str(e))
        except ArchiveDamaged as e:  # the request was fine; a record it needs is damaged on disk
            self.stats["archive_damaged"] += 1
            self._error(ident, _request_id(body), str(e))

    def _error(self, ident: bytes, req: Any, text: str) -> None:
        self._send(ident, [P.H_ERROR, orjson.dumps({"req": req, "error": _clip(text)})])

    # client commands

    def _client_msg(self, ident: bytes, cmd: int, body: bytes) -> None:
        msg = orjson.loads(body)
        if not isinstance(msg, dict):
            raise BadRequest("request body must be a JSON object")
        req = msg.get("req")
        if cmd == P.C_SUBMIT:
            self._submit(ident, req, msg, len(body))
        elif cmd == P.C_WAIT:
            ids = msg.get("ids")
            if type(ids) is not list or not all(type(i) is str for i in ids):
                raise BadRequest("WAIT needs ids: a list of job id strings")
            self._wait(ident, req, ids)
        elif cmd == P.C_GET:
            job = self._find(msg.get("id"))
            self._reply(ident, req, {"job": job.wire() if job is not None else None})
        elif cmd == P.C_LIST:
            self._list(ident, req, msg)
        elif cmd == P.C_CANCEL:
            self._cancel(ident, req, msg.get("id"), msg.get("reason"), msg.get("by"))
        elif cmd == P.C_STATUS:
            self._reply(ident, req, self.status())
        elif cmd == P.C_LOGS:
            self._logs(ident, req, msg)
        else:
            raise BadRequest(f"unknown client command {cmd:#04x}")

    def _reply(self, ident: bytes, req: Any, payload: dict[str, Any]) -> None:
        payload["req"] = req
        self._send(ident, [P.H_REPLY, orjson.dumps(payload)])

    def _find(self, jid: Any) -> Job | None:
        if not isinstance(jid, str):
            raise BadRequest("job id must be a string")
        return self.queue.jobs.get(jid) or self.archive.get(jid)

    def _submit(self, ident: bytes, req: Any, msg: dict[str, Any], size: int = 0) -> None:
        raw_jobs = msg.get("jobs")
        if not isinstance(raw_jobs, list) or not raw_jobs:
            raise BadRequest("submit needs a non-empty list of jobs")
        notify = bool(msg.get("notify", True))
        # "ack": false (Client.run): the outcome, sent once the SUBMIT is durable, stands in for the ACK,
        # saving one message per job.  Rejections are still answered with an ACK at once.
        ack = bool(msg.get("ack", True))
        now = time.time()
        accepted: list[str] = []
        rejected: list[dict[str, Any]] = []
        fresh: list[dict[str, Any]] = []
        new_jobs: list[Job] = []
        batch: dict[str, Job] = {}  # ids new in this batch: a repeat is a resubmit of the first
        known: list[Job] = []
        queue = self.queue
        next_order, archived = queue.next_order, self.archive.contains
        check_args = size > self.max_args_bytes  # only a body over the args limit can hold a job over it
        for raw in raw_jobs:
            try:
                d = normalize_job(raw, now)
            except BadRequest as e:
                rejected.append({"id": raw.get("id") if isinstance(raw, dict) else None, "error": _clip(str(e))})
                continue
            jid = d["id"]
            if check_args and (args_size := len(orjson.dumps(d["args"]))) > self.max_args_bytes:
                rejected.append({"id": jid, "error": f"job args are {args_size:,} bytes as JSON, over the router's "
                                                    f"limit of {self.max_args_bytes:,} bytes (--max-args-bytes)"})
                continue
            existing = queue.jobs.get(jid) or batch.get(jid)
            if existing is None and archived(jid):
                existing = self.archive.get(jid)
                if existing is None:
                    rejected.append({"id": jid, "error": f"job id {jid} was used by a job that has expired"})
                    continue
            if existing is not None:
                if existing.id not in batch:
                    known.append(existing)  # idempotent resubmit: same id, no second job
            else:
                job = job_from(d, next_order())
                new_jobs.append(job)
                batch[job.id] = job
                fresh.append(d)
            accepted.append(d["id"])
        seq = self.log.last_seq
        if fresh:
            if size > BIG_JOB_BYTES * len(raw_jobs):
                self._big.update(d["id"] for d in fresh)
            seq = self.log.append(SUBMIT, orjson.dumps({"at": now, "jobs": fresh}), eager=True)
            for job in new_jobs:
                job.submit_seq = seq
                if notify:
                    job.watchers = {ident}
                queue.add(job, now)
            self._dirty = True
        if notify:
            for job in known:
                self._watch(ident, job)
        if ack or rejected:
            self._send_gated(seq, ident, [P.H_ACK, orjson.dumps({"req": req, "accepted": accepted,
                                                                 "rejected": rejected})])

    def _watch(self, ident: bytes, job: Job) -> None:
        if job.status in FINISHED:
            self._send_gated(job.submit_seq, ident, [P.H_RESULT, orjson.dumps({"results": [job.outcome()]})])
        elif job.watchers is None:
            job.watchers = {ident}
        else:
            job.watchers.add(ident)

    def _wait(self, ident: bytes, req: Any, ids: list[Any]) -> None:
        unknown = []
        for jid in ids:
            job = self._find(jid)
            if job is None:
                unknown.append(jid)
            else:
                self._watch(ident, job)
        self._reply(ident, req, {"unknown": unknown})

    def _list(self, ident: bytes, req: Any, msg: dict[str, Any]) -> None:
        status, script, limit = msg.get("status"), msg.get("script"), msg.get("limit", 50)
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        if type(limit) is not int or limit <= 0:
            raise BadRequest("limit must be a positive integer")

        def wanted(job: Job) -> bool:
            return (status is None or job.status == status) and (script is None or job.script == script)

        # Newest first.  The archive is walked from its newest end and stops at ``limit``
        # matches, so a listing costs O(limit), not a sort of every job ever run, in the loop.
        live = sorted((j for j in self.queue.jobs.values() if wanted(j)), key=lambda j: j.created_at, reverse=True)
        done: list[Job] = []
        # Beyond the recent jobs held in memory, older ones are rebuilt from the log until ``limit`` match:
        # bounded per request, also for a huge limit (each rebuild reads the log; the loop serves nobody
        # else meanwhile).  Not by the limit: a filter's few matches may lie deep in the archive (after a
        # restart `--status failure --limit 10` read 1,000 jobs back and found none of 13 failures).
        for job in self.archive.newest(budget=LIST_REBUILD_BUDGET):
            if wanted(job):
                done.append(job)
                if len(done) >= limit:
                    break
        out = []
        for job in sorted(live[:limit] + done, key=lambda j: j.created_at, reverse=True)[:limit]:
            d = job.wire()
            d.pop("logs")
            d.pop("args")
            out.append(d)
        self._reply(ident, req, {"jobs": out})

    def _cancel(self, ident: bytes, req: Any, jid: Any, reason: Any, by: Any = None) -> None:
        """Cancel a queued, scheduled or running job; the record names who (``by``, else the client's
        routing id) and why.  A running job is finished here at once (CANCEL is its terminal record)
        and its worker is told to stop it (CANCEL to its supervisor, or to a cold worker, which kills
        the job's process); it keeps the job's credit until the worker reports the job gone."""
        job = self._find(jid)
        if job is None:
            self._reply(ident, req, {"canceled": False, "status": None, "message": _clip(f"no job {jid}")})
            return
        if job.status in FINISHED:
            self._reply(ident, req, {"canceled": False, "status": job.status,
                                     "message": f"job already finished ({job.status})"})
            return
        reason = reason[:1000] if isinstance(reason, str) and reason else "no reason given"
        by = by[:200] if isinstance(by, str) and by else "client " + ident.decode("utf-8", "replace")
        now = time.time()
        rec = {"at": now, "id": job.id, "reason": reason, "by": by, "attempts": job.attempts}
        if job.attempt_errors:  # the terminal record keeps what the archive shows (see zmqrun.archive)
            rec["attempt_errors"] = job.attempt_errors
        holder = None
        leased_to = None
        if job.status == RUNNING:
            holder = next((w for w in self.queue.workers.values() if w.in_flight.get(job.id) == job.attempts), None)
            rec["running_on"] = job.worker
            if holder is None and job.id in self.queue.leases:
                leased_to = job.worker  # after a restart: the worker that ran it may still be running it
        self._relog_submits([job])
        seq = self.log.append(CANCEL, orjson.dumps(rec), eager=True)
        apply_cancel(job, rec)
        self._finish_batch([(job, None)], seq)
        message = "canceled"
        if holder is not None:
            stop = orjson.dumps({"id": job.id, "attempt": job.attempts, "reason": f"canceled by {by}: {reason}"})
            self._send(holder.supervisor or holder.identity, [P.H_R_CANCEL, stop])
            message = f"canceled; its worker {holder.name} is stopping it"
        elif leased_to is not None:
            message = self._cancel_leased(job, leased_to, f"canceled by {by}: {reason}")
        self._send_gated(seq, ident, [P.H_REPLY, orjson.dumps({"req": req, "canceled": True, "status": CANCELED,
                                                               "message": message})])

    def _cancel_leased(self, job: Job, name: str, reason: str) -> str:
        """A canceled job was leased after a restart to the worker named ``name``: tell that worker to stop
        it now if it has registered again (it has not reported the job yet), else when it does (see
        :meth:`_ready`).  Returns the message for the client."""
        stop = orjson.dumps({"id": job.id, "attempt": job.attempts, "reason": reason})
        for w in self.queue.workers.values():
            if w.name == name:
                self._send(w.supervisor or w.identity, [P.H_R_CANCEL, stop])
                return f"canceled; its worker {name} is stopping it"
        pending = self._lease_cancels.setdefault(name, [])
        pending.append((time.monotonic(), stop))
        del pending[:-MAX_LEASE_CANCELS]
        return f"canceled; its worker {name} will be told to stop it when it registers again"

    def status(self) -> dict[str, Any]:
        """Workers (name, script, credit, in_flight) and job counts, for ``zmqrun status``."""
        now, mono = time.time(), time.monotonic()
        counts = self.queue.counts(now)
        counts["finished"] = self.archive.count()
        due = [j for j in self.queue.jobs.values() if j.status == QUEUED and j.scheduled_for <= now]
        by_script: dict[str, int] = collections.Counter(j.script for j in due)
        # A tagged job runs only on a worker with its tag: a queued one may wait for a worker nobody started.
        by_tag: dict[str, int] = collections.Counter(j.tag for j in due if j.tag is not None)
        return {
            "workers": [{"name": w.name, "script": w.script, "credit": w.credit, "in_flight": len(w.in_flight),
                         "expires_in": round(w.expires_at - mono, 3), "tags": sorted(t for t in w.tags if t),
                         "untagged": None in w.tags} for w in self.queue.workers.values()],
            "leased": len(self.queue.leases), "late_results": self.late_results,
            "live_logs": {"jobs": len(self._live), "chars": sum(ll.end - ll.start for ll in self._live.values()),
                          "followed_jobs": len(self._followers)},
            "counts": counts, "queued_by_script": dict(by_script), "queued_by_tag": dict(by_tag),
            "endpoint": self.endpoint,
            "fsync": self.policy.mode, "pid": os.getpid(),
            # Dropped input (malformed, bad requests, stale results) and group commit at work.
            "dropped": dict(self.stats),
            "log": {"records": self.log.last_seq, "records_since_start": self.log.last_seq - self._records_at_start,
                    "batches": self.log.batches_written, "syncs": self.log.syncs,
                    "segments": len(self.log.segments), "bytes": sum(seg.size for seg in self.log.segments[:-1])
                    + self.log._seg_size, "snapshot": (list_snapshots(self.log.fs, self.data_dir) or [None])[-1],
                    "checkpoints": {k: round(v, 3) for k, v in self.checkpoints.items()}},
        }

    # worker commands

    def _worker_msg(self, ident: bytes, cmd: int, body: bytes) -> None:
        if cmd == P.W_LOG:  # from a worker's log pump: its own socket, never registered
            self._live_log(body)
            return
        w = self.queue.workers.get(ident)
        if cmd == P.W_READY:
            self._ready(ident, orjson.loads(body))
            return
        if w is None:
            if cmd == P.W_SUP_HEARTBEAT or cmd == P.W_SUP_EXITED:
                self._supervisor_msg(ident, cmd, body)
            # MDP: an unknown worker (e.g. the router restarted) is told to reconnect and send READY.
            elif cmd != P.W_DISCONNECT:
                self._send(ident, [P.H_R_DISCONNECT, b'{"reason":"not registered; send READY"}'])
            return
        w.expires_at = time.monotonic() + w.heartbeat * self.liveness
        if cmd == P.W_RESULT:
            self._results(w, body)
        elif cmd == P.W_HEARTBEAT:
            pass
        elif cmd == P.W_DISCONNECT:
            # A stopping worker names the jobs it hands back unstarted: they go back uncounted.
            msg = orjson.loads(body) if body else None
            ids = msg.get("unstarted") if isinstance(msg, dict) else None
            back = frozenset(i for i in ids if type(i) is str) if isinstance(ids, list) else frozenset()
            self._lose_worker(ident, "worker disconnected", unstarted=back,
                              why_unstarted="handed back unstarted by the stopping worker")
        else:
            self._send(ident, [P.H_R_DISCONNECT, b'{"reason":"unexpected command"}'])
            self._lose_worker(ident, "worker sent an unexpected command")

    def _ready(self, ident: bytes, msg: Any) -> None:
        if not isinstance(msg, dict):
            raise BadRequest("READY body must be a JSON object")
        script, credit, beat = msg.get("script"), msg.get("credit"), msg.get("heartbeat", self.heartbeat)
        if script is not None and (not isinstance(script, str) or not script):
            raise BadRequest("READY script must be a string or null")
        if not isinstance(credit, int) or isinstance(credit, bool) or not 1 <= credit <= 100_000:
            raise BadRequest("READY credit must be an integer from 1 to 100000")
        if not isinstance(beat, (int, float)) or not 0.01 <= beat <= 60:
            raise BadRequest("READY heartbeat must be 0.01 to 60 seconds")
        sup = msg.get("supervisor")
        if sup is not None and (not isinstance(sup, str) or not 0 < len(sup.encode()) <= 255
                                or sup.encode() == ident):
            raise BadRequest("READY supervisor must be the supervisor's routing id (1-255 bytes) or null")
        tags = msg.get("tags") or []
        if type(tags) is not list or len(tags) > 64 or not all(valid_tag(t) for t in tags):
            raise BadRequest("READY tags must be a list of at most 64 tags")
        untagged = msg.get("untagged", not tags)
        wtags = frozenset(tags) | ({None} if untagged else frozenset())
        if not wtags:
            raise BadRequest("READY without tags must take untagged jobs")
        # Jobs the worker had buffered and dropped unstarted when its last session ended: [[id, attempt]].
        dropped = msg.get("unstarted")
        dropped = [u for u in dropped if type(u) is list and len(u) == 2] if type(dropped) is list else []
        why_dropped = "dropped unstarted from its buffer when it lost the router; not counted"
        if ident in self.queue.workers:
            self._lose_worker(ident, "worker re-registered", unstarted=frozenset(u[0] for u in dropped
                                                                                  if type(u[0]) is str),
                              why_unstarted=why_dropped)
        name = str(msg.get("name") or ident.decode("utf-8", "replace"))[:200]
        inc = msg.get("incarnation")
        inc = inc if type(inc) is str and 0 < len(inc) <= 64 else None
        slot = WorkerSlot(ident, name, script, credit, float(beat), time.monotonic() + beat * self.liveness,
                          tags=wtags, incarnation=inc)
        if sup is not None:
            # Its supervisor's heartbeats now keep this worker alive (a previous child of the same
            # supervisor, if still listed, is no longer refreshed and expires by itself).
            slot.supervisor = sup.encode()
            self._supervised[slot.supervisor] = ident
        self.queue.add_worker(slot)
        running = msg.get("running")
        if type(running) is list and running:
            # Jobs it kept running while the router restarted or had dropped it: its own again, not run twice.
            back = [r[0] for r in running[:credit] if type(r) is list and len(r) == 2
                    and self.queue.reclaim(slot, r[0], r[1])]
            if back:
                log.info("worker %s still runs %d job(s) it had before: %s", name, len(back),
                         ", ".join(back[:5]) + (", ..." if len(back) > 5 else ""))
        if dropped:
            # Leased after a router restart (or queued again when this worker was lost): back in the queue
            # without the attempt, instead of charging it when the lease runs out.
            self._give_back(name, dropped, why_dropped, "dropped {n} buffered job(s) unstarted")
        received = msg.get("received")
        if inc is not None and type(received) is list and self._lease_incarnation:
            known = {r for r in received if type(r) is str}
            if type(running) is list:
                known.update(r[0] for r in running if type(r) is list and r and type(r[0]) is str)
            known.update(u[0] for u in dropped if type(u[0]) is str)
            self._give_back_unreceived(name, inc, known)
        if self._lease_cancels:
            self._send_lease_cancels(slot)
        log.info("worker %s ready: %s, credit %d%s", name, script or "any script (cold path)", credit,
                 f", tags {', '.join(sorted(tags))}{' and untagged jobs' if untagged else ''}" if tags else "")
        self._dirty = True

    def _give_back_unreceived(self, name: str, inc: str, known: set[str]) -> None:
        """Worker ``name`` (process ``inc``) registered and named in ``known`` every job it received that
        may still count as running (running, dropped unstarted, or its result re-sent).  Jobs leased to
        it after a restart (their DISPATCH record names ``inc``) that it does not name never reached its
        code: lost with the old router (dispatched but not sent) or with the old connection (libzmq drops
        a connection's unread messages when it breaks).  They go back to the queue at once, their
        attempt not counted, instead of waiting for the lease to end and being charged it."""
        lost = []
        for jid in [jid for jid, i in self._lease_incarnation.items() if i == inc]:
            del self._lease_incarnation[jid]
            job = self.queue.jobs.get(jid)
            if jid not in known and job is not None and job.worker == name:
                lost.append((jid, job.attempts))
        self._give_back(name, lost, "never reached it (lost with the old router or connection); not counted",
                        "never received {n} job(s) leased to it")

    def _give_back(self, name: str, pairs: Iterable[Sequence[Any]], why: str, said: str) -> None:
        """Queue again, uncounted, the attempts ``pairs`` ([job id, attempt]) that registering worker ``name``
        says never started (:meth:`JobQueue.give_back` keeps only those still open), logged with ``why``;
        ``said`` ("... {n} job(s) ...") is what the router's log line says of them."""
        now = time.time()
        back = [job for jid, attempt in pairs if (job := self.queue.give_back(jid, attempt, now)) is not None]
        if back:
            self._log_uncounted([(job, job.attempts + 1) for job in back], f"worker re-registered ({name}); {why}",
                                now)
            log.info("worker %s %s: queued again, not counted", name, said.format(n=len(back)))
            self._dirty = True

    def _log_uncounted(self, entries: list[tuple[Job, int]], reason: str, now: float) -> None:
        """One REQUEUE "unstarted" record: these attempts ([job, attempt]) never reached a worker's code and
        do not count (replay takes them back the same way, see :meth:`recover`)."""
        self.log.append(REQUEUE, orjson.dumps({"at": now, "unstarted": True,
                                               "jobs": [[job.id, attempt, reason] for job, attempt in entries]}))

    def _send_lease_cancels(self, w: WorkerSlot) -> None:
        """A worker registered: send it the stops of canceled jobs leased to its name (see
        :meth:`_cancel_leased`); forget stops older than :data:`LEASE_CANCEL_TTL`."""
        stops = self._lease_cancels.pop(w.name, None)
        oldest = time.monotonic() - LEASE_CANCEL_TTL
        for name in [n for n, v in self._lease_cancels.items() if v[-1][0] < oldest]:
            del self._lease_cancels[name]
        for at, stop in stops or ():
            if at >= oldest:
                self._send(w.supervisor or w.identity, [P.H_R_CANCEL, stop])

    def _results(self, w: WorkerSlot, body: bytes) -> None:
        """A worker's RESULT batch: record each report that settles a job's current attempt, drop the rest.

        A report settles an attempt if the worker holds the job in its slots with that attempt, or
        if no slot holds the job and the attempt is still open (:meth:`JobQueue.settle`): a job
        leased after a router restart, or put back in the queue when its worker was lost and not
        dispatched again since.  That is how a worker that registers again after a restart (or
        after being declared lost) reports what it finished meanwhile.  A failed attempt of a job
        with retries left goes back to the queue after its backoff (a REQUEUE record with
        ``"retry": true``, written before the FINISH record, holds its error); its waiting clients
        hear nothing until the job's last attempt ends.  The batch number the worker gives is
        acknowledged once the log is durable up to here (in the next JOBS or HEARTBEAT), so the
        worker can forget those results.
        """
        msg = orjson.loads(body)
        results = msg.get("results") if isinstance(msg, dict) else None
        if not isinstance(results, list):
            raise BadRequest("RESULT body must be {\"results\": [...]}")
        queue = self.queue
        jobs, in_flight = queue.jobs, w.in_flight
        done: list[tuple[Job, dict[str, Any]]] = []
        retried: list[tuple[Job, dict[str, Any], float]] = []
        for r in results:
            jid = r.get("id") if type(r) is dict else None
            attempt = in_flight.get(jid) if type(jid) is str else None
            if attempt is not None:
                job = jobs.get(jid)
                if job is None or r.get("attempt") != attempt or job.attempts != attempt or job.status != RUNNING:
                    if job is None and r.get("attempt") == attempt:
                        # Finished here meanwhile (canceled while running): the worker is done with it,
                        # so its credit comes back.
                        del in_flight[jid]
                        self._dirty = True
                    self.stats["stale_results"] += 1  # a late result of an older attempt: drop it
                    continue
                del in_flight[jid]
            else:
                job = jobs.get(jid) if type(jid) is str else None
                if job is None or not queue.settle(job, r.get("attempt")):
                    self.stats["stale_results"] += 1
                    continue
                self.late_results += 1
            if job.retries and r.get("status") != SUCCESS:
                delay = retry_delay(job, r.get("error"), self._rng.random())
                if delay is not None:
                    retried.append((job, r, delay))
                    continue
            done.append((job, r))
        if retried:
            self._retry(retried, w.name)  # not terminal: no SUBMIT is logged again for these
        if done:
            if len(done) != len(results) or msg.get("worker") != w.name or any(job.attempt_errors
                                                                                for job, _ in done):
                # The body is logged as is unless some of its reports were dropped (stale or junk: only
                # the accepted ones are logged, as the archive rebuilds a job from the entries with its
                # id) or retried, it must name the registered worker, or a job that was retried ends
                # here: its terminal record carries its earlier attempts' errors.
                for job, r in done:
                    if job.attempt_errors:
                        r["attempt_errors"] = job.attempt_errors
                body = orjson.dumps({"worker": w.name, "results": [r for _job, r in done]})
            self._relog_submits([job for job, _r in done])
            if len(body) > BIG_JOB_BYTES * len(results):
                self._big.update(job.id for job, _r in done)
            # Replay applies the same acceptance rules to this record (see recover()).
            seq = self.log.append(FINISH, body)
            self._finish_batch([(job, apply_result(job, r)) for job, r in done], seq)
        if done or retried:
            self._dirty = True
        batch = msg.get("batch")
        if type(batch) is int:
            w.acks.append((self.log.last_seq, batch))

    def _retry(self, retried: list[tuple[Job, dict[str, Any], float]], worker: str) -> None:
        """Put failed attempts back in the queue after their backoff; record their errors (REQUEUE "retry")."""
        now = time.time()
        entries = []
        for job, r, delay in retried:
            err = r.get("error")
            if type(err) is not dict:
                err = {"type": "WorkerError", "message": "malformed error report", "traceback": ""}
            failed = {"attempt": job.attempts, "error": err, "started_at": r.get("started_at") or job.started_at,
                      "finished_at": r.get("finished_at") or now, "worker": worker}
            errors = [*(job.attempt_errors or ()), failed]
            reason = f"{err.get('type')}: retry {len(errors)} of {job.retries} in {delay:.3g} s"
            entries.append([job.id, job.attempts, reason, now + delay, failed])
            job.attempt_errors = errors
            self.queue.retry(job, now + delay, now)
            log.info("job %s attempt %d failed (%s)", job.id, job.attempts, reason)
        self.log.append(REQUEUE, orjson.dumps({"at": now, "retry": True, "jobs": entries}))

    def _relog_submits(self, jobs: list[Job]) -> None:
        """Before a terminal record: jobs whose SUBMIT record retention removed while they were live (the
        snapshots kept them) get it logged again, so the archive can rebuild them from the log.  It goes
        first, so no crash leaves a durable terminal record whose job's SUBMIT is gone."""
        oldest = self.log.segments[0].first_seq
        relog = [job for job in jobs if job.submit_seq < oldest]
        if relog:
            seq = self.log.append(SUBMIT, orjson.dumps({"at": time.time(), "jobs": [submitted_as(j) for j in relog]}))
            for job in relog:
                job.submit_seq = seq

    def _finish_batch(self, done: list[tuple[Job, dict[str, Any] | None]], end_seq: int) -> None:
        """Archive finished jobs and push their outcomes to watching clients.

        ``done`` holds (job, outcome dict or None to build one); ``end_seq`` is the
        terminal record (FINISH, CANCEL, final REQUEUE) they share.  One message per
        client carries all of its outcomes.  Each is gated on the job's SUBMIT
        record (so the ACK goes out first), not on the FINISH record: see the
        module docstring.
        """
        by_client: dict[bytes, tuple[int, list[dict[str, Any]]]] = {}
        for job, out in done:
            if job.watchers:
                if out is None:
                    out = job.outcome()
                for c in job.watchers:
                    entry = by_client.get(c)
                    if entry is None:
                        by_client[c] = (job.submit_seq, [out])
                    else:
                        entry[1].append(out)
                        if job.submit_seq > entry[0]:
                            by_client[c] = (job.submit_seq, entry[1])
                job.watchers = None
        for c, (gate, outs) in by_client.items():
            self._send_gated(gate, c, [P.H_RESULT, orjson.dumps({"results": outs})])
        # The bookkeeping after the sends: a waiting client's latency does not include it (nothing reads
        # the archive or the queue before this returns).
        self.archive.add_batch([job for job, _out in done], end_seq)
        forget = self.queue.remove
        for job, _out in done:
            forget(job.id)
        if self._big:
            self._forget_big([job for job, _out in done], end_seq)
        if self._live or self._followers:
            self._end_follows(done)

    def _forget_big(self, jobs: list[Job], end_seq: int) -> None:
        """Finished jobs with large args or results keep only their place in the archive's recent-jobs
        cache (a lookup or listing reads them back from the log), so the router does not hold their
        payloads (S5).  ``end_seq``: their terminal record."""
        big = self._big
        slim = [job for job in jobs if job.id in big]
        if slim:
            big.difference_update(job.id for job in slim)
            self.archive.slim(slim, end_seq)

    # -- live logs (zmqrun.livelogs) ------------------------------------------------------

    def _live_log(self, body: bytes) -> None:
        """W_LOG: chunks of running jobs' output.  Kept per running attempt (what a follower joining
        later, or a follow=False request, gets) and pushed to the job's followers; never logged.
        Chunks of an attempt that is not running (finished, or requeued since) are dropped."""
        msg = orjson.loads(body)
        entries = msg.get("logs") if isinstance(msg, dict) else None
        if not isinstance(entries, list):
            raise BadRequest("LOG body must be {\"logs\": [[id, attempt, offset, text], ...]}")
        jobs, live = self.queue.jobs, self._live
        for e in entries:
            if type(e) is not list or len(e) != 4:
                continue
            jid, attempt, offset, text = e
            job = jobs.get(jid) if type(jid) is str else None
            if (job is None or job.status != RUNNING or job.attempts != attempt or type(offset) is not int
                    or offset < 0 or type(text) is not str):
                continue
            ll = live.get(jid)
            if ll is None or ll.attempt != attempt:
                ll = live[jid] = LiveLog(attempt, offset)
            got = ll.add(offset, text)
            if got is not None and jid in self._followers:
                self._push_logs(jid, orjson.dumps({"id": jid, "attempt": attempt, "offset": got[0], "text": got[1]}))

    def _push_logs(self, jid: str, body: bytes) -> None:
        """Send an R_LOGS body to every follower of ``jid``; a follower that is gone is forgotten."""
        followers = self._followers[jid]
        for c in list(followers):
            if not self._send(c, [P.H_LOGS, body]):
                followers.discard(c)
        if not followers:
            del self._followers[jid]

    def _logs(self, ident: bytes, req: Any, msg: dict[str, Any]) -> None:
        """C_LOGS: the output of a job so far (finished: its archived logs), from the follower's position
        ``from`` [attempt, characters] on; with ``follow``, R_LOGS pushes follow until the job ends."""
        jid = msg.get("id")
        if msg.get("stop"):
            followers = self._followers.get(jid) if isinstance(jid, str) else None
            if followers is not None:
                followers.discard(ident)
                if not followers:
                    del self._followers[jid]
            self._reply(ident, req, {})
            return
        job = self._find(jid)
        if job is None:
            self._reply(ident, req, {"job": None})
            return
        frm = msg.get("from")
        pos = 0
        if type(frm) is list and len(frm) == 2 and frm[0] == job.attempts and type(frm[1]) is int and frm[1] > 0:
            pos = frm[1]
        if job.status in FINISHED:
            logs = job.logs or ""
            pos = min(pos, len(logs))
            self._reply(ident, req, {"status": job.status, "attempt": job.attempts, "offset": pos,
                                     "text": logs[pos:], "end": True})
            return
        ll = self._live.get(job.id)
        offset, text = 0, ""
        if ll is not None and ll.attempt == job.attempts and job.status == RUNNING:
            offset, text = ll.text_from(pos)
        if msg.get("follow"):
            self._followers.setdefault(job.id, set()).add(ident)
        self._reply(ident, req, {"status": job.status, "attempt": job.attempts, "offset": offset, "text": text,
                                 "end": False})

    def _keep_streamed_logs(self, results: list[Any]) -> None:
        """Outcomes a supervisor reports for jobs it killed (a warm timeout) carry no logs (they died with
        the child): give them the output the job streamed, so the archive keeps what followers saw."""
        for r in results:
            ll = self._live.get(r.get("id")) if type(r) is dict and type(r.get("id")) is str else None
            if ll is not None and ll.attempt == r.get("attempt") and ll.start == 0 and not r.get("logs"):
                r["logs"] = ll.text_from(0)[1]

    def _end_follows(self, done: list[tuple[Job, Any]]) -> None:
        """Jobs that finished: drop their live output; send their followers the end of the stream (the final
        logs past what was streamed, and the status), gated as their RESULT is."""
        live, followers = self._live, self._followers
        for job, _out in done:
            ll = live.pop(job.id, None)
            idents = followers.pop(job.id, None)
            if idents:
                offset = ll.end if ll is not None and ll.attempt == job.attempts else 0
                logs = job.logs or ""
                body = orjson.dumps({"id": job.id, "attempt": job.attempts, "offset": offset, "text": logs[offset:],
                                     "end": True, "status": job.status})
                for c in idents:
                    self._send_gated(job.submit_seq, c, [P.H_LOGS, body])

    def _supervisor_msg(self, ident: bytes, cmd: int, body: bytes) -> None:
        """A dedicated worker's supervisor (never registered itself; its worker's READY names it).

        HEARTBEAT keeps that worker alive while a job keeps it silent.  EXITED: the worker's
        process ended (killed for a timeout or cancel, or died); the outcomes it reports are
        recorded, then its other jobs go back to the queue, those it never started without
        counting an attempt.  From an unknown supervisor (e.g. this router just restarted and
        the worker has not registered again yet) both are ignored.
        """
        worker = self._supervised.get(ident)
        if cmd == P.W_SUP_HEARTBEAT:
            w = self.queue.workers.get(worker) if worker is not None else None
            if w is not None:
                w.expires_at = time.monotonic() + w.heartbeat * self.liveness
            return
        msg = orjson.loads(body)
        if not isinstance(msg, dict) or not isinstance(msg.get("worker"), str):
            raise BadRequest("EXITED body must be {\"worker\": routing id, ...}")
        child = msg["worker"].encode()
        w = self.queue.workers.get(child)
        if w is None or w.supervisor != ident:
            self.stats["stale_exits"] += 1  # already dropped (expired, or reported twice)
            return
        # Which jobs never started: the child starts jobs in dispatch order, so every job sent after
        # the one it started last; all of them if it started none.  If that one already reported,
        # all that are left, provided results come back in start order ("in_order": one job at a
        # time); otherwise (a pool) it cannot tell, and counts them all.
        unstarted: list[str] = []
        if "started" in msg:
            order, started = list(w.in_flight), msg["started"]
            if isinstance(started, list) and len(started) == 2 and type(started[0]) is str \
                    and started[1] is not None and w.in_flight.get(started[0]) == started[1]:
                unstarted = order[order.index(started[0]) + 1:]
            elif started is None or msg.get("in_order") is True:
                unstarted = order
        results = msg.get("results")
        if isinstance(results, list) and results:
            if self._live:
                self._keep_streamed_logs(results)
            self._results(w, orjson.dumps({"worker": w.name, "results": results}))
        reason = msg.get("reason")
        self._lose_worker(child, reason if isinstance(reason, str) and reason else "worker process ended",
                          unstarted=frozenset(unstarted))

    def _lose_worker(self, ident: bytes, reason: str, unstarted: frozenset[str] = frozenset(),
                     why_unstarted: str = "never started") -> None:
        """Drop a worker; its running jobs go back to the queue with their attempt counted, except
        ``unstarted`` ones (known never to have started, or never confirmed to have reached it: see
        :meth:`_beat`), or fail WorkerLost after max_attempts."""
        w = self.queue.workers.get(ident)
        if w is None:
            return
        if w.supervisor is not None and self._supervised.get(w.supervisor) == ident:
            del self._supervised[w.supervisor]
        now = time.time()
        back = self.queue.remove_worker(ident, now)
        if not back:  # (with jobs, _put_back's warning says it)
            log.info("worker %s gone: %s", w.name, reason)
        if unstarted and back:
            fresh = [j for j in back if j.id in unstarted]
            if fresh:
                back = [j for j in back if j.id not in unstarted]
                self._log_uncounted([(j, j.attempts) for j in fresh], f"{reason} ({w.name}); {why_unstarted}", now)
                for j in fresh:
                    j.attempts -= 1
                self._dirty = True
        if back:
            self._put_back([(j, w.name) for j in back], reason, now)

    def _put_back(self, back: list[tuple[Job, str | None]], reason: str, now: float) -> None:
        """Jobs whose attempt ended without a report (lost worker, ended lease), already queued again:
        log it, or fail them with WorkerLost once ``max_attempts`` such attempts were lost (attempts
        that failed and were retried do not count)."""
        final = [(j, name) for j, name in back if j.attempts - len(j.attempt_errors or ()) >= self.max_attempts]
        again = [(j, name) for j, name in back if j.attempts - len(j.attempt_errors or ()) < self.max_attempts]
        if again:
            self.log.append(REQUEUE, orjson.dumps({"at": now, "jobs": [[j.id, j.attempts, f"{reason} ({name})"]
                                                                        for j, name in again]}))
            log.warning("%s (%s): %d running job(s) back to the queue", reason,
                        ", ".join(sorted({str(name) for _, name in again})), len(again))
        if final:
            self._relog_submits([j for j, _name in final])
            seq = self.log.append(REQUEUE, orjson.dumps(
                {"at": now, "final": True, "jobs": [[j.id, j.attempts, f"{reason} ({name})", name, j.started_at,
                                                     *([j.attempt_errors] if j.attempt_errors else [])]
                                                    for j, name in final]}))
            for j, name in final:
                apply_lost(j, f"{reason} ({name})", now)
            self._finish_batch([(j, None) for j, _ in final], seq)
        self._dirty = True

    def _take_ack(self, w: WorkerSlot) -> int | None:
        """The newest RESULT batch of ``w`` whose records are durable, if any not yet acknowledged."""
        acks, durable = w.acks, self.log.durable_seq
        acked = None
        while acks and acks[0][0] <= durable:
            acked = acks.popleft()[1]
        return acked

    def _dispatch(self, now: float) -> None:
        """Lease due jobs to workers with credit and send them.

        Their DISPATCH records and this iteration's SUBMITs are written (one write, not synced) before
        the first send: a job never runs while its SUBMIT is only in this process's memory (a kill -9
        keeps what was written), and the sync that follows in :meth:`_commit` overlaps the worker hop.
        """
        leased = []
        for w, jobs in self.queue.dispatch(now):
            rec = {"at": now, "worker": w.name, "jobs": [[j.id, j.attempts] for j in jobs]}
            if w.incarnation is not None:
                rec["inc"] = w.incarnation
            self.log.append(DISPATCH, orjson.dumps(rec))
            msg: dict[str, Any] = {"jobs": [{"id": j.id, "attempt": j.attempts, "script": j.script, "args": j.args,
                                             "timeout": j.timeout} for j in jobs]}
            if w.acks:
                acked = self._take_ack(w)
                if acked is not None:
                    msg["acked"] = acked
            leased.append((w, jobs, orjson.dumps(msg)))
        self.log.write()
        if self.log.failure is not None:
            return  # the loop stops on the failure; nothing unwritten may run
        for w, jobs, body in leased:
            if not self._send(w.identity, [P.H_JOBS, body]):
                self._unreachable(w, unsent=frozenset(j.id for j in jobs))

    def _beat(self, mono: float) -> None:
        for ident, w in list(self.queue.workers.items()):
            if w.expires_at < mono:
                # Jobs dispatched after the worker last spoke may never have reached it (a network black
                # hole, S9): they go back uncounted.  A worker that died is usually found by a failed send
                # (a closed connection) first, and that path counts its jobs' attempts.
                heard_wall = time.time() - (time.monotonic() - (w.expires_at - w.heartbeat * self.liveness))
                jobs = self.queue.jobs
                unheard = frozenset(jid for jid in w.in_flight
                                    if (j := jobs.get(jid)) is not None and (j.started_at or 0.0) > heard_wall)
                self._lose_worker(ident, "worker missed heartbeats", unstarted=unheard,
                                  why_unstarted="dispatched after the worker last spoke; not counted")
                # If it is only frozen (SIGSTOP, a stalled VM) or cut off, it reads this before any job
                # still buffered for it, and registers again instead of running them (S9).
                self._send(ident, [P.H_R_DISCONNECT, b'{"reason":"no heartbeat within the liveness window"}'])
                log.warning("worker %s expired (no heartbeat for %.1f s)", w.name, w.heartbeat * self.liveness)
                continue
            frames = [P.H_R_HEARTBEAT]
            if w.acks:  # results the log now holds durably: the worker may forget them
                acked = self._take_ack(w)
                if acked is not None:
                    frames.append(b'{"acked":%d}' % acked)
            if not self._send(ident, frames):
                self._unreachable(w)
        if self.queue.leases:
            now = time.time()
            ended = self.queue.expire_leases(now)
            if ended:
                back = [(j, j.worker) for j in ended]
                for j in ended:
                    j.worker = None
                self._put_back(back, "router restarted and no worker reported these jobs within the "
                                     f"{self.recovery_lease:g} s recovery lease (--recovery-lease)", now)

    def _unreachable(self, w: WorkerSlot, unsent: frozenset[str] = frozenset()) -> None:
        """A send to ``w`` found its connection gone.  A supervised worker's process was just killed or
        died, and its supervisor reports that itself, with which jobs never started (jobs whose send
        failed here are among them): it is lost now only if its supervisor is gone too.  ``unsent``:
        jobs whose dispatch was that failed send; they never reached the worker, so they go back to the
        queue without counting an attempt (S1: a worker chosen, then killed before the send)."""
        if w.supervisor is not None and self._send(w.supervisor, [P.H_R_HEARTBEAT]):
            return
        self._lose_worker(w.identity, "worker unreachable", unstarted=unsent)


def _request_id(body: bytes) -> Any:
    """The "req" of a request body, for the error reply; None if it cannot be read."""
    try:
        return orjson.loads(body).get("req")
    except Exception:  # noqa: BLE001 - best effort to echo the request id
        return None


def run_router(bind: str, data_dir: str, fsync: str = "always", **kw: Any) -> int:
    """Run a router in this process until SIGTERM/SIGINT; return its exit code."""
    router = Router(bind, data_dir, fsync, **kw)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # checkpoint children are reaped with waitpid
    signal.signal(signal.SIGTERM, router.stop)
    signal.signal(signal.SIGINT, router.stop)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() past RLIMIT_FSIZE: EFBIG, not death (CPython's default too)
    signal.set_wakeup_fd(router._wake_w)
    router.open()
    return router.serve()
