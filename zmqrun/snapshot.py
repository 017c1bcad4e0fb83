"""Snapshots of the live queue, so recovery reads only the segments after one.

A snapshot at sequence ``S`` holds every live job (queued, scheduled,
running) as of record ``S``; ``S`` is always the last record of a sealed
segment, so replay resumes at the segment that starts at ``S + 1``
(log-format.md section 7).  Files::

    snap-<S:020d>   header (32 bytes: magic "ZRSN", u16 version, u16 flags, u64 S,
                    u64 body_len, u32 body_crc, u32 header_crc over bytes 0..27) + body: JSON lines,
                    {"seq", "at", "count"} then arrays of up to 4096 live jobs each (decoded one
                    line at a time, so loading 100k jobs never holds them all as JSON objects)
    CURRENT         {"snapshot": "snap-...", "seq": S} on one line, then the CRC-32 of that line in hex

Both are written to a ``.tmp`` file, fdatasync'ed, renamed into place and the
directory fsync'ed (:meth:`zmqrun.fsio.RealFS.write_file`).  Recovery trusts
CURRENT if its CRC holds and its snapshot verifies; otherwise it takes the
newest snapshot that verifies (two are kept), with a warning.  Written by a
forked child so the router loop never waits on it (Redis BGSAVE); the parent
keeps serving.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import orjson

from .fsio import RealFS

log = logging.getLogger("zmqrun.log")

SNAP_MAGIC = b"ZRSN"
SNAP_VERSION = 2
_ROWS_PER_LINE = 4096
_HEAD = struct.Struct("<4sHHQQI")  # 28 bytes + u32 header CRC
HEADER_SIZE = 32
KEEP_SNAPSHOTS = 2


class SnapshotCorrupt(Exception):
    """A snapshot file is torn or fails its CRC."""


def snapshot_name(seq: int) -> str:
    """File name of the snapshot at ``seq``."""
    return f"snap-{seq:020d}"


def list_snapshots(fs: RealFS, data_dir: Path) -> list[int]:
    """Sequence numbers of the snapshot files present, oldest first."""
    out = []
    for name in fs.listdir(data_dir):
        if name.startswith("snap-") and not name.endswith(".tmp"):
            try:
                out.append(int(name[5:]))
            except ValueError:
                pass
    return sorted(out)


def encode_snapshot(seq: int, jobs: list[Any], at: float) -> bytes:
    """The bytes of a snapshot at ``seq`` holding ``jobs`` (live job states, any JSON values)."""
    lines = [orjson.dumps({"seq": seq, "at": at, "count": len(jobs)})]
    lines += [orjson.dumps(jobs[i:i + _ROWS_PER_LINE]) for i in range(0, len(jobs), _ROWS_PER_LINE)]
    body = b"\n".join(lines)
    head = _HEAD.pack(SNAP_MAGIC, SNAP_VERSION, 0, seq, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def decode_snapshot(data: bytes, name: str = "snapshot") -> tuple[int, Iterator[Any]]:
    """(seq, jobs) of a snapshot's bytes, ``jobs`` decoded lazily, line by line; raise
    :class:`SnapshotCorrupt` if it does not verify (header and body CRCs, the job count)."""
    if len(data) < HEADER_SIZE:
        raise SnapshotCorrupt(f"{name}: truncated header")
    magic, version, _flags, seq, body_len, body_crc = _HEAD.unpack_from(data)
    (hcrc,) = struct.unpack_from("<I", data, 28)
    if magic != SNAP_MAGIC or zlib.crc32(data[:28]) != hcrc:
        raise SnapshotCorrupt(f"{name}: bad header")
    if version != SNAP_VERSION:
        raise SnapshotCorrupt(f"{name}: unsupported version {version}")
    body = data[HEADER_SIZE:]
    if len(body) != body_len:
        raise SnapshotCorrupt(f"{name}: body is {len(body)} bytes, the header says {body_len}")
    if zlib.crc32(body) != body_crc:
        raise SnapshotCorrupt(f"{name}: body fails its CRC")
    head_line, _, rest = body.partition(b"\n")
    meta = orjson.loads(head_line)
    if meta.get("seq") != seq:
        raise SnapshotCorrupt(f"{name}: body says sequence {meta.get('seq')}, the header {seq}")
    count = meta["count"]
    lines = rest.count(b"\n") + 1 if count else 0
    if lines != -(-count // _ROWS_PER_LINE):
        raise SnapshotCorrupt(f"{name}: {lines} lines of jobs for {count} jobs")

    def rows() -> Iterator[Any]:
        if count:
            for line in rest.split(b"\n"):
                yield from orjson.loads(line)
    return seq, rows()


def encode_current(seq: int) -> bytes:
    """The bytes of a CURRENT file naming the snapshot at ``seq``."""
    line = orjson.dumps({"snapshot": snapshot_name(seq), "seq": seq})
    return line + b"\n" + f"{zlib.crc32(line):08x}\n".encode()


def write_snapshot(fs: RealFS, data_dir: Path, seq: int, jobs: list[Any], at: float) -> None:
    """Durably write snapshot ``seq``, point CURRENT at it and keep only the newest two.

    Raises OSError if a write or sync fails (nothing older is removed then).
    """
    fs.write_file(data_dir / snapshot_name(seq), encode_snapshot(seq, jobs, at))
    fs.write_file(data_dir / "CURRENT", encode_current(seq))
    for old in list_snapshots(fs, data_dir)[:-KEEP_SNAPSHOTS]:
        fs.unlink(data_dir / snapshot_name(old))
    fs.fsync_dir(data_dir)


def read_current(fs: RealFS, data_dir: Path) -> int | None:
    """The snapshot sequence CURRENT names, or None if CURRENT is missing or fails its CRC."""
    try:
        data = fs.read_bytes(data_dir / "CURRENT")
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")
    try:
        if len(lines) < 2 or f"{zlib.crc32(lines[0]):08x}".encode() != lines[1]:
            raise ValueError("CRC mismatch")
        return int(orjson.loads(lines[0])["seq"])
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as e:
        log.warning("CURRENT is damaged (%s); falling back to the newest snapshot that verifies", e)
        return None


def load_latest(fs: RealFS, data_dir: Path, quarantine: bool = False
                ) -> tuple[int, Iterator[Any]] | None:
    """The snapshot to recover from: CURRENT's if it verifies, else the newest that does; None if none.

    A snapshot newer than CURRENT (CURRENT's rename lost in a crash) is complete,
    since it was renamed into place only after its fdatasync, so it is used.
    ``quarantine`` (the router): a snapshot that fails to verify is renamed
    ``snap-<seq>.damaged``, so it no longer counts among the two kept and a good
    older one is not removed in its place.
    """
    current = read_current(fs, data_dir)
    seqs = list_snapshots(fs, data_dir)
    if current is not None and current not in seqs:
        log.warning("CURRENT names %s, which is missing", snapshot_name(current))
    for seq in reversed(seqs):
        name = snapshot_name(seq)
        try:
            got = decode_snapshot(fs.read_bytes(data_dir / name), name)
        except (SnapshotCorrupt, orjson.JSONDecodeError, KeyError) as e:
            log.warning("skipping a damaged snapshot: %s%s", e, "; renamed to *.damaged" if quarantine else "")
            if quarantine:
                fs.rename(data_dir / name, data_dir / (name + ".damaged"))
                fs.fsync_dir(data_dir)
            continue
        if current is not None and seq != current:
            log.warning("using %s (CURRENT names %s)", name, snapshot_name(current))
        return got
    return None
