"""Router-side job state and dispatch policy, with no sockets.

:class:`JobQueue` holds live jobs (queued, scheduled and running) in memory;
the router loop calls it and turns its decisions into messages and log
records.  Dispatch order: due jobs (``scheduled_for <= now``) by priority
(higher first), then ``scheduled_for``, then submission order, to the worker
serving the script with the most free credit (least-loaded, LRU on ties:
ipyparallel's ``leastload``).  Dedicated workers for a script are preferred to
normal (any-script) workers; a normal worker takes the best due job of any
script.  Credit-based flow control (ZeroMQ Guide ch. 7): a worker never holds
more jobs than the credit it announced in READY.

Tags (worker groups): a job goes only to a worker whose tag set holds the
job's tag.  An untagged job has tag None, which is in the tag set of a worker
started without tags (and of a tagged one started with ``--untagged``), so tags
partition the workers: a ``gpu`` job never runs on an untagged worker or one
with other tags, and a ``gpu`` worker keeps its credit for ``gpu`` jobs.

Leases: after a router restart, jobs that were running stay "running" without
a worker slot until their lease ends (:meth:`JobQueue.lease`), so the worker
that ran them can register again and report their results; then they are
queued again (:meth:`JobQueue.expire_leases`).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from .model import CANCELED, FAILURE, QUEUED, RUNNING, SUCCESS, backoff_delay


class Job:
    """A live or finished job as the router keeps it (times are epoch seconds)."""

    __slots__ = ("id", "script", "args", "priority", "scheduled_for", "timeout", "created_at",
                 "started_at", "finished_at", "worker", "attempts", "status", "result", "error",
                 "logs", "order", "watchers", "submit_seq", "tag", "retries", "backoff", "attempt_errors",
                 "retry_of")

    def __init__(self, id: str, script: str, args: Any, priority: int, scheduled_for: float,
                 timeout: float | None, created_at: float, order: int) -> None:
        self.id = id
        self.script = script
        self.args = args
        self.priority = priority
        self.scheduled_for = scheduled_for
        self.timeout = timeout
        self.created_at = created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.worker: str | None = None
        self.attempts = 0
        self.status = QUEUED
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.logs = ""
        self.order = order
        self.watchers: set[bytes] | None = None  # client identities to push the result to
        self.submit_seq = 0  # log sequence number of the SUBMIT record
        self.tag: str | None = None  # worker group; None: untagged workers only
        self.retries = 0  # failed attempts re-run at most this often
        self.backoff: dict[str, Any] | None = None  # canonical (zmqrun.model.parse_backoff)
        self.attempt_errors: list[dict[str, Any]] | None = None  # failed attempts that were retried
        self.retry_of: str | None = None  # the job this one re-runs (Client.retry)

    def wire(self) -> dict[str, Any]:
        """Every field as a JSON-ready dict (times as epoch seconds); the optional ones (tag, retries,
        backoff, attempt_errors, retry_of) only when set (readers default them)."""
        d = {
            "id": self.id, "script": self.script, "args": self.args, "priority": self.priority,
            "scheduled_for": self.scheduled_for, "timeout": self.timeout, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "worker": self.worker,
            "attempts": self.attempts, "status": self.status, "result": self.result,
            "error": self.error, "logs": self.logs,
        }
        if self.tag is not None:
            d["tag"] = self.tag
        if self.retries or self.backoff:
            d["retries"], d["backoff"] = self.retries, self.backoff
        if self.attempt_errors:
            d["attempt_errors"] = self.attempt_errors
        if self.retry_of is not None:
            d["retry_of"] = self.retry_of
        return d

    def outcome(self) -> dict[str, Any]:
        """The compact result pushed to waiting clients."""
        if self.error is not None:
            return {"id": self.id, "status": self.status, "error": self.error}
        return {"id": self.id, "status": self.status, "result": self.result}


def job_from(d: dict[str, Any], order: int = 0) -> Job:
    """A queued Job from a normalized job dict (see :func:`zmqrun.router.normalize_job`), as submitted or replayed."""
    job = Job(d["id"], d["script"], d["args"], d["priority"], d["scheduled_for"], d["timeout"], d["created_at"], order)
    if len(d) > 7:  # optional fields are in the dict only when set (most jobs have none)
        job.tag, job.retries, job.backoff = d.get("tag"), d.get("retries") or 0, d.get("backoff")
        job.retry_of = d.get("retry_of")
    return job


# -- state transitions shared by live handling, replay and archive lookups ----------------

def apply_result(job: Job, r: dict[str, Any]) -> dict[str, Any]:
    """Record a worker's report ``r`` on ``job``; return ``r`` minus its logs, which doubles as the
    outcome pushed to clients (no second dict per job on the hot path)."""
    logs = r.pop("logs", "")
    job.logs = logs if type(logs) is str else ""
    if "attempt_errors" in r:  # a terminal record of a job that was retried carries its earlier attempts
        errors = r.pop("attempt_errors")
        job.attempt_errors = errors if type(errors) is list else job.attempt_errors
    if r.get("status") == SUCCESS:
        job.status, job.result, job.error = SUCCESS, r.get("result"), None
    else:
        err = r.get("error")
        if type(err) is not dict:
            err = r["error"] = {"type": "WorkerError", "message": "malformed error report", "traceback": ""}
        job.status, job.result, job.error = FAILURE, None, err
        r["status"] = FAILURE
    job.started_at = r.get("started_at") or job.started_at
    job.finished_at = r.get("finished_at") or time.time()
    return r


def apply_cancel(job: Job, rec: dict[str, Any]) -> None:
    """Mark ``job`` canceled by a CANCEL record ``rec`` ({"at", "reason", "by"?, "running_on"?}).

    The error message says who canceled it and why, and whether it was interrupted while running.
    """
    job.status = CANCELED
    job.finished_at = rec["at"]
    if rec.get("attempt_errors"):
        job.attempt_errors = rec["attempt_errors"]
    reason, by, where = rec.get("reason") or "canceled", rec.get("by"), rec.get("running_on")
    message = f"canceled by {by}: {reason}" if by else reason
    if where:
        message += f" (interrupted while running on {where})"
    job.error = {"type": "Canceled", "message": message, "traceback": ""}


def apply_lost(job: Job, reason: str, at: float) -> None:
    """Mark ``job`` failed with WorkerLost after its last attempt's worker was lost."""
    job.status = FAILURE
    job.finished_at = at
    job.error = {"type": "WorkerLost",
                 "message": f"{reason}; gave up after {job.attempts} attempts", "traceback": ""}


