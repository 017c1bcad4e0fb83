"""Shared fixtures: free ports, router/worker subprocesses with per-test data dirs, clients, the CLI.

Every process is started here as ``python -m zmqrun ...`` with its output in a
file under the test's ``tmp_path``, and always stopped by PID at teardown
(SIGTERM, bounded wait, then SIGKILL).  When a test fails, the output of every
process it started is attached to the failure report.  Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from zmqrun import Client, RouterUnavailable

FIBO = "zmqrun.examples.demo:fibo"
WORDS = "zmqrun.examples.demo:words"
READY_TIMEOUT = 15.0  # seconds to wait for a router or worker to come up
EXAMPLES_DIR = str(Path(__import__("zmqrun.examples", fromlist=["x"]).__file__).parent)  # the bundled examples
HEARTBEAT = 0.5  # default --heartbeat for routers and workers here: quick shutdown, no spurious losses


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unused_address() -> str:
    """A loopback endpoint nobody listens on."""
    return f"tcp://127.0.0.1:{free_port()}"


def wait_until(predicate: Callable[[], Any], timeout: float = READY_TIMEOUT, interval: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def read_pid(marker: Path, timeout: float = 20) -> int:
    """The PID a test job wrote to ``marker`` once it started (waits up to ``timeout`` seconds)."""
    wait_until(marker.exists, timeout=timeout, interval=0.02, what=f"the job to start ({marker.name})")
    return int(marker.read_text())


def pid_gone(pid: int) -> bool:
    """True if process ``pid`` no longer runs (gone, or a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def log_records(data_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """(type, payload) of every job log record in ``data_dir`` (the router must be stopped)."""
    import orjson

    from zmqrun.joblog import FsyncPolicy, JobLog

    jlog = JobLog(data_dir, FsyncPolicy("always"))
    try:
        jlog.scan_segments()
        return [(rtype, orjson.loads(payload)) for _seq, rtype, payload in jlog.recover(0)]
    finally:
        jlog.close()


def family_pids(pid: int) -> set[int]:
    """``pid`` and the PIDs of its live descendants, read from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return family


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for zmqrun subprocesses: ours without ZMQRUN_ADDRESS (and without
    PYTHONUNBUFFERED, which cold job processes would inherit and which would hide buffering bugs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ZMQRUN_ADDRESS", "PYTHONUNBUFFERED")}
    env.update(extra)
    return env


class Proc:
    """One ``python -m zmqrun`` subprocess whose stdout and stderr go to ``log_path``.

    ``program`` replaces ``python -m zmqrun`` (e.g. a launcher script that takes the same arguments).
    """

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path, env: dict[str, str],
                 program: list[str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        with open(log_path, "ab") as out:
            out.write(f"$ zmqrun {' '.join(args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen([*(program or [sys.executable, "-m", "zmqrun"]), *args], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What the process wrote so far ("" if its log file is gone: a report must not fail the run)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def family(self) -> set[int]:
        """This process's PID and those of its live descendants (a dedicated worker runs its jobs in a
        child process; Linux /proc)."""
        return family_pids(self.pid)

    def kill9(self) -> None:
        """SIGKILL by PID and reap."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.terminate()
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


class Cluster:
    """A router and workers for one test, all in ``tmp_path``; see the ``zr`` fixture."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.data_dir = tmp_path / "data"
        self.address: str | None = None
        self.procs: list[Proc] = []
        self.clients: list[Client] = []
        self.router_proc: Proc | None = None
        self.curve: Any = None  # zmqrun.CurveKeys for the clients made here, with a router that uses CURVE
        self._n = 0

    # -- processes ------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
              program: list[str] | None = None) -> Proc:
        self._n += 1
        p = Proc(name, args, self.tmp / f"{self._n:02d}-{name}.log", cwd or self.tmp, subprocess_env(**(env or {})),
                 program)
        self.procs.append(p)
        return p

    def start_router(self, *, data_dir: Path | None = None, heartbeat: float | None = HEARTBEAT, fsync: str = "always",
                     address: str | None = None, extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                     program: list[str] | None = None) -> Proc:
        """Start a router (new free port unless ``address`` is given) and wait until it answers.

        ``env`` adds to its environment; ``program`` replaces ``python -m zmqrun`` (see :class:`Proc`).
        """
        data_dir = data_dir or self.data_dir
        for _ in range(3):
            addr = address or unused_address()
            args = ["router", "--bind", addr, "--data-dir", str(data_dir), "--fsync", fsync, *extra]
            if heartbeat is not None:
                args += ["--heartbeat", str(heartbeat)]
            p = self.spawn("router", args, env=env, program=program)
            self.address = addr
            with Client(addr, timeout=0.5, curve=self.curve) as c:
                end = time.monotonic() + READY_TIMEOUT
                while time.monotonic() < end and p.alive():
                    try:
                        c.status()
                        self.router_proc = p
                        return p
                    except RouterUnavailable:
                        pass
            if p.alive():
                pytest.fail(f"router did not answer within {READY_TIMEOUT:g} s:\n{p.output()}")
            p.popen.wait(5)
            if address is not None or "cannot bind" not in p.output():
                pytest.fail(f"router exited with code {p.popen.returncode}:\n{p.output()}")
        pytest.fail("could not bind a router to a free port in 3 tries")

    def start_worker(self, script: str | None = None, *, name: str | None = None, concurrency: int = 1,
                     prefetch: int | None = None, heartbeat: float | None = HEARTBEAT, cwd: Path | None = None,
                     wait: bool = True, extra: tuple[str, ...] = ()) -> Proc:
        """Start a worker (dedicated to ``script``, or normal if None) and wait until the router lists it.

        ``extra``: more ``zmqrun worker`` arguments (e.g. ``("--timeout", "1")``).
        """
        assert self.address, "start the router first"
        name = name or f"{'warm' if script else 'cold'}-{self._n + 1}"
        args = ["worker", "--connect", self.address, "--name", name, "--concurrency", str(concurrency)]
        if script is not None:
            args += ["--dedicated", script]
        if prefetch is not None:
            args += ["--prefetch", str(prefetch)]
        if heartbeat is not None:
            args += ["--heartbeat", str(heartbeat)]
        if script is None and "--scripts" not in extra:
            # A normal worker runs only scripts under its roots: the test's files and the bundled examples
            # (named as modules, and as files).
            args += ["--scripts", str(cwd or self.tmp), "--scripts", "zmqrun.examples", "--scripts", EXAMPLES_DIR]
        args += list(extra)
        p = self.spawn(f"worker-{name}", args, cwd)
        p.worker_name = name  # type: ignore[attr-defined]
        if wait:
            self.wait_worker(name, proc=p)
        return p

    def worker_names(self) -> list[str]:
        with Client(self.address, timeout=5, curve=self.curve) as c:
            return [w["name"] for w in c.status()["workers"]]

    def wait_worker(self, name: str, proc: Proc | None = None, timeout: float = READY_TIMEOUT) -> None:
        def registered() -> bool:
            if proc is not None and not proc.alive():
                pytest.fail(f"worker {name} exited with code {proc.popen.returncode}:\n{proc.output()}")
            return name in self.worker_names()

        wait_until(registered, timeout, what=f"worker {name} to register")

    # -- clients and CLI ------------------------------------------------------------------

    def client(self, timeout: float = 10.0, address: str | None = None) -> Client:
        c = Client(address or self.address, timeout=timeout, curve=self.curve)
        self.clients.append(c)
        return c

    def cli(self, *args: str, address: bool = True, env: dict[str, str] | None = None,
            timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m zmqrun ARGS`` (``--address`` appended unless ``address`` is False)."""
        argv = [sys.executable, "-m", "zmqrun", *args]
        if address:
            argv += ["--address", self.address]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.tmp,
                              env=subprocess_env(**(env or {})), stdin=subprocess.DEVNULL)
        with open(self.tmp / "cli.log", "a") as f:
            f.write(f"$ {' '.join(argv[2:])}\n[exit {proc.returncode}]\n--- stdout\n{proc.stdout}\n"
                    f"--- stderr\n{proc.stderr}\n")
        return proc

    # -- teardown and reporting -----------------------------------------------------------

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        # SIGTERM every process by its own PID (workers first, router last), then wait for each,
        # SIGKILL after a bounded wait.  Signalling all first lets them shut down in parallel.
        for p in reversed(self.procs):
            if p.alive():
                p.popen.terminate()
        for p in reversed(self.procs):
            p.stop()

    def report(self) -> str:
        parts = []
        for p in self.procs:
            state = "running" if p.alive() else f"exit {p.popen.returncode}"
            parts.append(f"===== {p.log_path.name} (pid {p.pid}, {state})\n{p.output()[-20000:]}")
        cli_log = self.tmp / "cli.log"
        if cli_log.exists():
            parts.append(f"===== cli.log\n{cli_log.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts)


@pytest.fixture
def zr(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A per-test :class:`Cluster`; nothing is started until the test asks."""
    cluster = Cluster(tmp_path)
    request.node._zmqrun_cluster = cluster
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def router(zr: Cluster) -> Cluster:
    """A running router (fsync always) in the test's data dir; returns the cluster."""
    zr.start_router()
    return zr


@pytest.fixture
def client(router: Cluster) -> Client:
    """A Client connected to the ``router`` fixture's router."""
    return router.client()


@pytest.fixture(scope="module")
def _shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("shared"))
    try:
        cluster.start_router()
        cluster.start_worker(FIBO, name="warm-shared")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def shared(_shared_cluster: Cluster, request: pytest.FixtureRequest) -> Cluster:
    """One router with a dedicated FIBO worker ("warm-shared"), shared by the tests of a module.

    For tests that only need a working router and do not look at global state (counts, job lists).
    """
    request.node._zmqrun_cluster = _shared_cluster
    return _shared_cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    cluster = getattr(item, "_zmqrun_cluster", None)
    if rep.failed and cluster is not None:
        rep.sections.append(("zmqrun process output", cluster.report()))


def write_script(folder: Path, name: str, source: str) -> Path:
    """Write a job script ``name`` (e.g. ``jobs.py``) into ``folder``; return its path."""
    path = folder / name
    path.write_text(source)
    return path


class Submitter(threading.Thread):
    """Submits ``script`` with args ``args(x)`` and job id ``f"{prefix}-{x}"`` for x = 0, 1, 2, ... until
    ``stopping`` is set, through a client with ``timeout`` seconds that is replaced whenever the router
    is unavailable (a fresh client reconnects at once instead of after libzmq's grown interval).

    ``acked`` maps job id -> x for every submit that returned, ``tried`` for every submit attempted,
    ``unavailable`` counts RouterUnavailable, ``errors`` collects anything else (reported by the test,
    never swallowed).  Used by the kill -9 loops (test_crash_kill9.py, test_prealloc_chaos.py).
    """

    def __init__(self, address: str, script: str, prefix: str, timeout: float,
                 args: Callable[[int], dict[str, Any]] = lambda x: {"x": x}) -> None:
        super().__init__(name=f"{prefix}-submitter", daemon=True)
        self.address, self.script, self.prefix, self.timeout, self.args = address, script, prefix, timeout, args
        self.acked: dict[str, int] = {}
        self.tried: dict[str, int] = {}
        self.unavailable = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        client: Client | None = None
        x = 0
        try:
            while not self.stopping.is_set():
                if client is None:
                    client = Client(self.address, timeout=self.timeout)
                job_id = f"{self.prefix}-{x}"
                self.tried[job_id] = x
                try:
                    job = client.submit(self.script, self.args(x), job_id=job_id)
                except RouterUnavailable:  # the router is down (or died before its ACK): not acknowledged
                    self.unavailable += 1
                    client.close()
                    client = None
                else:
                    if job.id != job_id:
                        self.errors.append(f"submit returned id {job.id}, sent {job_id}")
                    self.acked[job_id] = x
                x += 1
        except Exception as e:  # noqa: BLE001 - reported by the test, never swallowed
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            if client is not None:
                client.close()
