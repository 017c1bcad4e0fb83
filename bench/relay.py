"""Raw ZeroMQ two-hop relay: the design's limit, without persistence or bookkeeping.

``python -m bench.relay --mode py`` runs a ROUTER (clients) / ROUTER (workers)
relay in a ``zmq.Poller`` loop, draining each socket until ``zmq.Again``;
workers announce themselves with one ``READY`` frame and get requests round
robin. ``--mode c`` runs ``zmq.proxy`` (ROUTER front, DEALER back) in C.
Both bind ``tcp://127.0.0.1:*`` and print ``READY front=<ep> back=<ep>``.
High-water marks are 0 (unbounded): the client bounds what is in flight.
"""

from __future__ import annotations

import argparse
from collections import deque

import zmq


def _bind(sock: zmq.Socket) -> str:
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def run_py(ctx: zmq.Context) -> None:
    """Python Poller relay. Client frames: [client_id, hdr, body]; to worker: [wid, client_id, hdr, body]."""
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
            while True:
                try:
                    msg = front.recv_multipart(NOBLOCK)
                except again:
                    break
                if not workers:
                    backlog.append(msg)
                    continue
                rr = (rr + 1) % len(workers)
                back.send_multipart([workers[rr], *msg])


def run_c(ctx: zmq.Context) -> None:
    """``zmq.proxy`` in C: ROUTER front, DEALER back (fair-queues to workers)."""
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    print(f"READY front={_bind(front)} back={_bind(back)}", flush=True)
    zmq.proxy(front, back)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", choices=("py", "c"), default="py")
    args = ap.parse_args()
    ctx = zmq.Context()
    (run_py if args.mode == "py" else run_c)(ctx)


if __name__ == "__main__":
    main()
