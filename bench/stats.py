"""Latency recording (HdrHistogram, nanoseconds in, microseconds out) and timing loops.

All clocks are ``time.perf_counter_ns`` (monotonic, ns). Histograms record
nanoseconds with 3 significant digits from 1 ns to 1 hour; summaries are in
microseconds (us).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from hdrh.histogram import HdrHistogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
"""Percentiles reported in every latency table."""

_HIGHEST_NS = 3_600 * 1_000_000_000


class Latency:
    """One HdrHistogram of end-to-end latencies, recorded in ns, reported in us."""

    def __init__(self) -> None:
        self.hist = HdrHistogram(1, _HIGHEST_NS, 3)

    def record_ns(self, value_ns: int) -> None:
        """Record one latency of ``value_ns`` nanoseconds (clamped to [1 ns, 1 h])."""
        self.hist.record_value(min(max(1, value_ns), _HIGHEST_NS))

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return int(self.hist.get_total_count())

    def summary(self) -> dict[str, float]:
        """n, min, mean, p50, p90, p99, p99.9 and max, all in microseconds (n is a count)."""
        h = self.hist
        out: dict[str, float] = {"n": self.count}
        if not self.count:
            return out
        out["min_us"] = h.get_min_value() / 1e3
        out["mean_us"] = h.get_mean_value() / 1e3
        for p in PERCENTILES:
            out[f"p{p:g}_us"] = h.get_value_at_percentile(p) / 1e3
        out["max_us"] = h.get_max_value() / 1e3
        return out

    def curve(self) -> list[tuple[float, float]]:
        """(percentile, latency in us) points for a percentile-distribution plot.

        Percentiles are spaced evenly in log(1 / (1 - p)), stopping where the
        sample count no longer resolves them, plus the max at 100.
        """
        n = self.count
        pts: list[tuple[float, float]] = []
        if not n:
            return pts
        k = 0
        while True:
            p = 100.0 * (1.0 - 10 ** (-k / 10))
            if k and 1.0 - p / 100.0 < 1.0 / n:
                break
            pts.append((p, self.hist.get_value_at_percentile(p) / 1e3))
            k += 1
        pts.append((100.0, self.hist.get_max_value() / 1e3))
        return pts

    def encoded(self) -> str:
        """Compressed, base64 HdrHistogram encoding (decode with ``HdrHistogram.decode``)."""
        return self.hist.encode().decode()


def timed_loop(call: Callable[[], Any], n: int, lat: Latency, deadline_s: float) -> float:
    """Call ``call()`` ``n`` times back to back (one in flight), recording each call's
    latency in ``lat``. Stops early when ``deadline_s`` seconds have passed.

    Returns elapsed wall time in seconds.
    """
    clock = time.perf_counter_ns
    gc.collect()
    start = clock()
    stop_at = start + int(deadline_s * 1e9)
    for _ in range(n):
        t0 = clock()
        call()
        t1 = clock()
        lat.record_ns(t1 - t0)
        if t1 > stop_at:
            break
    return (clock() - start) / 1e9


def paced_loop(
    call: Callable[[], Any], n: int, interval_s: float, lat: Latency, deadline_s: float
) -> float:
    """Open-loop pacing at one call per ``interval_s`` seconds, coordinated-omission safe.

    Call ``i`` is intended to start at ``start + i * interval_s``; its latency is
    measured from that intended time, so a stall delays (and is charged to) every
    call scheduled behind it. Returns elapsed wall time in seconds.
    """
    clock = time.perf_counter_ns
    interval_ns = int(interval_s * 1e9)
    gc.collect()
    start = clock() + interval_ns
    stop_at = start + int(deadline_s * 1e9)
    for i in range(n):
        intended = start + i * interval_ns
        now = clock()
        if intended - now > 300_000:  # sleep coarse, spin the last 0.3 ms
            time.sleep((intended - now - 300_000) / 1e9)
        while clock() < intended:
            pass
        call()
        done = clock()
        lat.record_ns(done - intended)
        if done > stop_at:
            break
    return (clock() - start) / 1e9
