"""The numbers of one bench run: latency and throughput rows, Windmill and scaling tables.

Units: latencies in microseconds (``*_us``), durations in seconds (``seconds``),
throughput in jobs per second (``jobs_per_s``). Per-job overhead
(``overhead_us``) = end-to-end time minus the job's own execution time as
measured by the for-loop floor in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.stats import Latency


@dataclass
class Results:
    """Everything measured in one run (serialised as-is to results.json)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    windmill: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    joblog: list[dict[str, Any]] = field(default_factory=list)
    """Job-log and recovery figures (scenarios ``log-writer`` and ``recovery``), one dict per figure."""
    notes: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    floor: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per job name: ``p50_us`` and ``mean_us`` of one in-process call."""

    def row(self, key: str) -> dict[str, Any] | None:
        """The row with ``key``, or None when it was not measured."""
        for r in self.rows:
            if r["key"] == key:
                return r
        return None

    def log_row(self, key: str) -> dict[str, Any] | None:
        """The job-log figure with ``key``, or None when it was not measured."""
        for r in self.joblog:
            if r["key"] == key:
                return r
        return None

    def add_log(self, key: str, scenario: str, label: str, value: float, unit: str,
                **extra: Any) -> dict[str, Any]:
        """Add one job-log figure: ``value`` in ``unit`` (records/s, jobs/s, us/job, s, MB), plus extras
        (``n``, ``seconds``, ``note``, ...).  Raises RuntimeError for a value that is not a positive number."""
        if not isinstance(value, (int, float)) or not value > 0:
            raise RuntimeError(f"{key}: nothing measured (value={value!r})")
        r: dict[str, Any] = {"key": key, "scenario": scenario, "label": label, "value": float(value),
                             "unit": unit, **extra}
        self.joblog.append(r)
        return r

    def add_latency(
        self,
        key: str,
        scenario: str,
        label: str,
        job: str,
        lat: Latency,
        fsync: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Add a latency row from histogram ``lat`` (overhead = p50 - floor p50 of ``job``)."""
        s = lat.summary()
        if not s["n"]:
            raise RuntimeError(f"{key}: no latency recorded")
        fl = self.floor.get(job)
        r: dict[str, Any] = {
            "key": key,
            "scenario": scenario,
            "label": label,
            "kind": "latency",
            "job": job,
            "fsync": fsync,
            **s,
            "jobs_per_s": 1e6 / s["mean_us"],
            "overhead_us": s["p50_us"] - fl["p50_us"] if fl else None,
            "curve": lat.curve(),
            "hdr": lat.encoded(),
            **extra,
        }
        self.rows.append(r)
        return r

    def add_throughput(
        self,
        key: str,
        scenario: str,
        label: str,
        job: str,
        n: int,
        seconds: float,
        fsync: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Add a throughput row: ``n`` jobs done in ``seconds`` (overhead = seconds/n - floor mean)."""
        if n <= 0 or seconds <= 0:
            raise RuntimeError(f"{key}: nothing measured (n={n}, seconds={seconds})")
        fl = self.floor.get(job)
        per_job_us = seconds / n * 1e6
        r: dict[str, Any] = {
            "key": key,
            "scenario": scenario,
            "label": label,
            "kind": "throughput",
            "job": job,
            "fsync": fsync,
            "n": n,
            "seconds": seconds,
            "jobs_per_s": n / seconds,
            "per_job_us": per_job_us,
            "overhead_us": per_job_us - fl["mean_us"] if fl else None,
            **extra,
        }
        self.rows.append(r)
        return r
