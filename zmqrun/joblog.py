"""The append-only job log: batch framing, group commit, recovery.

The log is zmqrun's only storage (the queue and the finished-job archive are
rebuilt from it).  Rules follow ``shared/reference/log-format.md``:

Files in the data dir::

    seg-<first_seq:020d>.log   segments, rolled at ``segment_bytes`` (64 MiB),
                               named by the sequence number of their first record
    (the directory itself)     flock'ed by the running router: one router per dir (a lock on
                               the directory, not on a file in it, so deleting a file cannot defeat it)

Segment header (32 bytes): magic ``ZRSG``, u16 version, u8 CRC algorithm id,
u8 flags, u64 first_seq, u64 created_ns, u32 reserved, u32 CRC of bytes 0..27.

Batch frame (the unit of commit, modelled on Kafka record batches)::

    0  u32 magic            4  u32 header_crc (over bytes 8..31)
    8  u32 body_len (<= MAX_BATCH)            12 u32 body_crc
    16 u64 first_seq (= previous first_seq + previous count)
    24 u32 count            28 u32 sync_lag (bytes before this batch not yet fdatasync'ed when it was written)
    32 body = count x [u8 type, u32 len, payload]

Two CRCs so that a flipped bit in ``body_len`` is detected as corruption
instead of being mistaken for a torn tail.  ``sync_lag`` replaces the rule
"batch N+1 is written only after fsync(N)": records nobody waits on (DISPATCH,
FINISH) are written without a sync of their own, so after a power loss
several unsynced batches may be damaged in any order.  Each batch therefore
says where the synced prefix ended when it was written (its offset minus
``sync_lag``); recovery treats damage that lies wholly past the furthest
synced prefix any surviving batch vouches for as a torn, never-synced tail
(nothing acknowledged in ``always`` mode is there) and anything before it as
corruption.  Record lengths are fixed u32
rather than varints: simpler and faster to parse in Python, 3 bytes dearer.

Write path (group commit): the router loop calls :meth:`JobLog.append` (a
deque append, no syscall) for each record and :meth:`JobLog.flush` once per
loop iteration, which frames every pending record as one batch, ``os.pwrite`` s
it at the segment's end and, in ``always`` mode and only if an acknowledgement waits on it,
``os.fdatasync`` s it: every message drained in that iteration shares the sync.
The loop sends dispatches to workers *before* it syncs, so the worker runs the
job while the disk syncs.  Records nobody waits on (DISPATCH, FINISH) are
written at once and synced by the next sync or within ``lazy_sync`` seconds
(:meth:`sync_due`).  Each batch is written only after the previous one's sync
returned, so at most the last batch can be torn.  There is deliberately no
writer thread: measured here (2 cores), a thread that syncs or frames fights the
loop for the GIL at every pyzmq send (~20-25 µs per send instead of ~4), and a
separate sync process (fdatasync works on the file from any process) avoids the
GIL but adds wake-ups and context switches: one job in flight took ~595 µs with
the thread, ~590 µs with the process and ~465 µs with the sync inline.

Preallocation: the active segment keeps up to 1.25 MiB of zeros written ahead of
its last batch (:data:`PREALLOC_CHUNK`, topped up below :data:`PREALLOC_LOW`), so a batch overwrites blocks that are
allocated and initialized and its fdatasync has no file size or extent change to
journal (ext4 here: ~95-125 instead of ~130-180 µs p50).  A sealed or closed
segment is cut back to its last batch; after a crash, recovery drops the zero
tail like any never-written one.  Positioned writes (``pwrite``) instead of
``O_APPEND``, which would write after the zeros.

Errors: a failed write or sync is never retried (Linux may mark failed pages
clean, so a retry can falsely succeed): :attr:`failure` is set, the partial
batch is truncated away, and the log accepts no more writes.
"""

from __future__ import annotations

import bisect
import collections
import fcntl
import logging
import os
import struct
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .fsio import RealFS
from .segindex import IndexCorrupt, SegmentIndex, index_name

log = logging.getLogger("zmqrun.log")

# Record types.
SUBMIT = 1  # {"at", "client", "jobs": [job, ...]}
DISPATCH = 2  # {"at", "worker", "jobs": [[id, attempt], ...], "inc"?: the worker process's incarnation}
FINISH = 3  # {"at", "worker", "results": [result, ...]}
CANCEL = 4  # {"at", "id", "reason"}
REQUEUE = 5  # {"at", "jobs": [[id, attempt, reason], ...]}

