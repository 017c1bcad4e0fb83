"""A recording file system for crash-point tests (SQLite's crash VFS idea, log-format.md section 8).

:class:`CrashFS` is a :class:`zmqrun.fsio.RealFS` that passes every call
through to the real directory (so the code under test reads back what it
wrote) and records each mutating call in :attr:`CrashFS.ops`.  It does not
actually sync: durability is what the recorded model says, not what the test
machine's disk does, and skipping real syncs keeps the recorded runs fast.

For any prefix ``ops[:p]`` of a run (a *crash point*: the run stopped just before
op ``p``) :meth:`CrashFS.crash_state` gives the disk state a power loss could
leave, under this model of a Linux file system (ext4-like, conservative):

- File data: the content as of the file's last ``fdatasync`` (or ``truncate``,
  which syncs) is durable.  Each later write or ``ftruncate`` may be kept,
  dropped, or torn (a prefix of a write kept).
- Directory entries: a ``create``, ``rename`` or ``unlink`` is durable once its
  directory was fsync'ed afterwards; before that it may be kept or dropped.
  ``fdatasync`` of a new file does *not* make its name durable.  A rename is
  atomic: either the new name points at the file and the old one is gone, or
  (dropped) the old names are as before.  A file whose creation entry is
  dropped does not exist (its data is unreachable).

:meth:`CrashState.choices` enumerates a bounded set of crash outcomes
(:class:`Choice`) and :meth:`CrashState.materialize` writes one of them into a
fresh directory, where a real recovery runs.  What is enumerated, and why it
covers the cases of log-format.md section 8, is in :meth:`CrashState.choices`.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zmqrun.fsio import RealFS

SYNC_OPS = ("fdatasync", "fsync_dir")
SECTOR = 512  # bytes: a torn write may also stop at a sector boundary


@dataclass(frozen=True)
class Op:
    """One recorded call.  ``kind`` is create, write, ftruncate, fdatasync, fsync_dir, rename or unlink.

    ``ino`` is the file's id in the model (stable across renames); ``path`` the
    name (create, unlink, rename source), ``dst`` the rename target, ``dir`` the
    directory a dir op or fsync_dir concerns, ``offset``/``data`` a write,
    ``size`` an ftruncate.
    """

    kind: str
    ino: int = -1
    path: Path | None = None
    dst: Path | None = None
    dir: Path | None = None
    offset: int = 0
    data: bytes = b""
    size: int = 0


class CrashFS(RealFS):
    """A :class:`RealFS` that records every mutating call (see the module docstring).

    ``root``: files already in it when the recorder is made count as durable
    (content and name).  Not thread-safe (the job log has one owner thread).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ops: list[Op] = []
        self._next_ino = 0
        self._fd_ino: dict[int, int] = {}
        self._name_ino: dict[Path, int] = {}  # live names -> inode
        self.baseline: dict[Path, tuple[int, bytes]] = {}  # durable at start: path -> (ino, content)
        for p in sorted(self.root.iterdir()) if self.root.exists() else []:
            if p.is_file() and p.name != "LOCK":
                ino = self._new_ino()
                self._name_ino[p] = ino
                self.baseline[p] = (ino, p.read_bytes())

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    @property
    def op_count(self) -> int:
        """How many ops were recorded so far (the crash point "now")."""
        return len(self.ops)

    def sync_points(self) -> list[int]:
        """Crash points just before and just after each sync op, plus the start and the end (sorted)."""
        pts = {0, len(self.ops)}
        for i, op in enumerate(self.ops):
            if op.kind in SYNC_OPS:
                pts.add(i)
                pts.add(i + 1)
        return sorted(pts)

    # -- recorded calls ------------------------------------------------------------------

    def create(self, path: Path) -> int:
        return self._created(super().create(path), path)

    def create_at(self, path: Path) -> int:
        return self._created(super().create_at(path), path)

    def _created(self, fd: int, path: Path) -> int:
        ino = self._new_ino()
        self._fd_ino[fd] = ino
        self._name_ino[Path(path)] = ino
        self.ops.append(Op("create", ino, path=Path(path), dir=Path(path).parent))
        return fd

    def open_append(self, path: Path) -> int:
        fd = super().open_append(path)
        self._fd_ino[fd] = self._name_ino[Path(path)]
        return fd

    def open_at(self, path: Path) -> int:
        fd = super().open_at(path)
        self._fd_ino[fd] = self._name_ino[Path(path)]
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        offset = os.fstat(fd).st_size  # create / open_append fds are O_APPEND
        n = super().write(fd, data)
        self.ops.append(Op("write", self._fd_ino[fd], offset=offset, data=bytes(data[:n])))
        return n

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        self.ops.append(Op("write", self._fd_ino[fd], offset=offset, data=bytes(data[:n])))
        return n

    def fdatasync(self, fd: int) -> None:
        self.ops.append(Op("fdatasync", self._fd_ino[fd]))  # modelled, not done: see the module docstring

    def ftruncate(self, fd: int, size: int) -> None:
        super().ftruncate(fd, size)
        self.ops.append(Op("ftruncate", self._fd_ino[fd], size=size))

    def close(self, fd: int) -> None:
        super().close(fd)
        self._fd_ino.pop(fd, None)

    def fsync_dir(self, path: Path) -> None:
        self.ops.append(Op("fsync_dir", dir=Path(path)))

    def rename(self, src: Path, dst: Path) -> None:
        super().rename(src, dst)
        ino = self._name_ino.pop(Path(src))
        self._name_ino[Path(dst)] = ino
        self.ops.append(Op("rename", ino, path=Path(src), dst=Path(dst), dir=Path(dst).parent))

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        ino = self._name_ino.pop(Path(path))
        self.ops.append(Op("unlink", ino, path=Path(path), dir=Path(path).parent))

    def truncate(self, path: Path, size: int) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        ino = self._name_ino[Path(path)]
        self.ops.append(Op("ftruncate", ino, size=size))
        self.ops.append(Op("fdatasync", ino))

    # -- crash states --------------------------------------------------------------------

    def crash_states(self, points: list[int]) -> Iterator[tuple[int, CrashState]]:
        """(p, state) for each crash point ``p`` of ``points`` (ascending), in one pass over the ops."""
        durable: dict[int, bytes] = {ino: data for ino, data in self.baseline.values()}
        pending: dict[int, list[Op]] = {}
        names: dict[Path, int] = {p: ino for p, (ino, _d) in self.baseline.items()}  # live namespace
        dnames: dict[Path, int] = dict(names)  # durable namespace
        dpending: list[Op] = []  # dir ops since their dir's last fsync
        want = iter(sorted(set(points)))
        nxt = next(want, None)
        for i in range(len(self.ops) + 1):
            while nxt is not None and nxt == i:
                yield i, CrashState(dict(durable), {k: list(v) for k, v in pending.items() if v},
                                    dict(dnames), list(dpending))
                nxt = next(want, None)
            if i == len(self.ops) or nxt is None:
                break
            op = self.ops[i]
            if op.kind in ("write", "ftruncate"):
                pending.setdefault(op.ino, []).append(op)
            elif op.kind == "create":
                durable.setdefault(op.ino, b"")
                names[op.path] = op.ino  # type: ignore[index]
                dpending.append(op)
            elif op.kind == "fdatasync":
                durable[op.ino] = apply_ops(durable.get(op.ino, b""), pending.pop(op.ino, []))
            elif op.kind == "rename":
                names.pop(op.path)  # type: ignore[arg-type]
                names[op.dst] = op.ino  # type: ignore[index]
                dpending.append(op)
            elif op.kind == "unlink":
                names.pop(op.path)  # type: ignore[arg-type]
                dpending.append(op)
            elif op.kind == "fsync_dir":
                for p in [p for p in dnames if p.parent == op.dir]:
                    del dnames[p]
                dnames.update({p: ino for p, ino in names.items() if p.parent == op.dir})
                dpending = [d for d in dpending if d.dir != op.dir]


