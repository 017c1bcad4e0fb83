"""The finished-job archive: lookups by id answered from the log, not from a dict of every job.

What stays in memory:

- ``recent``: the last :data:`RECENT_JOBS` finished jobs as full :class:`Job`
  objects (results and logs), so ``wait``/``get`` right after a job finishes
  costs no disk read; a large job (see :meth:`Archive.slim`) keeps its place
  there as its two sequence numbers only;
- per segment without an index file (the active one, and a sealed one until its
  index is written): ``{job id: (submit_seq, end_seq)}``;
- per sealed segment: its :class:`~zmqrun.segindex.SegmentIndex`, searched
  through mmap.

Any other finished job is rebuilt from two records read back from the log: its
SUBMIT (script, args, times, tag, retry policy) and its terminal record (FINISH,
CANCEL or final REQUEUE: outcome, worker, attempts, and the errors of earlier
attempts that were retried, which the router adds to the terminal record of
such a job).  A job whose records were removed by
retention is unknown ("expired"), which is what a lookup then says.
"""

from __future__ import annotations

import collections
import errno
import logging
from typing import Any, Iterator

import orjson

from .joblog import CANCEL, FINISH, REQUEUE, SUBMIT, JobLog, LogCorruption, Segment
from .queue import Job, apply_cancel, apply_lost, apply_result, job_from

log = logging.getLogger("zmqrun.router")

RECENT_JOBS = 4096


class ArchiveDamaged(Exception):
    """A finished job's records cannot be read back (a damaged or unreadable segment); one readable line."""


