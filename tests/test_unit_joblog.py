"""zmqrun.joblog without sockets: batch framing round trip, JobLog write/recover, torn tails,
mid-file corruption, segment rolls, the directory lock."""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqrun import joblog
from zmqrun.joblog import FsyncPolicy, JobLog, LogCorruption, LogLocked

records_st = st.lists(st.tuples(st.integers(1, 5), st.binary(max_size=300)), min_size=1, max_size=30)


@given(first_seq=st.integers(1, 2**40), records=records_st)
@settings(max_examples=200, deadline=None)
def test_batch_encode_decode_round_trip(first_seq: int, records: list[tuple[int, bytes]]) -> None:
    frame = joblog.encode_batch(first_seq, records)
    parsed = joblog.parse_batch_header(frame, 0)
    assert not isinstance(parsed, str), parsed
    body_len, body_crc, seq, count = parsed
    assert (seq, count) == (first_seq, len(records))
    assert len(frame) == joblog.BATCH_HEADER_SIZE + body_len
    body = frame[joblog.BATCH_HEADER_SIZE:]
    assert zlib.crc32(body) == body_crc
    assert joblog.decode_body(body, count) == records


@given(records=records_st, data=st.data())
@settings(max_examples=100, deadline=None)
def test_any_single_bit_flip_in_a_batch_is_detected(records: list[tuple[int, bytes]], data: st.DataObject) -> None:
    frame = bytearray(joblog.encode_batch(7, records))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    parsed = joblog.parse_batch_header(bytes(frame), 0)
    if isinstance(parsed, str):
        return  # header damage detected
    body_len, body_crc, _seq, count = parsed
    body = bytes(frame[joblog.BATCH_HEADER_SIZE:])
    assert len(body) != body_len or zlib.crc32(body) != body_crc


def _write(log: JobLog, recs: list[tuple[int, bytes]], durable: bool = True) -> list[int]:
    seqs = [log.append(t, p) for t, p in recs]
    log.flush(need_durable=durable)
    return seqs


def _recover(data_dir: Path, **kw) -> tuple[JobLog, list[tuple[int, int, bytes]]]:
    log = JobLog(data_dir, FsyncPolicy("always"), **kw)
    return log, list(log.recover())


def _batches(path: Path) -> list[int]:
    """Offsets of the batches of a segment file; a crashed log's active segment ends in zeros written ahead."""
    data = path.read_bytes()
    out, off = [], joblog.SEGMENT_HEADER_SIZE
    while off < len(data) and data.count(0, off) != len(data) - off:
        parsed = joblog.parse_batch_header(data, off)
        assert not isinstance(parsed, str)
        out.append(off)
        off += joblog.BATCH_HEADER_SIZE + parsed[0]
    return out


def _populate(data_dir: Path, batches: int = 3, per_batch: int = 2, **kw) -> list[tuple[int, int, bytes]]:
    log, recs = _recover(data_dir, **kw)
    assert recs == []
    log.start()
    expect = []
    for b in range(batches):
        batch = [(joblog.SUBMIT if i % 2 == 0 else joblog.FINISH, f'{{"b": {b}, "i": {i}}}'.encode())
                 for i in range(per_batch)]
        for seq, (t, p) in zip(_write(log, batch), batch):
            expect.append((seq, t, p))
    log.close()
    return expect


def test_write_close_recover_round_trip(tmp_path: Path) -> None:
    expect = _populate(tmp_path, batches=4, per_batch=3)
    assert [seq for seq, _, _ in expect] == list(range(1, 13))
    segs = joblog.list_segments(tmp_path)
    assert [s.name for s in segs] == [joblog.segment_name(1)]
    assert len(_batches(segs[0])) == 4
    log, recs = _recover(tmp_path)
    assert recs == expect
    # Appends after recovery continue the sequence.
    log.start()
    assert log.append(joblog.CANCEL, b'{"id": "x"}') == 13
    log.flush(need_durable=True)
    assert log.durable_seq == 13
    log.close()
    log, recs = _recover(tmp_path)
    log.close()
    assert recs == [*expect, (13, joblog.CANCEL, b'{"id": "x"}')]


def test_durable_seq_follows_the_fsync_mode(tmp_path: Path) -> None:
    log, _ = _recover(tmp_path / "always")
    log.start()
    seq = log.append(joblog.SUBMIT, b"{}", eager=True)
    assert log.durable_seq < seq
    log.flush(need_durable=False)  # an eager record is synced even if nobody asked yet
    assert log.durable_seq == seq
    log.close()
    never = JobLog(tmp_path / "never", FsyncPolicy("never"))
    list(never.recover())
    never.start()
    seq = never.append(joblog.DISPATCH, b"{}")
    never.flush(need_durable=False)
    assert never.durable_seq == seq
    never.close()


def test_second_log_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    log, _ = _recover(tmp_path)
    with pytest.raises(LogLocked):
        JobLog(tmp_path)
    log.close()
    again, _ = _recover(tmp_path)  # released on close
    again.close()