def apply_ops(data: bytes, ops: list[Op]) -> bytes:
    """``data`` after the writes and truncates ``ops`` (in order)."""
    buf = bytearray(data)
    for op in ops:
        if op.kind == "write":
            end = op.offset + len(op.data)
            if len(buf) < op.offset:
                buf.extend(bytes(op.offset - len(buf)))
            buf[op.offset:end] = op.data
        else:
            del buf[op.size:]
            if len(buf) < op.size:
                buf.extend(bytes(op.size - len(buf)))
    return bytes(buf)


@dataclass(frozen=True)
class Choice:
    """What one crash keeps of the unsynced operations.

    ``files``: how every file's unsynced writes (in order: w0, w1, ...) end up --
    ``keep`` all written; ``drop`` none; ``torn`` w0..w(at-1) kept, w(at) cut to
    its first ``arg`` bytes (0: dropped), the later ones dropped (``at`` -1: the
    last write); ``garble`` all kept but the last one's bytes are garbage;
    ``zeros`` all kept but the last one's extent reads as zeros (size updated,
    data not); ``hole`` w(at) reads as zeros while the later ones are kept
    (out-of-order writeback); ``only`` file ``arg`` keeps all, the others drop
    all; ``except`` file ``arg`` drops all, the others keep all.  A file with
    fewer unsynced writes than ``at`` needs keeps them all.  ``dirs``: for each
    unsynced directory op in order, kept or not (None: all kept).
    """

    files: str = "keep"
    arg: int = 0
    at: int = -1
    dirs: tuple[bool, ...] | None = None

    def __str__(self) -> str:
        d = "" if self.dirs is None else " dirs=" + "".join("k" if k else "-" for k in self.dirs)
        if self.files in ("keep", "drop", "garble", "zeros"):
            return self.files + d
        if self.files == "torn":
            return f"torn:w{self.at}@{self.arg}{d}"
        if self.files == "hole":
            return f"hole:w{self.at}{d}"
        return f"{self.files}:file{self.arg}{d}"