UNTAGGED: frozenset[str | None] = frozenset((None,))  # the tag set of a worker started without tags


@dataclass
class WorkerSlot:
    """What the router knows of one registered worker."""

    identity: bytes
    name: str
    script: str | None  # None: a normal worker that serves any script
    credit: int  # total slots announced in READY
    heartbeat: float  # seconds between heartbeats it promised
    expires_at: float  # monotonic deadline: last message + heartbeat x liveness
    in_flight: dict[str, int] = field(default_factory=dict)  # job id -> attempt, in dispatch order
    last_dispatch: int = 0  # LRU tie-break counter
    supervisor: bytes | None = None  # routing id of its supervisor process (dedicated workers), if any
    tags: frozenset[str | None] = UNTAGGED  # job tags it takes; None stands for untagged jobs
    incarnation: str | None = None  # the worker process's id from READY, named in DISPATCH records
    # (log seq, RESULT batch number) of the worker's reports, acknowledged once the log is durable there
    acks: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)

    @property
    def free(self) -> int:
        """Slots this worker can take now."""
        return self.credit - len(self.in_flight)


def retry_delay(job: Job, error: Any, rand: float) -> float | None:
    """Seconds to wait before running ``job`` again after its current attempt failed with ``error``
    (the error dict), or None when it must not be retried: no retries left (``job.retries`` counts
    the failed attempts that are re-run), or the attempt was canceled.  ``rand`` in [0, 1) is the
    jitter (see :func:`zmqrun.model.backoff_delay`)."""
    failed = len(job.attempt_errors) if job.attempt_errors else 0
    if failed >= job.retries or not job.backoff:
        return None
    if type(error) is dict and error.get("type") == "Canceled":
        return None
    return backoff_delay(job.backoff, failed + 1, rand)


