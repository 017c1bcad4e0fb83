"""Offline tools for a data dir: ``zmqrun log check`` (verify, read-only) and ``zmqrun log repair``.

:func:`check` reads every file of a data dir and verifies it against the rules of
``shared/reference/log-format.md`` (see :mod:`zmqrun.joblog`):

- every batch of every segment: magic, header CRC, length bound, body CRC, record framing, sequence
  continuity within a segment and across segments, the segment header and its file name;
- every index file: opens with its CRCs verified, its first/last sequence and batch table match the
  segment, its entries point at terminal records of that segment;
- every snapshot (CRCs) and CURRENT (CRC, names an existing snapshot that verifies);
- what the router would do on start, decided the way :meth:`zmqrun.router.Router.recover` and
  :meth:`zmqrun.joblog.JobLog.recover` decide it: which snapshot it loads, that the segments after it
  start at its sequence + 1, that every segment it covers has an index, whether a bad tail is a torn
  write it truncates (a warning) or corruption it refuses (an error).

It never writes: it does not even take the data dir's lock (it only probes it with a non-blocking
shared flock, released at once, to say whether a router is running).

:func:`plan_repair` and :func:`repair` cut the log at its first bad batch (``zmqrun log repair
--truncate-at-corruption``): the segment is truncated there, later segments are removed, and so are
index files and snapshots that refer to records past the cut; then :func:`check` passes.

Exit codes of the CLI (:func:`Report.exit_code`): 0 healthy (warnings allowed, e.g. a torn tail the
router truncates), 1 corruption, 2 the data dir cannot be read.
"""

from __future__ import annotations

import fcntl
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .fsio import RealFS
from .joblog import (
    CANCEL,
    FINISH,
    REQUEUE,
    SEGMENT_HEADER_SIZE,
    BatchProblem,
    LogLocked,
    lock_data_dir,
    read_segment,
    synced_prefix_claim,
    segment_header,
    segment_name,
)
from .segindex import IndexCorrupt, SegmentIndex, index_name
from .snapshot import SnapshotCorrupt, decode_snapshot, encode_current, snapshot_name

ERROR = "error"
WARNING = "warning"
_TERMINAL = (FINISH, CANCEL, REQUEUE)


class CheckError(Exception):
    """The data dir cannot be checked or repaired (missing, not a directory, unreadable, in use)."""


@dataclass
class Finding:
    """One problem: ``severity`` is :data:`ERROR` or :data:`WARNING`; ``file`` a name in the data dir;
    ``offset`` a byte offset in it (None: the whole file)."""

    severity: str
    file: str
    offset: int | None
    what: str

    def __str__(self) -> str:
        where = self.file if self.offset is None else f"{self.file} at offset {self.offset}"
        return f"{where}: {self.what}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"severity": self.severity, "file": self.file, "offset": self.offset, "what": self.what}


@dataclass
class SegmentScan:
    """What reading one segment on its own found.

    ``inner`` is the first problem inside the segment (read without an expected first sequence);
    ``problem`` the first problem including sequence continuity with the segment before it.  The
    counts cover the good batches before ``inner``.
    """

    name: str
    path: Path
    first_seq: int  # from the file name
    size: int  # bytes
    header_first: int | None  # from the header, None if the header is bad
    records: int
    batches: array  # flat (first_seq, offset) pairs of the good batches
    types: bytes  # record type of each good record
    good_end: int  # offset after the last good batch
    inner: BatchProblem | None
    later: int | None  # offset of a valid batch header after ``inner``
    zeros: bool  # every byte from ``inner`` on is zero
    synced_to: int = 0  # the furthest synced prefix a batch after ``inner`` vouches for (joblog sync_lag)
    problem: BatchProblem | None = None
    index: SegmentIndex | None = None
    index_problem: str | None = None  # the index file exists but does not open (torn, CRC)

    @property
    def end_seq(self) -> int:
        """The last good sequence number (``first_seq - 1`` if the segment holds no good record)."""
        first = self.header_first if self.header_first is not None else self.first_seq
        return first + self.records - 1

    def index_last(self) -> float:
        """The last sequence number by the segment's (opened) index; infinity without one."""
        return self.index.last_seq if self.index is not None else float("inf")

    def problem_for(self, expect: int | None) -> BatchProblem | None:
        """The first problem when the segment must start at ``expect`` (None: any start), as
        :func:`zmqrun.joblog.read_segment` reports it."""
        if self.inner is not None and self.inner.offset == 0:
            return self.inner  # header, version or file name: checked before the sequence
        if expect is not None and self.header_first != expect:
            return BatchProblem(0, f"sequence gap: segment starts at {self.header_first}, expected {expect}")
        return self.inner


