"""Job-log scenarios (issue 4): the log writer in process, and router recovery with a big archive.

``log-writer`` (in this process, no sockets):

- writer throughput: ``zmqrun.joblog.JobLog`` in ``always`` mode, ~100-byte
  records, ``flush(need_durable=True)`` every 100 records, against a raw loop
  of ``os.write`` of a buffer the size of one such batch + ``os.fdatasync`` on
  a file in the same directory (interleaved rounds, median of each);
- persistence CPU per job: the records a busy router writes per job (one
  SUBMIT per batch of jobs, one DISPATCH, one FINISH), 256 jobs per loop
  iteration and one durable flush per iteration; ``time.process_time()`` spent
  in the orjson encoding and the log calls, per job.

``recovery`` (the real system, every process started by Popen and stopped by
its PID): a router and one dedicated no-op worker; N jobs run through
``Client.map`` (finished, archived) and M jobs submitted with a one-day delay
(live, scheduled).  The router is SIGKILLed and restarted, then stopped with
SIGTERM and restarted; each restart is timed from Popen until the router
answers ``Client.status()``, and its RSS (VmRSS, VmHWM) is read from
``/proc/<pid>/status`` at that moment.  A router on an empty data dir gives the
start-up floor (interpreter, imports, bind).

Units: records/s, jobs/s, microseconds (``*_us``), seconds, MB = 10^6 bytes.
"""

from __future__ import annotations

import gc
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.jobs import JOB_SCRIPT
from bench.procs import PY, Child, ChildError, Children, free_port

WRITER_BATCH = 100
"""Records per durable flush in the writer-throughput measurement."""

RECORD_PAYLOAD = 100
"""Bytes of each record payload in the writer-throughput measurement."""

ROUTER_BATCH = 256
"""Jobs per router loop iteration in the persistence-CPU measurement."""

LIVE_DELAY_S = 86_400.0
"""Delay of the live jobs in the recovery scenario (seconds): they stay scheduled."""

TARGET_FINISHED = 1_000_000
TARGET_LIVE = 100_000
"""The recovery targets of issue 4 are stated for this many finished and live jobs."""


# --- in-process writer ------------------------------------------------------------------------


def _payload(size: int) -> bytes:
    """A JSON-looking record payload of exactly ``size`` bytes (``size`` >= 64)."""
    head = b'{"at":1764412345.123456,"worker":"bench-worker","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _open_log(path: Path, mode: str = "always") -> Any:
    from zmqrun.joblog import FsyncPolicy, JobLog

    jl = JobLog(path, FsyncPolicy(mode))
    for _ in jl.recover():
        pass
    jl.start()
    return jl


def _count_records(path: Path) -> int:
    """Records a fresh JobLog recovers from ``path`` (checks what a measurement wrote)."""
    from zmqrun.joblog import FsyncPolicy, JobLog

    jl = JobLog(path, FsyncPolicy("always"))
    try:
        return sum(1 for _ in jl.recover())
    finally:
        jl.close()


def writer_round(path: Path, n: int, deadline_s: float) -> dict[str, Any]:
    """Append ``n`` records of :data:`RECORD_PAYLOAD` bytes to a new JobLog in ``path`` (fsync always),
    ``flush(need_durable=True)`` every :data:`WRITER_BATCH` records, then ``close()``.

    Returns ``records``, ``seconds`` (wall, appends to close included), ``cpu_s``
    (process CPU seconds), ``unsynced_flushes`` (flushes that returned with
    ``durable_seq < last_seq``) and ``recovered`` (records a fresh JobLog reads back).
    """
    from zmqrun.joblog import DISPATCH

    payload = _payload(RECORD_PAYLOAD)
    jl = _open_log(path)
    append, flush = jl.append, jl.flush
    unsynced = 0
    done = 0
    gc.collect()
    end = time.perf_counter() + deadline_s
    c0, t0 = time.process_time(), time.perf_counter()
    while done < n:
        for _ in range(min(WRITER_BATCH, n - done)):
            append(DISPATCH, payload)
        done += min(WRITER_BATCH, n - done)
        flush(need_durable=True)
        durable, last = getattr(jl, "durable_seq", None), getattr(jl, "last_seq", None)
        if durable is not None and last is not None and durable < last:
            unsynced += 1
        if time.perf_counter() > end:
            break
    jl.close()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"records": done, "seconds": secs, "cpu_s": cpu, "unsynced_flushes": unsynced,
            "recovered": _count_records(path)}