BATCH_MAGIC = 0x5A524231  # "ZRB1"
SEGMENT_MAGIC = b"ZRSG"
SEGMENT_VERSION = 2  # 2: terminal records carry what the archive needs (see router)
CRC_ZLIB32 = 1
# Bytes; a larger body_len is corruption.  The writer caps a batch at WRITE_BATCH_BYTES *plus one record*, and one
# record can be a whole message's jobs or one result (args and results up to 64 MiB by default, messages up to
# --max-message-bytes): a 16 MiB bound made the router refuse its own log after any job with args or a result
# over ~16 MiB.  So the bound is the field's range; the header CRC is what tells a damaged length.
MAX_BATCH = 0xFFFFFFFF
WRITE_BATCH_BYTES = 1024 * 1024  # write-side cap per batch (RocksDB groups up to 1 MB)
WRITE_BATCH_RECORDS = 4096
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
# Zeros written ahead of the active segment's end, so that a batch overwrites allocated, initialized blocks and
# its fdatasync flushes data only (no size or extent change to journal).  Measured here (ext4, 2 cores): ~95-125
# vs ~130-180 us p50 per fdatasync; warm-path p50 with --fsync always ~530 vs ~615 us.  Topped up once less than
# PREALLOC_LOW bytes are left; the first sync after a top-up flushes the zeros once (amortized over the chunk).
PREALLOC_CHUNK = 1024 * 1024
PREALLOC_LOW = 256 * 1024
_ZEROS = bytes(PREALLOC_CHUNK)

_BATCH = struct.Struct("<IIIIQII")  # 32 bytes
_SEG = struct.Struct("<4sHBBQQI")  # 28 bytes + u32 crc = 32
_U32 = struct.Struct("<I")
_REC = struct.Struct("<BI")
SEGMENT_HEADER_SIZE = _SEG.size + 4
BATCH_HEADER_SIZE = _BATCH.size

FSYNC_MODES = ("always", "interval", "never")


class LogCorruption(Exception):
    """The log holds a bad batch that is not a torn tail; names file and offset."""

    def __init__(self, path: Path, offset: int, why: str) -> None:
        super().__init__(
            f"log corruption in {path.name} at offset {offset}: {why}; refusing to start "
            f"(nothing was changed). See `zmqrun log check {path.parent}`; "
            f"`zmqrun log repair {path.parent} --truncate-at-corruption` drops the log from there on"
        )
        self.path = path
        self.offset = offset
        self.why = why


class DataDirError(Exception):
    """The data dir cannot be used (not a directory, or held by another router)."""


class LogLocked(DataDirError):
    """Another router holds the data dir."""


class LogFailed(Exception):
    """A write or sync failed; the log accepts no more writes."""


@dataclass(frozen=True)
class FsyncPolicy:
    """How and when the writer syncs.

    ``mode`` is ``always`` (acknowledge after fdatasync of the batch),
    ``interval`` (acknowledge after write(); fdatasync every ``interval`` seconds)
    or ``never`` (acknowledge after write(); the OS writes back).
    """

    mode: str = "always"
    interval: float = 0.05  # seconds, for mode == "interval"

    @classmethod
    def parse(cls, text: str) -> "FsyncPolicy":
        """Parse ``always``, ``never``, ``interval`` or ``interval=MS``; raise ValueError otherwise."""
        mode, _, ms = text.partition("=")
        if mode not in FSYNC_MODES or (ms and mode != "interval"):
            raise ValueError(f"--fsync must be always, never, interval or interval=MS, not {text!r}")
        if ms:
            try:
                interval = float(ms) / 1000.0
            except ValueError:
                raise ValueError(f"--fsync interval=MS needs a number of milliseconds, not {ms!r}") from None
            if interval <= 0:
                raise ValueError("--fsync interval=MS needs a positive number of milliseconds")
            return cls(mode, interval)
        return cls(mode)


def encode_batch(first_seq: int, records: list[tuple[int, bytes]], sync_lag: int = 0) -> bytes:
    """Frame ``records`` ([(type, payload)]) as one batch starting at ``first_seq``; ``sync_lag``: bytes
    written before it in its segment that were not yet fdatasync'ed (see the module docstring)."""
    body = b"".join([_REC.pack(t, len(p)) + p for t, p in records])
    rest = struct.pack("<IIQII", len(body), zlib.crc32(body), first_seq, len(records), min(sync_lag, 0xFFFFFFFF))
    return _U32.pack(BATCH_MAGIC) + _U32.pack(zlib.crc32(rest)) + rest + body


def decode_body(body: bytes, count: int) -> list[tuple[int, bytes]]:
    """Split a verified batch body into ``count`` (type, payload) records; raise ValueError if malformed."""
    out = []
    pos = 0
    mv = memoryview(body)
    for _ in range(count):
        if pos + 5 > len(body):
            raise ValueError("record header past end of batch")
        t, n = _REC.unpack_from(body, pos)
        pos += 5
        if pos + n > len(body):
            raise ValueError("record payload past end of batch")
        out.append((t, bytes(mv[pos : pos + n])))
        pos += n
    if pos != len(body):
        raise ValueError("trailing bytes in batch body")
    return out


def segment_header(first_seq: int) -> bytes:
    """The 32-byte header of a new segment whose first record is ``first_seq``."""
    head = _SEG.pack(SEGMENT_MAGIC, SEGMENT_VERSION, CRC_ZLIB32, 0, first_seq, time.time_ns(), 0)
    return head + _U32.pack(zlib.crc32(head))


def segment_name(first_seq: int) -> str:
    """File name of the segment starting at ``first_seq``."""
    return f"seg-{first_seq:020d}.log"


