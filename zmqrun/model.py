"""The job record: fields, statuses, timestamps, and id generation.

Times are float seconds since the Unix epoch (UTC) inside zmqrun and on the
wire; they become UTC ISO-8601 strings on output (:func:`iso`).
"""

from __future__ import annotations

import datetime as _dt
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
    """Accept epoch seconds, an aware/naive (taken as UTC) datetime, or an ISO-8601 string; return epoch seconds.

    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
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
    order; ``timeout`` is in seconds.
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

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "JobRecord":
        """Build from the router's wire dict (times as epoch seconds)."""
        return cls(
            id=d["id"], script=d["script"], status=d["status"], args=d.get("args") or {},
            priority=d.get("priority", 0), scheduled_for=iso(d.get("scheduled_for")),
            timeout=d.get("timeout"), created_at=iso(d.get("created_at")),
            started_at=iso(d.get("started_at")), finished_at=iso(d.get("finished_at")),
            worker=d.get("worker"), attempts=d.get("attempts", 0), result=d.get("result"),
            error=d.get("error"), logs=d.get("logs") or "",
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dict(self.__dict__)