def raw_round(path: Path, n: int, deadline_s: float) -> dict[str, Any]:
    """The baseline: ``os.write`` of one batch-sized buffer + ``os.fdatasync``, once per
    :data:`WRITER_BATCH` records, on an O_APPEND file; returns ``records`` and ``seconds``."""
    from zmqrun import joblog

    header = getattr(joblog, "BATCH_HEADER_SIZE", 32)
    buf = b"x" * (header + WRITER_BATCH * (5 + RECORD_PAYLOAD))  # the size of one framed batch
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    done = 0
    try:
        end = time.perf_counter() + deadline_s
        t0 = time.perf_counter()
        while done < n:
            os.write(fd, buf)
            os.fdatasync(fd)
            done += WRITER_BATCH
            if time.perf_counter() > end:
                break
        secs = time.perf_counter() - t0
    finally:
        os.close(fd)
    expected = done // WRITER_BATCH * len(buf)
    if path.stat().st_size != expected:
        raise RuntimeError(f"raw loop: file holds {path.stat().st_size} bytes, expected {expected}")
    return {"records": done, "seconds": secs}


def _router_batches(n_jobs: int) -> Any:
    """Yield (fresh job dicts, FINISH body of those jobs) per :data:`ROUTER_BATCH` jobs, shaped like
    the router's (``normalize_job`` output) and the worker's RESULT body (logged by the router as is)."""
    from zmqrun.model import new_job_id

    script = JOB_SCRIPT["noop"]
    made = 0
    while made < n_jobs:
        k = min(ROUTER_BATCH, n_jobs - made)
        now = time.time()
        fresh: list[dict[str, Any]] = [
            {"id": new_job_id(), "script": script, "args": {}, "priority": 0, "scheduled_for": now,
             "timeout": None, "created_at": now} for _ in range(k)]
        finish = orjson.dumps({"results": [
            {"id": d["id"], "attempt": 1, "status": "success", "result": None, "logs": "",
             "started_at": now, "finished_at": now} for d in fresh]})
        made += k
        yield fresh, finish


def persist_cpu(path: Path, n_jobs: int, deadline_s: float, mode: str = "always") -> dict[str, Any]:
    """Process CPU per job of the router's log work: per iteration of :data:`ROUTER_BATCH` jobs,
    encode+append one SUBMIT (eager) and one DISPATCH, append the previous iteration's FINISH body
    (the worker's bytes, logged without re-encoding), then one ``flush(need_durable=True)``.

    Only that work is timed (building the inputs is not).  Returns ``jobs``,
    ``cpu_us_per_job``, ``wall_us_per_job``, ``iterations``, ``records``.
    """
    from zmqrun.joblog import DISPATCH, FINISH, SUBMIT

    jl = _open_log(path, mode)
    append, flush, dumps = jl.append, jl.flush, orjson.dumps
    cpu = wall = 0.0
    jobs = iters = 0
    prev_finish: bytes | None = None
    gc.collect()
    end = time.perf_counter() + deadline_s
    for fresh, finish in _router_batches(n_jobs):
        c0, t0 = time.process_time(), time.perf_counter()
        now = time.time()
        append(SUBMIT, dumps({"at": now, "jobs": fresh}), eager=True)
        append(DISPATCH, dumps({"at": now, "worker": "bench-worker", "jobs": [[d["id"], 1] for d in fresh]}))
        if prev_finish is not None:
            append(FINISH, prev_finish)
        flush(need_durable=True)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - t0
        prev_finish = finish
        jobs += len(fresh)
        iters += 1
        if time.perf_counter() > end:
            break
    c0, t0 = time.process_time(), time.perf_counter()
    if prev_finish is not None:
        append(FINISH, prev_finish)
    jl.close()
    cpu += time.process_time() - c0
    wall += time.perf_counter() - t0
    records = _count_records(path)
    if records != 3 * iters:
        raise RuntimeError(f"persistence CPU: {records} records recovered, expected {3 * iters}")
    return {"jobs": jobs, "cpu_us_per_job": cpu / jobs * 1e6, "wall_us_per_job": wall / jobs * 1e6,
            "iterations": iters, "records": records}