@pytest.mark.parametrize("tail", [b"\x31", bytes(64), b"ZRB1garbage" * 5], ids=["one-byte", "zeros", "garbage"])
def test_torn_tail_truncated_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes) -> None:
    expect = _populate(tmp_path)
    seg = joblog.list_segments(tmp_path)[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    caplog.set_level(logging.INFO, logger="zmqrun.log")
    log, recs = _recover(tmp_path)
    assert recs == expect
    assert seg.stat().st_size == good
    # Zeros hold no record (every crash leaves the zeros written ahead): an INFO line, not a warning.
    level = logging.INFO if tail.count(0) == len(tail) else logging.WARNING
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno == level)
    assert seg.name in text and str(good) in text, text
    log.start()
    _write(log, [(joblog.SUBMIT, b'{"after": 1}')])
    log.close()
    log, recs = _recover(tmp_path)
    log.close()
    assert recs == [*expect, (len(expect) + 1, joblog.SUBMIT, b'{"after": 1}')]


def test_torn_last_batch_drops_only_that_batch(tmp_path: Path) -> None:
    expect = _populate(tmp_path, batches=3, per_batch=2)
    seg = joblog.list_segments(tmp_path)[-1]
    last = _batches(seg)[-1]
    size = seg.stat().st_size
    for cut in (last + 1, last + joblog.BATCH_HEADER_SIZE, size - 1):
        with open(seg, "r+b") as f:
            f.truncate(cut)
        log, recs = _recover(tmp_path)
        log.close()
        assert recs == expect[:-2]
        assert seg.stat().st_size == last
        # Put the last batch back for the next cut.
        log, _ = _recover(tmp_path)
        log.start()
        _write(log, [(t, p) for _, t, p in expect[-2:]])
        log.close()
        assert seg.stat().st_size == size


@pytest.mark.parametrize("where", ["body", "body_len", "magic"])
def test_mid_file_corruption_raises_with_file_and_offset(tmp_path: Path, where: str) -> None:
    _populate(tmp_path, batches=3)
    seg = joblog.list_segments(tmp_path)[-1]
    off = _batches(seg)[0]
    data = bytearray(seg.read_bytes())
    pos = {"body": off + joblog.BATCH_HEADER_SIZE + 3, "body_len": off + 9, "magic": off}[where]
    data[pos] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruption) as info:
        _recover(tmp_path)
    assert info.value.path.name == seg.name and info.value.offset == off
    assert seg.name in str(info.value) and f"offset {off}" in str(info.value)
    assert seg.read_bytes() == bytes(data)  # nothing changed


def test_segments_roll_junk_after_a_sealed_segment_is_cut_and_damage_inside_it_is_refused(tmp_path: Path) -> None:
    expect = _populate(tmp_path, batches=6, per_batch=2, segment_bytes=120)
    segs = joblog.list_segments(tmp_path)
    assert len(segs) >= 3
    assert segs[0].name == joblog.segment_name(1)
    log, recs = _recover(tmp_path, segment_bytes=120)
    log.close()
    assert recs == expect
    # Zeros after the last batch of a sealed segment hide nothing (the next segment starts at the next
    # record): cut off with a warning.
    size = segs[0].stat().st_size
    with open(segs[0], "ab") as f:
        f.write(b"\0" * 10)
    log, recs = _recover(tmp_path, segment_bytes=120)
    log.close()
    assert recs == expect and segs[0].stat().st_size == size
    # A damaged batch inside a sealed segment is corruption, not a torn tail.
    data = bytearray(segs[0].read_bytes())
    data[joblog.SEGMENT_HEADER_SIZE + joblog.BATCH_HEADER_SIZE + 1] ^= 0x01
    segs[0].write_bytes(bytes(data))
    with pytest.raises(LogCorruption) as info:
        _recover(tmp_path, segment_bytes=120)
    assert info.value.path.name == segs[0].name


def test_fsync_policy_parse() -> None:
    assert FsyncPolicy.parse("always").mode == "always"
    assert FsyncPolicy.parse("never").mode == "never"
    p = FsyncPolicy.parse("interval=20")
    assert (p.mode, p.interval) == ("interval", 0.02)
    for bad in ("sometimes", "always=5", "interval=abc", "interval=-1"):
        with pytest.raises(ValueError):
            FsyncPolicy.parse(bad)


def test_damage_in_a_never_synced_region_before_later_unsynced_batches_is_a_torn_tail(tmp_path: Path) -> None:
    """A power loss can lose an unsynced batch yet keep a later one (pages reach the disk in any order).
    Batches written without a sync in between vouch only for the prefix synced before them
    (sync_lag), so the hole reads as a never-synced tail, not as corruption; nothing acknowledged is in it."""
    log = JobLog(tmp_path, FsyncPolicy("always"))
    list(log.recover())
    log.start()
    acked = log.append(joblog.SUBMIT, b'{"acked": 1}', eager=True)
    log.flush(need_durable=True)  # synced: acknowledged
    for i in range(3):  # written, never synced (records nobody waits on)
        log.append(joblog.FINISH, b'{"lazy": %d}' % i)
        log.flush(need_durable=False)
    log._fd, fd = -1, log._fd  # crash: no close-time sync
    os.close(fd)
    log.close()
    seg = joblog.list_segments(tmp_path)[-1]
    offsets = _batches(seg)
    data = bytearray(seg.read_bytes())
    data[offsets[1]:offsets[2]] = bytes(offsets[2] - offsets[1])  # the first unsynced batch never reached the disk
    seg.write_bytes(bytes(data))
    again, recs = _recover(tmp_path)
    assert [seq for seq, _, _ in recs] == [acked]
    assert seg.stat().st_size == offsets[1]
    again.close()