def attempt_open(job: Job, attempt: Any) -> bool:
    """True if a worker's report of ``attempt`` may still settle ``job`` although no worker slot holds it:
    the job's latest dispatch is that attempt, and since then it was only put back (a lost worker, a
    lease that ended) or leased, never dispatched again nor closed by a recorded failure."""
    if type(attempt) is not int or attempt < 1 or job.attempts != attempt:
        return False
    if job.status == QUEUED:
        errors = job.attempt_errors
        return not (errors and errors[-1].get("attempt") == attempt)
    return False


class JobQueue:
    """Queued, scheduled and running jobs plus the registered workers; decides dispatch.

    Not thread-safe; owned by the router loop.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}  # live jobs: queued (due or scheduled) and running
        # (script, tag) -> heap of (-priority, scheduled_for, order, id).  A heap entry whose order no
        # longer matches its job's is stale (the job was queued again since) and is skipped.
        self._ready: dict[tuple[str, str | None], list[tuple[int, float, int, str]]] = {}
        self._scheduled: list[tuple[float, int, str]] = []  # heap of (scheduled_for, order, id)
        self.leases: dict[str, float] = {}  # job id -> epoch seconds its lease ends (running, no worker slot)
        self.workers: dict[bytes, WorkerSlot] = {}
        self._order = itertools.count(1)
        self._lru = itertools.count(1)

    # -- jobs ---------------------------------------------------------------------------

    def next_order(self) -> int:
        """A new submission-order number."""
        return next(self._order)

    def add(self, job: Job, now: float) -> None:
        """Queue ``job`` (status queued): ready if due at ``now``, else scheduled."""
        job.status = QUEUED
        self.jobs[job.id] = job
        if job.scheduled_for <= now:
            heapq.heappush(self._ready.setdefault((job.script, job.tag), []),
                           (-job.priority, job.scheduled_for, job.order, job.id))
        else:
            heapq.heappush(self._scheduled, (job.scheduled_for, job.order, job.id))

    def retry(self, job: Job, at: float, now: float) -> None:
        """Queue ``job`` again to run at ``at`` (epoch seconds) after a failed attempt.

        It gets a new order number: behind the jobs of its priority already waiting, and any heap
        entry it still had (a report accepted while it was queued) goes stale.
        """
        self.leases.pop(job.id, None)
        job.worker = None
        job.scheduled_for = at
        job.order = next(self._order)
        self.add(job, now)

    def remove(self, job_id: str) -> Job | None:
        """Forget a live job (finished or canceled); heaps drop stale entries lazily."""
        self.leases.pop(job_id, None)
        return self.jobs.pop(job_id, None)

    def lease(self, job: Job, until: float) -> None:
        """Hold ``job`` as running without a worker slot until ``until`` (epoch seconds): a router that
        restarted waits that long for the job's worker to register again and report it."""
        job.status = RUNNING
        self.jobs[job.id] = job
        self.leases[job.id] = until

    def settle(self, job: Job, attempt: Any) -> bool:
        """A registered worker reports ``attempt`` of ``job``, which no worker slot holds: True if that
        report may settle the attempt (see :func:`attempt_open`).  Then the lease, if any, ends and the
        job counts as running until the caller finishes it or queues it again (:meth:`retry`), so a
        second report of the same attempt is refused."""
        if job.status == RUNNING:
            if job.id not in self.leases or type(attempt) is not int or job.attempts != attempt:
                return False
            del self.leases[job.id]
            return True
        if not attempt_open(job, attempt):
            return False
        job.status = RUNNING  # its heap entry goes stale: it is not dispatched again meanwhile
        return True

    def reclaim(self, w: WorkerSlot, job_id: Any, attempt: Any) -> bool:
        """Worker ``w``, registering, says it still runs ``attempt`` of ``job_id``: if no worker slot holds
        that attempt and it is still open (leased after a router restart, or queued again after the worker
        was lost and not dispatched since; see :meth:`settle`), the job is ``w``'s again, running in its
        slot and holding one of its credits.  True if taken back."""
        job = self.jobs.get(job_id) if type(job_id) is str else None
        if job is None or not self.settle(job, attempt):  # (a job in some worker's slot is not settled here)
            return False
        job.worker = w.name
        w.in_flight[job.id] = job.attempts
        return True

    def give_back(self, job_id: Any, attempt: Any, now: float) -> Job | None:
        """A registering worker says it dropped ``attempt`` of ``job_id`` from its buffer without starting
        it (its session with the router ended first).  If no worker slot holds that attempt and it is
        still open (leased after a router restart, or queued again and not dispatched since; see
        :func:`attempt_open`), the attempt does not count: the job is queued (due at ``now`` if it was
        leased) with one attempt less, and returned.  Else None."""
        job = self.jobs.get(job_id) if type(job_id) is str else None
        if job is None or type(attempt) is not int or job.attempts != attempt:
            return None
        if job.status == RUNNING:
            if job.id not in self.leases:
                return None  # in a worker's slot: that worker's to report
            del self.leases[job.id]
            job.worker = None
            self.add(job, now)
        elif not attempt_open(job, attempt):
            return None
        job.attempts -= 1
        return job

    def expire_leases(self, now: float) -> list[Job]:
        """Queue again (due now) every leased job whose lease ended by ``now``; return them."""
        ended = [jid for jid, until in self.leases.items() if until <= now]
        back = []
        for jid in ended:
            del self.leases[jid]
            job = self.jobs.get(jid)
            if job is not None and job.status == RUNNING:
                self.add(job, now)  # job.worker still names the worker that ran it: the caller logs it
                back.append(job)
        return back

    def promote_due(self, now: float) -> tuple[int, float | None]:
        """Move scheduled jobs that are due at ``now`` to the ready heaps.

        Returns (how many were promoted, the next scheduled time or None).
        """
        sched = self._scheduled
        promoted = 0
        while sched and sched[0][0] <= now:
            _, order, jid = heapq.heappop(sched)
            job = self.jobs.get(jid)
            if job is not None and job.status == QUEUED and job.order == order:
                heapq.heappush(self._ready.setdefault((job.script, job.tag), []),
                               (-job.priority, job.scheduled_for, job.order, job.id))
                promoted += 1
        return promoted, (sched[0][0] if sched else None)

    def counts(self, now: float) -> dict[str, int]:
        """Numbers of queued (due), scheduled (not yet due) and running jobs."""
        c = {"queued": 0, "scheduled": 0, "running": 0}
        for j in self.jobs.values():
            if j.status == RUNNING:
                c["running"] += 1
            elif j.scheduled_for > now:
                c["scheduled"] += 1
            else:
                c["queued"] += 1
        return c

    # -- workers ------------------------------------------------------------------------

    def add_worker(self, w: WorkerSlot) -> None:
        """Register a worker (after its READY)."""
        self.workers[w.identity] = w

    def remove_worker(self, identity: bytes, now: float) -> list[Job]:
        """Deregister a worker; its running jobs go back to the queue. Returns those jobs."""
        w = self.workers.pop(identity, None)
        if w is None:
            return []
        back = []
        for jid in w.in_flight:
            job = self.jobs.get(jid)
            if job is not None and job.status == RUNNING:
                job.worker = None
                self.add(job, now)
                back.append(job)
        return back

    # -- dispatch -----------------------------------------------------------------------

    def _pop_due(self, heap: list[tuple[int, float, int, str]]) -> Job | None:
        while heap:
            _, _, order, jid = heapq.heappop(heap)
            job = self.jobs.get(jid)
            if job is not None and job.status == QUEUED and job.order == order:
                return job
        return None

    def _peek_due(self, heap: list[tuple[int, float, int, str]]) -> tuple[int, float, int, str] | None:
        while heap:
            top = heap[0]
            job = self.jobs.get(top[3])
            if job is not None and job.status == QUEUED and job.order == top[2]:
                return top
            heapq.heappop(heap)
        return None

    def dispatch(self, now: float) -> list[tuple[WorkerSlot, list[Job]]]:
        """Assign due jobs to workers with free credit; mark them running.

        Returns [(worker, jobs)], one entry per worker that got jobs.  The caller
        bumps nothing: ``attempts``, ``worker``, ``started_at`` and the worker's
        ``in_flight`` are set here.  A worker takes only jobs whose tag is in its tag set.
        """
        ready = self._ready
        if not self.workers or not any(ready.values()):
            return []
        out: dict[bytes, tuple[WorkerSlot, list[Job]]] = {}
        # Workers that can take the same jobs (same script, same tags) are filled together, least-loaded first.
        dedicated: dict[tuple[str, frozenset[str | None]], list[WorkerSlot]] = {}
        normal: dict[frozenset[str | None], list[WorkerSlot]] = {}
        for w in self.workers.values():
            if w.free > 0:
                if w.script is None:
                    normal.setdefault(w.tags, []).append(w)
                else:
                    dedicated.setdefault((w.script, w.tags), []).append(w)
        # Dedicated workers first: each takes jobs of its own script (and tags).
        for (script, tags), ws in dedicated.items():
            heaps = [h for tag in tags if (h := ready.get((script, tag)))]
            if len(heaps) == 1:
                heap = heaps[0]
                self._fill(ws, lambda h=heap: self._pop_due(h), now, out)
            elif heaps:
                self._fill(ws, lambda hs=heaps: self._pop_best(hs), now, out)
        # Normal workers take the best due job of any script (with one of their tags).
        for tags, ws in normal.items():
            heaps = [h for (_script, tag), h in ready.items() if h and tag in tags]
            if heaps:
                self._fill(ws, lambda hs=heaps: self._pop_best(hs), now, out)
        return [entry for entry in out.values() if entry[1]]

    def _pop_best(self, heaps: list[list[tuple[int, float, int, str]]]) -> Job | None:
        best = None
        best_heap = None
        for heap in heaps:
            top = self._peek_due(heap)
            if top is not None and (best is None or top < best):
                best, best_heap = top, heap
        return self._pop_due(best_heap) if best_heap is not None else None

    def _fill(self, ws: list[WorkerSlot], pop, now: float, out: dict) -> None:
        """Give jobs from ``pop`` to ``ws``: least-loaded first, LRU on ties, one job at a time so load spreads."""
        lru = self._lru
        while True:
            if len(ws) == 1:
                w = ws[0]  # the common case: no choice to make, so hand out all its free credit at once
                n = w.free
                if n <= 0:
                    return
            else:
                free = [w for w in ws if w.free > 0]
                if not free:
                    return
                w = min(free, key=lambda w: (len(w.in_flight) / w.credit, w.last_dispatch))
                n = 1  # one at a time so load spreads evenly
            entry = out.get(w.identity)
            if entry is None:
                entry = out[w.identity] = (w, [])
            given, in_flight, name = entry[1], w.in_flight, w.name
            for _ in range(n):
                job = pop()
                if job is None:
                    return
                job.status = RUNNING
                job.attempts += 1
                job.worker = name
                job.started_at = now
                in_flight[job.id] = job.attempts
                given.append(job)
            w.last_dispatch = next(lru)
