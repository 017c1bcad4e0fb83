"""The file-system calls the job log makes, behind one small object.

Everything the log, its indexes and snapshots do to the disk goes through an
:class:`FS` so that crash tests can put a recording layer underneath (SQLite's
crash VFS idea: record unsynced writes and directory operations, then decide at
each sync point what a crash would have kept).  :class:`RealFS` is the plain
``os`` implementation used in production; it adds nothing on the hot path but
one attribute lookup per call.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

# One descriptor held in reserve (the classic spare-fd trick): when the process has run out of
# descriptors (EMFILE: e.g. a flood of connections nobody authenticated), the log frees it to open
# its next segment or sync its directory instead of failing the router; it is taken again after.
_spare_lock = threading.Lock()
_spare: list[int] = []


def _reserve() -> None:
    with _spare_lock:
        if not _spare:
            try:
                _spare.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass  # still out of descriptors: the next call tries again


def _opening(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which opens a descriptor); on EMFILE free the spare one and try once more."""
    if not _spare:
        _reserve()  # spent earlier (or not taken): take it back while descriptors are free
    try:
        return fn()
    except OSError as e:
        if e.errno != errno.EMFILE:
            raise
        with _spare_lock:
            if not _spare:
                raise
            os.close(_spare.pop())
        try:
            return fn()
        finally:
            _reserve()


_reserve()


class RealFS:
    """Raw ``os`` calls on file descriptors (no buffering: log-format.md rule "raw fds only").

    Every method raises ``OSError`` as the underlying call does.
    """

    def create(self, path: Path) -> int:
        """Create ``path`` (must not exist) for appending, mode 0600; return the fd."""
        return _opening(lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600))

    def open_append(self, path: Path) -> int:
        """Open an existing file for appending; return the fd."""
        return _opening(lambda: os.open(path, os.O_WRONLY | os.O_APPEND))

    def create_at(self, path: Path) -> int:
        """Create ``path`` (must not exist) for writes at explicit offsets (:meth:`pwrite`), mode 0600; return the fd."""
        return _opening(lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def open_at(self, path: Path) -> int:
        """Open an existing file for writes at explicit offsets (:meth:`pwrite`; not O_APPEND, which
        Linux applies to ``pwrite`` too); return the fd."""
        return _opening(lambda: os.open(path, os.O_WRONLY))

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """One ``write(2)``; return the bytes written (may be short)."""
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """One ``pwrite(2)`` at byte ``offset``; return the bytes written (may be short)."""
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        """Make the file's data (and size) durable."""
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        """Cut the file to ``size`` bytes."""
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        """Close the fd."""
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        """fsync a directory so a create, rename or delete in it is durable."""
        fd = _opening(lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace ``dst`` with ``src`` (same directory)."""
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        """Remove a file."""
        os.unlink(path)

    def read_bytes(self, path: Path) -> bytes:
        """The whole file."""
        return Path(path).read_bytes()

    def pread(self, path: Path, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes of ``path`` from ``offset``."""
        fd = _opening(lambda: os.open(path, os.O_RDONLY))
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def truncate(self, path: Path, size: int) -> None:
        """Cut ``path`` to ``size`` bytes and make that durable."""
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: Path) -> list[str]:
        """Names in the directory."""
        return os.listdir(path)

    def write_file(self, path: Path, data: bytes) -> None:
        """Durably replace ``path`` with ``data``: write a ``.tmp`` sibling, fdatasync it, rename, fsync the dir.

        Built from the primitives above so a recording subclass sees every step.
        """
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = self.create(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[self.write(fd, view):]
            self.fdatasync(fd)
        finally:
            self.close(fd)
        self.rename(tmp, path)
        self.fsync_dir(path.parent)

FS = RealFS