def run_log_writer(ctx: Any) -> None:
    """Scenario ``log-writer``: JobLog writer throughput vs a raw write+fdatasync loop, and the
    persistence CPU per job; fsync ``always`` (the mode the targets are stated for)."""
    p = ctx.plan
    with tempfile.TemporaryDirectory(prefix="tmp-log-", dir=ctx.out) as d:
        base = Path(d)
        ctx.progress("log-writer warm-up")
        warm = max(1000, p.log_records // 10)
        writer_round(base / "warm-log", warm, p.deadline_s)
        raw_round(base / "warm-raw", warm, p.deadline_s)
        writers, raws = [], []
        for i in range(p.log_rounds):
            ctx.progress(f"log-writer round {i + 1}/{p.log_rounds}")
            raws.append(raw_round(base / f"raw-{i}", p.log_records, p.deadline_s))
            w = writer_round(base / f"log-{i}", p.log_records, p.deadline_s)
            if w["recovered"] != w["records"]:
                raise RuntimeError(f"writer round {i}: {w['recovered']} records read back of {w['records']}")
            writers.append(w)
        w_rps = statistics.median(r["records"] / r["seconds"] for r in writers)
        r_rps = statistics.median(r["records"] / r["seconds"] for r in raws)
        unsynced = sum(r["unsynced_flushes"] for r in writers)
        ctx.res.add_log(
            "log-writer/writer/always", "log-writer",
            f"JobLog writer, fsync=always, {RECORD_PAYLOAD} B records, flush(need_durable=True) every "
            f"{WRITER_BATCH} (median of {len(writers)} rounds)",
            w_rps, "records/s", n=writers[0]["records"],
            seconds=statistics.median(r["seconds"] for r in writers),
            rounds_records_per_s=[r["records"] / r["seconds"] for r in writers],
            cpu_us_per_record=statistics.median(r["cpu_s"] / r["records"] * 1e6 for r in writers),
            unsynced_flushes=unsynced,
            note=f"every record read back by a fresh JobLog; CPU "
                 f"{statistics.median(r['cpu_s'] / r['records'] * 1e6 for r in writers):.2f} us/record"
                 + (f"; {unsynced} flushes returned before durable_seq reached last_seq" if unsynced else ""),
        )
        ctx.res.add_log(
            "log-writer/raw/always", "log-writer",
            f"raw loop: os.write of one {WRITER_BATCH}-record batch ({WRITER_BATCH * (5 + RECORD_PAYLOAD) + 32:,} B) "
            f"+ os.fdatasync, same dir (median of {len(raws)} rounds)",
            r_rps, "records/s", n=raws[0]["records"], seconds=statistics.median(r["seconds"] for r in raws),
            rounds_records_per_s=[r["records"] / r["seconds"] for r in raws],
        )
        ctx.progress("log-writer persistence CPU warm-up")
        persist_cpu(base / "cpu-warm", max(ROUTER_BATCH * 4, p.log_jobs // 10), p.deadline_s)
        ctx.progress("log-writer persistence CPU")
        c = persist_cpu(base / "cpu", p.log_jobs, p.deadline_s)
        ctx.res.add_log(
            "log-writer/persist-cpu/always", "log-writer",
            f"persistence CPU per job: SUBMIT + DISPATCH encoded and appended, FINISH appended, "
            f"{ROUTER_BATCH} jobs per iteration, one flush(need_durable=True) per iteration, fsync=always",
            c["cpu_us_per_job"], "us/job (process CPU)", n=c["jobs"], seconds=c["wall_us_per_job"] * c["jobs"] / 1e6,
            wall_us_per_job=c["wall_us_per_job"], iterations=c["iterations"], records=c["records"],
            note=f"wall {c['wall_us_per_job']:.2f} us/job including the fdatasync waits "
                 f"({1e6 / c['wall_us_per_job']:,.0f} jobs/s through the log alone); every record read back; "
                 f"kernel work in other threads (filesystem journal) is not in process CPU",
        )


# --- recovery with the real router --------------------------------------------------------------


def _vm_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MB (10^6 bytes), from /proc/<pid>/status."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, val = line.split(":", 1)
            out[key] = int(val.split()[0]) * 1024 / 1e6  # the kernel's "kB" are KiB
    return {"rss_mb": out["VmRSS"], "hwm_mb": out["VmHWM"]}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def _data_bytes(data: Path) -> int:
    return sum(f.stat().st_size for f in data.rglob("*") if f.is_file())


def start_router_timed(ch: Children, name: str, port: int, data: Path, fsync: str,
                       bound_s: float, extra: tuple[str, ...] = ()) -> tuple[Child, dict[str, Any]]:
    """Start a router on ``data`` and time it: Popen -> port accepts -> first ``status()`` answer.

    Returns the child and ``bind_s``, ``answer_s`` (seconds from Popen),
    ``status`` (the answer), ``rss_mb``/``hwm_mb`` read right after the answer.
    Raises :class:`ChildError` if it exits or does not answer within ``bound_s`` seconds.
    The port is probed every 5 ms before the client connects, so the client's
    100 ms reconnect interval does not pad the figure.
    """
    from zmqrun import Client

    addr = f"tcp://127.0.0.1:{port}"
    t0 = time.perf_counter()
    router = ch.start(name, [PY, "-m", "zmqrun", "router", "--bind", addr, "--data-dir", str(data),
                             "--fsync", fsync, *extra])
    deadline = t0 + bound_s
    while not _port_open(port):
        if not router.alive():
            raise ChildError(f"{name} exited with {router.proc.returncode}:\n{router.tail()}")
        if time.perf_counter() > deadline:
            raise ChildError(f"{name} did not bind within {bound_s:g} s:\n{router.tail()}")
        time.sleep(0.005)
    bind_s = time.perf_counter() - t0
    with Client(addr, timeout=max(1.0, deadline - time.perf_counter())) as c:
        st = c.status()
    answer_s = time.perf_counter() - t0
    return router, {"bind_s": bind_s, "answer_s": answer_s, "status": st, **_vm_mb(router.pid)}


def _submit_live(client: Any, n: int, chunk: int = 1000) -> int:
    """Submit ``n`` no-op jobs with a one-day delay, ``chunk`` per SUBMIT message, each acknowledged
    (durable) before the next; returns the number accepted.

    Uses the client's request plumbing (``zmqrun.client.job_dict``, ``Client._request``): the public
    Client has no batched submit with a delay, and one ``submit()`` per job would
    make this a round-trip benchmark.
    """
    from zmqrun import protocol as P
    from zmqrun.client import job_dict

    script = JOB_SCRIPT["noop"]
    accepted = 0
    while accepted < n:
        k = min(chunk, n - accepted)
        jobs = [job_dict(script, None, 0, None, LIVE_DELAY_S, None, None) for _ in range(k)]
        body = client._request(P.C_SUBMIT, {"jobs": jobs, "notify": False})
        if body.get("rejected") or len(body.get("accepted", [])) != k:
            raise RuntimeError(f"live submit refused: {str(body)[:300]}")
        accepted += k
    return accepted


def _check_counts(st: dict[str, Any], finished: int, live: int, what: str) -> None:
    counts = st.get("counts", {})
    got = (counts.get("finished"), counts.get("scheduled", 0) + counts.get("queued", 0) + counts.get("running", 0))
    if got != (finished, live):
        raise RuntimeError(f"{what}: router reports {got[0]} finished / {got[1]} live jobs, "
                           f"expected {finished} / {live}: {str(counts)[:300]}")


def run_recovery(ctx: Any) -> None:
    """Scenario ``recovery``: generate N finished + M live jobs with the real router and worker,
    then time restarts after SIGKILL and after SIGTERM, and read the router's RSS."""
    from zmqrun import Client

    p = ctx.plan
    fsync = ctx.fsync[0]
    n_fin, n_live, bound = p.rec_finished, p.rec_live, p.rec_wait_s
    script = JOB_SCRIPT["noop"]
    sizes = f"{n_fin:,} finished + {n_live:,} live jobs"
    full = n_fin >= TARGET_FINISHED and n_live >= TARGET_LIVE
    add = ctx.res.add_log
    common = {"finished": n_fin, "live": n_live, "fsync": fsync, "full_size": full}
    with tempfile.TemporaryDirectory(prefix="tmp-recovery-", dir=ctx.out) as d:
        data, empty = Path(d) / "data", Path(d) / "empty"
        with Children(ctx.raw) as ch:
            ctx.progress("recovery: empty-dir start-up floor")
            r0, floor = start_router_timed(ch, "recovery-empty-router", free_port(), empty, fsync, bound)
            r0.stop(timeout_s=30)
            add("recovery/restart/empty", "recovery", "router start on an empty data dir (floor): Popen to "
                "first status() answer", floor["answer_s"], "s", bind_s=floor["bind_s"],
                rss_mb=floor["rss_mb"], note=f"bound after {floor['bind_s']:.3f} s; RSS {floor['rss_mb']:.1f} MB")

            port = free_port()
            addr = f"tcp://127.0.0.1:{port}"
            ctx.progress(f"recovery: generating {sizes}")
            # At --quick sizes the log never reaches a 64 MiB segment: smaller segments make the generating
            # router roll, index and snapshot as the full-size run does.
            seg = () if full else ("--segment-mb", "1")
            router, _ = start_router_timed(ch, "recovery-router", port, data, fsync, bound, seg)
            worker = ch.start("recovery-worker", [PY, "-m", "zmqrun", "worker", "--connect", addr,
                                                  "--dedicated", script])
            warm = 1000
            with Client(addr, timeout=min(60.0, 1.5 * p.deadline_s)) as c:
                t_end = time.monotonic() + 30
                while not c.status().get("workers"):
                    if not worker.alive() or time.monotonic() > t_end:
                        raise ChildError(f"recovery worker not registered:\n{worker.tail()}")
                    time.sleep(0.05)
                c.map(script, [{}] * warm)
                gc.collect()
                t0 = time.perf_counter()
                chunk = 10_000
                for i in range(0, n_fin, chunk):
                    k = min(chunk, n_fin - i)
                    out = c.map(script, [{}] * k)
                    if out != [None] * k:
                        raise RuntimeError("recovery: a no-op job returned something other than null")
                    if i // chunk % 10 == 9:
                        ctx.progress(f"recovery: generating, {i + k:,}/{n_fin:,} finished")
                gen_fin_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                _submit_live(c, n_live)
                gen_live_s = time.perf_counter() - t0
                st = c.status()
            n_fin_all = n_fin + warm
            _check_counts(st, n_fin_all, n_live, "live router after generation")
            live_vm = _vm_mb(router.pid)
            records = (st.get("log") or {}).get("records")
            add("recovery/generate/finished", "recovery",
                f"generate: Client.map of {n_fin:,} no-op jobs in chunks of {chunk:,} (1 dedicated worker)",
                n_fin / gen_fin_s, "jobs/s", n=n_fin, seconds=gen_fin_s, **common)
            add("recovery/generate/live", "recovery",
                f"generate: {n_live:,} jobs submitted with a {LIVE_DELAY_S / 3600:g} h delay, 1,000 per SUBMIT",
                n_live / gen_live_s, "jobs/s", n=n_live, seconds=gen_live_s, **common)
            ck = (st.get("log") or {}).get("checkpoints") or {}
            add("recovery/checkpoint/pause", "recovery",
                f"longest loop pause for a checkpoint (fork of the index/snapshot writer, index open, retention) "
                f"while generating {sizes}: CPU of the loop thread", ck.get("max_pause_ms", float("nan")), "ms",
                **common, note=f"{ck.get('count', 0)} checkpoints, {ck.get('snapshots', 0)} snapshots, "
                f"{ck.get('total_pause_ms', 0):.1f} ms CPU in all; wall time: longest {ck.get('max_wall_ms', 0):.1f} "
                f"ms, {ck.get('total_wall_ms', 0):.1f} ms in all (includes time the loop was descheduled on 2 "
                "shared cores)")
            add("recovery/rss/live", "recovery", f"live router RSS after generating {sizes}",
                live_vm["rss_mb"], "MB", hwm_mb=live_vm["hwm_mb"], **common,
                note=f"VmHWM {live_vm['hwm_mb']:.1f} MB")
            worker.stop(timeout_s=30)

            ctx.progress("recovery: SIGKILL and restart")
            router.proc.kill()
            router.proc.wait(timeout=30)
            router.stop()
            size = _data_bytes(data)
            kill_r, kill = start_router_timed(ch, "recovery-router-after-kill", port, data, fsync, bound, seg)
            _check_counts(kill["status"], n_fin_all, n_live, "router restarted after SIGKILL")

            ctx.progress("recovery: SIGTERM and restart")
            t0 = time.perf_counter()
            code = kill_r.stop(timeout_s=bound)
            stop_s = time.perf_counter() - t0
            if code != 0:
                raise ChildError(f"the recovered router did not stop cleanly on SIGTERM (exit {code}):\n"
                                 f"{kill_r.tail()}")
            term_r, term = start_router_timed(ch, "recovery-router-after-term", port, data, fsync, bound, seg)
            _check_counts(term["status"], n_fin_all, n_live, "router restarted after SIGTERM")
            term_r.stop(timeout_s=bound)
        extra = {**common, "data_bytes": size, "log_records": records, "bound_s": bound}
        for key, what, m in (("sigkill", "after SIGKILL", kill), ("sigterm", "after SIGTERM (clean stop)", term)):
            add(f"recovery/restart/{key}", "recovery",
                f"restart {what} with {sizes}: Popen to first status() answer",
                m["answer_s"], "s", bind_s=m["bind_s"], **extra,
                note=f"bound after {m['bind_s']:.3f} s; counts checked; data dir {size / 1e6:,.0f} MB"
                     + (f", {records:,} log records" if isinstance(records, int) else ""))
            add(f"recovery/rss/{key}", "recovery", f"router RSS at its first answer, restarted {what}, {sizes}",
                m["rss_mb"], "MB", hwm_mb=m["hwm_mb"], **common, note=f"VmHWM {m['hwm_mb']:.1f} MB")
        ctx.res.notes.append(f"recovery: clean stop (SIGTERM to exit) of the recovered router took {stop_s:.2f} s")
