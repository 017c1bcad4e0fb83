"""Crash-point injection (log-format.md section 8, first row): crash at every sync point of short scenarios
that cross segment rolls, snapshot/CURRENT swaps and retention; recovery must keep every acknowledged job
exactly once and show no unacknowledged job as finished.

A scenario runs a real router in-process (:class:`routerdriver.Driver`, index files and snapshots written
inline) on :class:`crashfs.CrashFS`, which records every file-system call.  For each crash point (just
before and just after each fdatasync / directory fsync) and each crash outcome
:meth:`crashfs.CrashState.choices` enumerates (unsynced writes kept, dropped, torn, garbled, zeroed, or an
earlier one lost while a later one survives; unsynced directory entries kept or dropped), the disk state
is written into a fresh directory and a fresh router recovers from it.  Identical disk states are
recovered once and checked against every crash point that produced them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from crashfs import Choice, CrashFS, NoSyncFS
from routerdriver import CLIENT, WORKER, Driver, FakeSocket

from zmqrun import protocol as P
from zmqrun import router as router_mod
from zmqrun.fsio import RealFS
from zmqrun.model import FINISHED


class CountingSocket(FakeSocket):
    """A :class:`FakeSocket` that notes how many file-system ops were done when each message was sent."""

    def __init__(self, fs: CrashFS) -> None:
        super().__init__()
        self.fs = fs
        self.at: list[int] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        n = len(self.sent)
        super().send(frame, flags)
        if len(self.sent) > n:
            self.at.append(self.fs.op_count)


class RecoveringDriver(Driver):
    """A :class:`Driver` that releases what it holds (dir lock, wake pipe) if recovery raises, and on close."""

    def __init__(self, data_dir: Path, fs: RealFS, **kw: Any) -> None:
        try:
            super().__init__(data_dir, fs=fs, background=False, **kw)
        except BaseException:
            router = getattr(self, "router", None)
            if router is not None:
                if router.log is not None:
                    router.log.close()
                os.close(router._wake_r)
                os.close(router._wake_w)
            raise

    def close(self) -> None:
        super().close()
        os.close(self.router._wake_r)
        os.close(self.router._wake_w)


class CrashDriver(RecoveringDriver):
    """A :class:`Driver` on a :class:`CrashFS` that records, by op count, what the client was told and what
    became durable: ``acked_at`` (id -> op count when its ACK was sent), ``pushed`` (id -> (op count,
    outcome) when its result was pushed), ``durable_at`` ([(op count, durable_seq)] after each log sync),
    ``submit_seq``/``end_seq`` (id -> sequence number of its SUBMIT / terminal record)."""

    def __init__(self, data_dir: Path, fs: CrashFS, **kw: Any) -> None:
        super().__init__(data_dir, fs=fs, **kw)
        self.fs = fs
        self.sock = CountingSocket(fs)
        self.router.sock = self.sock  # type: ignore[assignment]
        self.acked_at: dict[str, int] = {}
        self.pushed: dict[str, tuple[int, dict[str, Any]]] = {}
        self.durable_at: list[tuple[int, int]] = []
        self.submit_seq: dict[str, int] = {}
        self.end_seq: dict[str, int] = {}
        self.written_at: list[tuple[int, int]] = []  # (op count, last sequence number written)
        self.cancel_asked: set[str] = set()
        self.hold: set[str] = set()  # jobs the worker keeps running until released
        self.queued: list[str] = []  # submitted, not dispatched (cancel candidates)
        jlog = self.router.log
        sync, write_all = jlog._sync, jlog._write_all

        def recorded_sync() -> None:
            sync()
            self.durable_at.append((fs.op_count, jlog.durable_seq))

        def recorded_write_all(frame: bytes) -> None:
            write_all(frame)
            first, count = struct.unpack_from("<QI", frame, 16)
            self.written_at.append((fs.op_count, first + count - 1))

        jlog._sync = recorded_sync  # type: ignore[method-assign]
        jlog._write_all = recorded_write_all  # type: ignore[method-assign]

    def submit(self, n: int = 1, **extra: Any) -> list[str]:
        ids = super().submit(n, **extra)
        for jid in ids:
            self.submit_seq[jid] = self.router.log.last_seq
        self.queued += ids
        return ids

    def work(self, rng: random.Random | None = None) -> None:
        """The worker reports a result for some (default: all) of the jobs it holds, except those in
        :attr:`hold` (long-running jobs)."""
        held = [j for j in self.running if j["id"] in self.hold]
        self.running = [j for j in self.running if j["id"] not in self.hold]
        before = {j["id"] for j in self.running}
        super().work(rng)
        for jid in before - {j["id"] for j in self.running}:
            self.end_seq[jid] = self.router.log.last_seq
        self.running += held

    def cancel(self, jid: str) -> None:
        """The client cancels queued job ``jid`` (answered once the CANCEL record is durable)."""
        self._req += 1
        self.cancel_asked.add(jid)
        self.queued.remove(jid)
        before = self.router.log.last_seq
        self.router._handle([CLIENT, P.header(P.CLIENT, P.C_CANCEL), orjson.dumps({"req": self._req, "id": jid})])
        # One CANCEL record, after the job's SUBMIT logged again if retention removed the original.
        assert self.router.log.last_seq in (before + 1, before + 2), "a queued job is canceled with one CANCEL record"
        self.end_seq[jid] = self.router.log.last_seq

    def tick(self) -> bool:
        ok = self.router._commit()
        for at, (ident, frames) in zip(self.sock.at, self.sock.sent):
            head, body = frames[0], orjson.loads(frames[1]) if len(frames) > 1 else {}
            if ident == CLIENT and head == P.H_ACK:
                for jid in body["accepted"]:
                    self.acked_at.setdefault(jid, at)
            elif ident == CLIENT and head == P.H_RESULT:
                for r in body["results"]:
                    self.pushed.setdefault(r["id"], (at, r))
            elif ident == WORKER and head == P.H_JOBS:
                self.running.extend(body["jobs"])
                sent = {j["id"] for j in body["jobs"]}
                self.queued = [q for q in self.queued if q not in sent]
        self.sock.sent.clear()
        self.sock.at.clear()
        return ok


@dataclass
class Recovered:
    """What a recovery from one crash state shows: live jobs, finished jobs (archive listing), or the error."""

    error: str | None = None
    live: dict[str, str] = field(default_factory=dict)  # id -> status
    finished: list[tuple[str, str, Any]] = field(default_factory=list)  # (id, status, result), listing order
    after: str | None = None  # what went wrong when the recovered router took more work, if anything
    segments: set[int] = field(default_factory=set)  # first_seq of each segment left after recovery


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {Path(frame.filename).name}:{frame.lineno})"


def recover(data_dir: Path, fs: RealFS | None = None, **kw: Any) -> Recovered:
    """Recover a router from ``data_dir`` (by default its syncs are not done: not under test here), list
    its jobs, then check it takes a new job (appends after the recovered tail)."""
    out = Recovered()
    try:
        d = RecoveringDriver(data_dir, fs=fs or NoSyncFS(), **kw)
    except Exception as e:  # noqa: BLE001 - any failure to recover is what the caller reports
        out.error = _where(e)
        return out
    try:
        r = d.router
        out.live = {jid: job.status for jid, job in r.queue.jobs.items()}
        # Every finished job read back from the log (index files, segments), not from memory.
        r.archive.recent.clear()
        out.finished = [(job.id, job.status, job.result) for job in r.archive.newest(budget=10**6)]
        new = d.submit(1)
        if not d.tick() or set(new) - d.acked:
            out.after = "the recovered router did not acknowledge a new job"
    except Exception as e:  # noqa: BLE001
        out.after = _where(e)
    finally:
        d.close()
    out.segments = {int(n[4:-4]) for n in os.listdir(data_dir) if n.startswith("seg-") and n.endswith(".log")}
    return out


@dataclass
class Scenario:
    """A recorded run: the file-system ops and what the client was told when."""

    fs: CrashFS
    drv: CrashDriver
    root: Path
    kw: dict[str, Any]


def run_scenario(tmp: Path, seed: int, steps: int, cancel: float = 0.0, hold: int = 0,
                 release: int | None = None, delayed: int = 0, **kw: Any) -> Scenario:
    """Record a run on :class:`CrashFS` (in ``tmp/run``): per step, submit 1-4 jobs, then the worker
    finishes some of what it holds; with probability ``cancel`` per step a queued job is canceled.  One
    job per step of the first ``hold`` steps runs until step ``release`` (default: 2 before the end;
    live across rolls, snapshots and retention), and one job per step of the first ``delayed`` steps is
    scheduled an hour ahead (queued all along).  ``kw`` go to the router (``retain_bytes``, ``credit``)."""
    rng = random.Random(seed)
    root = tmp / "run"
    root.mkdir()
    fs = CrashFS(root)
    credit = kw.pop("credit", 8)
    with fixed_clock():
        drv = CrashDriver(root, fs, credit=credit, **kw)
        _steps(drv, rng, steps, cancel, hold, release, delayed)
    return Scenario(fs, drv, root, kw)


class _Clock:
    """Stands in for the ``time`` module in :mod:`zmqrun.router`: wall-clock times step by 0.25 s from a
    fixed start, so the records (and so the crash points) of a scenario are the same on every run."""

    def __init__(self) -> None:
        self.now = 4_000_000_000.0  # far ahead of the real clock: delayed jobs stay in the future on recovery
        self.monotonic = time.monotonic
        self.perf_counter, self.thread_time = time.perf_counter, time.thread_time  # pause statistics only

    def time(self) -> float:
        self.now += 0.25
        return self.now


@contextlib.contextmanager
def fixed_clock() -> Iterator[None]:
    """Run the router on :class:`_Clock` inside the ``with`` block."""
    saved = router_mod.time
    router_mod.time = _Clock()  # type: ignore[assignment]
    try:
        yield
    finally:
        router_mod.time = saved


def _steps(drv: CrashDriver, rng: random.Random, steps: int, cancel: float, hold: int, release: int | None,
           delayed: int) -> None:
    for step in range(steps):
        drv.submit(rng.randint(1, 4))
        if step < hold:
            drv.hold.add(drv.submit(1)[0])
        if step < delayed:
            drv.submit(1, delay=3600.0)
        if drv.queued and rng.random() < cancel:
            drv.cancel(rng.choice(drv.queued))
        assert drv.tick()
        if step == (steps - 2 if release is None else release):
            drv.hold.clear()
        if rng.random() < 0.8:
            drv.work(rng)
            assert drv.tick()
    drv.work()
    assert drv.tick()
    drv.close()


def segment_holding(firsts: list[int], seq: int) -> int | None:
    """The first_seq of the segment (of ``firsts``, sorted) holding ``seq``."""
    best = None
    for f in firsts:
        if f <= seq:
            best = f
    return best


def check(sc: Scenario, p: int, choice: Choice, got: Recovered) -> list[str]:
    """Problems with recovering ``got`` after a crash at point ``p`` (empty: all invariants hold)."""
    drv, ops = sc.drv, sc.fs.ops
    where = f"crash at op {p} ({ops[p].kind if p < len(ops) else 'end'} next), {choice}"
    if got.error is not None:
        return [f"{where}: recovery failed: {got.error}"]
    bad = []
    if got.after is not None:
        bad.append(f"{where}: after recovery: {got.after}")
    fin_ids = [f[0] for f in got.finished]
    if len(fin_ids) != len(set(fin_ids)):
        bad.append(f"{where}: a job is archived twice: {sorted(j for j in fin_ids if fin_ids.count(j) > 1)}")
    fin = {jid: (status, result) for jid, status, result in got.finished}
    both = set(fin) & set(got.live)
    if both:
        bad.append(f"{where}: jobs both live and finished: {sorted(both)}")
    durable = max((s for at, s in drv.durable_at if at <= p), default=0)
    written = max((s for at, s in drv.written_at if at <= p), default=0)
    # Segments removed by retention, in the run before the crash point or by the recovering router (which
    # applies retention after its first snapshot): their finished jobs may read as unknown ("expired").
    # Retention removes the oldest segments only: a gap in the middle would be a bug.
    created = sorted(int(op.path.name[4:-4]) for op in ops[:p] if op.kind == "create"  # type: ignore[union-attr]
                     and op.path.name.startswith("seg-") and op.path.name.endswith(".log"))  # type: ignore[union-attr]
    gone = set(created) - got.segments
    kept = sorted(set(created) & got.segments)
    if any(kept[0] < f < kept[-1] for f in gone):
        bad.append(f"{where}: segments {sorted(gone)} are missing between ones that remain {kept}")
    unlinked_at = {int(op.path.name[4:-4]): i for i, op in enumerate(ops[:p]) if op.kind == "unlink"  # type: ignore[union-attr]
                   and op.path.name.startswith("seg-") and op.path.name.endswith(".log")}  # type: ignore[union-attr]

    def expired(jid: str) -> bool:
        """``jid`` had finished (terminal record written) when a segment holding one of its records was
        removed, in the run before the crash point or by the recovering router."""
        end = drv.end_seq.get(jid)
        if end is None or end > written:
            return False
        end_at = min(at for at, s in drv.written_at if s >= end)
        for seq in (drv.submit_seq[jid], end):
            seg = segment_holding(created, seq)
            if seg in gone and unlinked_at.get(seg, p) >= end_at:
                return True
        return False

    acked = {jid for jid, at in drv.acked_at.items() if at <= p}
    for jid in sorted(acked):
        if jid not in fin and jid not in got.live and not expired(jid):
            bad.append(f"{where}: acknowledged job {jid} is lost")
    for jid in sorted(set(fin) - acked):
        if fin[jid][0] == "canceled" and jid in drv.cancel_asked:
            continue  # submitted and canceled in one go: neither answered, both kept (like an unacked SUBMIT)
        bad.append(f"{where}: job {jid} was never acknowledged but recovered as finished ({fin[jid][0]})")
    for jid, (at, out) in sorted(drv.pushed.items()):
        if at > p:
            continue
        if jid in fin and fin[jid] != (out["status"], out.get("result")):
            bad.append(f"{where}: job {jid} finished as {fin[jid]}, but the client was told {out['status']}")
    for jid, seq in sorted(drv.end_seq.items()):
        if seq <= durable and jid not in fin and not expired(jid):
            where_now = "live" if jid in got.live else "missing"
            bad.append(f"{where}: job {jid}'s terminal record {seq} was durable (<= {durable}) but it is {where_now}")
    for jid, status in got.live.items():
        if status in FINISHED:
            bad.append(f"{where}: live job {jid} has terminal status {status}")
    return bad


@dataclass
class Tally:
    """How much a run of :func:`crash_everywhere` covered."""

    points: int = 0  # crash points
    states: int = 0  # (crash point, crash outcome) pairs checked
    recoveries: int = 0  # distinct disk states recovered (equal states are recovered once)
    nested: int = 0  # recoveries after a second crash during the first recovery
    seconds: float = 0.0


def crash_everywhere(sc: Scenario, tmp: Path, points: list[int] | None = None, holes: bool = False,
                     nested: Callable[[Choice], bool] | None = None, max_problems: int = 20
                     ) -> tuple[Tally, list[str]]:
    """Recover from every enumerated crash outcome at every crash point (default: the sync points) and
    check the invariants; return what was covered and the problems found (stops at ``max_problems``).

    ``nested``: for the crash outcomes it accepts, the first recovery runs on a :class:`CrashFS` too, and
    at each of its sync points (its unsynced writes and directory ops all kept, file data dropped, or
    both dropped) a second recovery must still meet the invariants of the first crash: a crash during
    recovery (torn-tail truncation, new segment, index files, snapshot, retention) is recoverable.
    """
    t0 = time.monotonic()
    tally, problems = Tally(), []
    cache: dict[str, list[tuple[str, Recovered]]] = {}
    dest, dest2 = tmp / "crash", tmp / "crash-again"
    pts = points if points is not None else sc.fs.sync_points()
    for p, state in sc.fs.crash_states(pts):
        tally.points += 1
        for choice in state.choices(holes=holes):
            tally.states += 1
            key, _names = state.materialize(choice, sc.root)
            outcomes = cache.get(key)
            if outcomes is None:
                _fresh(dest)
                state.materialize(choice, sc.root, dest)
                rfs = CrashFS(dest) if nested is not None and nested(choice) else None
                outcomes = cache[key] = [("", recover(dest, rfs, **sc.kw))]
                tally.recoveries += 1
                if rfs is not None:
                    seen = {key}
                    for q, st2 in rfs.crash_states(rfs.sync_points()):
                        for c2 in (Choice("keep"), Choice("drop"), Choice("drop", dirs=(False,) * len(st2.dpending))):
                            key2, _n = st2.materialize(c2, dest)
                            if key2 in seen:
                                continue
                            seen.add(key2)
                            _fresh(dest2)
                            st2.materialize(c2, dest, dest2)
                            outcomes.append((f" + crash in recovery at op {q} ({rfs.ops[q].kind if q < len(rfs.ops) else 'end'} next), {c2}",
                                             recover(dest2, **sc.kw)))
                            tally.nested += 1
            for suffix, got in outcomes:
                problems += [f + suffix for f in check(sc, p, choice, got)]
            if len(problems) >= max_problems:
                break
        if len(problems) >= max_problems:
            break
    for d in (dest, dest2):
        if d.exists():
            shutil.rmtree(d)
    tally.seconds = time.monotonic() - t0
    return tally, problems


def _fresh(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()


# -- the model itself ---------------------------------------------------------------------------------


def test_crashfs_models_unsynced_data_and_directory_entries(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "old").write_bytes(b"baseline")
    fs = CrashFS(root)
    fd = fs.create(root / "a")
    fs.write(fd, b"hello ")
    fs.fdatasync(fd)
    fs.write(fd, b"world")
    synced_data = fs.op_count  # a's first write synced, its name not yet
    fs.fsync_dir(root)
    fs.write(fd, b"!!")
    fs.close(fd)
    fs.rename(root / "a", root / "b")
    fs.unlink(root / "old")
    end = fs.op_count
    assert (root / "b").read_bytes() == b"hello world!!"  # calls go through to the real directory
    states = dict(fs.crash_states([synced_data, end]))
    st = states[synced_data]
    assert st.files_after(Choice("keep")) == {root / "old": b"baseline", root / "a": b"hello world"}
    assert st.files_after(Choice("drop")) == {root / "old": b"baseline", root / "a": b"hello "}
    assert st.files_after(Choice("torn", 2)) == {root / "old": b"baseline", root / "a": b"hello wo"}
    assert st.files_after(Choice("zeros"))[root / "a"] == b"hello \0\0\0\0\0"
    assert st.files_after(Choice("keep", dirs=(False,))) == {root / "old": b"baseline"}  # create not durable
    st = states[end]
    assert [op.kind for op in st.dpending] == ["rename", "unlink"]
    assert st.files_after(Choice("keep")) == {root / "b": b"hello world!!"}
    # fsync_dir made the name durable, not the data written after the fdatasync ("world", "!!").
    assert st.files_after(Choice("drop", dirs=(False, True))) == {root / "a": b"hello "}  # rename lost
    assert st.files_after(Choice("drop", dirs=(True, False))) == {root / "b": b"hello ", root / "old": b"baseline"}
    assert st.files_after(Choice("torn", 0, 1)) == {root / "b": b"hello world"}
    assert st.files_after(Choice("torn", 3, 0)) == {root / "b": b"hello wor"}
    assert st.files_after(Choice("hole", 0, 0)) == {root / "b": b"hello \0\0\0\0\0!!"}
    kinds = {str(c) for c in st.choices(holes=True)}
    assert {"keep", "drop", "torn:w0@1", "torn:w1@0", "garble", "zeros", "hole:w0", "keep dirs=k-",
            "drop dirs=--", "keep dirs=-k"} <= kinds
    dest = tmp_path / "out"
    dest.mkdir()
    key, names = st.materialize(Choice("keep", dirs=(False, False)), root, dest)
    assert names == {"a", "old"} and (dest / "a").read_bytes() == b"hello world!!"
    assert key == st.materialize(Choice("keep", dirs=(False, False)), root)[0]
    assert key != st.materialize(Choice("drop", dirs=(False, False)), root)[0]


# -- crash points of router scenarios -----------------------------------------------------------------

RETAIN = 6000  # bytes: with 4 KiB segments, retention removes segments once two snapshots exist

SCENARIOS: dict[str, dict[str, Any]] = {
    # Rolls, a snapshot at (nearly) every roll, retention removing old segments, cancels of queued jobs.
    "roll-snapshot-retention": {"seed": 1, "steps": 30, "cancel": 0.2, "retain_bytes": RETAIN},
    # Jobs running across several rolls and snapshots, then finishing, and 20 jobs scheduled an hour
    # ahead (live all along: retention keeps every segment from their SUBMIT on, and so many live jobs
    # make some rolls skip the snapshot).  Crashes between a segment's index file and the snapshot
    # covering it then replay segments whose index names jobs submitted in an earlier replayed segment:
    # this found the replay bug fixed in JobLog.recover (acknowledged finished jobs lost).
    "long-jobs-and-delayed": {"seed": 2, "steps": 30, "hold": 2, "delayed": 20, "retain_bytes": RETAIN},
    # Long jobs holding retention back, then released: their old segments are removed after they finish.
    "long-jobs-then-retention": {"seed": 3, "steps": 34, "hold": 2, "release": 16, "cancel": 0.1,
                                 "retain_bytes": RETAIN},
}


def _coverage(sc: Scenario) -> dict[str, int]:
    ops = sc.fs.ops

    def named(kind: str, prefix: str, suffix: str = "") -> int:
        return sum(1 for op in ops if op.kind == kind and (op.dst or op.path).name.startswith(prefix)  # type: ignore[union-attr]
                   and (op.dst or op.path).name.endswith(suffix))  # type: ignore[union-attr]

    return {"segments": named("create", "seg-", ".log"), "index files": named("rename", "seg-", ".idx"),
            "snapshots": named("rename", "snap-"), "CURRENT swaps": named("rename", "CURRENT"),
            "segments removed": named("unlink", "seg-", ".log"), "finished": len(sc.drv.pushed),
            "acknowledged": len(sc.drv.acked_at)}


def _run(tmp_path: Path, name: str, **kw: Any) -> tuple[Tally, list[str], dict[str, int]]:
    params = dict(SCENARIOS[name])
    sc = run_scenario(tmp_path, params.pop("seed"), params.pop("steps"), **params)
    cov = _coverage(sc)
    # The scenario crosses what it is meant to: rolls, index files, snapshot and CURRENT swaps, and
    # (retention scenarios) segment removal; a change of record sizes must not quietly shrink it.
    assert cov["segments"] >= 5 and cov["index files"] >= 4 and cov["snapshots"] >= 3, cov
    assert cov["CURRENT swaps"] >= 3 and cov["finished"] >= 40, cov
    if "delayed" not in params:
        assert cov["segments removed"] >= 1, cov
    tally, problems = crash_everywhere(sc, tmp_path, **kw)
    return tally, problems, cov


def _keep_or_garble(c: Choice) -> bool:
    return c.dirs is None and c.files in ("keep", "garble")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_sync_point_recovers_every_acknowledged_job_once(tmp_path: Path, name: str) -> None:
    """Crash just before and just after every fdatasync and directory fsync, with every enumerated outcome
    (log-format.md section 8), including out-of-order writeback: records nobody waits on (DISPATCH,
    FINISH) are written without a sync of their own, so a later unsynced batch may survive an earlier
    one that is lost (the batches' sync_lag makes that a torn tail, not corruption).  In the first
    scenario, for the outcomes that keep the data or garble the last write, crash again at each sync
    point of the recovery.  ~3-8 s per scenario."""
    nest = name == "roll-snapshot-retention"
    tally, problems, cov = _run(tmp_path, name, holes=True, nested=_keep_or_garble if nest else None)
    assert not problems, "\n".join(problems)
    assert tally.points >= 100 and tally.recoveries >= 300 and (tally.nested >= 300 or not nest), (tally, cov)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 16))
def test_every_op_of_longer_runs_recovers_every_acknowledged_job_once(tmp_path: Path, seed: int) -> None:
    """Slow variant: crash before every op (not only around syncs) of longer runs, with a second crash at
    every sync point of each recovery.  ~1-2 minutes per seed."""
    sc = run_scenario(tmp_path, seed, steps=45, cancel=0.15, hold=seed % 3, release=25, delayed=seed % 2,
                      retain_bytes=RETAIN)
    tally, problems = crash_everywhere(sc, tmp_path, points=list(range(len(sc.fs.ops) + 1)), holes=True,
                                       nested=lambda c: True)
    assert not problems, "\n".join(problems)
    assert tally.nested > tally.recoveries, tally
