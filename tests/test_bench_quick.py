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
