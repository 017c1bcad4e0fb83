"""Command line of the bench suite: ``python -m bench [--quick] [--only NAME] ...``.

:func:`main` is the entry point (also for a ``zmqrun bench`` alias). It runs the
for-loop floor and the selected scenarios in one process tree, then writes
``report.md``, ``results.json`` and PNG plots to ``bench/reports/<UTC timestamp>/``
(or ``--out``). Exit status: 0 when every selected scenario completed (a ratio
MISS does not fail the run), 1 when a scenario failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from tqdm import tqdm

from bench.procs import REPO_ROOT
from bench.results import Results
from bench.scenarios import RUNNERS, SCENARIOS, Ctx, Plan, jobs_needed, run_floor

METHOD_NOTES = [
    "Clock: time.perf_counter_ns. Each job's end-to-end latency goes into an HdrHistogram "
    "(ns, 3 significant digits); tables show us.",
    "The bench process is the client in every scenario (zmqrun Client, relay DEALER, HTTP invoker, "
    "Celery/RQ client); routers, relays, the Runtime API emulator, runtimes, brokers and workers "
    "each run in their own processes, all on 127.0.0.1.",
    "Warm-up before each measurement: max(20, min(1000, n/10)) jobs, not recorded.",
    "'1 in flight' rows are closed loop. 'paced' rows are open loop at a fixed rate with latency "
    "measured from each job's intended send time (coordinated-omission safe).",
    "The raw relay worker decodes the same JSON job body as zmqrun carries and calls the same function; "
    "the relay does no persistence or bookkeeping.",
    "Baseline clients (relay, Lambda-style) send pre-encoded request bodies, while zmqrun's Client encodes "
    "each job's args: this favours the baselines by the orjson encoding time (about 1-3 us).",
    "Lambda-style: the real awslambdaric runtime against bench.lambda_emu (one uvloop loop, keep-alive, "
    "no threads); the client POSTs to the Invoke endpoint over keep-alive HTTP/1.1. The throughput ratio "
    "uses the best of the runtime counts measured.",
    "Celery/RQ use a private redis-server with persistence off (no durability), which favours them "
    "against zmqrun with fsync=always.",
    "Ratio rows use the Python Poller relay as the raw-ZeroMQ baseline and zmqrun's pipelined "
    "per-message submits (not the batched Client.map) as zmqrun's throughput.",
    "The for-loop floor always runs: it is the reference for the overhead columns.",
]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="zmqrun bench suite: every figure measured side by side in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="bounded run (< 1 min) for CI")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"scenario(s) to run, repeatable or comma separated: {', '.join(SCENARIOS)}")
    ap.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="jobs per latency/throughput measurement (overrides the defaults)")
    ap.add_argument("--fsync", choices=("always", "never"), default=None,
                    help="zmqrun fsync mode (default: both where a scenario measures both)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="report directory (default: bench/reports/<UTC timestamp>)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _scenarios(only: list[str], ap: argparse.ArgumentParser) -> list[str]:
    if not only:
        return list(SCENARIOS)
    names = {n.strip() for item in only for n in item.split(",") if n.strip()}
    unknown = names - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    return [s for s in SCENARIOS if s in names]


def main(argv: list[str] | None = None) -> int:
    """Run the bench suite with command-line ``argv``; returns the process exit status."""
    ap = _parser()
    try:  # argparse exits on --help and bad arguments; return its status instead
        args = ap.parse_args(argv)
        if args.jobs is not None and args.jobs < 1:
            ap.error("--jobs must be >= 1")
        names = _scenarios(args.only, ap)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    plan = Plan.make(args.quick, args.jobs)
    fsync = [args.fsync] if args.fsync else ["always", "never"]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (args.out or REPO_ROOT / "bench" / "reports" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"

    from bench import report

    meta = {"timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **report.machine_info(out)}
    config = {"quick": args.quick, "scenarios": names, "fsync": fsync, "jobs": args.jobs,
              "argv": _argv_for_report(sys.argv[1:] if argv is None else argv), "plan": vars(plan)}
    res = Results()
    res.notes.extend(METHOD_NOTES)
    started = time.monotonic()
    bar = tqdm(total=len(names) + 2, desc="bench", unit="step", disable=args.no_progress,
               bar_format="{bar:20}| {n_fmt}/{total_fmt} [{elapsed}] {desc}")
    ctx = Ctx(plan=plan, fsync=fsync, out=out, raw=raw, res=res,
              progress=lambda s: bar.set_description_str(s, refresh=True))
    try:
        steps = [("floor", lambda c: run_floor(c, jobs_needed(names, plan)))]
        steps += [(n, RUNNERS[n]) for n in names if n != "floor"]
        for name, fn in steps:
            bar.set_description_str(name)
            t0 = time.monotonic()
            try:
                fn(ctx)
            except Exception as e:  # a failed scenario is reported, the others still run
                res.errors.append({"scenario": name, "error": f"{type(e).__name__}: {str(e)[:500]}",
                                   "traceback": traceback.format_exc()})
                bar.write(f"bench: scenario {name} failed: {type(e).__name__}: {str(e)[:300]}")
            res.notes.append(f"{name}: {time.monotonic() - t0:.1f} s")
            bar.update(1)
        ctx.progress("writing report and plots")
        res.notes.append(f"total: {time.monotonic() - started:.1f} s")
        ratios = report.compute_ratios(res, fsync)
        report.write_all(out, meta, config, res, ratios)
        bar.update(1)
    finally:
        bar.close()
    _cleanup_empty(raw)
    print(f"bench: report in {_rel(out)}", flush=True)
    shown = [r for r in ratios if r["status"] != "N/A"]
    for line in report.ratio_lines(shown):
        print(line)
    if len(shown) < len(ratios):
        print(f"({len(ratios) - len(shown)} ratio rows not measured in this run; see report.md)")
    if res.errors:
        print(f"bench: {len(res.errors)} scenario(s) failed: {', '.join(e['scenario'] for e in res.errors)}",
              file=sys.stderr)
        return 1
    return 0


def _argv_for_report(argv: list[str]) -> list[str]:
    """argv with the --out directory elided (it may be an absolute path of this machine)."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append("DIR")
            skip = False
        elif a == "--out":
            out.append(a)
            skip = True
        elif a.startswith("--out="):
            out.append("--out=DIR")
        else:
            out.append(a)
    return out


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def _cleanup_empty(raw: Path) -> None:
    if raw.is_dir() and not any(raw.iterdir()):
        raw.rmdir()
