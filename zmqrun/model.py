"""The job record: fields, statuses, timestamps, and id generation.

Times are float seconds since the Unix epoch (UTC) inside zmqrun and on the
wire; they become UTC ISO-8601 strings on output (:func:`iso`).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass, field
from typing import Any

import uuid_utils

QUEUED = "queued"
RUNNING = "running"
SUCCESS = "success"
FAILURE = "failure"
CANCELED = "canceled"
STATUSES = (QUEUED, RUNNING, SUCCESS, FAILURE, CANCELED)
FINISHED = frozenset((SUCCESS, FAILURE, CANCELED))


def new_job_id() -> str:
    """A new time-ordered job id: a UUIDv7 string (RFC 9562), e.g. ``0192f1c2-...``."""
    return str(uuid_utils.uuid7())


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}\Z").match


def valid_job_id(value: object) -> bool:
    """True if ``value`` is a job id zmqrun accepts: 1-64 chars of [A-Za-z0-9_.:-], starting alphanumeric."""
    return type(value) is str and _JOB_ID(value) is not None


def valid_tag(value: object) -> bool:
    """True if ``value`` is a tag zmqrun accepts (the job id alphabet: 1-64 chars of [A-Za-z0-9_.:-],
    starting alphanumeric)."""
    return type(value) is str and _JOB_ID(value) is not None


# -- retries ------------------------------------------------------------------------------------

MAX_RETRIES = 1000
MAX_PRIORITY = 2**31 - 1  # |priority| at most this (a 32-bit int, as the job record states it)
MAX_BACKOFF = 30 * 86400.0  # seconds: the longest wait before a retry
DEFAULT_BACKOFF: dict[str, Any] = {"kind": "exponential", "seconds": 1.0, "factor": 2.0, "max": 3600.0,
                                   "jitter": 0.1}
_BACKOFF_KEYS = {"constant": ("seconds", "jitter"), "exponential": ("seconds", "factor", "max", "jitter")}


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"backoff {name} must be a number from {_plain(low)} to {_plain(high)}, "
                         f"not {value!r}")
    return float(value)


def _plain(x: float) -> str:
    """A number for a message: 2,592,000, not 2.592e+06."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,g}"


def parse_backoff(value: Any) -> dict[str, Any] | None:
    """A retry backoff in its canonical dict form; None stays None (the router's default applies).

    Accepts seconds (a number: constant), a string (``"5"``, ``"constant:5"``,
    ``"exponential:1"``, ``"exponential:1,factor=3,max=60,jitter=0.2"``; ``exp`` is short for
    exponential) or a dict with ``kind`` and the keys of that kind.  Canonical forms:
    ``{"kind": "constant", "seconds": S, "jitter": J}`` and ``{"kind": "exponential", "seconds": S,
    "factor": F, "max": M, "jitter": J}``: retry n (1 = the first) waits S (constant) or
    min(M, S x F^(n-1)) (exponential) seconds, times a random factor in [1-J, 1+J].  Defaults:
    jitter 0 (constant) or 0.1 (exponential), factor 2, max 3600 s.  Raises ValueError for
    anything else (seconds and max up to 30 days, factor 1-100, jitter 0-1).
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"kind": "constant", "seconds": value}
    elif isinstance(value, str):
        kind, sep, rest = value.strip().partition(":")
        if not sep:
            kind, rest = "constant", kind
        kind = {"exp": "exponential", "const": "constant"}.get(kind.strip(), kind.strip())
        seconds, *opts = rest.split(",")
        d: dict[str, Any] = {"kind": kind}
        try:
            d["seconds"] = float(seconds)
            for opt in opts:
                key, eq, num = opt.partition("=")
                if not eq:
                    raise ValueError
                d[key.strip()] = float(num)
        except ValueError:
            raise ValueError(f"backoff {value!r} is not SECONDS, constant:SECONDS or "
                             f"exponential:SECONDS[,factor=F][,max=S][,jitter=J]") from None
        value = d
    if not isinstance(value, dict):
        raise ValueError(f"backoff must be seconds, a spec string or a dict, not {type(value).__name__}")
    kind = value.get("kind", "constant")
    keys = _BACKOFF_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise ValueError(f"backoff kind must be constant or exponential, not {kind!r}")
    unknown = set(value) - set(keys) - {"kind"}
    if unknown:
        raise ValueError(f"{kind} backoff takes {', '.join(keys)}, not {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {"kind": kind, "seconds": _number(value.get("seconds", 1.0), "seconds", 0, MAX_BACKOFF)}
    if kind == "exponential":
        out["factor"] = _number(value.get("factor", 2.0), "factor", 1, 100)
        out["max"] = _number(value.get("max", max(3600.0, out["seconds"])), "max", out["seconds"], MAX_BACKOFF)
    out["jitter"] = _number(value.get("jitter", 0.1 if kind == "exponential" else 0.0), "jitter", 0, 1)
    return out


def backoff_delay(spec: dict[str, Any], retry: int, rand: float) -> float:
    """Seconds to wait before retry number ``retry`` (1 = the first) under ``spec`` (canonical, see
    :func:`parse_backoff`); ``rand`` is a uniform random number in [0, 1) (the jitter)."""
    seconds = spec["seconds"]
    if spec["kind"] == "exponential" and seconds > 0:
        try:
            grown = seconds * spec["factor"] ** (retry - 1)
        except OverflowError:  # a large retry count: the cap applies
            grown = math.inf
        seconds = min(spec["max"], grown)
    return max(0.0, seconds * (1.0 + spec["jitter"] * (2.0 * rand - 1.0)))


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> UTC ISO-8601 with microseconds and a ``Z``; None stays None."""
    if ts is None:
        return None
    try:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds") \
            .replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return str(ts)  # outside what datetime can show: never fail a lookup over it


