"""Raw ZeroMQ two-hop relay: the design's limit, without persistence or bookkeeping.

``python -m bench.relay --mode py`` runs a ROUTER (clients) / ROUTER (workers)
relay in a ``zmq.Poller`` loop, draining each socket until ``zmq.Again``;
workers announce themselves with one ``READY`` frame and get requests round
robin. ``--mode c`` runs ``zmq.proxy`` (ROUTER front, DEALER back) in C.
Both bind ``tcp://127.0.0.1:*`` and print ``READY front=<ep> back=<ep>``.
High-water marks are 0 (unbounded): the client bounds what is in flight.

``--sync-dir DIR`` (py mode) makes it the *durability floor*: each request's
body is also written to a preallocated file in DIR and, once per drain of the
client socket, one ``fdatasync`` covers them (group commit) before the loop
goes on, so no reply leaves before its request is on disk.  The worker runs
while the sync is in flight, as in zmqrun's router.  It is what persisting
each job costs on this machine with no bookkeeping at all.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections import deque

import zmq


def _bind(sock: zmq.Socket) -> str:
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


SYNC_FILE_BYTES = 16 << 20
"""Size of the durability floor's preallocated file (bytes); writes wrap around inside it."""


def _sync_file(sync_dir: str) -> int:
    """A file of :data:`SYNC_FILE_BYTES` zeros, written and synced once (as zmqrun preallocates its
    log segment), so each later write overwrites allocated blocks and its fdatasync changes no metadata."""
    path = os.path.join(sync_dir, f"relay-log-{os.getpid()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    zeros = bytes(1 << 20)
    for _ in range(SYNC_FILE_BYTES >> 20):
        os.write(fd, zeros)
    os.fsync(fd)
    return fd


def run_py(ctx: zmq.Context, sync_dir: str | None = None) -> None:
    """Python Poller relay. Client frames: [client_id, hdr, body]; to worker: [wid, client_id, hdr, body].

    ``sync_dir``: also write each request body to a preallocated file there and fdatasync once per
    drain of the client socket (the durability floor, see the module docstring)."""
    fd = _sync_file(sync_dir) if sync_dir else -1
    offset = 0
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    print(f"READY front={_bind(front)} back={_bind(back)}", flush=True)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    workers: list[bytes] = []
    rr = 0
    backlog: deque[list[bytes]] = deque()
    again = zmq.Again
    NOBLOCK = zmq.NOBLOCK
    while True:
        events = dict(poller.poll())
        if back in events:
            while True:
                try:
                    msg = back.recv_multipart(NOBLOCK)
                except again:
                    break
                if len(msg) == 2 and msg[1] == b"READY":
                    workers.append(msg[0])
                    while backlog:
                        back.send_multipart([workers[0], *backlog.popleft()])
                else:
                    front.send_multipart(msg[1:])
        if front in events:
            forwarded = 0
            while True:
                try:
                    msg = front.recv_multipart(NOBLOCK)
                except again:
                    break
                if fd >= 0:  # written before it is sent, as zmqrun writes a job's SUBMIT before dispatch
                    body = msg[-1]
                    if offset + len(body) > SYNC_FILE_BYTES:
                        offset = 0
                    os.pwrite(fd, body, offset)
                    offset += len(body)
                    forwarded += 1
                if not workers:
                    backlog.append(msg)
                    continue
                rr = (rr + 1) % len(workers)
                back.send_multipart([workers[rr], *msg])
            if forwarded:
                os.fdatasync(fd)  # one sync for the whole drain; replies are read only after it


def run_c(ctx: zmq.Context) -> None:
    """``zmq.proxy`` in C: ROUTER front, DEALER back (fair-queues to workers)."""
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    print(f"READY front={_bind(front)} back={_bind(back)}", flush=True)
    zmq.proxy(front, back)


class RelayClient:
    """Bench-side DEALER client of the relay: one call in flight, or pipelined with a window."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = 0

    def call(self, body: bytes) -> bytes:
        """Send one job ``body`` and wait for its result bytes."""
        self.seq += 1
        hdr = struct.pack("<Q", self.seq)
        self.sock.send_multipart([hdr, body])
        rhdr, result = self.sock.recv_multipart()
        if rhdr != hdr:
            raise RuntimeError("relay: reply for another request")
        return result

    def pipelined(self, body: bytes, n: int, window: int, deadline_s: float) -> tuple[int, float]:
        """Send ``n`` jobs keeping up to ``window`` in flight; returns (jobs done, seconds)."""
        sock = self.sock
        send, recv = sock.send_multipart, sock.recv_multipart
        sent = done = 0
        t0 = time.perf_counter()
        stop_at = t0 + deadline_s
        while done < n:
            while sent < n and sent - done < window:
                send([struct.pack("<Q", sent), body])
                sent += 1
            recv()
            done += 1
            if not done % 1000 and time.perf_counter() > stop_at:
                n = sent  # stop sending; drain what is in flight
        return done, time.perf_counter() - t0

    def close(self) -> None:
        """Close the socket and context."""
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("py", "c"), default="py")
    ap.add_argument("--sync-dir", default=None,
                    help="py mode: write each request there and fdatasync once per drain (durability floor)")
    args = ap.parse_args()
    if args.sync_dir and args.mode != "py":
        ap.error("--sync-dir needs --mode py")
    ctx = zmq.Context()
    if args.mode == "py":
        run_py(ctx, args.sync_dir)
    else:
        run_c(ctx)


if __name__ == "__main__":
    main()
