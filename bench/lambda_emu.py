"""A lean local emulator of the AWS Lambda Runtime API (plus the Invoke endpoint).

One process, one uvloop event loop, a small ``asyncio.Protocol`` HTTP/1.1 parser,
keep-alive connections, no threads. It serves:

* runtime side: ``GET /2018-06-01/runtime/invocation/next`` (long poll),
  ``POST /2018-06-01/runtime/invocation/{id}/response`` and ``.../error``,
  ``POST /2018-06-01/runtime/init/error``;
* client side: ``POST /2015-03-31/functions/{name}/invocations`` (Lambda's
  Invoke API): the request is answered with the function's response.

It starts the real ``awslambdaric`` runtimes itself, as the Lambda service does:
``--mode warm`` keeps ``--runtimes N`` long-lived runtimes; ``--mode cold``
starts a new runtime process for every invocation and terminates it once it
answered. Prints ``READY port=<p>`` when the warm runtimes are polling.

Usage: ``python -m bench.lambda_emu --mode warm --runtimes 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import uvloop

HANDLER = "bench.jobs_lambda.handler"
INVOKE_PREFIX = b"/2015-03-31/functions/"
NEXT_PATH = b"/2018-06-01/runtime/invocation/next"
INV_PREFIX = b"/2018-06-01/runtime/invocation/"
REASONS = {100: b"Continue", 200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found"}


class Lane:
    """Invocations waiting for a runtime, and runtimes parked in ``/next``, of one API address.

    Warm mode has one lane on the main port, shared by all runtimes. Cold mode
    gives every invocation a lane of its own on a fresh port, so a runtime that
    answered and is being terminated can never pick up the next invocation.
    """

    def __init__(self) -> None:
        self.queue: deque[Invocation] = deque()
        self.pollers: deque[Conn] = deque()


@dataclass(slots=True)
class Invocation:
    """One pending invoke: its request id, event body and the client waiting for it."""

    req_id: bytes
    body: bytes
    client: Conn
    proc: asyncio.subprocess.Process | None = field(default=None)
    server: asyncio.AbstractServer | None = field(default=None)


class Emulator:
    """Runtime API state: lanes of queued invocations and polling runtimes, invocations in flight."""

    def __init__(self, mode: str, runtimes: int) -> None:
        self.mode = mode
        self.runtimes = runtimes
        self.port = 0
        self.main = Lane()
        self.inflight: dict[bytes, Invocation] = {}
        self.procs: set[asyncio.subprocess.Process] = set()
        self.ids = itertools.count(1)
        self.ready = asyncio.Event()

    async def spawn(self, port: int) -> asyncio.subprocess.Process:
        """Start one ``python -m awslambdaric bench.jobs_lambda.handler`` runtime on API ``port``."""
        env = dict(os.environ, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "awslambdaric", HANDLER, env=env, stdin=asyncio.subprocess.DEVNULL
        )
        self.procs.add(proc)
        return proc

    async def reap(self, proc: asyncio.subprocess.Process) -> None:
        """Terminate one runtime process and wait for it."""
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
        self.procs.discard(proc)

    # --- client side -------------------------------------------------------
    def invoke(self, client: Conn, body: bytes) -> None:
        """Queue an invocation from ``client``; cold mode starts a runtime for it."""
        inv = Invocation(b"%016x" % next(self.ids), body, client)
        if self.mode == "cold":
            asyncio.get_running_loop().create_task(self._cold(inv))
        else:
            self.main.queue.append(inv)
            self._dispatch(self.main)

    async def _cold(self, inv: Invocation) -> None:
        lane = Lane()
        lane.queue.append(inv)
        loop = asyncio.get_running_loop()
        inv.server = await loop.create_server(lambda: Conn(self, lane), "127.0.0.1", 0)
        inv.proc = await self.spawn(inv.server.sockets[0].getsockname()[1])

    # --- runtime side ------------------------------------------------------
    def next(self, runtime: Conn) -> None:
        """A runtime polls for work: hand it a queued invocation or park it."""
        lane = runtime.lane
        lane.pollers.append(runtime)
        if lane is self.main and len(lane.pollers) >= self.runtimes:
            self.ready.set()
        self._dispatch(lane)

    def _dispatch(self, lane: Lane) -> None:
        while lane.queue and lane.pollers:
            rt = lane.pollers.popleft()
            if rt.closed:
                continue
            inv = lane.queue.popleft()
            self.inflight[inv.req_id] = inv
            deadline = int(time.time() * 1000) + 900_000
            rt.reply(
                200,
                inv.body,
                b"Content-Type: application/json\r\n"
                b"Lambda-Runtime-Aws-Request-Id: %s\r\n"
                b"Lambda-Runtime-Deadline-Ms: %d\r\n"
                b"Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:local:000000000000:function:bench\r\n"
                b"Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000;Sampled=0\r\n"
                % (inv.req_id, deadline),
            )

    def result(self, req_id: bytes, body: bytes, error: bool) -> int:
        """A runtime posted a response (or error) for ``req_id``; answer the client."""
        inv = self.inflight.pop(req_id, None)
        if inv is None:
            return 400
        extra = b"X-Amz-Function-Error: Unhandled\r\n" if error else b""
        inv.client.reply(200, body, b"Content-Type: application/json\r\n" + extra)
        if inv.proc is not None:
            asyncio.get_running_loop().create_task(self.reap(inv.proc))
        if inv.server is not None:
            inv.server.close()
        return 202


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection (client or runtime), requests handled in order."""

    def __init__(self, emu: Emulator, lane: Lane) -> None:
        self.emu = emu
        self.lane = lane
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def reply(self, status: int, body: bytes, headers: bytes = b"") -> None:
        """Write one response (Content-Length framed, connection kept alive)."""
        if self.closed or self.transport is None:
            return
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, REASONS.get(status, b"Status"), len(body), headers, body)
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            length, expect = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"expect" and b"100-continue" in value.lower():
                    expect = True
            total = end + 4 + length
            if len(self.buf) < total:
                if expect and not self.continued and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self.continued = True
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            self.continued = False
            self.handle(method, path, body)

    def handle(self, method: bytes, path: bytes, body: bytes) -> None:
        """Route one request."""
        emu = self.emu
        if method == b"GET" and path == NEXT_PATH:
            emu.next(self)
        elif method == b"POST" and path.startswith(INVOKE_PREFIX):
            emu.invoke(self, body)
        elif method == b"POST" and path.startswith(INV_PREFIX):
            req_id, _, kind = path[len(INV_PREFIX) :].partition(b"/")
            code = emu.result(req_id, body, kind == b"error")
            self.reply(code, b'{"status":"OK"}')
        elif method == b"POST" and path.endswith(b"/init/error"):
            sys.stdout.write(f"runtime init error: {body[:500]!r}\n")
            self.reply(202, b'{"status":"OK"}')
        else:
            self.reply(404, b"{}")


async def serve(mode: str, runtimes: int) -> None:
    """Bind 127.0.0.1:0, start warm runtimes, print READY, serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    emu = Emulator(mode, runtimes)
    server = await loop.create_server(lambda: Conn(emu, emu.main), "127.0.0.1", 0, backlog=1024)
    emu.port = server.sockets[0].getsockname()[1]
    if mode == "warm":
        for _ in range(runtimes):
            await emu.spawn(emu.port)
        await asyncio.wait_for(emu.ready.wait(), timeout=30)
    print(f"READY port={emu.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await asyncio.gather(*(emu.reap(p) for p in list(emu.procs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("warm", "cold"), default="warm")
    ap.add_argument("--runtimes", type=int, default=1, help="warm runtimes to keep (warm mode)")
    args = ap.parse_args()
    uvloop.run(serve(args.mode, args.runtimes))


if __name__ == "__main__":
    main()
