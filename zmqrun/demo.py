"""``zmqrun demo``: a router, a dedicated worker and a normal worker on loopback, real jobs through both paths.

Everything runs in child processes started here and stopped here by PID; the
data dir is a temporary directory removed at the end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from hdrh.histogram import HdrHistogram

from .client import Client, JobFailed, RouterUnavailable

WARM_SCRIPT = "zmqrun.examples.demo:fibo"
# The same function named by file path is a different script identity, which
# only the normal worker serves: the cold path runs the very same code.
EXAMPLES = Path(__file__).resolve().parent / "examples" / "demo.py"
COLD_SCRIPT = f"{EXAMPLES}:fibo"
TEXT_SCRIPT = f"{EXAMPLES}:words"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_workers(client: Client, n: int, deadline_s: float = 30.0) -> None:
    """Block until the router lists ``n`` workers; raise RuntimeError after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if len(client.status()["workers"]) >= n:
                return
        except RouterUnavailable:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"workers did not register within {deadline_s:g} s")


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    out = open(log_path, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "zmqrun", *args], stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _run_path(client: Client, label: str, script: str, n: int, hist: HdrHistogram) -> None:
    with click.progressbar(range(n), label=f"{label:5} path, fibo(10)", width=30) as bar:
        for _ in bar:
            t0 = time.perf_counter()
            value = client.run(script, {"n": 10}, wait_timeout=60)
            hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
            if value != 55:
                raise RuntimeError(f"fibo(10) returned {value!r}")


def run_demo(warm_jobs: int = 500, cold_jobs: int = 100) -> int:
    """Run the demo; return an exit code.  Prints progress and a latency table (ms) to stdout."""
    tmp = Path(tempfile.mkdtemp(prefix="zmqrun-demo-"))
    address = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        click.echo(f"starting a router on {address} (data dir in {tmp}, fsync always), one dedicated worker "
                   f"for {WARM_SCRIPT} and one normal worker")
        procs.append(_spawn(["router", "--bind", address, "--data-dir", str(tmp / "data")], tmp / "router.log"))
        procs.append(_spawn(["worker", "--connect", address, "--dedicated", WARM_SCRIPT, "--name", "warm-1"],
                            tmp / "warm.log"))
        # A normal worker runs only scripts under its --scripts roots: here the bundled examples.
        procs.append(_spawn(["worker", "--connect", address, "--name", "cold-1", "--scripts", str(EXAMPLES.parent)],
                            tmp / "cold.log"))
        with Client(address, timeout=10) as c:
            wait_for_workers(c, 2)
            warm = HdrHistogram(1, 60_000_000, 3)
            cold = HdrHistogram(1, 60_000_000, 3)
            for _ in range(20):  # warm-up: connections, caches
                c.run(WARM_SCRIPT, {"n": 10}, wait_timeout=60)
            _run_path(c, "warm", WARM_SCRIPT, warm_jobs, warm)
            _run_path(c, "cold", COLD_SCRIPT, cold_jobs, cold)

            job = c.submit(TEXT_SCRIPT, {"text": "the quick brown fox jumps over the lazy dog the end"})
            summary = job.result(timeout=60)
            record = c.get(job.id)
            try:
                c.run(f"{EXAMPLES}:fail", {"message": "demo failure"}, wait_timeout=60)
            except JobFailed as e:
                failure = f"{e.type}: {e.message}"
            else:
                failure = "(expected a failure)"

        click.echo("")
        click.echo("per-job latency, submit to result (ms; one job in flight, fsync always):")
        click.echo(f"  {'path':<6} {'jobs':>6} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
        for label, h in (("warm", warm), ("cold", cold)):
            cells = [h.get_value_at_percentile(p) / 1000 for p in (50, 90, 99)] + [h.get_max_value() / 1000]
            click.echo(f"  {label:<6} {h.get_total_count():>6} " + " ".join(f"{v:>9.3f}" for v in cells))
        ratio = cold.get_value_at_percentile(50) / max(1, warm.get_value_at_percentile(50))
        click.echo(f"  the warm path is {ratio:.0f}x faster at p50 than a fresh process per job")
        click.echo("")
        click.echo(f"text job {job.id} on {record.worker}: {summary}")
        click.echo("its captured logs:")
        for line in record.logs.splitlines():
            click.echo(f"  | {line}")
        click.echo(f"a failing job comes back as JobFailed: {failure}")
        return 0
    except Exception as e:  # noqa: BLE001 - the demo reports and cleans up whatever happened
        click.echo(f"zmqrun demo failed: {type(e).__name__}: {e}", err=True)
        for name in ("router.log", "warm.log", "cold.log"):
            path = tmp / name
            if path.exists() and path.stat().st_size:
                click.echo(f"--- {name} (last lines)", err=True)
                click.echo("\n".join(path.read_text(errors="replace").splitlines()[-10:]), err=True)
        return 1
    finally:
        _stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
