"""Child-process helpers: start by Popen, wait for a readiness line, stop by that PID.

Every child runs with cwd = repo root and the repo on ``PYTHONPATH`` (so
``bench.jobs`` and ``zmqrun`` import), stdout+stderr going to a log file under
the run's ``raw/`` directory. Nothing is ever stopped by name.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Repository root (parent of the ``bench`` package)."""

PY = sys.executable


class ChildError(RuntimeError):
    """A child process died or did not become ready in time."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bound to port 0 and read back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for children: ours, with the repo first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process in /proc (Linux).

    CPU = user + system of the process plus that of its children already waited for.
    """
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(entry)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK)
        except (OSError, IndexError, ValueError):
            pass
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User+system CPU seconds used so far by each of ``pids`` plus its live descendants."""
    stats = _proc_stats()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    for root in pids:
        total, todo = 0.0, [root]
        while todo:
            p = todo.pop()
            total += stats.get(p, (0, 0.0))[1]
            todo += kids.get(p, [])
        out[root] = total
    return out


class Child:
    """One child process whose output goes to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        n = 1
        while self.log_path.exists():
            n += 1
            self.log_path = log_dir / f"{name}-{n}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """PID of the child."""
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the child has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 15) -> str:
        """Last ``n`` lines of the child's output."""
        return "\n".join(self.log_text().splitlines()[-n:])

    def wait_for(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        """Wait (bounded by ``timeout_s`` seconds) until the log matches regex ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if self.proc.poll() is not None:
                raise ChildError(
                    f"{self.name} exited with {self.proc.returncode} before ready:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(0.01)

    def alive(self) -> bool:
        """True while the child runs."""
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM this PID, wait up to ``timeout_s`` s, then SIGKILL it. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self._log.close()
        return self.proc.returncode


class Children:
    """Context manager owning the children of one scenario; stops them all (newest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` as child ``name`` and remember it for :meth:`stop_all`."""
        c = Child(name, argv, self.log_dir, env)
        self.children.append(c)
        return c

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each live child (with its live descendants), by name."""
        live = [c for c in self.children if c.alive()]
        sec = cpu_seconds([c.pid for c in live])
        return {c.name: sec[c.pid] for c in live}

    def stop_all(self) -> None:
        """Stop every child started here, newest first."""
        while self.children:
            self.children.pop().stop()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