def test_damage_in_a_synced_region_before_a_later_batch_is_refused(tmp_path: Path) -> None:
    log = JobLog(tmp_path, FsyncPolicy("always"))
    list(log.recover())
    log.start()
    for i in range(3):
        log.append(joblog.SUBMIT, b'{"acked": %d}' % i, eager=True)
        log.flush(need_durable=True)  # each batch synced before the next is written
    log.close()
    seg = joblog.list_segments(tmp_path)[-1]
    offsets = _batches(seg)
    data = bytearray(seg.read_bytes())
    data[offsets[1] + joblog.BATCH_HEADER_SIZE] ^= 0x01  # a flipped bit in a synced batch's body
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruption, match=f"offset {offsets[1]}"):
        _recover(tmp_path)


# -- preallocation: zeros written ahead of the active segment's last batch --------------------------------


def test_active_segment_has_zeros_ahead_and_a_crash_leaves_them_for_recovery_to_drop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = JobLog(tmp_path, FsyncPolicy("always"))
    list(log.recover())
    log.start()
    seqs = _write(log, [(joblog.SUBMIT, b'{"n": %d}' % i) for i in range(5)])
    seg = joblog.list_segments(tmp_path)[-1]
    data_end = log.active_bytes
    assert seg.stat().st_size == data_end + joblog.PREALLOC_CHUNK  # the zeros are written ahead...
    assert seg.read_bytes()[data_end:].count(0) == joblog.PREALLOC_CHUNK
    more = _write(log, [(joblog.FINISH, b'{"n": 9}')])  # ...and the next batch overwrites them in place
    assert seg.stat().st_size == data_end + joblog.PREALLOC_CHUNK and log.active_bytes > data_end
    data_end = log.active_bytes
    log._fd, fd = -1, log._fd  # kill -9: no close, the zeros stay
    os.close(fd)
    log.close()
    caplog.set_level(logging.INFO, logger="zmqrun.log")
    again, recs = _recover(tmp_path)
    assert [seq for seq, _, _ in recs] == [*seqs, *more]
    assert seg.stat().st_size == data_end
    text = " ".join(r.getMessage() for r in caplog.records)
    assert seg.name in text and f"offset {data_end}" in text and "zero bytes" in text, text
    again.close()


def test_close_and_roll_cut_the_zeros_written_ahead(tmp_path: Path) -> None:
    log, _ = _recover(tmp_path, segment_bytes=4096)
    log.start()
    for i in range(40):  # ~300 B per batch: several rolls of 4 KiB segments
        _write(log, [(joblog.SUBMIT, b'{"pad": "%s"}' % (b"x" * 250))])
        active = joblog.list_segments(tmp_path)[-1]
        assert active.stat().st_size <= max(4096, log.active_bytes)  # never preallocated past a segment
        for sealed in joblog.list_segments(tmp_path)[:-1]:  # a sealed segment ends at its last batch
            data = sealed.read_bytes()
            _recs, end, problem = joblog.read_segment(sealed, data, None)
            assert problem is None and end == len(data)
    log.close()
    segs = joblog.list_segments(tmp_path)
    assert len(segs) > 2
    data = segs[-1].read_bytes()  # closed: cut back too
    _recs, end, problem = joblog.read_segment(segs[-1], data, None)
    assert problem is None and end == len(data)
    again, recs = _recover(tmp_path)
    assert len(recs) == 40
    again.close()


class _NoRoomFS(joblog.RealFS):
    """A disk that refuses every write of zeros (ENOSPC) but takes the records."""

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if len(data) > 64 and bytes(data).count(0) == len(data):
            raise OSError(28, "No space left on device")
        return super().pwrite(fd, data, offset)


def test_a_failed_preallocation_is_not_a_log_failure(tmp_path: Path) -> None:
    log = JobLog(tmp_path, FsyncPolicy("always"), fs=_NoRoomFS())
    list(log.recover())
    log.start()
    seqs = _write(log, [(joblog.SUBMIT, b'{"n": 1}')]) + _write(log, [(joblog.SUBMIT, b'{"n": 2}')])
    assert log.failure is None and log.durable_seq == seqs[-1]
    assert joblog.list_segments(tmp_path)[-1].stat().st_size == log.active_bytes  # plain appends
    log.close()
    again, recs = _recover(tmp_path)
    assert [seq for seq, _, _ in recs] == seqs
    again.close()
