"""Lean HTTP/1.1 keep-alive clients for Lambda's Invoke endpoint (the Lambda-style baseline).

Raw sockets and a minimal parser, so the baseline's client costs as little as
possible (a slow client would flatter zmqrun).
"""

from __future__ import annotations

import asyncio
import socket

INVOKE_PATH = b"/2015-03-31/functions/bench/invocations"


def _request(body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (INVOKE_PATH, len(body), body)
    )


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, function error?) of one response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, ferr = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"x-amz-function-error":
            ferr = True
    return status, length, ferr


class InvokeError(RuntimeError):
    """The invocation failed (non-200 status or a function error)."""


class Invoker:
    """Blocking client on one keep-alive connection: one invocation in flight."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def invoke(self, body: bytes) -> bytes:
        """POST ``body`` to the Invoke endpoint; returns the function's response body."""
        self.sock.sendall(_request(body))
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise InvokeError("connection closed")
            buf += chunk
        status, length, ferr = _parse_head(buf[:end])
        total = end + 4 + length
        while len(buf) < total:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise InvokeError("connection closed")
            buf += chunk
        self.buf = buf[total:]
        payload = buf[end + 4 : total]
        if status != 200 or ferr:
            raise InvokeError(f"status {status}: {payload[:300]!r}")
        return payload

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


async def invoke_many(port: int, body: bytes, n: int, connections: int, timeout_s: float) -> int:
    """Invoke ``n`` times over ``connections`` keep-alive connections (each one in flight).

    Returns the number of successful invocations; raises on a failed one.
    """
    remaining = n
    done = 0
    req = _request(body)

    async def one_conn() -> None:
        nonlocal remaining, done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, ferr = _parse_head(head[:-4])
                payload = await reader.readexactly(length)
                if status != 200 or ferr:
                    raise InvokeError(f"status {status}: {payload[:300]!r}")
                done += 1
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(one_conn() for _ in range(connections))), timeout_s)
    return done
