"""Smoke test of the bench suite: a tiny ``--quick`` run writes its report, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli import main  # the repo root is on sys.path (pyproject: pythonpath = ["."])


def test_bench_quick_relay_and_warm(tmp_path: Path) -> None:
    out = tmp_path / "report"
    rc = main(["--quick", "--only", "relay,zmqrun-warm", "--jobs", "200", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("report.md", "results.json", "latency.png", "throughput.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in data["results"]["rows"]}
    expected = ["floor/latency/noop", "relay-py/latency/noop", "relay-c/latency/noop", "relay-py/pipelined/noop"]
    for f in ("always", "never"):
        expected += [f"zmqrun-warm/latency/noop/{f}", f"zmqrun-warm/pipelined/noop/{f}", f"zmqrun-warm/map/noop/{f}"]
    for key in expected:
        assert key in rows, key
    for r in rows.values():
        if r["kind"] == "latency":
            assert r["n"] > 0 and 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"], r["key"]
        else:
            assert r["n"] > 0 and r["seconds"] > 0 and r["jobs_per_s"] > 0, r["key"]
    ratios = {r["name"]: r for r in data["ratios"]}
    for f in ("always", "never"):
        warm_vs_relay = ratios[f"zmqrun warm p50 / raw relay p50 (noop, fsync={f})"]
        assert warm_vs_relay["status"] in ("PASS", "MISS") and warm_vs_relay["value"] > 0
    assert data["meta"]["cpu_count"] and data["meta"]["libzmq"]
    report = (out / "report.md").read_text()
    assert "## Ratios" in report and "p99.9" in report
    assert not data["results"]["errors"]
    assert not list(out.glob("tmp-*")), "temp dirs left behind"


def test_bench_quick_joblog_and_recovery(tmp_path: Path) -> None:
    """The job-log scenarios at --quick sizes (about 5 s): every figure is measured, the writer and
    CPU rows are judged, and the recovery rows are informational because 20,000 + 2,000 jobs are not
    the sizes the targets are stated for."""
    out = tmp_path / "report"
    rc = main(["--quick", "--only", "log-writer,recovery", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert not data["results"]["errors"]
    figs = {r["key"]: r for r in data["results"]["joblog"]}
    for key in ("log-writer/writer/always", "log-writer/raw/always", "log-writer/persist-cpu/always",
                "recovery/restart/empty", "recovery/generate/finished", "recovery/generate/live",
                "recovery/rss/live", "recovery/restart/sigkill", "recovery/rss/sigkill",
                "recovery/restart/sigterm", "recovery/rss/sigterm"):
        assert key in figs and figs[key]["value"] > 0, key
    assert figs["recovery/restart/sigterm"]["finished"] == 20_000 and figs["recovery/restart/sigterm"]["live"] == 2_000
    ratios = {r["name"]: r for r in data["ratios"]}
    writer = next(r for n, r in ratios.items() if n.startswith("Job log writer throughput"))
    cpu = next(r for n, r in ratios.items() if n.startswith("Persistence CPU per job"))
    assert writer["status"] in ("PASS", "MISS") and cpu["status"] in ("PASS", "MISS")
    recovery = [r for n, r in ratios.items() if n.startswith(("Router restart", "Router RSS"))]
    assert len(recovery) == 5 and all(r["status"] == "INFO" and r["value"] > 0 for r in recovery)
    assert (out / "joblog.png").stat().st_size > 0
    assert "## Job log and recovery" in (out / "report.md").read_text()
    assert not list(out.glob("tmp-*")), "temp dirs left behind"
