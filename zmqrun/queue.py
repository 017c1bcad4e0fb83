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
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from .model import CANCELED, FAILURE, QUEUED, RUNNING, SUCCESS


class Job:
    """A live or finished job as the router keeps it (times are epoch seconds)."""

    __slots__ = ("id", "script", "args", "priority", "scheduled_for", "timeout", "created_at",
                 "started_at", "finished_at", "worker", "attempts", "status", "result", "error",
                 "logs", "order", "watchers", "submit_seq")

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

    def wire(self) -> dict[str, Any]:
        """Every field as a JSON-ready dict (times as epoch seconds)."""
        return {
            "id": self.id, "script": self.script, "args": self.args, "priority": self.priority,
            "scheduled_for": self.scheduled_for, "timeout": self.timeout, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "worker": self.worker,
            "attempts": self.attempts, "status": self.status, "result": self.result,
            "error": self.error, "logs": self.logs,
        }

    def outcome(self) -> dict[str, Any]:
        """The compact result pushed to waiting clients."""
        if self.error is not None:
            return {"id": self.id, "status": self.status, "error": self.error}
        return {"id": self.id, "status": self.status, "result": self.result}


def job_from(d: dict[str, Any], order: int = 0) -> Job:
    """A queued Job from a normalized job dict (see :func:`zmqrun.router.normalize_job`), as submitted or replayed."""
    return Job(d["id"], d["script"], d["args"], d["priority"], d["scheduled_for"], d["timeout"],
               d["created_at"], order)


# -- state transitions shared by live handling, replay and archive lookups ----------------

def apply_result(job: Job, r: dict[str, Any]) -> dict[str, Any]:
    """Record a worker's report ``r`` on ``job``; return ``r`` minus its logs, which doubles as the
    outcome pushed to clients (no second dict per job on the hot path)."""
    logs = r.pop("logs", "")
    job.logs = logs if type(logs) is str else ""
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

    @property
    def free(self) -> int:
        """Slots this worker can take now."""
        return self.credit - len(self.in_flight)


class JobQueue:
    """Queued, scheduled and running jobs plus the registered workers; decides dispatch.

    Not thread-safe; owned by the router loop.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}  # live jobs: queued (due or scheduled) and running
        self._ready: dict[str, list[tuple[int, float, int, str]]] = {}  # script -> heap
        self._scheduled: list[tuple[float, int, str]] = []  # heap of (scheduled_for, order, id)
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
            heapq.heappush(self._ready.setdefault(job.script, []),
                           (-job.priority, job.scheduled_for, job.order, job.id))
        else:
            heapq.heappush(self._scheduled, (job.scheduled_for, job.order, job.id))

    def remove(self, job_id: str) -> Job | None:
        """Forget a live job (finished or canceled); heaps drop stale entries lazily."""
        return self.jobs.pop(job_id, None)

    def promote_due(self, now: float) -> tuple[int, float | None]:
        """Move scheduled jobs that are due at ``now`` to the ready heaps.

        Returns (how many were promoted, the next scheduled time or None).
        """
        sched = self._scheduled
        promoted = 0
        while sched and sched[0][0] <= now:
            _, _, jid = heapq.heappop(sched)
            job = self.jobs.get(jid)
            if job is not None and job.status == QUEUED:
                heapq.heappush(self._ready.setdefault(job.script, []),
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
            jid = heapq.heappop(heap)[3]
            job = self.jobs.get(jid)
            if job is not None and job.status == QUEUED:
                return job
        return None

    def _peek_due(self, heap: list[tuple[int, float, int, str]]) -> tuple[int, float, int, str] | None:
        while heap:
            job = self.jobs.get(heap[0][3])
            if job is not None and job.status == QUEUED:
                return heap[0]
            heapq.heappop(heap)
        return None

    def dispatch(self, now: float) -> list[tuple[WorkerSlot, list[Job]]]:
        """Assign due jobs to workers with free credit; mark them running.

        Returns [(worker, jobs)], one entry per worker that got jobs.  The caller
        bumps nothing: ``attempts``, ``worker``, ``started_at`` and the worker's
        ``in_flight`` are set here.
        """
        if not self.workers or not any(self._ready.values()):
            return []
        out: dict[bytes, tuple[WorkerSlot, list[Job]]] = {}
        dedicated: dict[str, list[WorkerSlot]] = {}
        normal: list[WorkerSlot] = []
        for w in self.workers.values():
            if w.free > 0:
                if w.script is None:
                    normal.append(w)
                else:
                    dedicated.setdefault(w.script, []).append(w)
        # Dedicated workers first: each takes jobs of its own script.
        for script, ws in dedicated.items():
            heap = self._ready.get(script)
            if heap:
                self._fill(ws, lambda h=heap: self._pop_due(h), now, out)
        # Normal workers take the best due job of any script.
        if normal:
            self._fill(normal, self._pop_best_any, now, out)
        return [entry for entry in out.values() if entry[1]]

    def _pop_best_any(self) -> Job | None:
        best = None
        best_heap = None
        for heap in self._ready.values():
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
