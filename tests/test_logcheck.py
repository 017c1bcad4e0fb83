"""`zmqrun log check` / `log repair` and crash test 3 of log-format.md: truncate the last segment at every
offset of its last two batches, append zeros or garbage, flip bits in a body, a length field, a sealed
segment, a snapshot and CURRENT, delete a middle segment.  Recovery runs in-process (a real Router fed
through tests/routerdriver.py, then a fresh Router recovering a copy of its data dir).  About 10 s."""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from crashfs import NoSyncFS
from routerdriver import Driver

from zmqrun import joblog, logcheck, segindex, snapshot
from zmqrun.cli import main
from zmqrun.fsio import RealFS
from zmqrun.joblog import FINISH, SUBMIT, FsyncPolicy, JobLog, LogCorruption
from zmqrun.router import Router

SEGMENT_BYTES = 4096


@dataclass
class Rec:
    seq: int
    type: int
    payload: bytes
    segment: str
    batch: int  # offset of its batch
    batch_end: int  # offset after its batch


@dataclass
class Built:
    """A data dir written by a real router, with what its client saw and an independent parse of its log."""

    dir: Path
    acked: set[str]
    finished: set[str]
    files: dict[str, bytes] = field(default_factory=dict)
    records: list[Rec] = field(default_factory=list)
    _stats: dict[Path, dict[str, tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def segments(self) -> list[str]:
        return sorted(n for n in self.files if n.startswith("seg-") and n.endswith(".log"))

    @property
    def snapshot_seq(self) -> int:
        return max(snapshot.list_snapshots(RealFS(), self.dir))

    def batches(self, name: str) -> list[int]:
        return sorted({r.batch for r in self.records if r.segment == name})

    def covered(self) -> list[str]:
        """Sealed segments the newest snapshot covers (the router does not read them)."""
        return [n for n in self.segments if max(r.seq for r in self.records if r.segment == n) <= self.snapshot_seq]

    def replayed_sealed(self) -> list[str]:
        return [n for n in self.segments[:-1] if n not in self.covered()]

    def restore(self, dest: Path) -> None:
        """Make ``dest`` hold exactly the built files again: cheaper than a fresh copy per cut, as only the
        files changed since the last restore (by inode, size and mtime) are written again."""
        dest.mkdir(exist_ok=True)
        seen = self._stats.setdefault(dest, {})
        for name in os.listdir(dest):
            if name not in self.files and name != "LOCK":
                os.unlink(dest / name)
        for name, data in self.files.items():
            try:
                st = os.stat(dest / name)
                if seen.get(name) == (st.st_ino, st.st_size, st.st_mtime_ns):
                    continue
            except FileNotFoundError:
                pass
            (dest / name).write_bytes(data)
            st = os.stat(dest / name)
            seen[name] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def expected(self, keep: set[int]) -> tuple[set[str], set[str]]:
        """(live ids, finished ids) that replaying the records with sequence numbers in ``keep`` gives."""
        submitted, done = set(), set()
        for r in self.records:
            if r.seq not in keep:
                continue
            if r.type == SUBMIT:
                submitted.update(j["id"] for j in orjson.loads(r.payload)["jobs"])
            elif r.type == FINISH:
                done.update(x["id"] for x in orjson.loads(r.payload)["results"])
        return submitted - done, done

    @property
    def all_ids(self) -> set[str]:
        live, done = self.expected({r.seq for r in self.records})
        return live | done


def parse_log(d: Path) -> list[Rec]:
    """Every record with its batch, read with joblog.read_segment (and checked to be whole)."""
    out = []
    for path in joblog.list_segments(d):
        data = path.read_bytes()
        batches = array("q")
        recs, end, problem = joblog.read_segment(path, data, None, batches)
        assert problem is None and end == len(data), (path.name, problem)
        starts = {batches[i]: batches[i + 1] for i in range(0, len(batches), 2)}
        offs = sorted(starts.values()) + [end]
        seq_to_off, cur = {}, None
        for seq, _t, _p in recs:
            cur = starts.get(seq, cur)
            seq_to_off[seq] = cur
        for seq, t, p in recs:
            off = seq_to_off[seq]
            out.append(Rec(seq, t, p, path.name, off, offs[offs.index(off) + 1]))
    return out


def build(d: Path, delayed: int, after_snapshot: int) -> Built:
    """Run a router through the driver on ``d`` (4 KiB segments) until two snapshots exist and the newest
    is followed by ``after_snapshot`` segments (the last one active, over 1500 bytes).  ``delayed`` jobs
    stay live: a snapshot follows a roll once the bytes since the last one reach ~200 per live job."""
    drv = Driver(d, segment_bytes=SEGMENT_BYTES)
    rng = random.Random(7)
    drv.submit(delayed, delay=3600)
    drv.tick()
    for _ in range(400):
        drv.submit(3)
        drv.tick()
        drv.work(rng)
        drv.tick()
        segs = joblog.list_segments(d)
        snaps = snapshot.list_snapshots(RealFS(), d)
        if len(snaps) == 2 and len(segs) > 5:
            after = [s for s in segs if int(s.name[4:-4]) > snaps[-1]]
            if len(after) == after_snapshot and drv.router.log.active_bytes > 1500:
                break
    else:
        pytest.fail("the data dir never reached the wanted layout")
    drv.close()
    os.close(drv.router._wake_r)
    os.close(drv.router._wake_w)
    b = Built(d, set(drv.acked), set(drv.finished))
    b.files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "LOCK"}
    b.records = parse_log(d)
    assert b.acked - b.finished and b.finished  # live and finished jobs both
    assert len(b.batches(b.segments[-1])) >= 3
    return b


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """60 delayed jobs: a snapshot every third roll; the newest is followed by two sealed segments."""
    b = build(tmp_path_factory.mktemp("logcheck") / "data", delayed=60, after_snapshot=3)
    assert len(b.covered()) >= 4 and len(b.replayed_sealed()) == 2
    return b


@pytest.fixture(scope="module")
def built_tail(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """5 delayed jobs: a snapshot at every roll; recovery reads only the active segment."""
    b = build(tmp_path_factory.mktemp("logcheck-tail") / "data", delayed=5, after_snapshot=1)
    assert len(b.covered()) >= 4 and b.replayed_sealed() == []
    return b


def recover(d: Path) -> Router:
    """A fresh router recovering ``d`` (raises LogCorruption); close it with :func:`close`."""
    r = Router("tcp://127.0.0.1:0", d, FsyncPolicy("always"), segment_bytes=SEGMENT_BYTES,
               background_checkpoints=False)
    try:
        r.log = JobLog(d, r.policy, SEGMENT_BYTES, fs=NoSyncFS())
        try:
            r.recover()
        except BaseException:
            r.log.close()
            raise
    except BaseException:
        os.close(r._wake_r)
        os.close(r._wake_w)
        raise
    return r


def close(r: Router) -> None:
    r.log.close()
    os.close(r._wake_r)
    os.close(r._wake_w)


def state(r: Router, universe: set[str]) -> tuple[set[str], set[str]]:
    """(live ids, finished ids) of a recovered router, looked up for every id in ``universe``."""
    live = set(r.queue.jobs)
    done = {jid for jid in universe if r.archive.contains(jid)}
    return live, done


def assert_recovers_everything(d: Path, b: Built) -> None:
    r = recover(d)
    try:
        live, done = state(r, b.all_ids)
        want_live, want_done = b.expected({x.seq for x in b.records})
        assert (live, done) == (want_live, want_done)
        assert b.acked <= live | done  # every acknowledged job is back
        for jid in sorted(b.finished)[:5] + sorted(b.finished)[-5:]:  # read back from segments / index files
            job = r.archive.get(jid)
            assert job is not None and job.status == "success", jid
    finally:
        close(r)


def check(d: Path) -> logcheck.Report:
    rep = logcheck.check(d)
    rep.close()
    return rep


def flip(path: Path, pos: int, bit: int = 0x04) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= bit
    path.write_bytes(bytes(data))


def snapshot_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != "LOCK"}


# -- healthy dir ------------------------------------------------------------------------------------------


def test_check_of_a_healthy_dir_reports_what_it_holds(built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    rep = logcheck.check(d)
    try:
        assert rep.exit_code == 0 and rep.findings == [] and rep.refusal is None and not rep.in_use
        assert len(rep.segments) == len(built.segments)
        assert rep.records == len(built.records)
        assert rep.seq_range == (1, built.records[-1].seq)
        assert [r.seq for r in built.records] == list(range(1, len(built.records) + 1))
        assert sum(len(s.batches) // 2 for s in rep.segments) == len({(r.segment, r.batch) for r in built.records})
        assert sum(s.index is not None for s in rep.segments) == len(built.segments) - 1
        assert rep.snapshot_used == built.snapshot_seq
        assert rep.replayed == built.replayed_sealed() + [built.segments[-1]]
        assert rep.current == (built.snapshot_seq, None)
    finally:
        rep.close()
    res = CliRunner().invoke(main, ["log", "check", str(d)])
    assert res.exit_code == 0, res.output
    assert f"{len(built.segments)} (" in res.output and "status: healthy" in res.output
    assert snapshot.snapshot_name(built.snapshot_seq) in res.output
    js = CliRunner().invoke(main, ["log", "check", "--json", str(d)])
    assert js.exit_code == 0
    doc = orjson.loads(js.output)
    assert doc["status"] == "healthy" and doc["records"] == len(built.records) and doc["refusal"] is None
    assert snapshot_of(d) == built.files  # read-only
    assert_recovers_everything(d, built)


def test_recovery_keeps_jobs_submitted_and_finished_in_different_replayed_segments(
        built: Built, tmp_path: Path) -> None:
    # Regression: the index file of a later replayed segment used to answer archive lookups while the replay
    # was still at an earlier segment, so the SUBMIT of a job that finished in the later one was skipped as a
    # duplicate: the job vanished from the archive and the rewritten index.
    replayed = set(built.replayed_sealed() + built.segments[-1:])
    submit_seg = {}
    across = set()
    for x in built.records:
        if x.segment not in replayed:
            continue
        if x.type == SUBMIT:
            for j in orjson.loads(x.payload)["jobs"]:
                submit_seg[j["id"]] = x.segment
        elif x.type == FINISH:
            for res in orjson.loads(x.payload)["results"]:
                if submit_seg.get(res["id"], x.segment) < x.segment:
                    across.add(res["id"])
    assert across, "the layout has no job submitted and finished in different replayed segments"
    d = tmp_path / "d"
    built.restore(d)
    r = recover(d)
    try:
        for jid in sorted(across):
            job = r.archive.get(jid)
            assert job is not None and job.status == "success", jid
    finally:
        close(r)
    r = recover(d)  # once more, from the index files the first recovery rewrote
    try:
        assert all(r.archive.contains(jid) for jid in across)
    finally:
        close(r)


def test_check_usage_errors_exit_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["log", "check", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output
    (tmp_path / "file").write_bytes(b"x")
    res = CliRunner().invoke(main, ["log", "check", str(tmp_path / "file")])
    assert res.exit_code == 2 and "not a directory" in res.output
    # A directory with no job log in it (a mistyped --data-dir) is not "healthy" (found by a new-user session).
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "job.py").write_text("def main():\n    return 1\n")
    res = CliRunner().invoke(main, ["log", "check", str(tmp_path / "scripts")])
    assert res.exit_code == 2 and "holds no job log" in res.output, res.output


def test_check_says_in_use_and_repair_refuses_while_a_router_holds_the_lock(built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    r = recover(d)
    try:
        rep = check(d)
        assert rep.in_use and rep.exit_code == 0
        res = CliRunner().invoke(main, ["log", "check", str(d)])
        assert res.exit_code == 0 and "IN USE" in res.output
        res = CliRunner().invoke(main, ["log", "repair", str(d), "--truncate-at-corruption"])
        assert res.exit_code == 2 and "in use" in res.output
    finally:
        close(r)
    assert not check(d).in_use  # check's probe took no lasting lock; the router's is released


# -- torn tails ---------------------------------------------------------------------------------------------


def test_truncating_the_last_segment_at_every_offset_of_its_last_two_batches(built_tail: Built, tmp_path: Path
                                                                            ) -> None:
    built, d = built_tail, tmp_path / "d"
    last = built.segments[-1]
    starts = built.batches(last)
    size = len(built.files[last])
    boundaries = set(starts) | {size}
    universe = built.all_ids
    cuts = range(starts[-2], size)
    assert len(cuts) > 300
    for cut in cuts:
        built.restore(d)
        os.truncate(d / last, cut)
        rep = check(d)
        assert rep.exit_code == 0 and rep.refusal is None, (cut, rep.findings)
        if cut in boundaries:
            assert rep.findings == [], (cut, rep.findings)
        else:
            torn = max(s for s in starts if s < cut)
            assert [(f.file, f.offset, f.severity) for f in rep.findings] == [(last, torn, "warning")], cut
            assert "torn tail" in rep.findings[0].what and f"{cut - torn} bytes" in rep.findings[0].what
        kept = {x.seq for x in built.records if x.segment != last or x.batch_end <= cut}
        r = recover(d)
        try:
            assert state(r, universe) == built.expected(kept), cut
            assert r.log.last_seq == max(kept)
        finally:
            close(r)
        assert (d / last).stat().st_size == max(s for s in boundaries if s <= cut)  # cut back to a batch boundary


@pytest.mark.parametrize("tail", ["zeros", "garbage"])
def test_zeros_or_garbage_appended_recover_with_a_warning(built: Built, tmp_path: Path, tail: str) -> None:
    d = tmp_path / "d"
    built.restore(d)
    last = d / built.segments[-1]
    size = last.stat().st_size
    extra = bytes(700) if tail == "zeros" else random.Random(3).randbytes(700)
    with open(last, "ab") as f:
        f.write(extra)
    rep = check(d)
    assert rep.exit_code == 0 and rep.refusal is None
    [f] = rep.findings
    assert (f.file, f.offset, f.severity) == (last.name, size, "warning")
    assert ("zero-filled tail" if tail == "zeros" else "torn tail") in f.what and "700" in f.what
    res = CliRunner().invoke(main, ["log", "check", str(d)])
    assert res.exit_code == 0 and f"offset {size}" in res.output and "with warnings" in res.output
    # A zero tail (what any crash leaves: the zeros written ahead of the appends) needs no repair; garbage
    # gets a plan (the router would cut it too).
    res = CliRunner().invoke(main, ["log", "repair", str(d)])
    if tail == "zeros":
        assert res.exit_code == 0 and "nothing to repair" in res.output, res.output
    else:
        assert res.exit_code == 1 and f"{last.name}" in res.output, res.output
    assert_recovers_everything(d, built)
    assert last.stat().st_size == size


# -- corruption the router refuses --------------------------------------------------------------------------


def _flip_target(b: Built, where: str) -> tuple[str, int, int]:
    """(segment, batch offset the router must name, byte to flip) for a bit flip ``where``."""
    if where == "sealed":
        name = b.replayed_sealed()[0]
    else:
        name = b.segments[-1]
    starts = b.batches(name)
    off = starts[1]  # a batch in the middle: valid batches follow it
    end = starts[2]
    if where == "body_len":
        return name, off, off + 9  # the second byte of body_len: covered by the header CRC
    return name, off, off + joblog.BATCH_HEADER_SIZE + (end - off - joblog.BATCH_HEADER_SIZE) // 2


@pytest.mark.parametrize("where", ["body", "body_len", "sealed"])
def test_bit_flip_mid_log_is_refused_and_check_names_the_same_file_and_offset(
        built: Built, tmp_path: Path, where: str) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name, off, pos = _flip_target(built, where)
    flip(d / name, pos)
    before = snapshot_of(d)
    with pytest.raises(LogCorruption) as info:
        close(recover(d))
    assert (info.value.path.name, info.value.offset) == (name, off)
    assert f"zmqrun log check {d}" in str(info.value)
    rep = check(d)
    assert rep.exit_code == 1
    assert (rep.first_problem.file, rep.first_problem.offset) == (name, off)
    assert (rep.refusal.file, rep.refusal.offset) == (name, off)
    res = CliRunner().invoke(main, ["log", "check", str(d)])
    assert res.exit_code == 1 and f"{name} at offset {off}" in res.output
    assert snapshot_of(d) == before  # neither the router nor the check changed anything


def test_bit_flip_in_a_segment_the_snapshot_covers_is_reported_though_the_router_starts(
        built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name = built.covered()[1]
    off = built.batches(name)[1]
    flip(d / name, off + joblog.BATCH_HEADER_SIZE + 2)
    rep = check(d)
    assert rep.exit_code == 1 and rep.refusal is None
    assert (rep.first_problem.file, rep.first_problem.offset) == (name, off)
    assert "covers it" in rep.first_problem.what
    close(recover(d))  # the router does not read covered segments on start


def test_a_whole_batch_with_a_wrong_sequence_at_the_tail_is_corruption_not_a_torn_tail(
        built: Built, tmp_path: Path) -> None:
    # Its CRCs hold, so it was written whole: a sequence repeat is corruption (log-format.md section 2).
    d = tmp_path / "d"
    built.restore(d)
    last = d / built.segments[-1]
    off = built.batches(last.name)[-1]
    recs = [(x.type, x.payload) for x in built.records if x.segment == last.name and x.batch == off]
    first = min(x.seq for x in built.records if x.segment == last.name and x.batch == off)
    with open(last, "r+b") as f:
        f.truncate(off)
        f.seek(off)
        f.write(joblog.encode_batch(first - 1, recs))
    with pytest.raises(LogCorruption) as info:
        close(recover(d))
    assert (info.value.path.name, info.value.offset) == (last.name, off) and "sequence gap" in str(info.value)
    rep = check(d)
    assert rep.exit_code == 1 and (rep.refusal.file, rep.refusal.offset) == (last.name, off)


@pytest.mark.parametrize("which", ["covered", "replayed"])
def test_deleted_middle_segment_is_refused_and_reported(built: Built, tmp_path: Path, which: str) -> None:
    d = tmp_path / "d"
    built.restore(d)
    gone = built.covered()[2] if which == "covered" else built.replayed_sealed()[0]
    nxt = built.segments[built.segments.index(gone) + 1]
    (d / gone).unlink()
    (d / segindex.index_name(int(gone[4:-4]))).unlink()
    with pytest.raises(LogCorruption) as info:
        close(recover(d))
    assert (info.value.path.name, info.value.offset) == (nxt, 0) and "sequence gap" in str(info.value)
    rep = check(d)
    assert rep.exit_code == 1
    assert (rep.first_problem.file, rep.first_problem.offset) == (nxt, 0)
    assert f"expected {int(gone[4:-4])}" in rep.first_problem.what


# -- snapshot, CURRENT and index damage: fall back ----------------------------------------------------------


@pytest.mark.parametrize("what", ["snapshot", "CURRENT"])
def test_snapshot_or_current_damage_falls_back_and_recovers_every_acked_job(
        built: Built, tmp_path: Path, what: str) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name = snapshot.snapshot_name(built.snapshot_seq) if what == "snapshot" else "CURRENT"
    flip(d / name, len(built.files[name]) // 2)
    rep = check(d)
    assert rep.exit_code == 0 and rep.refusal is None
    # (a damaged snapshot is the one CURRENT names: both are reported)
    assert [f.file for f in rep.findings] == ([name, "CURRENT"] if what == "snapshot" else [name]), rep.findings
    assert all(f.severity == "warning" for f in rep.findings)
    older = snapshot.list_snapshots(RealFS(), d)[0]
    assert rep.snapshot_used == (older if what == "snapshot" else built.snapshot_seq)
    assert_recovers_everything(d, built)


def test_missing_index_of_a_covered_segment(built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name = built.covered()[2]
    (d / segindex.index_name(int(name[4:-4]))).unlink()
    rep = check(d)  # the log starts at 1: the router rebuilds it by a full replay
    assert rep.exit_code == 0 and rep.snapshot_used == 0 and "replays the whole log" in rep.findings[0].what
    assert_recovers_everything(d, built)
    # With the oldest segment gone (as retention removes it) a full replay is impossible: refused.
    built.restore(d)
    (d / segindex.index_name(int(name[4:-4]))).unlink()
    first = built.segments[0]
    (d / first).unlink()
    (d / segindex.index_name(1)).unlink()
    rep = check(d)
    assert rep.exit_code == 1 and (rep.refusal.file, rep.refusal.offset) == (name, 0)
    with pytest.raises(LogCorruption) as info:
        close(recover(d))
    assert (info.value.path.name, info.value.offset) == (name, 0)


def test_an_index_that_verifies_but_disagrees_with_its_segment_is_an_error(built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name = built.covered()[1]
    path = d / segindex.index_name(int(name[4:-4]))
    idx = segindex.SegmentIndex(path)
    batches = array("q", [v for i, b in enumerate(built.batches(name))
                                 for v in (min(x.seq for x in built.records if x.segment == name and x.batch == b),
                                           b + (8 if i == 1 else 0))])
    data = segindex.encode_index(idx.first_seq, idx.last_seq, list(idx.entries()), batches, idx.min_submit_seq,
                                 idx.sealed_at)
    idx.close()
    path.write_bytes(data)
    rep = check(d)
    assert rep.exit_code == 1 and [f.file for f in rep.errors] == [path.name]
    assert "offset" in rep.errors[0].what


# -- repair ----------------------------------------------------------------------------------------------------


def test_repair_truncates_at_a_mid_log_flip_then_check_passes_and_the_router_recovers(
        built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    name, off, pos = _flip_target(built, "sealed")
    flip(d / name, pos)
    before = snapshot_of(d)
    dry = CliRunner().invoke(main, ["log", "repair", str(d)])
    assert dry.exit_code == 1 and "nothing changed" in dry.output
    assert snapshot_of(d) == before
    res = CliRunner().invoke(main, ["log", "repair", str(d), "--truncate-at-corruption"])
    assert res.exit_code == 0, res.output
    later = built.segments[built.segments.index(name) + 1:]
    dropped = len(built.files[name]) - off
    assert f"truncate {name} at offset {off}: drops {dropped} bytes" in res.output
    for seg in later:
        assert f"remove {seg}" in res.output and not (d / seg).exists()
    order = built.segments.index
    kept = {x.seq for x in built.records
            if order(x.segment) < order(name) or (x.segment == name and x.batch_end <= off)}
    lost = [x.seq for x in built.records if x.seq not in kept]
    assert f"records lost: sequence {min(lost)} to {max(lost)} ({len(lost)} records" in res.output
    assert f"the log will end at sequence {max(kept)}" in res.output
    assert (d / name).stat().st_size == off
    assert not (d / segindex.index_name(int(name[4:-4]))).exists()  # it indexed records past the cut
    assert snapshot.list_snapshots(RealFS(), d) == [s for s in snapshot.list_snapshots(RealFS(), built.dir)
                                                    if s <= max(kept)]
    rep = check(d)
    assert rep.exit_code == 0 and rep.findings == [], rep.findings
    r = recover(d)
    try:
        assert state(r, built.all_ids) == built.expected(kept)
        assert r.log.last_seq == max(kept)
    finally:
        close(r)
    again = CliRunner().invoke(main, ["log", "repair", str(d), "--truncate-at-corruption"])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_of_a_deleted_segment_after_the_snapshot_cuts_there_and_the_router_recovers(
        built: Built, tmp_path: Path) -> None:
    d = tmp_path / "d"
    built.restore(d)
    gone = built.replayed_sealed()[0]  # starts right after the snapshot: the cut leaves no record after it
    (d / gone).unlink()
    (d / segindex.index_name(int(gone[4:-4]))).unlink()
    res = CliRunner().invoke(main, ["log", "repair", str(d), "--truncate-at-corruption"])
    assert res.exit_code == 0, res.output
    assert f"create {gone} (empty)" in res.output  # replay after the snapshot starts at a segment there
    assert check(d).findings == []
    kept = {x.seq for x in built.records if x.seq <= built.snapshot_seq}
    r = recover(d)
    try:
        assert state(r, built.all_ids) == built.expected(kept)
    finally:
        close(r)


def test_junk_after_the_last_batch_of_a_sealed_segment_is_cut_when_the_next_segment_proves_nothing_is_missing(
        tmp_path: Path) -> None:
    """Zeros or garbage appended to a sealed segment hide no record when the next segment starts at the
    next sequence number: the router truncates them (with a warning) instead of refusing, and check agrees."""
    d = Driver(tmp_path / "data", segment_bytes=4096)
    d.run(120)
    d.close()
    segs = sorted((tmp_path / "data").glob("seg-*.log"))
    assert len(segs) >= 4
    victim = segs[-2]  # sealed
    size = victim.stat().st_size
    with open(victim, "ab") as f:
        f.write(bytes(4096) + b"garbage")
    for p in (tmp_path / "data").glob("snap-*"):  # no snapshot: the router replays every segment
        p.unlink()
    (tmp_path / "data" / "CURRENT").unlink()
    rep = logcheck.check(tmp_path / "data")
    assert rep.exit_code == 0, rep.findings
    again = Driver(tmp_path / "data", segment_bytes=4096)
    assert again.router.archive.count() == len(d.finished)
    assert victim.stat().st_size == size
    again.close()


def test_repair_removes_a_snapshot_that_does_not_match_the_log(tmp_path: Path) -> None:
    """A snapshot copied from another data dir (no segment starts right after it) makes the router refuse;
    repair removes it (and CURRENT follows) instead of saying there is nothing to repair."""
    d = Driver(tmp_path / "data", segment_bytes=4096)
    d.run(120)
    d.close()
    data = tmp_path / "data"
    newest = max(snapshot.list_snapshots(RealFS(), data))
    foreign = newest + 7  # inside the log, but no segment starts after it
    snapshot.write_snapshot(RealFS(), data, foreign, [], at=1.0)
    r = Router("tcp://127.0.0.1:0", data, FsyncPolicy("always"), segment_bytes=4096, background_checkpoints=False)
    r.log = JobLog(data, r.policy, 4096)
    with pytest.raises(LogCorruption, match="does not belong to this log"):
        r.recover()
    r.log.close()
    os.close(r._wake_r)
    os.close(r._wake_w)
    _before, plan, after = logcheck.repair(data, apply=True)
    assert any(name == snapshot.snapshot_name(foreign) for name, _why in plan.remove)
    assert after is not None and after.exit_code == 0
    again = Driver(data, segment_bytes=4096)
    assert again.router.archive.count() == len(d.finished)
    again.close()
