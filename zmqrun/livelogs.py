"""Live logs: a running job's output streamed to followers while it runs.

Worker side
-----------
Each running job's output goes into a :class:`JobOutput` (the warm path: the
job thread's ``sys.stdout``/``sys.stderr`` writes; the cold path: a thread
reading the job process's pipe).  It keeps at most ``cap`` bytes (UTF-8) and
counts the rest as dropped; its :meth:`JobOutput.text` (the logs that travel
with the result and are archived) ends with a marker saying how many bytes were
dropped.

One :class:`LogPump` thread per worker process wakes every
:data:`FLUSH_SECONDS` and sends, in one ``W_LOG`` message on its own DEALER
socket, the output that jobs that were running at its previous wake-up already
(so for 0.1 to 0.2 s) wrote since its last look (whole lines or not: a partial
line shows up too).  A job that
finishes sooner sends its output only inside its result, as before: no
message and no thread hop per job; the job's own cost is one small object and
one dict entry.  Chunks carry the job id, attempt and the character offset of
their text in the job's output, so the router can put them in order, drop
repeats and notice gaps.

Client side
-----------
:class:`FollowState` turns the router's pushes (``R_LOGS``) and replies into
the text a follower yields: overlapping text (asked again after a quiet spell
or a reconnection) is cut, a gap and a new attempt are marked in the text.

Only light stdlib modules are imported here (zmq and orjson inside the pump).
"""

from __future__ import annotations

import codecs
import threading
from typing import Any, Callable

FLUSH_SECONDS = 0.1  # seconds: the pump's period, and how long a job runs before its output streams
DEFAULT_MAX_LOG_BYTES = 4 * 1024 * 1024  # bytes of output kept per job (streamed and archived)
MAX_LOG_BYTES_LIMIT = 128 * 1024 * 1024  # the largest --max-log-bytes (results travel in one message)
ROUTER_LIVE_LIMIT = MAX_LOG_BYTES_LIMIT  # characters the router keeps per running job, whatever a worker sends


