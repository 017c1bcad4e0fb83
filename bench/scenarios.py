"""The bench scenarios. Each ``run_<name>(ctx)`` measures and appends rows to ``ctx.res``.

Every scenario starts its own processes (Popen, stopped by PID), talks over
loopback TCP only, warms up before measuring, bounds each measurement by a
count and a deadline, and checks the jobs' results. Latencies are in
microseconds, throughput in jobs/s (see :mod:`bench.results`).
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from bench.jobs import JOB_ARGS, JOB_FUNC, JOB_SCRIPT
from bench.procs import PY, REPO_ROOT, ChildError, Children, child_env, free_port
from bench.results import Results
from bench.stats import Latency, paced_loop, timed_loop

SCENARIOS = (
    "floor",
    "relay",
    "zmqrun-warm",
    "interleaved",
    "zmqrun-cold",
    "lambda-warm",
    "lambda-cold",
    "celery",
    "rq",
    "windmill",
    "scaling",
    "log-writer",
    "recovery",
)
"""Scenario names accepted by ``--only``, in run order."""

WINDMILL_PUBLISHED_MS = {
    "Windmill dedicated worker": 54.0,
    "Windmill normal worker": 111.0,
    "AWS Lambda": 73.0,
}
"""Published fibo(10) end-to-end ms per job (Windmill's benchmark page, m4.large; not measured here)."""


@dataclass
class Plan:
    """Counts and variants of one run (``--quick`` shrinks them; ``--jobs`` overrides the main counts)."""

    quick: bool
    lat_n: int
    pipe_n: int
    map_n: int
    cold_n: int
    peer_lat_n: int
    peer_tput_n: int
    lat_jobs: tuple[str, ...]
    tput_jobs: tuple[str, ...]
    map_jobs: tuple[str, ...]
    floor_n: int
    deadline_s: float
    light_n: int
    light_cold_n: int
    heavy_n: int
    scaling_jobs: int
    scaling_slots: tuple[int, ...]
    scaling_modes: tuple[str, ...]
    lambda_runtimes: tuple[int, ...] = (1, 2)
    window: int = 1000
    pace_hz: float = 1000.0
    log_records: int = 300_000  # records per writer-throughput round (log-writer)
    log_rounds: int = 3  # interleaved writer/raw rounds; the median is reported
    log_jobs: int = 256_000  # jobs in the persistence-CPU measurement
    rec_finished: int = 1_000_000  # finished jobs in the archive (recovery)
    rec_live: int = 100_000  # live (scheduled) jobs (recovery)
    rec_wait_s: float = 300.0  # bound on each router start/stop in the recovery scenario, seconds
    mix_rounds: int = 25  # interleaved: rounds, each one block of calls per system
    mix_block: int = 200  # interleaved: calls per block

    @classmethod
    def make(cls, quick: bool, jobs: int | None) -> Plan:
        """The plan for ``--quick`` or the full suite; ``jobs`` overrides per-measurement counts."""
        if quick:
            p = cls(
                quick=True, lat_n=1000, pipe_n=10000, map_n=20000, cold_n=8, peer_lat_n=100,
                peer_tput_n=500, lat_jobs=("noop",), tput_jobs=("noop",), map_jobs=("noop",),
                floor_n=2000, deadline_s=20.0, light_n=20, light_cold_n=5, heavy_n=0,
                scaling_jobs=200, scaling_slots=(1, 4), scaling_modes=("concurrency",),
                log_records=30_000, log_jobs=25_600, rec_finished=20_000, rec_live=2_000, rec_wait_s=60.0,
                mix_rounds=5,
            )
        else:
            p = cls(
                quick=False, lat_n=5000, pipe_n=20000, map_n=200000, cold_n=100, peer_lat_n=1000,
                peer_tput_n=5000, lat_jobs=("noop", "fibo10", "transform"),
                tput_jobs=("noop", "transform"), map_jobs=("noop", "transform"), floor_n=20000,
                deadline_s=120.0, light_n=500, light_cold_n=500, heavy_n=100,
                scaling_jobs=2000, scaling_slots=(1, 2, 4, 8, 16),
                scaling_modes=("concurrency", "workers"),
            )
        if jobs:
            p.lat_n = p.pipe_n = p.map_n = p.peer_lat_n = p.peer_tput_n = jobs
            p.cold_n = min(p.cold_n, jobs)
        return p


@dataclass
class Ctx:
    """What a scenario needs: the plan, fsync modes, output dirs, results, progress callback."""

    plan: Plan
    fsync: list[str]
    out: Path
    raw: Path
    res: Results = field(default_factory=Results)
    progress: Callable[[str], None] = lambda s: None


class CpuMeter:
    """CPU time per job of the bench (client) process and each child, over one measurement.

    :meth:`per_job_us` gives ``{"client": us, "<child name>": us, ...}``: user+system
    CPU microseconds per job (Linux clock ticks, so +-10 ms over the whole run).
    """

    def __init__(self, *chs: Children) -> None:
        self.chs = chs
        t = os.times()
        self.client0 = t.user + t.system
        self.kids0 = self._kids()

    def _kids(self) -> dict[str, float]:
        return {k: v for ch in self.chs for k, v in ch.cpu().items()}

    def per_job_us(self, n: int) -> dict[str, float]:
        """CPU microseconds per job since construction, for ``n`` jobs."""
        t = os.times()
        out = {"client": (t.user + t.system - self.client0) / n * 1e6}
        for name, sec in self._kids().items():
            if name in self.kids0:
                out[name] = (sec - self.kids0[name]) / n * 1e6
        return out


def _missing(ctx: Ctx, scenario: str, *modules: str) -> bool:
    """True (and a note) when an optional module a baseline needs is not installed."""
    import importlib.util

    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    if gone:
        ctx.res.notes.append(f"{scenario}: skipped, not installed: {', '.join(gone)} "
                             "(pip install -e '.[bench]')")
    return bool(gone)


def _warm_n(n: int) -> int:
    return max(20, min(1000, n // 10))


def _check(got: Any, expected: Any, what: str) -> None:
    if got != expected:
        raise RuntimeError(f"{what}: wrong result {str(got)[:200]!r}, expected {str(expected)[:200]!r}")


# --- 1. for-loop floor --------------------------------------------------------------


def run_floor(ctx: Ctx, jobs: set[str]) -> None:
    """Scenario 1: each job function called in a Python loop in this process."""
    p = ctx.plan
    for job in sorted(jobs):
        fn, args = JOB_FUNC[job], JOB_ARGS[job]
        n = {"fibo33": 5, "sleep10ms": 20}.get(job, p.floor_n)
        ctx.progress(f"floor {job}")
        timed_loop(partial(fn, **args), _warm_n(n), Latency(), p.deadline_s)
        lat = Latency()
        timed_loop(partial(fn, **args), n, lat, p.deadline_s)
        s = lat.summary()
        ctx.res.floor[job] = {"p50_us": s["p50_us"], "mean_us": s["mean_us"]}
        ctx.res.add_latency(f"floor/latency/{job}", "floor", f"for-loop floor, {job}", job, lat)
    # The cold paths' floor: start a fresh interpreter that imports the job module and runs it.
    ctx.progress("floor process start")
    argv = [PY, "-c", "import bench.jobs as j; j.noop()"]
    env = child_env()
    def run() -> None:
        subprocess.run(argv, cwd=REPO_ROOT, env=env, check=True)

    run()
    lat = Latency()
    timed_loop(run, p.cold_n, lat, p.deadline_s)
    ctx.res.add_latency("floor/process/noop", "floor",
                        "process floor: fresh `python -c 'import bench.jobs; noop()'`", "noop", lat)


# --- 2. raw ZeroMQ relay ------------------------------------------------------------


def _job_body(job: str) -> bytes:
    """The JSON a job message carries: script spec and args (same bytes for relay and Lambda)."""
    return orjson.dumps({"script": JOB_SCRIPT[job], "job": job, "args": JOB_ARGS[job]})


def run_relay(ctx: Ctx) -> None:
    """Scenario 2: DEALER -> relay process -> DEALER worker process -> back; Python and C relays."""
    from bench.relay import RelayClient

    p = ctx.plan
    for mode, name in (("py", "relay-py"), ("c", "relay-c")):
        with Children(ctx.raw) as ch:
            ctx.progress(f"{name} start")
            relay = ch.start(name, [PY, "-m", "bench.relay", "--mode", mode])
            m = relay.wait_for(r"READY front=(\S+) back=(\S+)")
            wargs = [PY, "-m", "bench.relay_worker", "--connect", m[2]]
            ch.start(f"{name}-worker", wargs + (["--no-ready"] if mode == "c" else [])).wait_for("READY")
            what = "Python Poller relay" if mode == "py" else "C zmq.proxy relay"
            with RelayClient(m[1]) as cl:
                for job in dict.fromkeys(p.lat_jobs + p.tput_jobs):
                    body = _job_body(job)
                    expected = orjson.dumps(JOB_FUNC[job](**JOB_ARGS[job]))
                    _check(cl.call(body), expected, name)
                    if job in p.lat_jobs:
                        ctx.progress(f"{name} latency {job}")
                        timed_loop(partial(cl.call, body), _warm_n(p.lat_n), Latency(), p.deadline_s)
                        lat = Latency()
                        timed_loop(partial(cl.call, body), p.lat_n, lat, p.deadline_s)
                        ctx.res.add_latency(
                            f"{name}/latency/{job}", "relay", f"{what}, 1 in flight, {job}", job, lat
                        )
                        if job == "noop" and mode == "py":
                            ctx.progress(f"{name} paced {job}")
                            lat = Latency()
                            paced_loop(partial(cl.call, body), p.lat_n, 1 / p.pace_hz, lat, p.deadline_s)
                            ctx.res.add_latency(
                                f"{name}/paced/{job}", "relay",
                                f"{what}, paced {p.pace_hz:g}/s (from intended send), {job}", job, lat,
                            )
                    if job in p.tput_jobs:
                        ctx.progress(f"{name} pipelined {job}")
                        cl.pipelined(body, _warm_n(p.pipe_n), p.window, p.deadline_s)
                        cpu = CpuMeter(ch)
                        n, secs = cl.pipelined(body, p.pipe_n, p.window, p.deadline_s)
                        ctx.res.add_throughput(
                            f"{name}/pipelined/{job}", "relay",
                            f"{what}, pipelined {p.window} in flight, {job}", job, n, secs,
                            cpu_us_per_job=cpu.per_job_us(n),
                        )


# --- 3./4. zmqrun warm and cold ------------------------------------------------------


def _wait_workers(client: Any, n: int, ch: Children, timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) until the router lists ``n`` workers; fail early if a child died."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.status()
        if len(st.get("workers", [])) >= n:
            return st
        for c in ch.children:
            if not c.alive():
                raise ChildError(f"{c.name} exited with {c.proc.returncode}:\n{c.tail()}")
        if time.monotonic() > deadline:
            raise ChildError(f"only {len(st.get('workers', []))}/{n} workers after {timeout_s:.0f}s: {st}")
        time.sleep(0.05)


@dataclass
class Stack:
    """A running zmqrun router + workers and a connected Client (``client``)."""

    ctx: Ctx
    tag: str
    fsync: str
    addr: str
    data: str
    ch: Children
    router: Any
    client: Any

    def _start_router(self) -> None:
        self.router = self.ch.start(
            f"{self.tag}-router",
            [PY, "-m", "zmqrun", "router", "--bind", self.addr, "--data-dir", self.data, "--fsync", self.fsync],
        )
        self.router.wait_for("listening", 60)

    def verify_archive(self, script: str, expected: Any, sample: int = 20) -> tuple[bool, str]:
        """Restart the router from its data dir and check the recovered archive.

        Passes when the restarted router, rebuilt from the log alone, counts as
        many finished jobs as the live one did and sampled records of ``script``
        carry ``expected`` as their result.
        """
        from zmqrun import Client

        live = _finished(self.client)
        self.client.close()
        self.router.stop(timeout_s=30)
        self._start_router()
        self.client = Client(self.addr, timeout=min(60.0, 1.5 * self.ctx.plan.deadline_s))
        recovered = _finished(self.client)
        recs = self.client.list_jobs(status="success", script=script, limit=sample)
        good = sum(1 for r in recs if self.client.get(r.id).result == expected)
        ok = recovered == live and good == len(recs) > 0
        return ok, (f"router restarted from its log: {recovered:,} finished jobs recovered of {live:,} archived "
                    f"live; {good}/{len(recs)} sampled records hold the expected result")


def _finished(client: Any) -> int:
    return int(client.status()["counts"]["finished"])


@contextmanager
def zmqrun_stack(ctx: Ctx, tag: str, fsync: str, workers: list[list[str]]) -> Iterator[Stack]:
    """Router (data dir in a temp dir under the output dir) + ``workers``; yields a :class:`Stack`."""
    from zmqrun import Client

    with tempfile.TemporaryDirectory(prefix="tmp-data-", dir=ctx.out) as data, Children(ctx.raw) as ch:
        st = Stack(ctx, tag, fsync, f"tcp://127.0.0.1:{free_port()}", data, ch, None, None)
        st._start_router()
        for i, w in enumerate(workers):
            if "--dedicated" not in w:  # a normal worker runs only scripts under its roots: the bench jobs
                w = [*w, "--scripts", "bench.jobs"]
            ch.start(f"{tag}-worker{i}", [PY, "-m", "zmqrun", "worker", "--connect", st.addr, *w])
        st.client = Client(st.addr, timeout=min(60.0, 1.5 * ctx.plan.deadline_s))
        try:
            _wait_workers(st.client, len(workers), ch)
            yield st
        finally:
            st.client.close()


def run_zmqrun_warm(ctx: Ctx) -> None:
    """Scenario 3: one dedicated worker; 1 in flight, pipelined submits, batched Client.map; per fsync mode."""
    p = ctx.plan
    jobs = dict.fromkeys(p.lat_jobs + p.tput_jobs + p.map_jobs)
    for fsync in ctx.fsync:
        for job in jobs:
            script, args = JOB_SCRIPT[job], JOB_ARGS[job]
            expected = JOB_FUNC[job](**args)
            tag = f"warm-{fsync}-{job}"
            ctx.progress(f"zmqrun warm {fsync} {job} start")
            with zmqrun_stack(ctx, tag, fsync, [["--dedicated", script]]) as stack:
                c = stack.client
                _check(c.run(script, args), expected, tag)
                if job in p.lat_jobs:
                    ctx.progress(f"zmqrun warm {fsync} latency {job}")
                    timed_loop(partial(c.run, script, args), _warm_n(p.lat_n), Latency(), p.deadline_s)
                    lat = Latency()
                    timed_loop(partial(c.run, script, args), p.lat_n, lat, p.deadline_s)
                    ctx.res.add_latency(
                        f"zmqrun-warm/latency/{job}/{fsync}", "zmqrun-warm",
                        f"zmqrun warm, 1 in flight, {job}, fsync={fsync}", job, lat, fsync,
                    )
                    if job == "noop":
                        ctx.progress(f"zmqrun warm {fsync} paced {job}")
                        lat = Latency()
                        paced_loop(partial(c.run, script, args), p.lat_n, 1 / p.pace_hz, lat, p.deadline_s)
                        ctx.res.add_latency(
                            f"zmqrun-warm/paced/{job}/{fsync}", "zmqrun-warm",
                            f"zmqrun warm, paced {p.pace_hz:g}/s (from intended send), {job}, fsync={fsync}",
                            job, lat, fsync,
                        )
                if job in p.tput_jobs:
                    ctx.progress(f"zmqrun warm {fsync} pipelined {job}")
                    c.map(script, [args] * _warm_n(p.pipe_n), batch_size=1, window=p.window)
                    gc.collect()
                    cpu = CpuMeter(stack.ch)
                    t0 = time.perf_counter()
                    out = c.map(script, [args] * p.pipe_n, batch_size=1, window=p.window)
                    secs = time.perf_counter() - t0
                    cpu_us = cpu.per_job_us(p.pipe_n)
                    _check(out, [expected] * p.pipe_n, tag)
                    ctx.res.add_throughput(
                        f"zmqrun-warm/pipelined/{job}/{fsync}", "zmqrun-warm",
                        f"zmqrun warm, pipelined submits ({p.window} in flight), {job}, fsync={fsync}",
                        job, p.pipe_n, secs, fsync, cpu_us_per_job=cpu_us,
                    )
                if job in p.map_jobs:
                    ctx.progress(f"zmqrun warm {fsync} Client.map {job}")
                    c.map(script, [args] * _warm_n(p.map_n))
                    before = _finished(c)
                    gc.collect()
                    cpu = CpuMeter(stack.ch)
                    t0 = time.perf_counter()
                    out = c.map(script, [args] * p.map_n)
                    secs = time.perf_counter() - t0
                    cpu_us = cpu.per_job_us(p.map_n)
                    _check(out, [expected] * p.map_n, tag)
                    delta = _finished(c) - before
                    ctx.progress(f"zmqrun warm {fsync} archive check {job}")
                    ok, note = stack.verify_archive(script, expected)
                    ok = ok and delta == p.map_n
                    note = f"{delta:,}/{p.map_n:,} map jobs archived live; {note}"
                    ctx.res.add_throughput(
                        f"zmqrun-warm/map/{job}/{fsync}", "zmqrun-warm",
                        f"zmqrun warm, Client.map batched, {job}, fsync={fsync}",
                        job, p.map_n, secs, fsync, archived=ok, archive_note=note, cpu_us_per_job=cpu_us,
                    )


MIX_RELAY = "interleaved/latency/relay-py"
MIX_FLOOR = "interleaved/latency/relay-fsync"
MIX_WARM = "interleaved/latency/zmqrun-warm/{fsync}"
"""Row keys of the interleaved scenario (``MIX_WARM`` per fsync mode)."""


def run_interleaved(ctx: Ctx) -> None:
    """Scenario 3b: the headline latencies measured in the same minutes, one job in flight, noop.

    Alive at once: the raw Python relay, the same relay with one write+fdatasync per drain of its
    client socket (``bench.relay --sync-dir``: the *durability floor*, what making each job durable
    before its reply costs on this machine with no bookkeeping at all), and a zmqrun warm stack per
    fsync mode.  This process calls them in turn, ``mix_block`` calls each, for ``mix_rounds``
    rounds, so the drift of a shared 2-core machine hits all of them alike (measured minutes apart,
    the same relay moved 283-368 us p50 between runs).  Rows: :data:`MIX_RELAY`, :data:`MIX_FLOOR`,
    :data:`MIX_WARM`.
    """
    from bench.relay import RelayClient

    p = ctx.plan
    body = _job_body("noop")
    script, args = JOB_SCRIPT["noop"], JOB_ARGS["noop"]
    expected = JOB_FUNC["noop"](**args)
    calls: dict[str, Callable[[], Any]] = {}
    labels: dict[str, tuple[str, str, str | None]] = {}
    with ExitStack() as stack:
        ch = stack.enter_context(Children(ctx.raw))
        sync_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tmp-sync-", dir=ctx.out))
        for key, name, extra, what in (
            (MIX_RELAY, "mix-relay", [], "Python Poller relay, interleaved, 1 in flight, noop"),
            (MIX_FLOOR, "mix-relay-fsync", ["--sync-dir", sync_dir],
             "durability floor: Python relay + one write+fdatasync per job, interleaved, 1 in flight, noop"),
        ):
            ctx.progress(f"interleaved {name} start")
            relay = ch.start(name, [PY, "-m", "bench.relay", "--mode", "py", *extra])
            m = relay.wait_for(r"READY front=(\S+) back=(\S+)", 60)
            ch.start(f"{name}-worker", [PY, "-m", "bench.relay_worker", "--connect", m[2]]).wait_for("READY")
            cl = stack.enter_context(RelayClient(m[1]))
            _check(orjson.loads(cl.call(body)), expected, name)
            calls[key] = partial(cl.call, body)
            labels[key] = ("relay", what, None)
        for fsync in ctx.fsync:
            ctx.progress(f"interleaved zmqrun warm {fsync} start")
            st = stack.enter_context(zmqrun_stack(ctx, f"mix-{fsync}", fsync, [["--dedicated", script]]))
            _check(st.client.run(script, args), expected, f"interleaved {fsync}")
            key = MIX_WARM.format(fsync=fsync)
            calls[key] = partial(st.client.run, script, args)
            labels[key] = ("zmqrun-warm", f"zmqrun warm, interleaved, 1 in flight, noop, fsync={fsync}", fsync)
        for key, call in calls.items():
            ctx.progress(f"interleaved warm-up {key}")
            timed_loop(call, _warm_n(p.lat_n), Latency(), p.deadline_s)
        lats = {key: Latency() for key in calls}
        stop_at = time.monotonic() + p.deadline_s
        for rnd in range(p.mix_rounds):
            ctx.progress(f"interleaved round {rnd + 1}/{p.mix_rounds}")
            for key, call in calls.items():
                timed_loop(call, p.mix_block, lats[key], p.deadline_s)
            if time.monotonic() > stop_at:  # whole rounds only: every system gets as many calls
                break
        for key, lat in lats.items():
            scenario, label, fsync = labels[key]
            ctx.res.add_latency(key, scenario, label, "noop", lat, fsync)


def run_zmqrun_cold(ctx: Ctx) -> None:
    """Scenario 4: one normal worker, a fresh process per job; 1 in flight, per fsync mode."""
    p = ctx.plan
    script, args = JOB_SCRIPT["noop"], JOB_ARGS["noop"]
    for fsync in ctx.fsync:
        tag = f"cold-{fsync}"
        ctx.progress(f"zmqrun cold {fsync}")
        with zmqrun_stack(ctx, tag, fsync, [[]]) as stack:
            c = stack.client
            for _ in range(3):
                _check(c.run(script, args), None, tag)
            lat = Latency()
            timed_loop(partial(c.run, script, args), p.cold_n, lat, p.deadline_s)
            ctx.res.add_latency(
                f"zmqrun-cold/latency/noop/{fsync}", "zmqrun-cold",
                f"zmqrun cold (fresh process per job), noop, fsync={fsync}", "noop", lat, fsync,
            )


# --- 5. Lambda-style baseline ------------------------------------------------------------


@contextmanager
def lambda_emulator(ctx: Ctx, mode: str, runtimes: int = 1) -> Iterator[tuple[int, Children]]:
    """Start :mod:`bench.lambda_emu` (which starts the awslambdaric runtimes); yields (port, children)."""
    with Children(ctx.raw) as ch:
        emu = ch.start(
            f"lambda-{mode}-{runtimes}rt",
            [PY, "-m", "bench.lambda_emu", "--mode", mode, "--runtimes", str(runtimes)],
        )
        yield int(emu.wait_for(r"READY port=(\d+)", 40)[1]), ch


def _lambda_body(job: str) -> bytes:
    return orjson.dumps({"job": job, "args": JOB_ARGS[job]})


def run_lambda_warm(ctx: Ctx) -> None:
    """Scenario 5 (warm): long-lived awslambdaric runtime(s) behind the emulator; HTTP invokes."""
    import uvloop

    from bench.httpc import Invoker, invoke_many

    p = ctx.plan
    if _missing(ctx, "lambda-warm", "awslambdaric"):
        return
    ctx.progress("lambda warm start")
    with lambda_emulator(ctx, "warm", 1) as (port, _):
        inv = Invoker(port)
        try:
            for job in p.lat_jobs:
                body = _lambda_body(job)
                expected = JOB_FUNC[job](**JOB_ARGS[job])
                _check(orjson.loads(inv.invoke(body)), expected, "lambda-warm")
                ctx.progress(f"lambda warm latency {job}")
                timed_loop(partial(inv.invoke, body), _warm_n(p.lat_n), Latency(), p.deadline_s)
                lat = Latency()
                timed_loop(partial(inv.invoke, body), p.lat_n, lat, p.deadline_s)
                ctx.res.add_latency(
                    f"lambda-warm/latency/{job}", "lambda-warm",
                    f"Lambda-style warm (awslambdaric), 1 in flight, {job}", job, lat,
                )
                if job == "noop":
                    ctx.progress(f"lambda warm paced {job}")
                    lat = Latency()
                    paced_loop(partial(inv.invoke, body), p.lat_n, 1 / p.pace_hz, lat, p.deadline_s)
                    ctx.res.add_latency(
                        f"lambda-warm/paced/{job}", "lambda-warm",
                        f"Lambda-style warm, paced {p.pace_hz:g}/s (from intended send), {job}", job, lat,
                    )
        finally:
            inv.close()
    for rt in p.lambda_runtimes:
        ctx.progress(f"lambda warm throughput {rt} runtime(s)")
        with lambda_emulator(ctx, "warm", rt) as (port, ch):
            conns = 2 * rt
            for job in p.tput_jobs:
                body = _lambda_body(job)
                uvloop.run(invoke_many(port, body, _warm_n(p.pipe_n), conns, p.deadline_s))
                gc.collect()
                cpu = CpuMeter(ch)
                t0 = time.perf_counter()
                n = uvloop.run(invoke_many(port, body, p.pipe_n, conns, p.deadline_s))
                secs = time.perf_counter() - t0
                ctx.res.add_throughput(
                    f"lambda-warm/throughput/{job}/{rt}rt", "lambda-warm",
                    f"Lambda-style warm, {rt} runtime(s), {conns} keep-alive connections, {job}",
                    job, n, secs, runtimes=rt, connections=conns, cpu_us_per_job=cpu.per_job_us(n),
                )


def run_lambda_cold(ctx: Ctx) -> None:
    """Scenario 5 (cold): a new awslambdaric runtime process per invocation."""
    from bench.httpc import Invoker

    p = ctx.plan
    if _missing(ctx, "lambda-cold", "awslambdaric"):
        return
    ctx.progress("lambda cold")
    with lambda_emulator(ctx, "cold") as (port, _):
        inv = Invoker(port)
        try:
            body = _lambda_body("noop")
            for _ in range(2):
                _check(orjson.loads(inv.invoke(body)), None, "lambda-cold")
            lat = Latency()
            timed_loop(partial(inv.invoke, body), p.cold_n, lat, p.deadline_s)
            ctx.res.add_latency(
                "lambda-cold/latency/noop", "lambda-cold",
                "Lambda-style cold (new runtime process per invocation), noop", "noop", lat,
            )
        finally:
            inv.close()


# --- 6. peers: Celery and RQ -----------------------------------------------------------------


@contextmanager
def redis_server(ctx: Ctx) -> Iterator[tuple[str | None, Children | None]]:
    """A private redis-server on 127.0.0.1 (no persistence); yields (URL, children), or (None, None)
    when redis-server is not on PATH."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield None, None
        return
    with tempfile.TemporaryDirectory(prefix="tmp-redis-", dir=ctx.out) as d, Children(ctx.raw) as ch:
        port = free_port()
        r = ch.start(
            "redis-server",
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", d, "--daemonize", "no", "--protected-mode", "yes"],
        )
        r.wait_for("Ready to accept connections", 20)
        yield f"redis://127.0.0.1:{port}/0", ch


def _peer_rows(ctx: Ctx, name: str, label: str, call: Callable[[], Any], submit: Callable[[], Any],
               wait: Callable[[Any], Any], chs: tuple[Children, ...]) -> None:
    p = ctx.plan
    ctx.progress(f"{name} latency")
    timed_loop(call, _warm_n(p.peer_lat_n), Latency(), p.deadline_s)
    lat = Latency()
    timed_loop(call, p.peer_lat_n, lat, p.deadline_s)
    ctx.res.add_latency(f"{name}/latency/noop", name, f"{label}, 1 in flight, noop", "noop", lat)
    ctx.progress(f"{name} throughput")
    gc.collect()
    cpu = CpuMeter(*chs)
    t0 = time.perf_counter()
    handles = [submit() for _ in range(p.peer_tput_n)]
    for h in handles:
        wait(h)
    secs = time.perf_counter() - t0
    ctx.res.add_throughput(
        f"{name}/throughput/noop", name, f"{label}, submit {p.peer_tput_n} then wait all, noop",
        "noop", p.peer_tput_n, secs, cpu_us_per_job=cpu.per_job_us(p.peer_tput_n),
    )


def run_celery(ctx: Ctx) -> None:
    """Scenario 6: Celery 5, Redis broker and result backend, one solo-pool worker."""
    if _missing(ctx, "celery", "celery", "redis"):
        return
    with redis_server(ctx) as (url, rch):
        if url is None or rch is None:
            ctx.res.notes.append("celery: skipped, redis-server is not on PATH")
            return
        from bench.peer_tasks import make_app

        ctx.progress("celery start")
        with Children(ctx.raw) as ch:
            ch.start(
                "celery-worker",
                [PY, "-m", "celery", "-A", "bench.peer_tasks", "worker", "--pool", "solo",
                 "--concurrency", "1", "--loglevel", "WARNING", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                env={"BENCH_REDIS_URL": url},
            )
            app = make_app(url)
            try:
                _check(app.send_task("bench.noop").get(timeout=60), None, "celery")
                _peer_rows(
                    ctx, "celery", "Celery solo pool (Redis)",
                    lambda: app.send_task("bench.noop").get(timeout=30),
                    lambda: app.send_task("bench.noop"),
                    lambda r: r.get(timeout=ctx.plan.deadline_s),
                    (ch, rch),
                )
            finally:
                app.close()


def run_rq(ctx: Ctx) -> None:
    """Scenario 6: RQ with one SimpleWorker (no fork per job), Redis on loopback."""
    if _missing(ctx, "rq", "rq", "redis"):
        return
    with redis_server(ctx) as (url, rch):
        if url is None or rch is None:
            ctx.res.notes.append("rq: skipped, redis-server is not on PATH")
            return
        from redis import Redis
        from rq import Queue
        from rq.results import Result

        ctx.progress("rq start")
        with Children(ctx.raw) as ch:
            ch.start(
                "rq-worker",
                [PY, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "-u", url,
                 "--logging_level", "WARNING", "bench"],
            )
            conn = Redis.from_url(url)
            q = Queue("bench", connection=conn)

            def wait(job: Any, timeout: int = 30) -> None:
                r = job.latest_result(timeout=timeout)
                if r is None or r.type != Result.Type.SUCCESSFUL:
                    raise RuntimeError(f"rq job {job.id} did not succeed: {r}")

            try:
                wait(q.enqueue("bench.jobs.noop"), 60)
                _peer_rows(
                    ctx, "rq", "RQ SimpleWorker (Redis)",
                    lambda: wait(q.enqueue("bench.jobs.noop")),
                    lambda: q.enqueue("bench.jobs.noop"),
                    lambda j: wait(j, int(ctx.plan.deadline_s)),
                    (ch, rch),
                )
            finally:
                conn.close()


# --- 7. Windmill's published workloads --------------------------------------------------------


def _sequential(call: Callable[[], Any], n: int, deadline_s: float) -> tuple[Latency, list[int]]:
    """Run ``call`` n times back to back; returns latencies and the cumulative end times (ns from start)."""
    clock = time.perf_counter_ns
    lat, ends = Latency(), []
    gc.collect()
    start = clock()
    for _ in range(n):
        t0 = clock()
        call()
        t1 = clock()
        lat.record_ns(t1 - t0)
        ends.append(t1 - start)
        if t1 - start > deadline_s * 1e9:
            break
    return lat, ends


def run_windmill(ctx: Ctx) -> None:
    """Scenario 7: sequential fibo(10) (light) and fibo(33) (heavy) jobs, warm vs cold vs Lambda-style."""
    from bench.httpc import Invoker

    p = ctx.plan
    fsync = ctx.fsync[0]
    workloads = [("fibo10", p.light_n, p.light_cold_n, 40)]
    if p.heavy_n:
        workloads.append(("fibo33", p.heavy_n, p.heavy_n, 10))
    deadline = max(p.deadline_s, 600.0) if not p.quick else p.deadline_s

    def measure(runner: str, call_for: Callable[[str], Callable[[], Any]], cold: bool) -> None:
        for job, n, n_cold, k in workloads:
            count = n_cold if cold else n
            ctx.progress(f"windmill {runner} {job} x{count}")
            call = call_for(job)
            lat, ends = _sequential(call, count, deadline)
            ctx.res.add_latency(
                f"windmill/{runner}/{job}", "windmill", f"Windmill workload, {runner}, {job}", job, lat,
                fsync if runner.startswith("zmqrun") else None,
            )
            s = lat.summary()
            ctx.res.windmill.append({
                "runner": runner, "job": job, "n": len(ends), "p50_ms": s["p50_us"] / 1e3,
                "mean_ms": s["mean_us"] / 1e3, "total_s": ends[-1] / 1e9,
                "first_k": min(k, len(ends)), "total_first_k_s": ends[min(k, len(ends)) - 1] / 1e9,
            })

    def fn_call(job: str) -> Callable[[], Any]:
        fn, args = JOB_FUNC[job], JOB_ARGS[job]
        return partial(fn, **args)

    measure("for-loop", fn_call, False)

    def zmq_call(st: Stack) -> Callable[[str], Callable[[], Any]]:
        return lambda job: partial(st.client.run, JOB_SCRIPT[job], JOB_ARGS[job])

    with zmqrun_stack(ctx, f"windmill-warm-{fsync}", fsync, [["--dedicated", "bench.jobs:fibo"]]) as st:
        st.client.run("bench.jobs:fibo", {"n": 10})
        measure("zmqrun warm (dedicated)", zmq_call(st), False)
    with zmqrun_stack(ctx, f"windmill-cold-{fsync}", fsync, [[]]) as st:
        st.client.run("bench.jobs:fibo", {"n": 10})
        measure("zmqrun cold (normal)", zmq_call(st), True)

    def lam_call(inv: Invoker) -> Callable[[str], Callable[[], Any]]:
        return lambda job: partial(inv.invoke, _lambda_body(job))

    for mode in () if _missing(ctx, "windmill (Lambda-style rows)", "awslambdaric") else ("warm", "cold"):
        with lambda_emulator(ctx, mode) as (port, _):
            inv = Invoker(port)
            try:
                inv.invoke(_lambda_body("fibo10"))
                measure(f"Lambda-style {mode}", lam_call(inv), mode == "cold")
            finally:
                inv.close()


# --- 8. scaling ----------------------------------------------------------------------------------


def run_scaling(ctx: Ctx) -> None:
    """Scenario 8: N sleep(10 ms) jobs over 1..16 slots; efficiency = (N * 10 ms / slots) / elapsed."""
    p = ctx.plan
    fsync = ctx.fsync[0]
    script, args = JOB_SCRIPT["sleep10ms"], JOB_ARGS["sleep10ms"]
    for mode in p.scaling_modes:
        for slots in p.scaling_slots:
            if mode == "concurrency":
                workers = [["--dedicated", script, "--concurrency", str(slots)]]
                what = f"1 dedicated worker --concurrency {slots}"
            else:
                workers = [["--dedicated", script]] * slots
                what = f"{slots} dedicated worker{'s' if slots > 1 else ''}"
            ctx.progress(f"scaling {what}")
            with zmqrun_stack(ctx, f"scaling-{mode}-{slots}", fsync, workers) as st:
                c = st.client
                c.map(script, [args] * (2 * slots))
                t0 = time.perf_counter()
                out = c.map(script, [args] * p.scaling_jobs)
                secs = time.perf_counter() - t0
                _check(out, [args["ms"]] * p.scaling_jobs, "scaling")
            ideal = p.scaling_jobs * args["ms"] / 1000 / slots
            ctx.res.scaling.append({
                "mode": mode, "slots": slots, "what": what, "n": p.scaling_jobs, "seconds": secs,
                "ideal_s": ideal, "efficiency": ideal / secs, "jobs_per_s": p.scaling_jobs / secs,
                "fsync": fsync,
            })


def jobs_needed(names: list[str], plan: Plan) -> set[str]:
    """Job names whose floor the selected scenarios need."""
    jobs = set(plan.lat_jobs + plan.tput_jobs + plan.map_jobs) | {"noop"}
    if "windmill" in names:
        jobs |= {"fibo10"} | ({"fibo33"} if plan.heavy_n else set())
    if "scaling" in names:
        jobs.add("sleep10ms")
    return jobs


def run_log_writer(ctx: Ctx) -> None:
    """Scenario 9: the job-log writer in process (see :mod:`bench.logbench`)."""
    from bench.logbench import run_log_writer as run

    run(ctx)


def run_recovery(ctx: Ctx) -> None:
    """Scenario 10: router restart time and RSS with a big archive (see :mod:`bench.logbench`)."""
    from bench.logbench import run_recovery as run

    run(ctx)


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "relay": run_relay,
    "zmqrun-warm": run_zmqrun_warm,
    "interleaved": run_interleaved,
    "zmqrun-cold": run_zmqrun_cold,
    "lambda-warm": run_lambda_warm,
    "lambda-cold": run_lambda_cold,
    "celery": run_celery,
    "rq": run_rq,
    "windmill": run_windmill,
    "scaling": run_scaling,
    "log-writer": run_log_writer,
    "recovery": run_recovery,
}
"""Scenario name -> runner (the floor runs first, always)."""
