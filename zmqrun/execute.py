"""Run one job's function and turn its outcome into a JSON-safe report.

Shared by the dedicated worker (in-process, warm) and the cold path's child
process.  Only light stdlib modules and orjson are imported at module level:
every import here is paid again by each cold-path job.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from typing import Any, Callable

import orjson

REPR_LIMIT = 500  # characters of repr() kept when a value cannot be serialized


def error_report(exc: BaseException, tb: bool = True) -> dict[str, str]:
    """{type, message, traceback} for an exception, always JSON-serializable (S6)."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        message = f"<unprintable {type(exc).__name__}>"
    return {
        "type": type(exc).__name__,
        "message": message[:10_000],
        "traceback": "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__))) if tb else "",
    }


def _user_frames(tb: Any) -> Any:
    """``tb`` without its leading frames in this module (run_job, call): a job's traceback starts at the
    job's own code.  Kept whole if every frame is ours (an error of zmqrun itself)."""
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb if tb is not None else first


def _find_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_find_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_find_non_finite(v) for v in value)
    return False


def encode_json(value: Any, what: str) -> bytes:
    """Encode ``value`` as strict JSON; raise TypeError naming ``what`` (e.g. "result", "job args") if it is not.

    orjson turns NaN and infinities into ``null`` silently, so an encoding that
    contains ``null`` is checked for them.
    """
    try:
        data = orjson.dumps(value)
    except TypeError as e:
        raise TypeError(f"{what}: not JSON-serializable ({e}): {_short_repr(value)}") from None
    # find(), not ``in``: bytes.__contains__ first tries its argument as an int and builds (then drops) a
    # TypeError for a bytes one: ~3000 instructions per job.  A bare None (b"null") holds no float.
    if value is not None and data.find(b"null") != -1 and _find_non_finite(value):
        raise TypeError(f"{what}: NaN or infinity cannot be sent as JSON: {_short_repr(value)}")
    return data


def encode_result(value: Any) -> bytes:
    """Encode a job's return value as JSON; raise TypeError with a clear message if it is not JSON."""
    return encode_json(value, "result")


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        text = f"<{type(value).__name__} with a failing repr>"
    return text if len(text) <= REPR_LIMIT else text[:REPR_LIMIT] + "..."


_loops = threading.local()


def _new_loop() -> "asyncio.AbstractEventLoop":  # noqa: F821
    import asyncio

    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop is not built for every platform
        return asyncio.new_event_loop()


def _await(value: Any) -> Any:
    """Run an awaitable on this thread's event loop (made at its first async job) and return its value."""
    # asyncio is imported only for async jobs: it costs ~30 ms, paid by every cold-path process.
    loop = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = _new_loop()
    return loop.run_until_complete(value)


def run_job(func: Callable[..., Any], args: dict[str, Any]) -> tuple[bytes, float, float]:
    """Run one job; return (outcome JSON fragment, started_at, finished_at) with epoch-second times.

    The fragment is ``"status":"success","result":...`` or
    ``"status":"failure","error":{...}`` (without braces) so the caller can splice
    in id, attempt and logs without re-encoding the result.
    """
    started = time.time()
    try:
        # encode_result() inline: one Python call less on every warm job's path.
        value = func(**args)
        if hasattr(value, "__await__"):
            value = _await(value)
        frag = b'"status":"success","result":' + encode_json(value, "result")
    except BaseException as e:  # noqa: BLE001 - any job failure is reported, the worker goes on
        # KeyboardInterrupt and SystemExit too: a worker's own Ctrl-C never surfaces here (workers stop on
        # a signal handler, warm children ignore SIGINT), so the job's code raised it; re-raised, it
        # used to kill a warm process and charge the job an attempt each time (WorkerLost after 3).
        frag = b'"status":"failure","error":' + orjson.dumps(error_report(e))
    return frag, started, time.time()


class OutputCapture:
    """A ``sys.stdout``/``sys.stderr`` stand-in that sends each thread's writes to that thread's job buffer.

    Writes from a thread with no job in progress go to the real stream, so two
    concurrent jobs' logs never mix.  Output written straight to file
    descriptor 1 or 2 (C extensions, subprocesses) is not captured on the warm path.
    """

    def __init__(self, real: Any, local: threading.local) -> None:
        self._real = real
        self._local = local

    def write(self, text: str) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            return self._real.write(text)
        if type(buf) is dict:  # the job's first write: now it gets its output buffer (see run_captured)
            buf = self._local.buf = getattr(self._local, "make", _default_output)(buf)
        # buf: a zmqrun.livelogs.JobOutput (capped, and visible to the live-log pump).  Its common case
        # inline: ASCII text under the cap (one Python call less per print).
        if type(text) is str and text.isascii():
            n = len(text)
            size = buf.size + n
            if size <= buf.cap:
                buf.parts.append(text)
                buf.size = size
                return n
        return buf.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if getattr(self._local, "buf", None) is None:
            self._real.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._real.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._real, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


_capture_local = threading.local()
_installed = False


def install_capture() -> None:
    """Replace sys.stdout and sys.stderr with per-thread capturing stand-ins (idempotent)."""
    global _installed
    if not _installed:
        sys.stdout = OutputCapture(sys.stdout, _capture_local)  # type: ignore[assignment]
        sys.stderr = OutputCapture(sys.stderr, _capture_local)  # type: ignore[assignment]
        _installed = True


def _default_output(job: dict[str, Any]) -> Any:
    from .livelogs import JobOutput

    return JobOutput(str(job.get("id", "")), int(job.get("attempt", 0)))


def set_output_factory(make: Callable[[dict[str, Any]], Any] | None) -> None:
    """This thread's jobs get their output buffer from ``make(job)``, called at a job's first write
    (a worker makes a capped :class:`zmqrun.livelogs.JobOutput` and shows it to its live-log pump);
    None: a new JobOutput with the default cap, seen by no pump."""
    _capture_local.make = make or _default_output


def run_captured(func: Callable[..., Any], args: dict[str, Any],
                 job: dict[str, Any] | None = None) -> tuple[bytes, float, float, str]:
    """:func:`run_job` with this thread's stdout/stderr captured; returns (fragment, started, finished, logs).

    ``job`` (the job's dict, default ``{}``) is handed to this thread's output factory
    (:func:`set_output_factory`) at the job's first write, so a job that prints nothing costs no
    buffer; ``logs`` is that buffer's final text (capped, with the dropped-bytes marker), or "".
    """
    local = _capture_local
    local.buf = job if job is not None else {}
    try:
        frag, started, finished = run_job(func, args)
    finally:
        out = local.buf
        local.buf = None
    if type(out) is dict:
        return frag, started, finished, ""
    # The warm path's common case inline (no decoder, nothing dropped): see JobOutput.text.
    return frag, started, finished, out.text() if out.dropped else "".join(out.parts)
