"""Segments, index files, snapshots and retention, end to end with a real router on tiny segments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import Cluster, wait_until, write_script
from zmqrun import protocol as P
from zmqrun import segindex, snapshot
from zmqrun.fsio import RealFS

ECHO = """\
def echo(i, pad=""):
    print(f"job {i}")
    return {"i": i, "pad": pad}
"""

SEGMENT = ("--segment-mb", "0.01")  # ~10 KiB segments: a few hundred jobs roll many times


def _files(data_dir: Path, pattern: str) -> list[Path]:
    return sorted(data_dir.glob(pattern))


def test_rolls_write_index_files_and_snapshots_and_restart_reads_old_jobs_from_disk(
        zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'echo.py', ECHO)}:echo"
    zr.start_router(extra=SEGMENT)
    zr.start_worker(script)
    c = zr.client()
    n = 1500
    jobs = [c.submit(script, {"i": i}) for i in range(n)]
    assert [j.result(timeout=60) for j in jobs] == [{"i": i, "pad": ""} for i in range(n)]
    delayed = c.submit(script, {"i": -1}, delay=3600)  # live across the restart, inside a snapshot

    segs = _files(zr.data_dir, "seg-*.log")
    assert len(segs) > 10, [p.name for p in segs]
    # Every sealed segment gets its index (written by a forked child: wait for it).
    wait_until(lambda: len(_files(zr.data_dir, "seg-*.idx")) >= len(_files(zr.data_dir, "seg-*.log")) - 1,
               timeout=20, what="an index file per sealed segment")
    snaps = snapshot.list_snapshots(RealFS(), zr.data_dir)
    # Two are kept; a third can exist for a moment, between a new one's rename and the old one's removal.
    assert 1 <= len(snaps) <= snapshot.KEEP_SNAPSHOTS + 1
    assert (zr.data_dir / "CURRENT").exists()

    zr.router_proc.kill9()
    zr.start_router(address=zr.address, extra=SEGMENT)
    out = zr.router_proc.output()
    m = re.search(r"recovered from snapshot at (\d+)", out)
    assert m, out
    assert int(m.group(1)) >= max(snaps)
    # The first jobs are long out of the recent-jobs cache: these reads come from index files and segments.
    for i in (0, 1, n // 2, n - 1):
        rec = c.get(jobs[i].id)
        assert rec.status == "success" and rec.result == {"i": i, "pad": ""}
        assert rec.args == {"i": i} and rec.script == script
        assert rec.logs == f"job {i}\n" and rec.attempts == 1 and rec.worker
        assert rec.created_at and rec.started_at and rec.finished_at
    assert c.get(delayed.id).status == "queued"
    listed = c.list_jobs(limit=n + 10)
    ids = [r.id for r in listed]
    assert len(ids) == len(set(ids)) == n + 1
    st = c.status()
    assert st["counts"]["finished"] == n and st["counts"]["scheduled"] == 1
    with pytest.raises(KeyError):
        c.get("no-such-job")


def test_retention_by_size_keeps_disk_bounded_and_old_jobs_read_as_unknown(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'echo.py', ECHO)}:echo"
    zr.start_router(extra=(*SEGMENT, "--retain-bytes", "512KiB"))
    zr.start_worker(script)
    c = zr.client()
    pad = "x" * 200
    first = c.submit(script, {"i": 0, "pad": pad})
    first.result(timeout=30)
    sizes, largest, written = [], 0, 0
    for _round in range(12):
        assert len(c.map(script, [{"i": i, "pad": pad} for i in range(300)])) == 300
        wait_until(lambda: len(_files(zr.data_dir, "seg-*.idx")) >= len(_files(zr.data_dir, "seg-*.log")) - 1,
                   timeout=20, what="index files")
        segs = {p.name: p.stat().st_size for p in _files(zr.data_dir, "seg-*.log")}
        largest = max(largest, *segs.values())
        sizes.append(sum(segs.values()))
        written += 300 * 400  # at least this many bytes of log per round (SUBMIT + FINISH of 300 padded jobs)
    # Disk use levels off: the cap, plus the segments the older kept snapshot does not cover yet (a
    # segment rolls after a whole loop iteration's batch, so one can be well past --segment-mb).
    assert max(sizes) <= 0.5 * 1024 * 1024 + 3 * largest, (sizes, largest)
    assert max(sizes) < written / 2, (sizes, written)
    assert not zr.data_dir.joinpath("seg-00000000000000000001.log").exists()
    with pytest.raises(KeyError):
        c.get(first.id)
    last = c.list_jobs(limit=1)[0]
    assert c.get(last.id).status == "success"


def test_index_file_round_trip_and_lookup(tmp_path: Path) -> None:
    from array import array

    entries = [(f"0190-{i:04d}", 10 + i, 100 + i) for i in range(0, 400, 3)]
    batches = array("q", [100, 32, 150, 4000, 300, 9000])
    data = segindex.encode_index(100, 499, entries, batches, min_submit_seq=10, sealed_at=1.5)
    path = tmp_path / segindex.index_name(100)
    segindex.write_index(RealFS(), path, data)
    idx = segindex.SegmentIndex(path)
    assert (idx.first_seq, idx.last_seq, idx.n_entries, idx.min_submit_seq, idx.sealed_at) == (100, 499, 134, 10, 1.5)
    for jid, s, e in entries:
        assert idx.find(jid) == (s, e)
    assert idx.find("0190-0001") is None and idx.find("zzz") is None and idx.find("0") is None
    assert idx.batch_for(100) == (100, 32) and idx.batch_for(149) == (100, 32)
    assert idx.batch_for(150) == (150, 4000) and idx.batch_for(499) == (300, 9000)
    assert idx.batch_for(99) is None and idx.batch_for(500) is None
    assert sorted(idx.entries()) == sorted(entries)
    idx.close()
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(segindex.IndexCorrupt, match="CRC"):
        segindex.SegmentIndex(path)


def test_snapshot_falls_back_to_the_older_one_when_the_newest_is_damaged(tmp_path: Path) -> None:
    fs = RealFS()
    snapshot.write_snapshot(fs, tmp_path, 10, [{"id": "a"}], at=1.0)
    snapshot.write_snapshot(fs, tmp_path, 20, [{"id": "b"}], at=2.0)
    snapshot.write_snapshot(fs, tmp_path, 30, [{"id": "c"}], at=3.0)
    assert snapshot.list_snapshots(fs, tmp_path) == [20, 30]  # two kept
    def latest() -> tuple[int, list] | None:
        got = snapshot.load_latest(fs, tmp_path)
        return None if got is None else (got[0], list(got[1]))

    assert latest() == (30, [{"id": "c"}])
    newest = tmp_path / snapshot.snapshot_name(30)
    raw = bytearray(newest.read_bytes())
    raw[-3] ^= 0x40
    newest.write_bytes(bytes(raw))
    assert latest() == (20, [{"id": "b"}])
    (tmp_path / "CURRENT").write_bytes(b"garbage")
    assert latest() == (20, [{"id": "b"}])


def test_replay_through_segments_that_already_have_index_files_loses_nothing(tmp_path: Path) -> None:
    """Regression: when recovery replays segments that were indexed before (e.g. it fell back to an
    older snapshot), their old index files must not answer lookups during the replay; a job submitted in one
    segment and finished in the next would otherwise look finished at its SUBMIT and vanish."""
    import random

    from routerdriver import Driver

    rng = random.Random(7)
    d = Driver(tmp_path, segment_bytes=4096)
    for _ in range(300):
        d.submit(rng.randint(1, 2))
        d.tick()
        if rng.random() < 0.5:
            d.work(rng)
            d.tick()
    while d.running:
        d.work()
        d.tick()
    d.close()
    assert len(d.finished) == len(d.acked) > 300
    snaps = snapshot.list_snapshots(RealFS(), tmp_path)
    assert len(snaps) == 2
    for seq in snaps:  # no snapshot left: recovery replays every segment, each of which has an index
        (tmp_path / snapshot.snapshot_name(seq)).unlink()
    (tmp_path / "CURRENT").unlink()
    again = Driver(tmp_path, segment_bytes=4096)
    assert again.router.archive.count() == len(d.finished)
    for jid, outcome in d.finished.items():
        job = again.router.archive.get(jid)
        assert job is not None and job.status == "success" and job.result == outcome["result"], jid
    again.close()


def test_the_data_dir_lock_cannot_be_defeated_by_deleting_a_file(tmp_path: Path) -> None:
    from zmqrun.joblog import JobLog, LogLocked

    first = JobLog(tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()  # whatever files there are: the lock is on the directory itself
    with pytest.raises(LogLocked, match="in use"):
        JobLog(tmp_path)
    first.close()
    JobLog(tmp_path).close()  # free again once the holder is gone


def test_a_damaged_archived_job_gets_one_error_line_and_the_router_keeps_serving(tmp_path: Path) -> None:
    import orjson

    from routerdriver import CLIENT, Driver
    from zmqrun import protocol as P

    d = Driver(tmp_path, segment_bytes=4096)
    d.run(200)
    d.close()
    first_id = "job-00001-0"
    assert first_id in d.finished
    seg = sorted(tmp_path.glob("seg-*.log"))[0]  # covered by the snapshot: not read on start
    data = bytearray(seg.read_bytes())
    from zmqrun.joblog import BATCH_HEADER_SIZE, SEGMENT_HEADER_SIZE

    data[SEGMENT_HEADER_SIZE + BATCH_HEADER_SIZE + 2] ^= 0xFF  # the first job's SUBMIT record
    seg.write_bytes(bytes(data))
    again = Driver(tmp_path, segment_bytes=4096)
    r = again.router
    for job_id, cmd in ((first_id, P.C_GET), (first_id, P.C_WAIT)):
        r._handle([CLIENT, P.header(P.CLIENT, cmd), orjson.dumps({"req": 7, "id": job_id, "ids": [job_id]})])
    sent = [(f[0], orjson.loads(f[1])) for _ident, f in again.sock.sent]
    errors = [body["error"] for head, body in sent if head == P.H_ERROR]
    assert errors and all("cannot be read back" in e and "zmqrun log check" in e for e in errors), sent
    again.sock.sent.clear()
    r._handle([CLIENT, P.header(P.CLIENT, P.C_STATUS), orjson.dumps({"req": 8})])
    assert again.sock.sent and again.sock.sent[0][1][0] == P.H_REPLY  # still serving
    again.close()


def test_entries_of_an_indexed_segment_are_freed_in_slices_and_jobs_stay_readable(tmp_path: Path) -> None:
    """Issue 4 ("never blocks the loop for more than a few ms"): dropping a sealed segment's in-memory
    entries at once cost ~20 ms for a 64 MiB segment; they are freed a bounded slice per loop iteration,
    and a finished job is found through the index file meanwhile."""
    from routerdriver import Driver

    d = Driver(tmp_path, segment_bytes=64 * 1024, credit=100)
    arch = d.router.archive
    while not arch.retired:
        d.submit(50)
        d.tick()
        d.work()
        d.tick()
        assert len(d.acked) < 20_000, "no segment was indexed"
    retired = sum(len(e) for e in arch.retired)
    assert retired > 100
    first = next(iter(d.finished))
    arch.recent.clear()  # force a lookup through the index file
    assert arch.get(first) is not None and arch.get(first).status == "success"
    d.tick()  # the loop's second half frees one slice (8,192 entries at most)
    left = sum(len(e) for e in arch.retired)
    assert left == max(0, retired - 8192)
    retired = left
    steps = 0
    while arch.retired:
        before = sum(len(e) for e in arch.retired)
        arch.release(budget=64)
        assert before - sum(len(e) for e in arch.retired) <= 64
        steps += 1
    assert steps >= retired / 64
    for jid in d.finished:
        job = arch.get(jid)
        assert job is not None and job.result == d.finished[jid]["result"], jid
    d.close()


def test_a_job_is_dispatched_only_after_its_submit_record_is_written(tmp_path: Path) -> None:
    """A kill -9 between a dispatch and the log write would let a job run with no record of it anywhere
    (found by a chaos session: the client got no ACK, re-submitted, and it ran twice).  The SUBMIT
    batch is written (not yet synced) before the JOBS message leaves."""
    from routerdriver import WORKER, Driver, FakeSocket

    seen: list[bool] = []

    class Checking(FakeSocket):
        def send(self, frame: bytes, flags: int = 0) -> None:
            super().send(frame, flags)
            last = self.sent[-1] if self.sent and not flags & 2 else None
            if last is not None and last[0] == WORKER and last[1][0] == P.H_JOBS:
                jid = orjson.loads(last[1][1])["jobs"][0]["id"].encode()
                on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("seg-*.log"))
                seen.append(jid in on_disk)

    d = Driver(tmp_path, segment_bytes=1 << 20)
    d.sock = d.router.sock = Checking()  # type: ignore[assignment]
    for _ in range(5):
        d.submit(1)
        d.tick()
        d.work()
        d.tick()
    d.close()
    assert seen == [True] * 5


def test_a_filtered_listing_finds_old_matches_beyond_the_recent_jobs(tmp_path: Path) -> None:
    """(Found by a new-user session.) After a restart, `jobs list --status failure --limit 10` read back
    only max(1000, 4 x limit) finished jobs and listed none of 13 older failures.  A filtered listing
    reads back until ``limit`` jobs match (within the per-request bound)."""
    from routerdriver import CLIENT, Driver

    d = Driver(tmp_path, segment_bytes=64 * 1024)
    old = d.submit(3, delay=3600)
    for jid in old:
        d.router._handle([CLIENT, P.header(P.CLIENT, P.C_CANCEL), orjson.dumps({"req": 900, "id": jid})])
    d.tick()
    d.run(1500)  # newer than the canceled ones, all successes
    d.close()
    again = Driver(tmp_path, segment_bytes=64 * 1024)
    again.router.archive.recent.clear()  # as after a restart of a router with a big archive: all from disk
    again.sock.sent.clear()
    again.router._handle([CLIENT, P.header(P.CLIENT, P.C_LIST),
                          orjson.dumps({"req": 1, "status": "canceled", "limit": 10})])
    (reply,) = [orjson.loads(f[1]) for ident, f in again.sock.sent if ident == CLIENT]
    assert sorted(j["id"] for j in reply["jobs"]) == sorted(old), reply
    again.sock.sent.clear()
    again.router._handle([CLIENT, P.header(P.CLIENT, P.C_LIST), orjson.dumps({"req": 2, "limit": 5})])
    (reply,) = [orjson.loads(f[1]) for ident, f in again.sock.sent if ident == CLIENT]
    assert len(reply["jobs"]) == 5 and all(j["status"] == "success" for j in reply["jobs"])
    again.close()


def test_status_counts_this_processes_log_records_apart_from_the_replayed_ones(tmp_path: Path) -> None:
    """(Found by a new-user session: `status` set the whole log's record count against this process's
    batches and syncs, "526.5 records per sync".)"""
    from routerdriver import Driver

    d = Driver(tmp_path, segment_bytes=64 * 1024)
    d.run(20)
    before = d.router.status()["log"]
    assert before["records_since_start"] == before["records"] > 0
    d.close()
    again = Driver(tmp_path, segment_bytes=64 * 1024)
    start = again.router.status()["log"]
    assert start["records"] >= before["records"] and start["records_since_start"] == 0 and start["syncs"] == 0
    again._req = 1000  # new job ids (the driver numbers them from 1 again: those are the finished jobs)
    again.run(5)
    after = again.router.status()["log"]
    assert after["records_since_start"] == after["records"] - start["records"] > 0
    again.close()


def test_a_restart_from_a_snapshot_still_gives_back_jobs_the_worker_never_received(tmp_path: Path) -> None:
    """(Found by a new-user session: a kill -9 right after a snapshot charged ~115 never-run jobs an attempt.)
    Jobs dispatched before the snapshot are not replayed from DISPATCH records, so the snapshot row of a
    running job keeps its worker's incarnation; the worker's READY after the restart, naming none of them,
    gets them queued again at once, uncounted."""
    from routerdriver import WORKER, Driver

    def ready(d: Driver, **extra: Any) -> None:
        d.router._handle([WORKER, P.header(P.WORKER, P.W_READY), orjson.dumps(
            {"script": "s.py:f", "credit": 64, "name": "w1", "incarnation": "inc-A", **extra})])

    d = Driver(tmp_path, segment_bytes=4096)
    ready(d)
    held = d.submit(5)
    d.tick()
    assert sorted(j["id"] for j in d.running) == sorted(held)
    d.running = []  # the worker holds these five and never reports them
    snaps_before = len(snapshot.list_snapshots(RealFS(), tmp_path))
    d.run(120)  # other jobs: segments roll, snapshots cover the five running ones
    assert len(snapshot.list_snapshots(RealFS(), tmp_path)) > snaps_before
    d.close()  # as a kill -9: nothing more is written
    again = Driver(tmp_path, segment_bytes=4096)
    r = again.router
    assert {jid: r.queue.jobs[jid].status for jid in held} == dict.fromkeys(held, "running")  # leased
    assert all(r._lease_incarnation.get(jid) == "inc-A" for jid in held), r._lease_incarnation
    ready(again, received=[], running=[], unstarted=[])
    again.tick()
    assert sorted(j["id"] for j in again.running) == sorted(held)  # dispatched again at once
    assert all(j["attempt"] == 1 for j in again.running), again.running  # the lost dispatch did not count
    again.close()
