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


def _quick(tmp_path: Path, only: str) -> tuple[Path, dict]:
    """Run ``python -m bench --quick --only ONLY`` into tmp_path/report; (report dir, results.json), no errors."""
    out = tmp_path / "report"
    assert main(["--quick", "--only", only, "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert not data["results"]["errors"]
    return out, data


def test_bench_quick_joblog_and_recovery(tmp_path: Path) -> None:
    """The job-log scenarios at --quick sizes (about 5 s): every figure is measured, the writer and
    CPU rows are judged, and the recovery rows are informational because 20,000 + 2,000 jobs are not
    the sizes the targets are stated for."""
    out, data = _quick(tmp_path, "log-writer,recovery")
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


def test_bench_quick_interleaved_headline(tmp_path: Path) -> None:
    """The interleaved scenario (about 10 s): relay, durability floor and zmqrun warm per fsync mode
    measured in the same minutes; the headline ratio is judged from these rows, and the separate-run
    row and the floor rows are informational."""
    out, data = _quick(tmp_path, "interleaved")
    rows = {r["key"]: r for r in data["results"]["rows"]}
    keys = ["interleaved/latency/relay-py", "interleaved/latency/relay-fsync",
            "interleaved/latency/zmqrun-warm/always", "interleaved/latency/zmqrun-warm/never"]
    for key in keys:
        assert rows[key]["n"] == 1000 and 0 < rows[key]["p50_us"] <= rows[key]["p99_us"], key  # 5 rounds of 200
    ratios = {r["name"]: r for r in data["ratios"]}
    for f in ("always", "never"):
        head = ratios[f"zmqrun warm p50 / raw relay p50 (noop, fsync={f}, interleaved)"]
        assert head["status"] in ("PASS", "MISS") and head["target"] == 1.3
        assert head["value"] == rows[f"interleaved/latency/zmqrun-warm/{f}"]["p50_us"] / rows[keys[0]]["p50_us"]
        # zmqrun-warm did not run: the separate-run row says so instead of borrowing other figures
        assert ratios[f"zmqrun warm p50 / raw relay p50 (noop, fsync={f}, separate runs)"]["status"] == "N/A"
    floor = next(r for n, r in ratios.items() if n.startswith("durability floor p50 / raw relay p50"))
    assert floor["status"] == "INFO" and floor["value"] == rows[keys[1]]["p50_us"] / rows[keys[0]]["p50_us"]
    assert ratios["zmqrun warm p50 / durability floor p50 (noop, fsync=always, interleaved)"]["status"] == "INFO"
    assert not list(out.glob("tmp-*")), "temp dirs left behind"


def test_relay_sync_dir_writes_each_request_before_it_replies(tmp_path: Path) -> None:
    """bench.relay --sync-dir (the durability floor): a reply comes back only after its request's
    body is in the relay's preallocated file."""
    from bench.jobs import fibo
    from bench.procs import PY, Children
    from bench.relay import SYNC_FILE_BYTES, RelayClient

    sync_dir = tmp_path / "sync"
    sync_dir.mkdir()
    with Children(tmp_path / "raw") as ch:
        relay = ch.start("relay", [PY, "-m", "bench.relay", "--mode", "py", "--sync-dir", str(sync_dir)])
        m = relay.wait_for(r"READY front=(\S+) back=(\S+)", 60)
        ch.start("worker", [PY, "-m", "bench.relay_worker", "--connect", m[2]]).wait_for("READY", 60)
        (log,) = sync_dir.iterdir()
        assert log.stat().st_size == SYNC_FILE_BYTES  # preallocated before READY
        with RelayClient(m[1]) as cl:
            for i in range(3):
                body = b'{"script":"bench.jobs:fibo","job":"fibo","args":{"n":%d}}' % (10 + i)
                assert json.loads(cl.call(body)) == fibo(10 + i)
                assert body in log.read_bytes()


def test_a_ratio_next_to_its_target_is_printed_with_enough_digits() -> None:
    """(Found by a new-user session: "MISS 1.30 (target <= 1.3)".)"""
    from bench.report import ratio_lines

    def row(value: float | None, status: str) -> dict:
        return {"name": "r", "value": value, "op": "<=", "target": 1.3, "status": status}

    assert "1.304" in ratio_lines([row(1.304, "MISS")])[0]
    assert "1.296" in ratio_lines([row(1.296, "PASS")])[0]
    assert "1.30 " in ratio_lines([row(1.3, "PASS")])[0] and "1.42 " in ratio_lines([row(1.4213, "MISS")])[0]
    assert "n/a" in ratio_lines([row(None, "N/A")])[0]