def dropped_marker(dropped: int, cap: int, after: str) -> str:
    """The line that ends a job's logs when its output passed ``cap`` bytes (``dropped`` bytes were not kept).

    ``after`` is the kept text: the marker starts on a new line."""
    lead = "" if not after or after.endswith("\n") else "\n"
    return f"{lead}[zmqrun: {dropped} bytes of output dropped (log cap {cap} bytes)]\n"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class JobOutput:
    """The output of one running job attempt, capped at ``cap`` bytes (UTF-8).

    Written by one thread (the job's, or the cold path's pipe reader), read by
    the worker's :class:`LogPump` (:meth:`take` / :meth:`sent_through`) and, once
    the job ended, by the worker (:meth:`text`).  Appends to a list are atomic
    under the GIL, so no lock is taken per write.
    """

    # Class-level defaults: one per job on the warm path's hot path, so __init__ sets only what it must.
    dropped = 0  # bytes dropped past the cap
    sent = 0  # parts the pump has sent
    offset = 0  # characters the pump has sent
    _decoder: Any = None  # the cold path's incremental UTF-8 decoder

    def __init__(self, job_id: str, attempt: int, cap: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.id = job_id
        self.attempt = attempt
        self.cap = cap
        self.parts: list[str] = []
        self.size = 0  # bytes kept

    def write(self, text: str) -> int:
        """Keep ``text`` (or the part of it that fits under the cap); return len(text) as ``io`` does.

        Raises TypeError for anything but a str (as a text stream does)."""
        if type(text) is str and text.isascii():  # the common case, kept short: it runs per print
            n = len(text)
            if self.size + n <= self.cap:
                self.parts.append(text)
                self.size += n
                return n
        elif not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        else:
            text = str(text)
            n = _utf8_len(text)
        room = self.cap - self.size
        if n <= room:
            if n:
                self.parts.append(text)
                self.size += n
            return len(text)
        if room > 0:
            cut = text[:room] if text.isascii() else \
                text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
            kept = _utf8_len(cut)
            if cut:
                self.parts.append(cut)
            self.size += kept
            self.dropped += n - kept
        else:
            self.dropped += n
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Keep raw output bytes (the cold path's pipe), decoded as UTF-8 (invalid bytes replaced)."""
        room = self.cap - self.size
        if room <= 0:
            self.dropped += len(data)
            return
        if len(data) > room:
            self.dropped += len(data) - room
            data = data[:room]
        self.size += len(data)
        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = self._decoder.decode(data)
        if text:
            self.parts.append(text)

    def text(self) -> str:
        """The job's whole logs (call once it wrote its last output): the kept text, then the dropped marker."""
        if self._decoder is None and not self.dropped:
            return "".join(self.parts)
        if self._decoder is not None:
            tail = self._decoder.decode(b"", True)
            self._decoder = None
            if tail:
                self.parts.append(tail)
        text = "".join(self.parts)
        if self.dropped:
            text += dropped_marker(self.dropped, self.cap, text)
        return text

    def take(self) -> tuple[int, str, int] | None:
        """(offset, text, parts) written since the last :meth:`sent_through`, or None: for the pump."""
        n = len(self.parts)
        if n == self.sent:
            return None
        return self.offset, "".join(self.parts[self.sent:n]), n

    def sent_through(self, parts: int, chars: int) -> None:
        """The pump sent everything up to ``parts`` (``chars`` characters long)."""
        self.sent = parts
        self.offset += chars


class LogPump:
    """The worker's live-log sender: one daemon thread and its own DEALER socket (see the module docstring).

    ``outputs`` is the worker's registry of running jobs (job id -> :class:`JobOutput`) and
    ``current`` a one-item list holding the output of the job its loop thread runs (or None); the
    pump only reads them.  The socket is opened at the first chunk to send, so a worker whose jobs are all
    short never opens it.  A send that finds no connection (IMMEDIATE) is tried again next tick.
    """

    def __init__(self, connect: str, outputs: dict[str, JobOutput], current: list[JobOutput | None] | None = None,
                 period: float = FLUSH_SECONDS, on_error: Callable[[BaseException], None] | None = None,
                 secure: Callable[[Any], None] | None = None) -> None:
        self.connect = connect
        self.secure = secure  # applies the worker's CURVE keys to the pump's socket (zmqrun.security.CurveKeys.apply)
        self.outputs = outputs
        self.current = current if current is not None else [None]
        self.period = period
        self.on_error = on_error
        self.messages = 0  # W_LOG messages sent (for tests and status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmqrun-logs", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and close its socket (waits at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        ctx = sock = None
        seen: dict[str, JobOutput] = {}  # the running jobs at the last tick
        try:
            while not self._stop.wait(self.period):
                outputs, inline = self.outputs, self.current[0]
                if not outputs and inline is None:
                    seen = {}
                    continue
                try:
                    now = dict(outputs)
                except RuntimeError:  # resized by a job thread meanwhile: next tick
                    continue
                if inline is not None:
                    now[inline.id] = inline
                # Due: jobs that were running at the last tick already (so for at least one period).
                # Telling them apart costs the pump a dict per tick instead of each job a clock read.
                chunks = []
                for jid, out in now.items():
                    if seen.get(jid) is out:
                        got = out.take()
                        if got is not None:
                            chunks.append((out, got))
                seen = now
                if not chunks:
                    continue
                if sock is None:
                    ctx, sock = self._open()
                self._send(sock, chunks)
        except BaseException as e:  # noqa: BLE001 - live logs are best effort; the result still carries the logs
            if self.on_error is not None:
                self.on_error(e)
        finally:
            if sock is not None:
                sock.close(0)
            if ctx is not None:
                ctx.term()

    def _open(self) -> tuple[Any, Any]:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.IPV6, 1)  # a tcp://[::1] router address
        if self.secure is not None:
            self.secure(sock)
        sock.connect(self.connect)
        # A fresh connection: wait briefly for it, so the first chunk is not held back a whole tick.
        sock.poll(int(self.period * 1000), zmq.POLLOUT)
        return ctx, sock

    def _send(self, sock: Any, chunks: list[tuple[JobOutput, tuple[int, str, int]]]) -> None:
        import orjson
        import zmq

        from . import protocol as P

        body = orjson.dumps({"logs": [[out.id, out.attempt, off, text] for out, (off, text, _n) in chunks]})
        try:
            sock.send_multipart([P.H_W_LOG, body], zmq.NOBLOCK)
        except zmq.Again:
            return  # no connection to the router now: the same text goes next tick
        self.messages += 1
        for out, (_off, text, n) in chunks:
            out.sent_through(n, len(text))


class FollowState:
    """What a follower has yielded of one job: the attempt shown, characters of it yielded, and whether
    the job ended (``status``: its final status).  :meth:`feed` turns one router message into the text
    to yield (pieces of the job's output, plus one-line markers for a new attempt or a gap)."""

    __slots__ = ("attempt", "pos", "ended", "status", "_last")

    def __init__(self) -> None:
        self.attempt: int | None = None
        self.pos = 0
        self.ended = False
        self.status: str | None = None
        self._last = "\n"  # the last character yielded (markers start on a line of their own)

    def position(self) -> list[int] | None:
        """[attempt, characters yielded] to ask the router to send only what follows, or None."""
        return None if self.attempt is None else [self.attempt, self.pos]

    def feed(self, msg: dict[str, Any]) -> list[str]:
        """Text to yield for one R_LOGS push or C_LOGS reply ``msg`` ({attempt, offset, text, end?, status?})."""
        out: list[str] = []
        attempt, offset, text = msg.get("attempt"), msg.get("offset") or 0, msg.get("text") or ""
        if type(attempt) is int and type(offset) is int and type(text) is str:
            if self.attempt is None or attempt > self.attempt:
                if self.attempt is not None and self.pos > 0:
                    out.append(self._marker(f"job attempt {attempt} starts here; the output above is from "
                                            f"attempt {self.attempt}"))
                self.attempt, self.pos = attempt, 0
            if attempt == self.attempt:
                end = offset + len(text)
                if end > self.pos:
                    if offset > self.pos:
                        out.append(self._marker(f"{offset - self.pos} characters of output missed here"))
                        piece = text
                    else:
                        piece = text[self.pos - offset:]
                    self.pos = end
                    if piece:
                        out.append(piece)
                        self._last = piece[-1]
        if msg.get("end"):
            self.ended = True
            self.status = msg.get("status")
        return out

    def _marker(self, what: str) -> str:
        text = ("" if self._last == "\n" else "\n") + f"[zmqrun: {what}]\n"
        self._last = "\n"
        return text


def check_max_log_bytes(value: int) -> int:
    """``value`` if it is a valid per-job log cap (an int of bytes, 1 to :data:`MAX_LOG_BYTES_LIMIT`);
    raises ValueError otherwise."""
    if type(value) is not int or not 1 <= value <= MAX_LOG_BYTES_LIMIT:
        raise ValueError(f"max_log_bytes must be an integer from 1 to {MAX_LOG_BYTES_LIMIT}, not {value!r}")
    return value


class LiveLog:
    """Router side: the output of one running attempt that has arrived so far, characters ``start`` to ``end``
    of it (``start`` > 0 only when this router missed the beginning, e.g. it restarted mid-job)."""

    __slots__ = ("attempt", "start", "end", "parts")

    def __init__(self, attempt: int, start: int) -> None:
        self.attempt = attempt
        self.start = self.end = start
        self.parts: list[str] = []

    def add(self, offset: int, text: str) -> tuple[int, str] | None:
        """Take a chunk at character ``offset``; return (offset, text) of what is new, or None (a repeat).

        A chunk past the end (a gap: chunks were lost) starts the copy again from it.  At most
        :data:`ROUTER_LIVE_LIMIT` characters are kept (a worker caps its jobs' output lower)."""
        if offset > self.end:
            self.start = self.end = offset
            self.parts.clear()
        new = offset + len(text) - self.end
        if new <= 0:
            return None
        room = ROUTER_LIVE_LIMIT - (self.end - self.start)
        if room <= 0:
            return None
        piece = text[len(text) - new:][:room]
        at = self.end
        self.parts.append(piece)
        self.end += len(piece)
        return at, piece

    def text_from(self, pos: int) -> tuple[int, str]:
        """(offset, text) of what is kept from character ``pos`` on."""
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        text = self.parts[0] if self.parts else ""
        begin = min(max(pos, self.start), self.end)
        return begin, text[begin - self.start:]