def list_segments(data_dir: Path) -> list[Path]:
    """Segment files of ``data_dir``, oldest first."""
    return sorted(data_dir.glob("seg-*.log"))


@dataclass
class BatchProblem:
    """Where and why reading a segment stopped early.

    ``complete``: the batch at ``offset`` passed its CRCs (a wrong sequence number, a malformed
    body, a length over the bound), so it was written whole: it cannot be a torn write.
    """

    offset: int
    why: str
    complete: bool = False


def parse_batch_header(data: bytes, off: int) -> tuple[int, int, int, int] | str:
    """Validate the batch header at ``off``; return (body_len, body_crc, first_seq, count) or a reason string."""
    if off + BATCH_HEADER_SIZE > len(data):
        return "truncated batch header"
    magic, hcrc, body_len, body_crc, first_seq, count, _sync_lag = _BATCH.unpack_from(data, off)
    if magic != BATCH_MAGIC:
        return "bad batch magic"
    if zlib.crc32(data[off + 8 : off + 32]) != hcrc:
        return "batch header CRC mismatch"
    if body_len > MAX_BATCH:
        return f"batch length {body_len} exceeds the maximum {MAX_BATCH}"
    return body_len, body_crc, first_seq, count


def read_segment(path: Path, data: bytes, expect_seq: int | None, batches: array | None = None
                 ) -> tuple[list[tuple[int, int, bytes]], int, BatchProblem | None]:
    """Read every valid batch of one segment's bytes.

    Returns (records as [(seq, type, payload)], end offset of the last good
    batch, problem or None).  ``expect_seq`` is the sequence number the first
    batch must carry (None: take the segment header's).  ``batches``, if given,
    receives a (first_seq, offset) pair per good batch.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        return [], 0, BatchProblem(0, "truncated segment header")
    head = data[: _SEG.size]
    (crc,) = _U32.unpack_from(data, _SEG.size)
    magic, version, _alg, _flags, first_seq, _created, _r = _SEG.unpack(head)
    if magic != SEGMENT_MAGIC or zlib.crc32(head) != crc:
        return [], 0, BatchProblem(0, "bad segment header")
    if version != SEGMENT_VERSION:
        return [], 0, BatchProblem(0, f"unsupported segment version {version}")
    if path.name != segment_name(first_seq):
        return [], 0, BatchProblem(0, f"segment header says first sequence {first_seq}, file name disagrees")
    if expect_seq is not None and first_seq != expect_seq:
        return [], 0, BatchProblem(0, f"sequence gap: segment starts at {first_seq}, expected {expect_seq}")
    seq = first_seq
    out: list[tuple[int, int, bytes]] = []
    off = SEGMENT_HEADER_SIZE
    while off < len(data):
        parsed = parse_batch_header(data, off)
        if isinstance(parsed, str):
            return out, off, BatchProblem(off, parsed, complete=parsed.startswith("batch length"))
        body_len, body_crc, bseq, count = parsed
        end = off + BATCH_HEADER_SIZE + body_len
        if end > len(data):
            return out, off, BatchProblem(off, "batch body truncated")
        body = data[off + BATCH_HEADER_SIZE : end]
        if zlib.crc32(body) != body_crc:
            return out, off, BatchProblem(off, "batch body CRC mismatch")
        if bseq != seq:
            return out, off, BatchProblem(off, f"sequence gap: batch starts at {bseq}, expected {seq}", True)
        try:
            records = decode_body(body, count)
        except ValueError as e:
            return out, off, BatchProblem(off, str(e), True)
        if batches is not None:
            batches.append(seq)
            batches.append(off)
        for t, p in records:
            out.append((seq, t, p))
            seq += 1
        off = end
    return out, off, None


def segment_first_seq(data: bytes) -> int:
    """The first sequence number a (valid) segment header names."""
    return _SEG.unpack_from(data)[4]


def batch_sync_lag(data: bytes, off: int) -> int:
    """The ``sync_lag`` field of the (already validated) batch header at ``off``."""
    return _U32.unpack_from(data, off + 28)[0]


def synced_prefix_claim(data: bytes, start: int, base: int = 0) -> tuple[int | None, int]:
    """Scan ``data`` after ``start`` for valid batch headers; return (offset of the first one or None,
    the furthest synced prefix any of them vouches for, as a file offset: ``base + pos - sync_lag``)."""
    magic = _U32.pack(BATCH_MAGIC)
    first, claim = None, 0
    pos = data.find(magic, start + 1)
    while pos != -1:
        if not isinstance(parse_batch_header(data, pos), str):
            if first is None:
                first = pos
            claim = max(claim, base + pos - batch_sync_lag(data, pos))
        pos = data.find(magic, pos + 1)
    return first, claim


def later_valid_batch(data: bytes, start: int) -> int | None:
    """Offset of a valid batch header after ``start`` (evidence of mid-file corruption), or None."""
    magic = _U32.pack(BATCH_MAGIC)
    pos = data.find(magic, start + 1)
    while pos != -1:
        if not isinstance(parse_batch_header(data, pos), str):
            return pos
        pos = data.find(magic, pos + 1)
    return None


class SegmentReader:
    """Iterate one segment file's records (seq, type, payload), reading one batch at a time.

    The same checks as :func:`read_segment`; after the iteration, ``problem``
    (None or where and why it stopped), ``good_end`` (offset after the last good
    batch), ``size`` (file size), ``first_seq`` (from the header, or None) and
    ``next_seq`` (the sequence number after the last record read) tell the
    outcome.  ``batches`` receives a (first_seq, offset) pair per good batch.
    """

    def __init__(self, path: Path, expect_seq: int | None, batches: array | None = None) -> None:
        self.path = path
        self.expect_seq = expect_seq
        self.batches = batches
        self.problem: BatchProblem | None = None
        self.good_end = 0
        self.size = 0
        self.first_seq: int | None = None
        self.next_seq = expect_seq or 0

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        with open(self.path, "rb") as f:
            self.size = size = os.fstat(f.fileno()).st_size
            head = f.read(SEGMENT_HEADER_SIZE)
            _records, _end, problem = read_segment(self.path, head, self.expect_seq)
            if problem is not None:
                self.problem = problem
                return
            self.first_seq = seq = segment_first_seq(head)
            off = self.good_end = SEGMENT_HEADER_SIZE
            while off < size:
                hdr = f.read(BATCH_HEADER_SIZE)
                parsed = parse_batch_header(hdr, 0)
                if isinstance(parsed, str):
                    self.problem = BatchProblem(off, parsed, complete=parsed.startswith("batch length"))
                    break
                body_len, body_crc, bseq, count = parsed
                # (a torn tail's body is not read: its length may be far past the end of the file)
                body = f.read(body_len) if off + BATCH_HEADER_SIZE + body_len <= size else b""
                if len(body) < body_len:
                    self.problem = BatchProblem(off, "batch body truncated")
                    break
                if zlib.crc32(body) != body_crc:
                    self.problem = BatchProblem(off, "batch body CRC mismatch")
                    break
                if bseq != seq:
                    self.problem = BatchProblem(off, f"sequence gap: batch starts at {bseq}, expected {seq}", True)
                    break
                try:
                    records = decode_body(body, count)
                except ValueError as e:
                    self.problem = BatchProblem(off, str(e), True)
                    break
                if self.batches is not None:
                    self.batches.append(seq)
                    self.batches.append(off)
                for t, p in records:
                    yield seq, t, p
                    seq += 1
                off += BATCH_HEADER_SIZE + body_len
                self.good_end, self.next_seq = off, seq
            else:
                self.good_end, self.next_seq = off, seq


def lock_data_dir(data_dir: Path, shared: bool = False) -> int:
    """flock the data directory itself (exclusive for a router or a repair, ``shared`` for a probe) without
    waiting; return the fd that holds the lock.  Raises :class:`LogLocked` if a router holds it."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogLocked(f"data dir {data_dir} is in use by another zmqrun router") from None
    return fd


