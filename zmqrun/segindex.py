"""Per-segment index files: finished-job lookup by id without a dict of every job.

Written when a segment is sealed (log-format.md section 7, option a), next to
it as ``seg-<first_seq:020d>.idx``::

    header (64 bytes)
      0  4s  magic "ZRIX"          4  u16 version        6  u16 id_width (bytes per id, NUL-padded)
      8  u64 first_seq            16  u64 last_seq      24  u32 n_entries   28  u32 n_batches
     32  u64 min_submit_seq       40  f64 sealed_at (epoch seconds)
     48  u32 body_crc             52  u32 reserved      56  u32 reserved    60  u32 header_crc (over 0..59)
    entries  n_entries x (id[id_width], u64 submit_seq, u64 end_seq), sorted by id
    batches  n_batches x (u64 first_seq, u64 file offset), sorted

An entry names a job whose terminal record (FINISH, CANCEL or final REQUEUE)
lies in this segment: ``end_seq`` is that record's sequence number and
``submit_seq`` its SUBMIT record's.  The batch table maps a sequence number to
the batch holding it, so one ``pread`` finds a record.  Both tables are
searched by bisection through ``mmap``: only the touched pages cost memory, so
router memory stays bounded however large the archive grows.  Ids are
time-ordered (UUIDv7), so ``min_id``/``max_id`` usually rule a segment out at once.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from array import array
from pathlib import Path
from typing import Iterable, Iterator

from .fsio import RealFS

INDEX_MAGIC = b"ZRIX"
INDEX_VERSION = 1
_HEAD = struct.Struct("<4sHHQQIIQdIII")  # 60 bytes + u32 header CRC
HEADER_SIZE = 64
_PAIR = struct.Struct("<QQ")


class IndexCorrupt(Exception):
    """An index file is missing, torn or fails its CRC (it can be rebuilt from its segment)."""


def index_name(first_seq: int) -> str:
    """File name of the index of the segment starting at ``first_seq``."""
    return f"seg-{first_seq:020d}.idx"


def encode_index(first_seq: int, last_seq: int, entries: Iterable[tuple[str, int, int]],
                 batches: array, min_submit_seq: int, sealed_at: float) -> bytes:
    """The bytes of an index file.  ``entries``: (job id, submit_seq, end_seq); ``batches``: flat
    array('q') of (batch first_seq, offset) pairs."""
    items = sorted((jid.encode(), s, e) for jid, s, e in entries)
    width = max((len(k) for k, _, _ in items), default=1)
    rec = struct.Struct(f"<{width}sQQ")
    body = bytearray(len(items) * rec.size + len(batches) * 8)
    pos = 0
    for k, s, e in items:
        rec.pack_into(body, pos, k, s, e)
        pos += rec.size
    body[pos:] = batches.tobytes()
    head = _HEAD.pack(INDEX_MAGIC, INDEX_VERSION, width, first_seq, last_seq, len(items), len(batches) // 2,
                      min_submit_seq, sealed_at, zlib.crc32(body), 0, 0)
    return head + struct.pack("<I", zlib.crc32(head)) + bytes(body)


def write_index(fs: RealFS, path: Path, data: bytes) -> None:
    """Durably write an index file (temp file, fdatasync, rename, directory fsync)."""
    fs.write_file(path, data)


class SegmentIndex:
    """A sealed segment's index, opened read-only through mmap.

    Raises :class:`IndexCorrupt` if the file is torn or a CRC fails (``verify``
    checks the body too; the router does, ``zmqrun log check`` does).
    """

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER_SIZE)
                size = os.fstat(f.fileno()).st_size
                if len(head) < HEADER_SIZE:
                    raise IndexCorrupt(f"{path.name}: truncated header")
                (magic, version, width, self.first_seq, self.last_seq, self.n_entries, self.n_batches,
                 self.min_submit_seq, self.sealed_at, body_crc, _r1, _r2) = _HEAD.unpack_from(head)
                (hcrc,) = struct.unpack_from("<I", head, 60)
                if magic != INDEX_MAGIC or zlib.crc32(head[:60]) != hcrc:
                    raise IndexCorrupt(f"{path.name}: bad header")
                if version != INDEX_VERSION:
                    raise IndexCorrupt(f"{path.name}: unsupported version {version}")
                self.width = width
                self._rec = struct.Struct(f"<{width}sQQ")
                body_len = self.n_entries * self._rec.size + self.n_batches * 16
                if size != HEADER_SIZE + body_len:
                    raise IndexCorrupt(f"{path.name}: {size} bytes, header says {HEADER_SIZE + body_len}")
                if verify:
                    crc = 0
                    f.seek(HEADER_SIZE)
                    while chunk := f.read(1 << 20):  # streamed: verifying must not pull the file into our memory
                        crc = zlib.crc32(chunk, crc)
                    if crc != body_crc:
                        raise IndexCorrupt(f"{path.name}: body CRC mismatch")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise IndexCorrupt(f"{path.name}: {e}") from None
        self._batches_at = HEADER_SIZE + self.n_entries * self._rec.size
        if self.n_entries:
            self.min_id = self._key(0)  # NUL-padded to width, as compared in find()
            self.max_id = self._key(self.n_entries - 1)
        else:
            self.min_id = self.max_id = b""

    def close(self) -> None:
        """Unmap the file."""
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def _key(self, i: int) -> bytes:
        at = HEADER_SIZE + i * self._rec.size
        return self._mm[at:at + self.width]  # type: ignore[index]

    def find(self, job_id: str) -> tuple[int, int] | None:
        """(submit_seq, end_seq) of ``job_id`` if its terminal record is in this segment."""
        key = job_id.encode()
        if not self.n_entries or len(key) > self.width:
            return None
        key = key.ljust(self.width, b"\0")
        if key < self.min_id or key > self.max_id:
            return None
        lo, hi = 0, self.n_entries
        while lo < hi:
            mid = (lo + hi) // 2
            if self._key(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.n_entries and self._key(lo) == key:
            _k, s, e = self._rec.unpack_from(self._mm, HEADER_SIZE + lo * self._rec.size)  # type: ignore[arg-type]
            return s, e
        return None

    def entries(self) -> Iterator[tuple[str, int, int]]:
        """Every (job id, submit_seq, end_seq), in id order."""
        for i in range(self.n_entries):
            k, s, e = self._rec.unpack_from(self._mm, HEADER_SIZE + i * self._rec.size)  # type: ignore[arg-type]
            yield k.rstrip(b"\0").decode(), s, e

    def batch_for(self, seq: int) -> tuple[int, int] | None:
        """(first_seq, file offset) of the batch holding ``seq``, or None if out of range."""
        if not self.n_batches or not self.first_seq <= seq <= self.last_seq:
            return None
        lo, hi = 0, self.n_batches  # find the last batch with first_seq <= seq
        while lo < hi:
            mid = (lo + hi) // 2
            if _PAIR.unpack_from(self._mm, self._batches_at + mid * 16)[0] <= seq:  # type: ignore[arg-type]
                lo = mid + 1
            else:
                hi = mid
        return _PAIR.unpack_from(self._mm, self._batches_at + (lo - 1) * 16) if lo else None  # type: ignore[arg-type]
