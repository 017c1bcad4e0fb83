"""The job board: a small shared-memory page between a warm worker's supervisor and its child process.

A dedicated worker is two processes (see :mod:`zmqrun.supervisor`): the child
imports the script and talks to the router for jobs and results exactly as a
plain worker does; the supervisor owns liveness, timeouts and cancels.  They
share this board instead of exchanging a message per job: the child writes a
slot when a job starts and one word when it ends (a few hundred nanoseconds, no
system call, nothing to wait for), and the supervisor reads the slots on its
own timer.  The supervisor writes the list of canceled job ids, which the child
checks (one word read) before starting each job.

Layout (little-endian), in a memfd (Linux) or an unlinked temporary file, so
the child maps it from an inherited file descriptor:

- header, 64 bytes: ``magic u32, child_state u32 (0 starting, 1 serving),
  cancel_seq u32, cancel_len u32, handed_seq u32, handed_attempt u32,
  handed_len u32, handed_id 36s`` -- ``handed`` is the last job a pool child
  gave to its threads (ids longer than 36 bytes: see below);
- canceled ids: 4032 bytes of JSON (a list of job id strings), written under
  ``cancel_seq``;
- ``n`` slots of 128 bytes, one per concurrent job: ``seq u32, running u32,
  attempt u32, id_len u32, deadline f64 (time.monotonic seconds, 0 = none),
  timeout f64 (seconds, 0 = none), started f64 (epoch seconds), id 64s, ...``.

Every record the child writes is guarded by a sequence number (a seqlock):
odd while a write is in progress, so a reader never acts on a torn record.
Both processes read ``time.monotonic()``, which is CLOCK_MONOTONIC, one clock
for the whole machine.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import orjson

MAGIC = 0x5A524231  # "ZRB1"
HEADER = 64
CANCEL_AREA = 4032
SLOTS_AT = HEADER + CANCEL_AREA  # 4096
SLOT_SIZE = 128
ID_MAX = 64  # bytes of a job id (zmqrun ids are at most 64 ASCII characters)
HANDED_ID_MAX = 36

_U32 = struct.Struct("<I")
_HANDED = struct.Struct("<II36s")  # handed_attempt, handed_len, handed_id (after handed_seq)
_SLOT_BODY = struct.Struct("<IIIddd64s")  # running, attempt, id_len, deadline, timeout, started, id
_SLOT = struct.Struct("<IIIIddd64s")  # seq + body


@dataclass(frozen=True)
class SlotState:
    """One slot as the supervisor reads it: the job last started there and whether it still runs."""

    running: bool
    job_id: str
    attempt: int
    deadline: float  # time.monotonic() seconds; 0.0 = no timeout
    timeout: float  # seconds; 0.0 = none
    started: float  # epoch seconds


class JobBoard:
    """The shared page.  ``slots``: concurrent jobs of the child (its --concurrency).

    Create it in the supervisor with :meth:`create`, pass :attr:`fd` to the
    child and :meth:`attach` it there.  Not thread-safe on the writer side
    except that each slot has one writer (one job thread).
    """

    def __init__(self, fd: int, slots: int) -> None:
        if slots < 1:
            raise ValueError("a board needs at least one slot")
        self.fd = fd
        self.slots = slots
        self.size = SLOTS_AT + slots * SLOT_SIZE
        self.mem = mmap.mmap(fd, self.size)
        self._seq = [0] * slots  # writer side: each slot's sequence number
        self._handed_seq = 0
        self._cancel_seq = 0  # supervisor side

    @classmethod
    def create(cls, slots: int) -> JobBoard:
        """A new zeroed board in an anonymous file; its descriptor is inheritable by a child.

        Raises OSError if no anonymous file can be made.
        """
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("zmqrun-board", os.MFD_CLOEXEC)  # a child gets it through pass_fds
        else:  # pragma: no cover - non-Linux
            f = tempfile.TemporaryFile()
            fd = os.dup(f.fileno())
            f.close()
        os.ftruncate(fd, SLOTS_AT + slots * SLOT_SIZE)
        board = cls(fd, slots)
        _U32.pack_into(board.mem, 0, MAGIC)
        return board

    @classmethod
    def attach(cls, fd: int, slots: int) -> JobBoard:
        """Map a board made by :meth:`create` in another process; ValueError if it is not one."""
        board = cls(fd, slots)
        if _U32.unpack_from(board.mem, 0)[0] != MAGIC:
            raise ValueError("file descriptor does not hold a zmqrun job board")
        return board

    def close(self) -> None:
        """Unmap and close the descriptor."""
        self.mem.close()
        os.close(self.fd)

    # -- child side (writers) -------------------------------------------------------------

    def set_serving(self) -> None:
        """The child imported its script and is about to register."""
        _U32.pack_into(self.mem, 4, 1)

    def begin(self, slot: int, job_id: str, attempt: int, timeout: float | None) -> None:
        """Job ``job_id`` (``attempt``) starts in ``slot`` now, with ``timeout`` seconds (None: no limit)."""
        mem, off = self.mem, SLOTS_AT + slot * SLOT_SIZE
        seq = self._seq[slot] + 1
        _U32.pack_into(mem, off, seq)  # odd: writing
        raw = job_id.encode()[:ID_MAX]
        if timeout:
            _SLOT_BODY.pack_into(mem, off + 4, 1, attempt, len(raw), time.monotonic() + timeout, timeout,
                                 time.time(), raw)
        else:
            _SLOT_BODY.pack_into(mem, off + 4, 1, attempt, len(raw), 0.0, 0.0, time.time(), raw)
        self._seq[slot] = seq + 1
        _U32.pack_into(mem, off, seq + 1)  # even: done

    def end(self, slot: int) -> None:
        """The job in ``slot`` finished (one aligned word: atomic, no sequence bump needed)."""
        _U32.pack_into(self.mem, SLOTS_AT + slot * SLOT_SIZE + 4, 0)

    def handed(self, job_id: str, attempt: int) -> None:
        """A pool child gave ``job_id`` to its threads (they start jobs in the order they get them)."""
        mem = self.mem
        seq = self._handed_seq + 1
        _U32.pack_into(mem, 16, seq)
        raw = job_id.encode()
        if len(raw) > HANDED_ID_MAX:
            raw = b""  # too long to record: the supervisor then counts every job as started
            attempt = 0
        _HANDED.pack_into(mem, 20, attempt, len(raw), raw)
        self._handed_seq = seq + 1
        _U32.pack_into(mem, 16, seq + 1)

    def cancel_seq(self) -> int:
        """The cancel list's sequence number (changes whenever the supervisor rewrites it)."""
        return _U32.unpack_from(self.mem, 8)[0]

    def canceled(self) -> tuple[int, frozenset[str]] | None:
        """(sequence number, canceled job ids), or None while the supervisor is rewriting the list."""
        mem = self.mem
        seq = _U32.unpack_from(mem, 8)[0]
        if seq & 1:
            return None
        n = _U32.unpack_from(mem, 12)[0]
        data = bytes(mem[HEADER:HEADER + min(n, CANCEL_AREA)])
        if _U32.unpack_from(mem, 8)[0] != seq:
            return None
        try:
            ids = orjson.loads(data) if data else []
        except orjson.JSONDecodeError:
            return None
        return seq, frozenset(i for i in ids if isinstance(i, str))

    # -- supervisor side (readers, and the cancel list) -----------------------------------

    def is_serving(self) -> bool:
        """True once the child has imported its script (see :meth:`set_serving`)."""
        return _U32.unpack_from(self.mem, 4)[0] == 1

    def read(self, slot: int) -> SlotState | None:
        """The slot's last job (None if none started yet, or if a write is in progress: try again)."""
        mem, off = self.mem, SLOTS_AT + slot * SLOT_SIZE
        seq, running, attempt, n, deadline, timeout, started, raw = _SLOT.unpack_from(mem, off)
        if seq == 0 or seq & 1 or _U32.unpack_from(mem, off)[0] != seq:
            return None
        # ``running`` may flip to 0 after the sequence check: re-read that one word.
        running = _U32.unpack_from(mem, off + 4)[0]
        return SlotState(bool(running), raw[:n].decode("utf-8", "replace"), attempt, deadline, timeout, started)

    def slot_written(self, slot: int) -> int:
        """The slot's sequence number: 0 never written, odd while a write is in progress."""
        return _U32.unpack_from(self.mem, SLOTS_AT + slot * SLOT_SIZE)[0]

    def last_handed(self) -> tuple[str, int] | Literal[False] | None:
        """(job id, attempt) last given to a pool's threads; None if none; False if unknown (torn or too long)."""
        mem = self.mem
        seq = _U32.unpack_from(mem, 16)[0]
        if seq == 0:
            return None
        attempt, n, raw = _HANDED.unpack_from(mem, 20)
        if seq & 1 or n == 0 or _U32.unpack_from(mem, 16)[0] != seq:
            return False
        return raw[:n].decode("utf-8", "replace"), attempt

    def set_canceled(self, ids: list[str]) -> None:
        """Publish the canceled job ids (the newest that fit in the area) to the child."""
        data = orjson.dumps(ids)
        while len(data) > CANCEL_AREA and ids:
            ids = ids[1:]
            data = orjson.dumps(ids)
        mem = self.mem
        self._cancel_seq += 1
        _U32.pack_into(mem, 8, self._cancel_seq)  # odd
        mem[HEADER:HEADER + len(data)] = data
        _U32.pack_into(mem, 12, len(data))
        self._cancel_seq += 1
        _U32.pack_into(mem, 8, self._cancel_seq)  # even

    def reset(self) -> None:
        """Zero everything but the magic (before a new child starts)."""
        self.mem[4:self.size] = bytes(self.size - 4)
        self._seq = [0] * self.slots
        self._handed_seq = 0
        self._cancel_seq = 0