class Archive:
    """Finished jobs of one router (see the module docstring).  Not thread-safe: the router loop owns it."""

    def __init__(self, jlog: JobLog, recent_max: int = RECENT_JOBS) -> None:
        self.log = jlog
        # job id -> Job, or (submit_seq, end_seq) for a large job slimmed down (read back when asked for)
        self.recent: collections.OrderedDict[str, Job | tuple[int, int]] = collections.OrderedDict()
        self.recent_max = recent_max
        self.open: dict[int, dict[str, tuple[int, int]]] = {}  # segment first_seq -> entries (no index yet)
        self._open_min: dict[int, int] = {}  # segment first_seq -> smallest submit_seq among its entries
        # Entry dicts of segments that got their index file, freed a slice per loop iteration: dropping a
        # 64 MiB segment's ~250k entries at once stalls the loop ~20 ms (issue 4: "a few ms" at most).
        self.retired: list[dict[str, tuple[int, int]]] = []

    # -- adding -------------------------------------------------------------------------

    def add(self, job: Job, end_seq: int, seg: Segment | None = None) -> None:
        """Record that ``job`` finished with terminal record ``end_seq`` (in ``seg``, default: the active one)."""
        self.recent[job.id] = job
        first = (seg or self.log.segments[-1]).first_seq
        entries = self.open.get(first)
        if entries is None:
            entries = self.open[first] = {}
        entries[job.id] = (job.submit_seq, end_seq)
        if job.submit_seq < self._open_min.get(first, end_seq + 1):
            self._open_min[first] = job.submit_seq

    def add_batch(self, jobs: list[Job], end_seq: int) -> None:
        """:meth:`add` for jobs that share one terminal record in the active segment (the router's hot path:
        one dict lookup per batch instead of per job)."""
        first = self.log.segments[-1].first_seq
        entries = self.open.get(first)
        if entries is None:
            entries = self.open[first] = {}
        recent = self.recent
        low = end_seq + 1
        for job in jobs:
            jid, sub = job.id, job.submit_seq
            recent[jid] = job
            entries[jid] = (sub, end_seq)
            if sub < low:
                low = sub
        if low < self._open_min.get(first, end_seq + 1):
            self._open_min[first] = low

    def trim(self) -> None:
        """Drop the oldest full jobs beyond ``recent_max`` (call after the log flush: they are on disk then)."""
        recent = self.recent
        while len(recent) > self.recent_max:
            recent.popitem(last=False)

    def slim(self, jobs: list[Job], end_seq: int) -> None:
        """Keep only the sequence numbers of these finished jobs (terminal record ``end_seq``) in the recent
        cache, in their place: large jobs whose args or result the router should not hold (S5), which
        a lookup or a listing reads back from the log."""
        recent = self.recent
        for job in jobs:
            if job.id in recent:
                recent[job.id] = (job.submit_seq, end_seq)

    def entries_of(self, seg: Segment) -> dict[str, tuple[int, int]]:
        """The (submit_seq, end_seq) entries of jobs that finished in ``seg`` and have no index file yet."""
        return self.open.get(seg.first_seq, {})

    def indexed(self, seg: Segment) -> None:
        """``seg``'s index file is written and opened: forget its in-memory entries (freed later, in
        slices, by :meth:`release`)."""
        entries = self.open.pop(seg.first_seq, None)
        if entries:
            self.retired.append(entries)
        self._open_min.pop(seg.first_seq, None)

    def release(self, budget: int = 8192) -> None:
        """Free up to ``budget`` retired entries (~1 ms of CPU per 8k here); call while :attr:`retired`."""
        while self.retired and budget > 0:
            entries = self.retired[-1]
            n = min(budget, len(entries))
            budget -= n
            pop = entries.popitem
            for _ in range(n):
                pop()
            if not entries:
                self.retired.pop()

    def expire_through(self, seq: int) -> None:
        """Records up to ``seq`` were removed by retention: forget recent jobs submitted in them (they now
        read as unknown, like every other job whose records are gone)."""
        for jid in [jid for jid, job in self.recent.items()
                    if (job[0] if type(job) is tuple else job.submit_seq) <= seq]:  # type: ignore[union-attr]
            del self.recent[jid]

    def open_min_submit(self) -> list[int]:
        """The smallest SUBMIT sequence number referenced by each segment without an index (retention)."""
        return list(self._open_min.values())

    # -- lookups ------------------------------------------------------------------------

    def locate(self, job_id: str) -> tuple[int, int] | None:
        """(submit_seq, end_seq) of a finished job, or None if unknown."""
        for entries in self.open.values():
            hit = entries.get(job_id)
            if hit is not None:
                return hit
        for seg in reversed(self.log.segments):
            if seg.index is not None:
                hit = seg.index.find(job_id)
                if hit is not None:
                    return hit
        return None

    def contains(self, job_id: str) -> bool:
        """True if ``job_id`` finished (and is not expired)."""
        return job_id in self.recent or self.locate(job_id) is not None

    def get(self, job_id: str) -> Job | None:
        """The finished job, rebuilt from the log if it is not among the recent ones; None if unknown or expired."""
        job = self.recent.get(job_id)
        if type(job) is tuple:
            return self.rebuild(job_id, *job)
        if job is not None:
            return job  # type: ignore[return-value]
        loc = self.locate(job_id)
        return self.rebuild(job_id, *loc) if loc is not None else None

    def rebuild(self, job_id: str, submit_seq: int, end_seq: int,
                cache: dict[int, _Decoded | None] | None = None) -> Job | None:
        """A finished :class:`Job` from its SUBMIT and terminal records; None if either is gone (retention).

        ``cache`` (seq -> decoded record) lets a caller rebuilding many jobs (a listing) read and decode
        each record once: a SUBMIT or FINISH record holds up to a batch of jobs.
        Raises :class:`ArchiveDamaged` if a record cannot be read (damaged or unreadable segment)."""
        try:
            sub = self._decoded(submit_seq, cache)
            end = self._decoded(end_seq, cache)
        except (LogCorruption, OSError) as e:  # a lookup must not take the router down, nor say "unknown"
            if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                raise ArchiveDamaged(f"job {job_id} cannot be read back now: the router is out of file "
                                     f"descriptors (too many connections?); try again") from None
            where = f"{e.path.name} at offset {e.offset}: {e.why}" if isinstance(e, LogCorruption) else str(e)
            msg = (f"job {job_id} is in the archive but its records cannot be read back ({where}); "
                   f"run `zmqrun log check {self.log.dir}`")
            log.error("%s", msg)
            raise ArchiveDamaged(msg) from None
        if sub is None or end is None or sub.rtype != SUBMIT:
            return None
        d = sub.find(job_id)
        if d is None:
            return None
        job = job_from(d)
        job.submit_seq = submit_seq
        rec = end.rec
        if end.rtype == FINISH:
            r = end.find(job_id)
            if r is None:
                return None
            job.worker, job.attempts = rec.get("worker"), r.get("attempt") or 0
            apply_result(job, dict(r))  # a copy: apply_result pops fields and the record may be cached
        elif end.rtype == CANCEL:
            job.attempts = rec.get("attempts", 0)
            apply_cancel(job, rec)
        elif end.rtype == REQUEUE:
            entry = end.find(job_id)
            if entry is None:
                return None
            job.attempts, job.worker = entry[1], entry[3] if len(entry) > 3 else None
            job.started_at = entry[4] if len(entry) > 4 else None
            if len(entry) > 5 and entry[5]:
                job.attempt_errors = entry[5]
            apply_lost(job, entry[2], rec["at"])
        else:
            return None
        return job

    def _decoded(self, seq: int, cache: dict[int, _Decoded | None] | None) -> _Decoded | None:
        if cache is not None and seq in cache:
            return cache[seq]
        raw = self.log.read_record(seq)
        out = None if raw is None else _Decoded(raw[0], orjson.loads(raw[1]))
        if cache is not None:
            if len(cache) >= 4096:  # bounded: a listing walks records in order, old entries are done
                cache.clear()
            cache[seq] = out
        return out

    def count(self) -> int:
        """How many finished jobs the archive holds."""
        n = sum(len(e) for e in self.open.values())
        return n + sum(seg.index.n_entries for seg in self.log.segments if seg.index is not None)

    def newest(self, budget: int) -> Iterator[Job]:
        """Finished jobs, most recently finished first: the recent ones, then up to ``budget`` rebuilt from disk."""
        seen = set()
        cache: dict[int, _Decoded | None] = {}
        for jid, job in reversed(self.recent.items()):
            seen.add(jid)
            if type(job) is tuple:  # a large job: read back (it counts against the budget)
                budget -= 1
                try:
                    job = self.rebuild(jid, *job, cache)
                except ArchiveDamaged:
                    continue
                if job is None:
                    continue
            yield job  # type: ignore[misc]
        for seg in reversed(self.log.segments):
            if budget <= 0:
                return
            if seg.index is not None:
                items = sorted(seg.index.entries(), key=lambda e: e[2], reverse=True)
            else:
                items = sorted(((k, s, e) for k, (s, e) in self.open.get(seg.first_seq, {}).items()),
                               key=lambda e: e[2], reverse=True)
            for jid, s, e in items:
                if jid in seen:
                    continue
                if budget <= 0:
                    return
                budget -= 1
                try:
                    job = self.rebuild(jid, s, e, cache)
                except ArchiveDamaged:
                    continue  # logged; a listing shows what can be read
                if job is not None:
                    yield job