def parse_time(value: object) -> float:
    """Accept epoch seconds, a datetime, or an ISO-8601 string; return epoch seconds.

    A naive datetime (or a string without an offset) is local time, as Python's own
    ``datetime.timestamp()`` reads it, so ``datetime.now() + timedelta(seconds=30)`` is 30 s
    from now in any time zone.  Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, _dt.datetime):
        return value.timestamp()  # naive: local time
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            return parse_time(_dt.datetime.fromisoformat(text))
        except ValueError:
            raise ValueError(f"not an ISO-8601 time: {value!r}") from None
    raise ValueError(f"not a time: {value!r}")


@dataclass
class JobRecord:
    """Everything zmqrun knows about one job, as returned by ``Client.get``.

    Timestamps are UTC ISO-8601 strings (or None); ``args`` is the JSON object
    passed as keyword arguments; ``result`` is the JSON value returned (status
    ``success``); ``error`` is ``{"type", "message", "traceback"}`` (status
    ``failure`` or ``canceled``); ``logs`` is the job's stdout and stderr text in
    order; ``timeout`` is in seconds.  ``tag``: the worker group the job runs on (None: untagged
    workers).  ``retries``: failed attempts re-run at most this often, waiting ``backoff`` (see
    :func:`parse_backoff`); ``attempt_errors``: each earlier attempt that failed and was retried,
    ``{"attempt", "error", "started_at", "finished_at", "worker"}`` (the last attempt's outcome is
    ``result``/``error``).  ``retry_of``: the job this one re-runs (``Client.retry``).
    """

    id: str
    script: str
    status: str
    args: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    scheduled_for: str | None = None
    timeout: float | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    attempts: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    logs: str = ""
    tag: str | None = None
    retries: int = 0
    backoff: dict[str, Any] | None = None
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    retry_of: str | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "JobRecord":
        """Build from the router's wire dict (times as epoch seconds)."""
        return cls(
            id=d["id"], script=d["script"], status=d["status"], args=d.get("args") or {},
            priority=d.get("priority", 0), scheduled_for=iso(d.get("scheduled_for")),
            timeout=d.get("timeout"), created_at=iso(d.get("created_at")),
            started_at=iso(d.get("started_at")), finished_at=iso(d.get("finished_at")),
            worker=d.get("worker"), attempts=d.get("attempts", 0), result=d.get("result"),
            error=d.get("error"), logs=d.get("logs") or "", tag=d.get("tag"), retries=d.get("retries") or 0,
            backoff=d.get("backoff"), retry_of=d.get("retry_of"),
            attempt_errors=[{**e, "started_at": iso(e.get("started_at")), "finished_at": iso(e.get("finished_at"))}
                            for e in d.get("attempt_errors") or () if isinstance(e, dict)],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dict(self.__dict__)