def fsync_dir(path: Path) -> None:
    """fsync a directory so a create, rename or delete in it is durable."""
    RealFS().fsync_dir(path)


class Segment:
    """One segment file as the log knows it.

    ``batches`` is the in-memory batch table (flat array of (first_seq, offset)
    pairs) while the segment has no index file; ``index`` the opened
    :class:`~zmqrun.segindex.SegmentIndex` once it has one.  ``last_seq`` is
    None for the active segment.
    """

    __slots__ = ("first_seq", "last_seq", "path", "batches", "index", "size")

    def __init__(self, first_seq: int, path: Path) -> None:
        self.first_seq = first_seq
        self.last_seq: int | None = None
        self.path = path
        self.batches: array | None = array("q")
        self.index: SegmentIndex | None = None
        self.size = 0

    def batch_for(self, seq: int) -> tuple[int, int] | None:
        """(first_seq, offset) of the batch holding ``seq``, from the index or the in-memory table."""
        if self.index is not None:
            return self.index.batch_for(seq)
        b = self.batches
        if not b:
            return None
        # Bisect the pairs in place (no copy of a table that can hold ~500k batches).
        i = bisect.bisect_right(range(len(b) // 2), seq, key=lambda k: b[2 * k]) - 1
        return (b[2 * i], b[2 * i + 1]) if i >= 0 else None


class JobLog:
    """One data dir's append-only log: recovery, then group-committed appends.

    Use: ``log = JobLog(dir, FsyncPolicy("always"))``; ``for seq, type, payload in
    log.recover(after_seq): ...``; ``log.start()``; then ``seq = log.append(type, payload)``
    and ``log.flush(need_durable)`` once per iteration of the owning loop; a
    record is durable (for the mode) once ``seq <= log.durable_seq``.  When the
    active segment reaches ``segment_bytes``, :meth:`flush` seals it (after its
    last batch) and opens the next; sealed segments wait in :attr:`sealed` for
    the owner to index and snapshot them.  ``close()`` flushes and syncs.  Not
    thread-safe: one owner thread.  ``fs``: the file-system layer (crash tests
    pass a recording one).

    Raises :class:`LogLocked` if another process holds the dir and
    :class:`LogCorruption` from :meth:`recover` on mid-log damage.
    """

    def __init__(self, data_dir: str | os.PathLike[str], policy: FsyncPolicy | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, fs: RealFS | None = None) -> None:
        self.dir = Path(data_dir)
        self.policy = policy or FsyncPolicy()
        self.segment_bytes = segment_bytes
        self.fs = fs or RealFS()
        if self.dir.exists() and not self.dir.is_dir():
            raise DataDirError(f"data dir {self.dir} exists and is not a directory")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = lock_data_dir(self.dir)
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()
        self._seq = 0  # last sequence number handed out
        self._written_seq = 0  # last sequence number written
        self.durable_seq = 0  # last sequence number acknowledged-durable for the mode
        self.failure: BaseException | None = None
        self._fd = -1
        self._seg_size = 0
        self._synced_size = 0  # bytes of the active segment known durable (fdatasync returned)
        self._prealloc_end = 0  # end of the zeros written ahead in the active segment (>= _seg_size)
        self._prealloc_ok = True  # False once a top-up failed (a full disk): plain appends for this segment
        self._appended = False  # a batch was written to the active segment since it was opened
        self.segments: list[Segment] = []  # every segment present, oldest first; the last is active
        self._firsts: list[int] = []  # first_seq of each segment, for bisection
        self.sealed: list[Segment] = []  # sealed by flush(), not yet handed to the owner
        self._eager_seq = 0  # last record appended with eager=True
        self._unsynced_since: float | None = None  # monotonic time of the oldest unsynced write
        self.lazy_sync = 0.01  # seconds an unawaited record may stay unsynced in always mode
        self.batches_written = 0
        self.syncs = 0
        self.replayed_bytes = 0
        self._scanned = False

    # -- recovery -------------------------------------------------------------------------

    def scan_segments(self) -> list[Segment]:
        """List the segment files (oldest first) and open the index of each that has one.

        An index that is torn or fails its CRC is left unopened (the segment is
        then replayed or the index rebuilt by the owner).
        """
        fs = self.fs
        names = sorted(n for n in fs.listdir(self.dir) if n.startswith("seg-") and n.endswith(".log"))
        present = set(fs.listdir(self.dir))
        for orphan in sorted(n for n in present if n.startswith("seg-") and n.endswith(".idx")
                             and n[:-4] + ".log" not in present):
            # Retention removes a segment before its index (drop_segment): a crash in between leaves this.
            log.warning("removing %s: its segment is gone", orphan)
            fs.unlink(self.dir / orphan)
        segs = []
        for name in names:
            try:
                first = int(name[4:-4])
            except ValueError:
                continue
            seg = Segment(first, self.dir / name)
            seg.size = os.stat(seg.path).st_size
            if index_name(first) in present:
                try:
                    seg.index = SegmentIndex(self.dir / index_name(first))
                except IndexCorrupt as e:
                    log.warning("ignoring a damaged index (it will be rebuilt): %s", e)
                else:
                    seg.batches, seg.last_seq = None, seg.index.last_seq
            segs.append(seg)
        self.segments = segs
        self._firsts = [s.first_seq for s in segs]
        self._scanned = True
        return segs

    def recover(self, after_seq: int = 0) -> Iterator[tuple[int, int, bytes]]:
        """Yield every record (seq, type, payload) after ``after_seq`` in order and prepare the tail.

        ``after_seq`` is the sequence number a snapshot covers: segments wholly
        at or before it are not read (their index files answer lookups), and
        the first segment read must start at ``after_seq + 1``.  Call
        :meth:`scan_segments` first (done here if not).  A torn tail (bad bytes at the end of the
        last segment with no valid batch after them) is truncated with a warning
        naming file, offset and bytes dropped.  Any other bad batch raises
        :class:`LogCorruption`.
        """
        fs = self.fs
        if not self._scanned:
            self.scan_segments()
        for name in fs.listdir(self.dir):
            if name.endswith(".tmp"):
                fs.unlink(self.dir / name)
        segments = self.segments
        for i, seg in enumerate(segments):
            if not (after_seq and i + 1 < len(segments) and segments[i + 1].first_seq <= after_seq + 1):
                # Replayed: its table is rebuilt as we read.  Its index (written before the restart) goes
                # *now*, not when the replay reaches it: while the owner replays an earlier segment, a
                # later segment's index must not answer lookups (it would call a job submitted there
                # finished already, and the owner would skip its SUBMIT as a duplicate).
                if seg.index is not None:
                    seg.index.close()
                seg.batches, seg.index = array("q"), None
        expect: int | None = after_seq + 1 if after_seq else None
        i = 0
        while i < len(segments):
            seg = segments[i]
            nxt = segments[i + 1].first_seq if i + 1 < len(segments) else None
            if after_seq and nxt is not None and nxt <= after_seq + 1:
                i += 1  # wholly covered by the snapshot
                continue
            last = i == len(segments) - 1
            seg.batches, seg.index = array("q"), None  # replayed: the table is rebuilt as we read
            reader = SegmentReader(seg.path, expect, seg.batches)
            n = 0
            for rec in reader:  # streamed batch by batch: replay memory stays at one batch, not one segment
                n += 1
                yield rec
            problem = reader.problem
            # The records read, not the file: a zero tail written ahead for appends (PREALLOC_CHUNK, up to
            # ~1.25 MiB) is no replayed data, and the owner rolls and snapshots by this count.
            self.replayed_bytes += reader.good_end if problem is not None else reader.size
            if problem is not None and not last and problem.offset > 0 \
                    and segments[i + 1].first_seq == reader.next_seq:
                # Junk after the last batch of a sealed segment, but the next segment starts right after its
                # last record: nothing is missing, so cut the junk off instead of refusing.
                log.warning("%s: %d bytes after its last batch at offset %d (%s); the next segment starts at the "
                            "next record, so nothing is missing: truncating them", seg.path.name,
                            reader.size - problem.offset, problem.offset, problem.why)
                fs.truncate(seg.path, problem.offset)
                problem = None
            if problem is not None and problem.offset == 0 and after_seq and expect == after_seq + 1 \
                    and problem.why.startswith("sequence gap"):
                raise LogCorruption(seg.path, 0, problem.why + f" (the newest snapshot is at {after_seq}: either "
                                    "segments after it are missing or the snapshot does not belong to this log)")
            if problem is not None:
                if not last:
                    raise LogCorruption(seg.path, problem.offset, problem.why + " (in a sealed segment)")
                if problem.offset == 0 and problem.why in ("truncated segment header", "bad segment header") \
                        and reader.size <= SEGMENT_HEADER_SIZE:
                    # The segment's creation itself was torn: nothing in it was ever acknowledged.
                    log.warning("%s: torn segment header (%d bytes); removing the empty segment",
                                seg.path.name, reader.size)
                    fs.unlink(seg.path)
                    fs.fsync_dir(self.dir)
                    segments.pop()
                    break
                rest = fs.pread(seg.path, reader.size - problem.offset, problem.offset)
                later, synced_to = synced_prefix_claim(rest, 0, problem.offset)  # batches *after* the bad one
                # (a batch that passed its CRCs was written whole: a wrong sequence in it is not a torn write)
                if problem.offset == 0 or problem.complete or (later is not None and synced_to > problem.offset):
                    raise LogCorruption(seg.path, problem.offset, problem.why + (
                        f"; a valid batch follows at offset {problem.offset + later}, written after the damaged "
                        f"bytes were synced" if later is not None else ""))
                dropped = len(rest)
                if later is not None:
                    log.warning("%s: damaged batch at offset %d (%s) followed by batches written before any sync "
                                "covered it (a crash before fdatasync, e.g. a power loss); truncating, %d bytes "
                                "dropped, never synced (so never acknowledged with --fsync always)",
                                seg.path.name, problem.offset, problem.why, dropped)
                elif rest.count(0) == dropped:
                    # The zeros the log writes ahead of its appends (PREALLOC_CHUNK), which every crash leaves,
                    # or an unfinished write: no record in them, so not a warning (a new user read it as damage).
                    log.info("%s: %d zero bytes after offset %d cut off (space written ahead for appends, or an "
                             "unfinished write: no record in them; normal after a crash)", seg.path.name, dropped,
                             problem.offset)
                else:
                    log.warning("%s: torn tail at offset %d (%s); truncating, %d bytes dropped",
                                seg.path.name, problem.offset, problem.why, dropped)
                fs.truncate(seg.path, problem.offset)
            seg.size = reader.good_end if problem is not None else reader.size
            if n:
                expect = reader.next_seq
            elif expect is None:
                expect = reader.first_seq
            if not last:
                seg.last_seq = expect - 1
            i += 1
        if expect is None and after_seq:
            expect = after_seq + 1
        self._seq = self._written_seq = self.durable_seq = (expect - 1) if expect is not None else 0
        self._firsts = [s.first_seq for s in segments]

    def segment_of(self, seq: int) -> Segment | None:
        """The segment holding sequence number ``seq`` (None if before the first)."""
        firsts = self._firsts
        if firsts and seq >= firsts[-1]:
            return self.segments[-1]
        i = bisect.bisect_right(firsts, seq) - 1
        return self.segments[i] if i >= 0 else None

    def read_record(self, seq: int) -> tuple[int, bytes] | None:
        """The (type, payload) of written record ``seq``, read back from disk; None if it is gone
        (its segment was removed by retention) or not written yet.  Raises :class:`LogCorruption`
        if the batch read fails its checks."""
        if seq > self._written_seq:
            return None
        seg = self.segment_of(seq)
        if seg is None:
            return None
        loc = seg.batch_for(seq)
        if loc is None:
            return None
        first, off = loc
        try:
            head = self.fs.pread(seg.path, BATCH_HEADER_SIZE, off)
            parsed = parse_batch_header(head, 0)
            if isinstance(parsed, str):
                raise LogCorruption(seg.path, off, parsed)
            body_len, body_crc, bseq, count = parsed
            body = self.fs.pread(seg.path, body_len, off + BATCH_HEADER_SIZE)
        except FileNotFoundError:
            return None
        if len(body) != body_len or zlib.crc32(body) != body_crc or bseq != first:
            raise LogCorruption(seg.path, off, "batch failed its checks on read-back")
        records = decode_body(body, count)
        if not 0 <= seq - first < len(records):
            return None
        return records[seq - first]

    # -- writing --------------------------------------------------------------------------

    def start(self, roll: bool = False) -> None:
        """Open the tail segment for appends (a new one if there is none, it is full, or ``roll``).

        A segment left behind is sealed and appended to :attr:`sealed`.
        """
        last = self.segments[-1] if self.segments else None
        if last is not None and (last.first_seq > self._seq or (last.size < self.segment_bytes and not roll)):
            # (a segment with no record yet is as good as a new one, roll or not)
            seg = self.segments[-1]
            self._fd = self.fs.open_at(seg.path)
            # What recovery read back may still sit in the page cache (a kill -9 keeps it): sync it once so
            # the batches written from now on can vouch for it (sync_lag 0).
            self.fs.fdatasync(self._fd)
            self._seg_size = self._synced_size = self._prealloc_end = seg.size
            self._prealloc_ok, self._appended = True, False
        else:
            if self.segments:
                self.segments[-1].last_seq = self._written_seq
                self.sealed.append(self.segments[-1])
            self._open_segment(self._seq + 1)

    @property
    def active(self) -> Segment:
        """The segment appends go to."""
        return self.segments[-1]

    def append(self, rtype: int, payload: bytes, eager: bool = False) -> int:
        """Queue one record; return its sequence number.  :meth:`flush` writes it.

        ``eager``: someone will wait on this record (a SUBMIT or CANCEL), so the
        next :meth:`flush` syncs it even if no acknowledgement is queued yet.
        """
        if self.failure is not None:
            raise LogFailed(f"the job log failed and accepts no more writes: {self.failure}")
        self._seq += 1
        self._pending.append((rtype, payload))
        if eager:
            self._eager_seq = self._seq
        return self._seq

    @property
    def active_bytes(self) -> int:
        """Bytes written to the active segment, header included (its file may be longer by the zeros
        written ahead, see :data:`PREALLOC_CHUNK`)."""
        return self._seg_size

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record appended (durable or not)."""
        return self._seq

    def flush(self, need_durable: bool) -> None:
        """Write pending records as one batch; sync if someone waits on them (call once per loop iteration).

        ``need_durable``: an acknowledgement waits on a record up to
        :attr:`last_seq` (or an eager record is unsynced).  In ``always`` mode that costs one fdatasync here, for
        every record gathered since the last one (group commit); otherwise the
        batch is written now and synced by the next such call or by
        :meth:`sync_due` within ``lazy_sync`` seconds.  In ``interval`` and
        ``never`` modes records count as durable once written.  If the active
        segment reached ``segment_bytes``, it is synced, sealed (appended to
        :attr:`sealed`) and the next one opened, so a segment boundary always
        falls between loop iterations.  A failure sets :attr:`failure` and is never retried.
        """
        if self.failure is not None:
            return
        try:
            if self._pending:
                self._write_pending()
            if self._seg_size >= self.segment_bytes:
                self._roll()
            if self.policy.mode != "always":
                self.durable_seq = self._written_seq
            elif (need_durable or self._eager_seq > self.durable_seq) and self.durable_seq < self._written_seq:
                self._sync()
            if self._appended and self._prealloc_ok and self._prealloc_end - self._seg_size < PREALLOC_LOW:
                self._preallocate()  # after the sync: nobody waits on this write
        except OSError as e:
            self._fail(e)

    def write(self) -> None:
        """Write pending records now, without a sync and without rolling the segment (the router calls
        this before it dispatches, so a job never runs while its SUBMIT is only in this process's memory:
        a kill -9 keeps what was written).  A failure sets :attr:`failure`."""
        if self.failure is not None or not self._pending:
            return
        try:
            self._write_pending()
        except OSError as e:
            self._fail(e)

    def _write_pending(self) -> None:
        batches = self.segments[-1].batches
        while self._pending:
            batch = self._take_batch()
            frame = encode_batch(self._written_seq + 1, batch, self._seg_size - self._synced_size)
            self._write_all(frame)
            batches.append(self._written_seq + 1)  # type: ignore[union-attr]
            batches.append(self._seg_size)  # type: ignore[union-attr]
            self._seg_size += len(frame)
            self._written_seq += len(batch)
            self.batches_written += 1
        self._appended = True
        if self._unsynced_since is None:
            self._unsynced_since = time.monotonic()

    def _preallocate(self) -> None:
        """Write zeros ahead of the active segment's data (see PREALLOC_CHUNK), up to ``segment_bytes``.

        Optional: a failure (ENOSPC, EFBIG past RLIMIT_FSIZE, EIO) only stops the top-ups for this
        segment; the zeros already written stay (recovery drops a zero tail), and the appends that
        follow hit the same condition and fail the log as they would without preallocation.
        """
        start = max(self._prealloc_end, self._seg_size)
        n = min(PREALLOC_CHUNK, self.segment_bytes - start)
        if n <= 0:
            return
        try:
            written = self.fs.pwrite(self._fd, memoryview(_ZEROS)[:n], start)
        except OSError as e:
            log.info("cannot preallocate log space in %s (%s): appending without it",
                     self.segments[-1].path.name, e)
            self._prealloc_ok = False
            return
        self._prealloc_end = start + written
        if written < n:
            self._prealloc_ok = False

    def _cut_prealloc(self) -> None:
        """Drop the zeros written ahead (the next sync makes the new size durable): a sealed or closed
        segment ends at its last batch."""
        if self._prealloc_end > self._seg_size:
            self.fs.ftruncate(self._fd, self._seg_size)
        self._prealloc_end = self._seg_size

    def _roll(self) -> None:
        """Seal the active segment (sync, close) and open the next one."""
        self._cut_prealloc()
        self._sync()
        seg = self.segments[-1]
        seg.last_seq, seg.size = self._written_seq, self._seg_size
        self.fs.close(self._fd)
        self._fd = -1
        self.sealed.append(seg)
        self._open_segment(self._written_seq + 1)

    def sync_due(self, now: float) -> float | None:
        """Sync if written records have waited too long; return when the next sync is due (monotonic) or None.

        ``always``: records nobody waits on are synced within ``lazy_sync``
        seconds.  ``interval``: every ``policy.interval`` seconds.  ``never``: not at all.
        """
        if self._unsynced_since is None or self.policy.mode == "never" or self.failure is not None:
            return None
        period = self.policy.interval if self.policy.mode == "interval" else self.lazy_sync
        due = self._unsynced_since + period
        if now < due:
            return due
        try:
            self._sync()
        except OSError as e:
            self._fail(e)
        return None

    def _sync(self) -> None:
        self.fs.fdatasync(self._fd)
        self._synced_size = self._seg_size
        self.syncs += 1
        self.durable_seq = self._written_seq
        self._unsynced_since = None

    def drop_segment(self, seg: Segment) -> None:
        """Delete a sealed segment and its index (retention); the directory is fsynced."""
        assert seg is not self.segments[-1], "the active segment is never dropped"
        if seg.index is not None:
            seg.index.close()
        # The segment goes first and its removal is made durable before the index's: a crash in between
        # leaves an unused index file, never a segment without its index (which recovery must refuse
        # once older segments are gone).  One fsync for both would let the directory keep either alone.
        for path in (seg.path, self.dir / index_name(seg.first_seq)):
            try:
                self.fs.unlink(path)
            except FileNotFoundError:
                pass
            self.fs.fsync_dir(self.dir)
        self.segments.remove(seg)
        self._firsts = [s.first_seq for s in self.segments]

    def close(self) -> None:
        """Write and sync everything pending, release the dir lock."""
        if self._fd >= 0:
            self.flush(need_durable=True)
            if self.failure is None:
                try:
                    self._cut_prealloc()
                    self._sync()
                except OSError as e:
                    self.failure = e
            if self._fd >= 0:
                self.fs.close(self._fd)
            self._fd = -1
        for seg in self.segments:
            if seg.index is not None:
                seg.index.close()
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
        except OSError:
            pass

    def _open_segment(self, first_seq: int) -> None:
        fs = self.fs
        path = self.dir / segment_name(first_seq)
        fd = fs.create_at(path)
        head = segment_header(first_seq)
        fs.pwrite(fd, head, 0)
        fs.fdatasync(fd)
        fs.fsync_dir(self.dir)
        self._fd = fd
        self._seg_size = self._synced_size = self._prealloc_end = len(head)
        self._prealloc_ok, self._appended = True, False
        seg = Segment(first_seq, path)
        seg.size = len(head)
        self.segments.append(seg)
        self._firsts.append(first_seq)

    def _take_batch(self) -> list[tuple[int, bytes]]:
        batch: list[tuple[int, bytes]] = []
        size = 0
        pending = self._pending
        while pending and len(batch) < WRITE_BATCH_RECORDS and size < WRITE_BATCH_BYTES:
            rec = pending.popleft()
            batch.append(rec)
            size += len(rec[1]) + 5
        return batch

    def _fail(self, e: BaseException) -> None:
        """Record a write or sync failure: never retried, no more writes (see module docstring)."""
        if self.failure is None:
            self.failure = e
            log.error("job log write failed, accepting no more writes: %s", e)

    def _write_all(self, frame: bytes) -> None:
        start = pos = self._seg_size
        pwrite, fd = self.fs.pwrite, self._fd
        try:
            n = pwrite(fd, frame, pos)
            if n == len(frame):
                return  # the common case: one whole write, no view to slice
            view = memoryview(frame)[n:]
            pos += n
            while view:
                n = pwrite(fd, view, pos)
                view = view[n:]
                pos += n
        except OSError:
            # ENOSPC or a short write: cut the partial batch (and the zeros written ahead) off so the tail
            # stays clean.
            try:
                self.fs.ftruncate(self._fd, start)
                self._prealloc_end = start
            except OSError:
                pass
            raise