@dataclass
class CrashState:
    """The model's view at one crash point: durable file data, unsynced file ops, durable names, unsynced dir ops."""

    durable: dict[int, bytes]
    pending: dict[int, list[Op]]
    dnames: dict[Path, int]
    dpending: list[Op]

    def choices(self, holes: bool = False) -> list[Choice]:
        """The crash outcomes enumerated at this point.

        File data (applied to every file with unsynced writes at once; usually
        there is one: the active segment, or a ``.tmp`` being written): all kept;
        all dropped; for each unsynced write in order, the ones before it kept,
        it cut after 0 (dropped), 1 byte, half, all but 1 byte and at each
        sector boundary, the later ones dropped; the last write garbled; the last
        write's extent read as zeros; with several such files, each one alone
        kept and each one alone dropped.  ``holes`` adds, for each unsynced
        write but the last, that write reading as zeros while the later ones are
        kept (page writeback in any order; the job log writes batches nobody
        waits on without a sync of their own, so several may be unsynced).

        Directory ops (those since the directory's last fsync): all kept, all
        dropped, each in-order prefix kept (a journaling file system commits
        metadata in order), and each single op dropped with the others kept
        (out of order, as POSIX allows).  These are combined with "all file data
        kept" and "all dropped"; the file-data variants above run with all
        directory ops kept.

        Why this covers log-format.md section 8: at each sync point the only
        unsynced data are the batches written since the last fdatasync (torn
        tail: kept, dropped, cut at every interesting place, garbled, zeroed)
        and the creates/renames/unlinks since the last directory fsync (a new
        segment, an index or snapshot ``.tmp`` and its rename, CURRENT's
        rename, the unlinks of old snapshots and of segments removed by
        retention: each dropped alone, all, or a prefix).  The full powerset
        (every subset of writes and dir ops, every cut) is not enumerated: it
        grows exponentially, and a subset that keeps a later write but drops an
        earlier one of the same file is the ``holes`` case.
        """
        out: list[Choice] = [Choice("keep"), Choice("drop")]
        most = max((len(v) for v in self.pending.values()), default=0)
        for at in range(most):
            sizes = [len(v[at].data) for v in self.pending.values() if len(v) > at and v[at].kind == "write"]
            if not sizes:
                continue
            n = max(sizes)
            cuts = {0, 1, n // 2, n - 1} | set(range(SECTOR, n, SECTOR))
            out += [Choice("torn", k, at) for k in sorted(cuts) if 0 <= k < n and (k or at)]
        if most:
            out += [Choice("garble"), Choice("zeros")]
        if len(self.pending) > 1:
            for ino in sorted(self.pending):
                out += [Choice("only", ino), Choice("except", ino)]
        if holes:
            out += [Choice("hole", 0, at) for at in range(most - 1)]
        d = len(self.dpending)
        if d:
            variants = {tuple([False] * d)} | {tuple([True] * k + [False] * (d - k)) for k in range(1, d)}
            if d > 1:
                variants |= {tuple(j != i for j in range(d)) for i in range(d)}
            for v in sorted(variants, reverse=True):
                out += [Choice("keep", dirs=v), Choice("drop", dirs=v)]
        return out

    def files_after(self, choice: Choice) -> dict[Path, bytes]:
        """Name -> content of every file the crash ``choice`` leaves."""
        names = dict(self.dnames)
        for op, kept in zip(self.dpending, choice.dirs or [True] * len(self.dpending)):
            if not kept:
                continue
            if op.kind == "create":
                names[op.path] = op.ino  # type: ignore[index]
            elif op.kind == "rename":
                if names.get(op.path) == op.ino:  # type: ignore[arg-type]
                    del names[op.path]  # type: ignore[arg-type]
                names[op.dst] = op.ino  # type: ignore[index]
            elif op.kind == "unlink" and names.get(op.path) == op.ino:  # type: ignore[arg-type]
                del names[op.path]  # type: ignore[arg-type]
        return {p: self._content(ino, choice) for p, ino in names.items()}

    def _content(self, ino: int, c: Choice) -> bytes:
        base = self.durable.get(ino, b"")
        ops = self.pending.get(ino, [])
        kind = c.files
        if not ops or kind == "drop" or (kind == "only" and ino != c.arg) or (kind == "except" and ino == c.arg):
            return base
        at = len(ops) - 1 if c.at < 0 else c.at
        if kind in ("keep", "only", "except") or at >= len(ops) or ops[at].kind != "write":
            return apply_ops(base, ops)
        w = ops[at]
        if kind == "torn":
            return apply_ops(base, ops[:at] + [Op("write", ino, offset=w.offset, data=w.data[:c.arg])])
        if kind == "garble":
            garbage = random.Random(f"{ino}:{w.offset}").randbytes(len(w.data))  # same bytes every time
            return apply_ops(base, ops[:at] + [Op("write", ino, offset=w.offset, data=garbage)])
        if kind == "zeros":
            return apply_ops(base, ops[:at] + [Op("write", ino, offset=w.offset, data=bytes(len(w.data)))])
        if kind == "hole":
            if at == len(ops) - 1:
                return apply_ops(base, ops)
            return apply_ops(base, ops[:at] + [Op("write", ino, offset=w.offset, data=bytes(len(w.data)))]
                             + ops[at + 1:])
        raise ValueError(f"unknown crash choice {c}")

    def materialize(self, choice: Choice, root: Path, dest: Path | None = None) -> tuple[str, set[str]]:
        """Write the files ``choice`` leaves into the empty directory ``dest`` (paths under ``root`` are
        placed under ``dest``; ``dest`` None: write nothing); return a digest of the result (equal
        digests: equal disk states) and the names (relative to ``root``)."""
        files = {p.relative_to(root): data for p, data in self.files_after(choice).items()}
        if dest is not None:
            for rel, data in files.items():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return digest(files), {str(rel) for rel in files}


def digest(files: dict[Path, bytes]) -> str:
    """A digest of a set of files (name -> content): equal digests, equal disk states."""
    h = hashlib.blake2b(digest_size=16)
    for rel, data in sorted(files.items()):
        h.update(str(rel).encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class NoSyncFS(RealFS):
    """A :class:`RealFS` whose syncs do nothing: for recoveries whose durability is not under test (fast)."""

    def fdatasync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: Path) -> None:
        pass

    def truncate(self, path: Path, size: int) -> None:
        os.truncate(path, size)
