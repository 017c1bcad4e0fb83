"""Job functions shared by every bench scenario.

Each job is a plain function that takes keyword arguments and returns a JSON
value, so the very same function runs in the for-loop floor, behind the raw
ZeroMQ relay, in a zmqrun worker (``bench.jobs:noop``), in the Lambda-style
runtime (via :mod:`bench.jobs_lambda`) and in the Celery/RQ peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def noop() -> None:
    """Do nothing; returns ``None`` (JSON ``null``)."""
    return None


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def fibo(n: int = 10) -> int:
    """Naive recursive Fibonacci of ``n`` (Windmill's benchmark job).

    fibo(10) costs a few microseconds, fibo(33) about half a second of CPU.
    """
    return _fib(n)


def transform(record: dict[str, Any]) -> dict[str, Any]:
    """A 1 KB JSON transform: normalise, filter and aggregate ``record``.

    ``record`` is the document made by :func:`transform_record`; the result is a
    JSON object of similar size (~0.6-1 KB).
    """
    items = record["items"]
    kept = [
        {"sku": it["sku"].upper(), "qty": it["qty"], "total": round(it["qty"] * it["price"], 2)}
        for it in items
        if it["qty"] > 0
    ]
    return {
        "id": record["id"],
        "customer": record["customer"].strip().title(),
        "tags": sorted({t.lower() for t in record["tags"]}),
        "items": kept,
        "count": len(kept),
        "total": round(sum(it["total"] for it in kept), 2),
    }


def sleep(ms: float = 10.0) -> float:
    """Sleep ``ms`` milliseconds (I/O-bound stand-in for the scaling scenario); returns ``ms``."""
    time.sleep(ms / 1000.0)
    return ms


def transform_record() -> dict[str, Any]:
    """Deterministic ~1 KB JSON document used as the ``record`` argument of :func:`transform`."""
    return {
        "id": "order-000042",
        "customer": "  ada lovelace  ",
        "tags": ["Priority", "EU", "priority", "Wholesale", "eu", "Q3"],
        "items": [
            {"sku": f"sku-{i:04d}-blue", "qty": (i * 7) % 5, "price": 3.25 + i * 1.5}
            for i in range(16)
        ],
        "note": "x" * 200,
    }


# Named bench jobs: their keyword arguments, zmqrun script spec and function.
JOB_ARGS: dict[str, dict[str, Any]] = {
    "noop": {},
    "fibo10": {"n": 10},
    "fibo33": {"n": 33},
    "transform": {"record": transform_record()},
    "sleep10ms": {"ms": 10.0},
}
"""Keyword arguments for each named bench job."""

JOB_SCRIPT: dict[str, str] = {
    "noop": "bench.jobs:noop",
    "fibo10": "bench.jobs:fibo",
    "fibo33": "bench.jobs:fibo",
    "transform": "bench.jobs:transform",
    "sleep10ms": "bench.jobs:sleep",
}
"""zmqrun script spec of each named bench job."""

JOB_FUNC: dict[str, Callable[..., Any]] = {
    "noop": noop,
    "fibo10": fibo,
    "fibo33": fibo,
    "transform": transform,
    "sleep10ms": sleep,
}
"""Function of each named bench job."""