@dataclass
class Report:
    """The result of :func:`check`.  ``findings`` are in log order (segments first, oldest first, then
    index files, snapshots and other files); ``refusal`` is what the router would refuse to start with."""

    data_dir: Path
    in_use: bool = False
    segments: list[SegmentScan] = field(default_factory=list)
    snapshots: list[tuple[str, int, str | None]] = field(default_factory=list)  # (name, seq, problem)
    current: tuple[int | None, str | None] | None = None  # (seq named, problem); None: no CURRENT file
    orphan_indexes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    snapshot_used: int = 0  # the snapshot the router loads (0: none, replay from the first segment)
    replayed: list[str] = field(default_factory=list)  # segments the router reads on start
    refusal: Finding | None = None

    @property
    def errors(self) -> list[Finding]:
        """Findings of severity error."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def exit_code(self) -> int:
        """0 healthy (warnings allowed), 1 corruption."""
        return 1 if self.errors else 0

    @property
    def first_problem(self) -> Finding | None:
        """The first error, or if there is none the first warning."""
        errors = self.errors
        return errors[0] if errors else (self.findings[0] if self.findings else None)

    @property
    def records(self) -> int:
        """Good records over all segments."""
        return sum(s.records for s in self.segments)

    @property
    def seq_range(self) -> tuple[int, int] | None:
        """(first, last) sequence number of the good records, None if there is none."""
        held = [s for s in self.segments if s.records]
        return (held[0].header_first, held[-1].end_seq) if held else None  # type: ignore[return-value]

    def close(self) -> None:
        """Unmap the index files opened by the check."""
        for s in self.segments:
            if s.index is not None:
                s.index.close()
                s.index = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``zmqrun log check --json``)."""
        rng = self.seq_range
        return {
            "data_dir": str(self.data_dir),
            "in_use": self.in_use,
            "status": "corrupt" if self.errors else ("warning" if self.findings else "healthy"),
            "exit_code": self.exit_code,
            "segments": {"count": len(self.segments), "bytes": sum(s.size for s in self.segments),
                         "files": [{"name": s.name, "bytes": s.size, "first_seq": s.first_seq,
                                    "records": s.records, "batches": len(s.batches) // 2,
                                    "index": s.index is not None} for s in self.segments]},
            "records": self.records,
            "batches": sum(len(s.batches) // 2 for s in self.segments),
            "seq_range": list(rng) if rng else None,
            "snapshots": [{"name": n, "seq": q, "ok": p is None, "problem": p} for n, q, p in self.snapshots],
            "current": None if self.current is None else {"seq": self.current[0], "ok": self.current[1] is None,
                                                          "problem": self.current[1]},
            "index_files": sum(1 for s in self.segments if s.index is not None or s.index_problem),
            "snapshot_used": self.snapshot_used or None,
            "replayed": self.replayed,
            "refusal": self.refusal.to_dict() if self.refusal else None,
            "first_problem": self.first_problem.to_dict() if self.first_problem else None,
            "findings": [f.to_dict() for f in self.findings],
        }


def lock_held(data_dir: Path) -> bool:
    """True if a process (a running router) holds the data dir's lock (an flock on the directory).

    Probes with a non-blocking shared flock and releases it at once, so a router starting at the same
    moment is not disturbed."""
    try:
        fd = lock_data_dir(data_dir, shared=True)
    except LogLocked:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return False


def _scan_segment(path: Path, first_seq: int) -> SegmentScan:
    data = path.read_bytes()
    batches = array("q")
    records, good_end, inner = read_segment(path, data, None, batches)
    header_first = None if inner is not None and inner.offset == 0 else first_seq
    later = zeros = None
    synced_to = 0
    if inner is not None:
        later, synced_to = synced_prefix_claim(data, inner.offset)
        zeros = data.count(0, inner.offset) == len(data) - inner.offset
    return SegmentScan(path.name, path, first_seq, len(data), header_first, len(records), batches,
                       bytes(t for _s, t, _p in records), good_end, inner, later, bool(zeros), synced_to)


def _index_mismatch(idx: SegmentIndex, scan: SegmentScan) -> str | None:
    """Why ``idx`` does not describe the good part of ``scan``, or None if it does."""
    if idx.first_seq != scan.first_seq:
        return f"the index says the segment starts at {idx.first_seq}, the segment at {scan.first_seq}"
    if idx.last_seq != scan.end_seq:
        return f"the index says the segment ends at sequence {idx.last_seq}, it ends at {scan.end_seq}"
    n = len(scan.batches) // 2
    if idx.n_batches != n:
        return f"the index lists {idx.n_batches} batches, the segment has {n}"
    for i in range(0, len(scan.batches), 2):
        first, off = scan.batches[i], scan.batches[i + 1]
        if idx.batch_for(first) != (first, off):
            return f"the index places the batch of sequence {first} at {idx.batch_for(first)}, it is at offset {off}"
    min_submit = idx.last_seq + 1
    for jid, submit_seq, end_seq in idx.entries():
        if not idx.first_seq <= end_seq <= idx.last_seq or submit_seq > end_seq:
            return f"entry {jid} ({submit_seq}, {end_seq}) lies outside the segment"
        if scan.types[end_seq - idx.first_seq] not in _TERMINAL:
            return f"entry {jid} points at record {end_seq}, which is not a FINISH, CANCEL or REQUEUE"
        min_submit = min(min_submit, submit_seq)
    if idx.min_submit_seq != min_submit:
        return f"the index says its smallest SUBMIT sequence is {idx.min_submit_seq}, its entries say {min_submit}"
    return None


def _read_current(path: Path) -> tuple[int | None, str | None]:
    """(seq CURRENT names, problem or None), checked as :func:`zmqrun.snapshot.read_current` does."""
    import zlib

    lines = path.read_bytes().split(b"\n")
    if len(lines) < 2 or f"{zlib.crc32(lines[0]):08x}".encode() != lines[1]:
        return None, "fails its CRC"
    try:
        d = orjson.loads(lines[0])
        seq = int(d["seq"])
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as e:
        return None, f"unreadable ({e})"
    if d.get("snapshot") != snapshot_name(seq):
        return seq, f"names {d.get('snapshot')!r} but sequence {seq}"
    return seq, None


def _harmless_junk(sc: SegmentScan, problem: BatchProblem, nxt: SegmentScan) -> bool:
    """Bytes after the last good batch of a sealed segment that the next segment proves are no record
    (it starts at the next sequence number): the router truncates them (JobLog.recover)."""
    return problem.offset > 0 and sc.header_first is not None and nxt.first_seq == sc.end_seq + 1


def _classify_last(sc: SegmentScan, problem: BatchProblem) -> Finding:
    """What the router makes of ``problem`` in the last segment (JobLog.recover): a torn segment header it
    removes, a torn or zero-filled tail it truncates (warnings), or mid-file corruption it refuses (error)."""
    if problem.offset == 0 and problem.why in ("truncated segment header", "bad segment header") \
            and sc.size <= SEGMENT_HEADER_SIZE:
        return Finding(WARNING, sc.name, 0, f"torn segment header ({sc.size} bytes, no record): the router "
                       "removes this empty segment on start")
    if problem.offset == 0 or problem.complete or (sc.later is not None and sc.synced_to > problem.offset):
        why = problem.why + (f"; a valid batch follows at offset {sc.later}, written after the damaged bytes "
                             "were synced" if sc.later is not None else "")
        return Finding(ERROR, sc.name, problem.offset, why + "; the router refuses to start")
    n = sc.size - problem.offset
    if sc.later is not None:
        return Finding(WARNING, sc.name, problem.offset, f"damaged batch ({problem.why}) followed by batches "
                       f"written before any sync covered it (a crash before fdatasync): the router will truncate "
                       f"{n} bytes at offset {problem.offset} on start, none of them acknowledged")
    if sc.zeros:
        return Finding(WARNING, sc.name, problem.offset, f"zero-filled tail (zeros written ahead for appends, "
                       f"or an unfinished write: no record in it): the router will truncate {n} zero bytes at "
                       f"offset {problem.offset} on start")
    return Finding(WARNING, sc.name, problem.offset, f"torn tail ({problem.why}): the router will truncate "
                   f"{n} bytes at offset {problem.offset} on start")


def check(data_dir: str | os.PathLike[str]) -> Report:
    """Verify a data dir without changing it; return a :class:`Report` (call ``close()`` when done).

    Raises :class:`CheckError` if the dir does not exist, is not a directory or a file in it cannot
    be read.  Reads every segment whole, one at a time (memory: about one segment).
    """
    d = Path(data_dir)
    if not d.exists():
        raise CheckError(f"data dir {d} does not exist")
    if not d.is_dir():
        raise CheckError(f"data dir {d} is not a directory")
    if not any(name.startswith(("seg-", "snap-")) for name in os.listdir(d)):
        # A mistyped path must not pass as "healthy" (found by a new-user session).
        raise CheckError(f"{d} holds no job log (no seg-*.log or snapshot file): is it a router's --data-dir?")
    rep = Report(d)
    try:
        rep.in_use = lock_held(d)
        _check(rep)
    except OSError as e:
        rep.close()
        hint = " (a running router changes the dir: try again)" if rep.in_use else ""
        raise CheckError(f"cannot read {getattr(e, 'filename', None) or d}: {e.strerror or e}{hint}") from None
    return rep


def _check(rep: Report) -> None:
    d = rep.data_dir
    names = sorted(os.listdir(d))
    present = set(names)
    add = rep.findings.append
    other: list[Finding] = []

    # -- segments, in the router's order ----------------------------------------------------------------
    segs = rep.segments
    for name in names:
        if not (name.startswith("seg-") and name.endswith(".log")):
            continue
        try:
            first = int(name[4:-4])
        except ValueError:
            other.append(Finding(WARNING, name, None, "not a segment name; the router ignores this file"))
            continue
        segs.append(_scan_segment(d / name, first))
    expect: int | None = None
    for i, sc in enumerate(segs):
        sc.problem = sc.problem_for(expect)
        expect = sc.end_seq + 1 if sc.problem is None else None
    # Index files: the router opens (and CRC-checks) the index of each segment it lists.
    for sc in segs:
        if index_name(sc.first_seq) in present:
            try:
                sc.index = SegmentIndex(d / index_name(sc.first_seq), verify=True)
            except IndexCorrupt as e:
                sc.index_problem = str(e).split(": ", 1)[-1]
    seg_firsts = {sc.first_seq for sc in segs}
    for name in names:
        if name.startswith("seg-") and name.endswith(".idx"):
            try:
                idx_first: int | None = int(name[4:-4])
            except ValueError:
                idx_first = None
            if idx_first not in seg_firsts:
                rep.orphan_indexes.append(name)
                other.append(Finding(WARNING, name, None, "index file without its segment (left by an "
                                     "interrupted retention); the router ignores it"))
        elif name.endswith(".tmp"):
            other.append(Finding(WARNING, name, None, "temporary file of an interrupted write; the router "
                                 "removes it on start"))

    # -- snapshots and CURRENT, as zmqrun.snapshot.load_latest picks one ---------------------------------
    snap_findings: list[Finding] = []
    valid: list[int] = []
    for name in names:
        if not name.startswith("snap-") or name.endswith(".tmp"):
            continue
        if name.endswith(".damaged"):
            other.append(Finding(WARNING, name, None, "a snapshot the router found damaged and set aside; "
                                 "it is not used (delete it once inspected)"))
            continue
        try:
            seq = int(name[5:])
        except ValueError:
            other.append(Finding(WARNING, name, None, "not a snapshot name; the router ignores this file"))
            continue
        try:
            got, _jobs = decode_snapshot((d / name).read_bytes(), name)
        except (SnapshotCorrupt, orjson.JSONDecodeError, KeyError, TypeError) as e:
            rep.snapshots.append((name, seq, str(e).split(": ", 1)[-1]))
            continue
        if got != seq:
            rep.snapshots.append((name, seq, f"its header says sequence {got}"))
            snap_findings.append(Finding(ERROR, name, None, f"the file name says sequence {seq}, its header {got}"))
            continue
        rep.snapshots.append((name, seq, None))
        valid.append(seq)
    rep.snapshots.sort(key=lambda t: t[1])
    valid.sort()
    used = valid[-1] if valid else 0
    for name, snap_seq, why in reversed(rep.snapshots):
        if why is not None and snap_seq > used:
            then = f"the router falls back to {snapshot_name(used)}" if used else \
                "the router replays the whole log instead"
            snap_findings.append(Finding(WARNING, name, None, f"damaged snapshot ({why}); {then}"))
        elif why is not None:
            snap_findings.append(Finding(WARNING, name, None, f"damaged older snapshot ({why}); not used"))
    if "CURRENT" in present:
        cur_seq, why = _read_current(d / "CURRENT")
        if why is None and cur_seq not in [q for _n, q, _w in rep.snapshots]:
            why = f"names {snapshot_name(cur_seq)}, which is missing"  # type: ignore[arg-type]
        elif why is None and cur_seq not in valid:
            why = f"names {snapshot_name(cur_seq)}, which is damaged"  # type: ignore[arg-type]
        rep.current = (cur_seq, why)
        if why is not None:
            then = f"the router uses {snapshot_name(used)}, the newest that verifies" if used else \
                "no snapshot verifies: the router replays the whole log"
            snap_findings.append(Finding(WARNING, "CURRENT", None, f"{why}; {then}"))
        elif cur_seq != used:
            snap_findings.append(Finding(WARNING, "CURRENT", None, f"names {snapshot_name(cur_seq)}, older than "  # type: ignore[arg-type]
                                 f"{snapshot_name(used)} (a crash between the two writes); the router uses the newer"))
    elif valid:
        snap_findings.append(Finding(WARNING, "CURRENT", None, f"missing; the router uses {snapshot_name(used)}, "
                             "the newest snapshot that verifies"))

    # -- the router's start, step by step (Router.recover, JobLog.recover) --------------------------------
    after = used
    covered = [i for i in range(len(segs) - 1) if after and (
        segs[i + 1].first_seq <= after + 1 or segs[i].index_last() <= after)]
    refusal: Finding | None = None
    unindexed = [segs[i] for i in covered if segs[i].index is None]
    needed = {sc.name for sc in unindexed}  # covered segments whose index the router needs but cannot open
    start_notes: list[Finding] = []
    cannot_rebuild = False
    if unindexed:
        u = unindexed[0]
        state = "damaged" if u.index_problem else "missing"
        cannot_rebuild = segs[0].first_seq != 1
        if cannot_rebuild:
            refusal = Finding(ERROR, u.name, 0, f"its index file is {state} and older segments were removed by "
                              "retention, so the router cannot rebuild it by replay: it refuses to start")
        else:
            start_notes.append(Finding(WARNING, index_name(u.first_seq), None,
                                       f"{state}, and the snapshot at {after} covers {u.name}: the router "
                                       "replays the whole log to rebuild it (a slow start)"))
            after, covered = 0, []
    elif after:
        for i in covered:
            idx, nxt = segs[i].index, segs[i + 1]
            if idx.last_seq + 1 != nxt.first_seq:  # type: ignore[union-attr]
                refusal = Finding(ERROR, nxt.name, 0, f"sequence gap: segment starts at {nxt.first_seq}, expected "
                                  f"{idx.last_seq + 1} (the end of {segs[i].name} by its index)")  # type: ignore[union-attr]
                break
    if after and segs and segs[-1].problem is None and segs[-1].end_seq < after:
        start_notes.append(Finding(ERROR, snapshot_name(after), None, f"the snapshot is at sequence {after}, past "
                                   f"the end of the log ({segs[-1].end_seq}): the segments after "
                                   f"{segs[-1].end_seq} are missing"))
    if after and not segs:
        start_notes.append(Finding(ERROR, snapshot_name(after), None, "there is no segment at all: the records "
                                   "after the snapshot and every finished job are missing"))
    rep.snapshot_used = after
    if refusal is None:
        expect = after + 1 if after else None
        for i in range(len(covered), len(segs)):
            sc, last = segs[i], i == len(segs) - 1
            rep.replayed.append(sc.name)
            problem = sc.problem_for(expect) if i == len(covered) else sc.problem
            if problem is None:
                expect = sc.end_seq + 1
                continue
            if not last and _harmless_junk(sc, problem, segs[i + 1]):
                expect = sc.end_seq + 1
                continue
            if not last:
                refusal = Finding(ERROR, sc.name, problem.offset, problem.why + " (in a sealed segment); "
                                  "the router refuses to start")
            else:
                f = _classify_last(sc, problem)
                refusal = f if f.severity == ERROR else None
            break
    rep.refusal = refusal

    # -- findings in log order ------------------------------------------------------------------------------
    covered_set = {segs[i].name for i in covered}
    for i, sc in enumerate(segs):
        here = [refusal] if refusal is not None and refusal.file == sc.name else []
        p = sc.problem
        if p is not None and not any(f.offset == p.offset for f in here):
            if i == len(segs) - 1:
                here.append(_classify_last(sc, p))
            elif _harmless_junk(sc, p, segs[i + 1]):
                here.append(Finding(WARNING, sc.name, p.offset, f"{sc.size - p.offset} bytes after the last batch "
                                    f"({p.why}), but the next segment starts at the next record: nothing is missing; "
                                    "the router ignores them (and cuts them off if it ever replays this segment)"))
            elif sc.name in covered_set:
                here.append(Finding(ERROR, sc.name, p.offset, p.why + f" (in a sealed segment); the router does "
                                    f"not read it on start (the snapshot at {after} covers it) and starts, but "
                                    "reading finished jobs back from here on may fail"))
            else:
                here.append(Finding(ERROR, sc.name, p.offset, p.why + " (in a sealed segment)"))
        rep.findings.extend(sorted(here, key=lambda f: f.offset or 0))
    if refusal is not None and refusal not in rep.findings:
        add(refusal)
    rep.findings.extend(start_notes)
    # Index files against their segments.
    named = {f.file for f in rep.findings}
    for i, sc in enumerate(segs):
        iname = index_name(sc.first_seq)
        if sc.index is None:
            if sc.name in needed and sc.name not in named and iname not in named:
                state = f"damaged ({sc.index_problem})" if sc.index_problem else "missing"
                if cannot_rebuild:
                    add(Finding(ERROR, iname, None, f"{state}, and the snapshot covers {sc.name}"))
                else:
                    add(Finding(WARNING, iname, None, f"{state}; rebuilt by the router's full replay"))
            elif sc.index_problem is not None and sc.name not in needed:
                then = "the router ignores the index of the last segment" if i == len(segs) - 1 else \
                    "the router replays this segment and rewrites its index on start"
                add(Finding(WARNING, iname, None, f"damaged ({sc.index_problem}); {then}"))
            continue
        if sc.problem is not None:
            continue  # (a damaged segment's index is not compared: the segment is the finding)
        why = _index_mismatch(sc.index, sc)
        if why is None:
            continue
        if sc.name in covered_set:
            add(Finding(ERROR, iname, None, f"{why}: the router trusts this index (the segment is covered by the "
                        "snapshot), so lookups of finished jobs in it would be wrong"))
        else:
            add(Finding(WARNING, iname, None, f"{why}; the router replays this segment and rewrites its index"))
    rep.findings.extend(snap_findings)
    rep.findings.extend(other)


# -- repair ---------------------------------------------------------------------------------------------------


@dataclass
class RepairPlan:
    """What :func:`repair` does: cut at ``cut`` (None: no bad batch) and remove what refers past it."""

    cut: Finding | None = None
    new_end: int | None = None  # the last sequence number kept
    truncate: tuple[str, int, int] | None = None  # (segment, offset, bytes dropped)
    remove: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    current: int | None = None  # rewrite CURRENT to name this snapshot (0: remove CURRENT); None: keep
    create: int | None = None  # create an empty segment starting here
    lost: tuple[int, int] | None = None  # (first, last) sequence numbers dropped, as far as known
    left: list[Finding] = field(default_factory=list)  # errors a cut does not address

    @property
    def empty(self) -> bool:
        """True if there is nothing to do."""
        return self.truncate is None and not self.remove and self.current is None and self.create is None

    def lines(self) -> list[str]:
        """The plan as readable lines (file, offset, bytes, sequence range lost, files removed)."""
        out = []
        if self.cut is not None:
            out.append(f"first bad batch: {self.cut}")
        if self.truncate is not None:
            name, off, n = self.truncate
            out.append(f"  truncate {name} at offset {off}: drops {n} bytes (the bad batch and all after it)")
        for name, why in self.remove:
            out.append(f"  remove {name}: {why}")
        if self.current is not None:
            out.append(f"  rewrite CURRENT to name {snapshot_name(self.current)}" if self.current else
                       "  remove CURRENT: it names a removed snapshot and none is left")
        if self.create is not None:
            out.append(f"  create {segment_name(self.create)} (empty): appends continue at sequence {self.create}")
        if self.lost is not None:
            a, b = self.lost
            out.append(f"records lost: sequence {a} to {b} ({b - a + 1} records, as far as the remaining segment "
                       f"headers and index files tell; a damaged batch may hide more)")
        if self.new_end is not None and not self.empty:
            out.append(f"the log will end at sequence {self.new_end}")
        for f in self.left:
            out.append(f"not repaired by truncation: {f}")
        return out


def plan_repair(rep: Report) -> RepairPlan:
    """The repair of ``rep``'s data dir that :func:`repair` carries out (nothing is changed here)."""
    plan = RepairPlan()
    segs = rep.segments
    if not segs:
        plan.left = rep.errors
        return plan
    # Junk after a sealed segment's last batch that the next segment proves hides nothing is not cut here
    # (the router ignores it, or cuts just the junk when it replays that segment).
    # Nor is a zero-filled tail of the last segment (the zeros the log writes ahead of its appends, left by
    # any crash): no record is in it, and the router drops it on start.
    g = next((i for i, sc in enumerate(segs) if sc.problem is not None
              and not (i + 1 < len(segs) and _harmless_junk(sc, sc.problem, segs[i + 1]))
              and not (i + 1 == len(segs) and sc.zeros and sc.later is None and sc.inner is not None
                       and 0 < sc.problem.offset == sc.inner.offset)), None)
    keep_g_index = True
    if g is None:
        end = segs[-1].end_seq
    else:
        sc = segs[g]
        off = sc.problem.offset  # type: ignore[union-attr]
        plan.cut = Finding(ERROR, sc.name, off, sc.problem.why)  # type: ignore[union-attr]
        if off >= SEGMENT_HEADER_SIZE:
            end = sc.end_seq
            plan.truncate = (sc.name, off, sc.size - off)
            keep_g_index = sc.index is not None and _index_mismatch(sc.index, sc) is None
            if (sc.index is not None or sc.index_problem) and not keep_g_index:
                plan.remove.append((index_name(sc.first_seq), "it indexes records past the cut"))
        else:
            end = segs[g - 1].end_seq if g else sc.first_seq - 1
            plan.remove.append((sc.name, f"{sc.size} bytes, the segment is bad from its start"))
            if sc.index is not None or sc.index_problem:
                plan.remove.append((index_name(sc.first_seq), "the index of a removed segment"))
            plan.create = end + 1
        known = [end]
        if sc.index is not None:
            known.append(sc.index.last_seq)
        if sc.inner is None or sc.inner.offset > 0:
            known.append(sc.end_seq)  # (a segment cut at a sequence gap: its own records are lost too)
        for later in segs[g + 1:]:
            plan.remove.append((later.name, f"{later.size} bytes, after the cut"))
            if later.index is not None or later.index_problem:
                plan.remove.append((index_name(later.first_seq), "the index of a removed segment"))
            known.append(later.first_seq - 1)
            if later.index is not None:
                known.append(later.index.last_seq)
            if later.header_first is not None:
                known.append(later.end_seq)
        if max(known) > end:
            plan.lost = (end + 1, max(known))
    plan.new_end = end
    # Snapshots past the new end describe records that are gone.
    kept: list[int] = []
    for name, seq, why in rep.snapshots:
        if seq > end:
            plan.remove.append((name, f"a snapshot at {seq}, past the new end {end}"))
        elif why is None:
            kept.append(seq)
    if g is not None and plan.truncate is not None and not keep_g_index:
        # A snapshot at the new end would cover the cut segment, which has no index any more.
        while kept and kept[-1] == end:
            plan.remove.append((snapshot_name(kept.pop()), "it would cover the cut segment, whose index is removed"))
    # A snapshot with no segment starting right after it (copied from another data dir, or the segments
    # after it are gone) makes the router refuse: it goes, and recovery falls back to an older one.
    firsts = {sc.first_seq for sc in segs if sc.name not in {n for n, _w in plan.remove}}
    for seq in [k for k in kept if k + 1 not in firsts and k != end]:  # (at the new end: a segment is created)
        plan.remove.append((snapshot_name(seq), f"no segment starts at {seq + 1}, right after it: it does not "
                            "match this log"))
        kept.remove(seq)
    removed = {n for n, _w in plan.remove}
    newest = kept[-1] if kept else 0
    if any(n.startswith("snap-") for n in removed) and rep.current is not None and rep.current != (newest, None):
        plan.current = newest  # (0: remove CURRENT, no snapshot is left)
    if plan.create is None and newest and newest == end and not any(
            sc.first_seq == end + 1 and sc.name not in removed for sc in segs):
        plan.create = end + 1  # the replay after a snapshot at the new end starts at a segment there
    if plan.create is not None and (rep.data_dir / index_name(plan.create)).exists() \
            and index_name(plan.create) not in removed:
        # A stale index of a segment that is gone would be taken for the new, empty segment's.
        plan.remove.append((index_name(plan.create), "the index of a segment that is gone; an empty segment "
                            "is created in its place"))
        removed.add(index_name(plan.create))
    # Errors a cut does not touch (e.g. an index file that disagrees with its segment); a prediction: the
    # check after the repair says what is left.  (Errors named on segments are the cut's business.)
    touched = removed | {plan.truncate[0] if plan.truncate else "", "CURRENT"}
    plan.left = [f for f in rep.errors if f.file not in touched and not f.file.endswith(".log")]
    return plan


def repair(data_dir: str | os.PathLike[str], apply: bool, fs: RealFS | None = None
           ) -> tuple[Report, RepairPlan, Report | None]:
    """Check ``data_dir`` and plan the cut at its first bad batch; with ``apply``, carry it out.

    Returns (report before, plan, report after or None if nothing was applied).  Holds
    the data dir's lock exclusively while it works and raises :class:`CheckError` if a router holds it (or the
    dir cannot be read).  Every truncate, create and delete is made durable (fdatasync, directory fsync).
    """
    fs = fs or RealFS()
    d = Path(data_dir)
    before = check(d)
    if before.in_use:
        before.close()
        raise CheckError(f"data dir {d} is in use by a running router; stop it before repairing")
    plan = plan_repair(before)
    before.close()
    if not apply or plan.empty:
        return before, plan, None
    try:
        lock = lock_data_dir(d)
    except LogLocked:
        raise CheckError(f"data dir {d} is in use by a running router; stop it before repairing") from None
    try:
        # CURRENT first, so it never names a removed snapshot; then newest files first.
        if plan.current is not None:
            if plan.current:
                fs.write_file(d / "CURRENT", encode_current(plan.current))
            else:
                fs.unlink(d / "CURRENT")
        for name, _why in sorted(plan.remove, key=lambda t: (not t[0].startswith("snap-"), t[0]), reverse=True):
            try:
                fs.unlink(d / name)
            except FileNotFoundError:
                pass
        fs.fsync_dir(d)
        if plan.truncate is not None:
            name, off, _n = plan.truncate
            fs.truncate(d / name, off)
        if plan.create is not None:
            fd = fs.create(d / segment_name(plan.create))
            try:
                fs.write(fd, segment_header(plan.create))
                fs.fdatasync(fd)
            finally:
                fs.close(fd)
            fs.fsync_dir(d)
    finally:
        os.close(lock)  # (closing releases the flock)
    return before, plan, check(d)


def format_report(rep: Report) -> str:
    """The human-readable report of ``zmqrun log check``."""
    out = [f"data dir {rep.data_dir}" + (" — IN USE by a running router (its active segment may be mid-write)"
                                         if rep.in_use else " (not in use)")]
    size = sum(s.size for s in rep.segments)
    rng = rep.seq_range
    batches = sum(len(s.batches) // 2 for s in rep.segments)
    out.append(f"segments: {len(rep.segments)} ({size:,} bytes), {rep.records:,} records in {batches:,} batches, "
               + (f"sequence {rng[0]} to {rng[1]}" if rng else "no record"))
    n_idx = sum(1 for s in rep.segments if s.index is not None)
    sealed_without = sum(1 for s in rep.segments[:-1] if s.index is None and s.index_problem is None)
    out.append(f"index files: {n_idx} verified" + (f", {sealed_without} sealed segment(s) without one (the router "
                                                    "writes it on start)" if sealed_without else ""))
    if rep.snapshots:
        out.append("snapshots: " + ", ".join(f"{n} ({'ok' if w is None else 'DAMAGED: ' + w})"
                                              for n, _q, w in rep.snapshots))
    else:
        out.append("snapshots: none")
    if rep.current is None:
        out.append("CURRENT: none")
    else:
        seq, why = rep.current
        out.append(f"CURRENT: names {snapshot_name(seq) if seq is not None else '?'}" +
                   (" (ok)" if why is None else f" (PROBLEM: {why})"))
    if rep.refusal is None:
        start = f"from the snapshot at {rep.snapshot_used}" if rep.snapshot_used else "from the start of the log"
        out.append(f"router start: {start}, replaying {len(rep.replayed)} segment(s)")
    else:
        out.append(f"router start: REFUSED at {rep.refusal.file} offset {rep.refusal.offset}")
    first = rep.first_problem
    if first is not None:
        label = "first problem" if first.severity == ERROR else "warning"
        out.append(f"{label}: {first}")
    for f in rep.findings:
        if f is not first:
            out.append(f"{'also' if f.severity == ERROR else 'warning'}: {f}")
    if rep.errors:
        out.append(f"status: CORRUPT (exit 1). `zmqrun log repair {rep.data_dir}` shows what a cut at the first "
                   "bad batch drops (changing nothing); add --truncate-at-corruption to do it")
    elif rep.findings:
        out.append("status: healthy, with warnings (exit 0): the router starts and handles them as described")
    else:
        out.append("status: healthy")
    return "\n".join(out)