class _Decoded:
    """One decoded log record and, built on first use, its entries by job id (SUBMIT: the job dicts;
    FINISH: the result of the highest attempt; REQUEUE: the first entry)."""

    __slots__ = ("rtype", "rec", "_by_id")

    def __init__(self, rtype: int, rec: Any) -> None:
        self.rtype, self.rec = rtype, rec
        self._by_id: dict[Any, Any] | None = None

    def find(self, job_id: str) -> Any:
        by_id = self._by_id
        if by_id is None:
            by_id = self._by_id = {}
            rec = self.rec
            if self.rtype == SUBMIT:
                for j in rec["jobs"]:
                    by_id.setdefault(j["id"], j)
            elif self.rtype == FINISH:
                # Only the accepted report is logged; a log written before junk entries were filtered out
                # may hold others (ids and attempts of any type): of those, the highest whole-number
                # attempt is the best guess.
                for r in rec["results"]:
                    if isinstance(r, dict) and type(r.get("id")) is str and type(r.get("attempt")) is int:
                        old = by_id.get(r["id"])
                        if old is None or r["attempt"] > old["attempt"]:
                            by_id[r["id"]] = r
            elif self.rtype == REQUEUE:
                for e in rec["jobs"]:
                    by_id.setdefault(e[0], e)
        return by_id.get(job_id)


def submitted_as(job: Job) -> dict[str, Any]:
    """The job as its SUBMIT record holds it (the normalized job dict :func:`job_from` reads; the
    optional fields tag, retries, backoff and retry_of only when set)."""
    d = {"id": job.id, "script": job.script, "args": job.args, "priority": job.priority,
         "scheduled_for": job.scheduled_for, "timeout": job.timeout, "created_at": job.created_at}
    if job.tag is not None:
        d["tag"] = job.tag
    if job.retries or job.backoff:
        d["retries"], d["backoff"] = job.retries, job.backoff
    if job.retry_of is not None:
        d["retry_of"] = job.retry_of
    return d


_OPTIONAL = ("tag", "retries", "backoff", "retry_of", "attempt_errors")


def state_of(job: Job, inc: str | None = None) -> list[Any]:
    """A live job as a snapshot row (every field replay needs; a list, not a dict: 100k of them are
    decoded at every start).  The optional fields (tag, retry policy, retry_of, attempt errors, and
    ``inc``: the incarnation of the worker process a running job was dispatched to, see
    ``Router._give_back_unreceived``) follow as a 13th element, a dict, only when one of them is set."""
    row = [job.id, job.script, job.args, job.priority, job.scheduled_for, job.timeout, job.created_at,
           job.status, job.attempts, job.worker, job.started_at, job.submit_seq]
    extra = {key: value for key in _OPTIONAL if (value := getattr(job, key))}
    if inc is not None:
        extra["inc"] = inc
    if extra:
        row.append(extra)
    return row


def job_from_state(row: list[Any]) -> Job:
    """The inverse of :func:`state_of`."""
    (jid, script, args, priority, scheduled_for, timeout, created_at, status, attempts, worker, started_at,
     submit_seq) = row[:12]
    job = Job(jid, script, args, priority, scheduled_for, timeout, created_at, 0)
    job.status, job.attempts, job.worker = status, attempts, worker
    job.started_at, job.submit_seq = started_at, submit_seq
    if len(row) > 12:
        extra = row[12]
        job.tag, job.retries, job.backoff = extra.get("tag"), extra.get("retries") or 0, extra.get("backoff")
        job.retry_of, job.attempt_errors = extra.get("retry_of"), extra.get("attempt_errors")
    return job
