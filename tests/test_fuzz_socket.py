"""Socket-level fuzz of a real router process (``python -m zmqrun router`` on 127.0.0.1).

Hostile peers with raw sockets: TCP connections that send random bytes, ZMTP greetings with garbage or
oversized frames behind them; DEALERs that send random and mutated multipart messages (frames over the
router's MAXMSGSIZE, thousands of frames, unknown headers, junk bodies) under tricky routing ids (one
another's, the client's); a worker that registers and then reports junk; REQ, ROUTER, PUB and PUSH
sockets.  Meanwhile a real client runs jobs on a real worker.  Afterwards the router process is alive,
its log shows no traceback, a fresh client runs a job end to end, and ``zmqrun log check`` finds its data
dir healthy.  Deterministic (fixed seed), a few thousand messages, ~10-20 s.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import orjson
import zmq

from conftest import FIBO, Cluster, wait_until
from zmqrun import protocol as P

MAX_MESSAGE = 2**20  # the router's --max-message-bytes 1MiB here, so oversized frames are cheap to send
BUDGET_S = 12.0  # the hostile phases stop early if the machine is slow (each is also bounded by count)


def _zmtp_greeting(socket_type: bytes = b"DEALER") -> bytes:
    """A ZMTP 3.0 greeting (NULL mechanism) and READY command, as a real DEALER sends them."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    props = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    body = b"\x05READY" + props
    return greeting + b"\x04" + bytes([len(body)]) + body


def _raw_tcp(host: str, port: int, rnd: random.Random, deadline: float) -> int:
    """TCP connections that speak garbage; return how many were made."""
    n = 0
    while n < 150 and time.monotonic() < deadline:
        kind = n % 5
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(0.2)
                if kind == 0:  # random bytes from the first byte on
                    s.sendall(rnd.randbytes(rnd.randint(1, 3000)))
                elif kind == 1:  # a valid greeting, then random bytes
                    s.sendall(_zmtp_greeting() + rnd.randbytes(rnd.randint(1, 500)))
                elif kind == 2:  # a valid greeting, then a frame announcing 2^40 bytes (over MAXMSGSIZE)
                    s.sendall(_zmtp_greeting() + b"\x02" + struct.pack(">Q", 1 << 40) + b"x" * 100)
                elif kind == 3:  # a greeting cut short, or of another version or mechanism
                    g = bytearray(_zmtp_greeting())
                    g[rnd.randrange(len(g))] ^= 0xFF
                    s.sendall(bytes(g[:rnd.randint(1, len(g))]))
                else:  # a greeting with an unknown socket type, then well-formed frames
                    s.sendall(_zmtp_greeting(b"BOGUS") + b"\x01\x00" + b"\x00\x05ZRC1\x01")
                try:
                    s.recv(4096)
                except (socket.timeout, OSError):
                    pass
        except OSError:
            pass
        n += 1
    return n


def _junk_frames(rnd: random.Random) -> list[bytes]:
    kind = rnd.randrange(8)
    heads = [P.header(P.CLIENT, c) for c in range(1, 8)] + [P.header(P.WORKER, c) for c in range(0x11, 0x19)]
    if kind == 0:
        return [rnd.randbytes(rnd.randint(0, 30)) for _ in range(rnd.randint(1, 5))]
    if kind == 1:
        return [rnd.choice(heads), rnd.randbytes(rnd.randint(0, 60))]
    if kind == 2:
        return [rnd.choice(heads), orjson.dumps({"req": rnd.randint(0, 9), "jobs": [{"id": rnd.random()}],
                                                 "ids": [1, None], "id": [], "results": "x", "worker": 5})]
    if kind == 3:
        return [rnd.choice([b"ZRC2\x01", b"ZRR1\x21", b"ZRW0\x11", b"HTTP/", b"\x00" * 5]), b"{}"]
    if kind == 4:
        return [rnd.choice(heads)]
    if kind == 5:
        body = bytearray(orjson.dumps({"req": 1, "jobs": [{"id": "sock-fz", "script": "m:f", "args": {}}]}))
        body[rnd.randrange(len(body))] ^= 1 << rnd.randrange(8)
        return [P.header(P.CLIENT, P.C_SUBMIT), bytes(body)]
    if kind == 6:
        return [rnd.choice(heads), b"\xff\xfe\xed\xa0\x80"]
    return [rnd.choice(heads), orjson.dumps({"req": 1, "id": "nope", "ids": ["nope"], "limit": -1})]


def test_socket_fuzz_real_router(zr: Cluster) -> None:
    rnd = random.Random(20261129)
    router = zr.start_router(extra=("--max-message-bytes", "1MiB"))
    zr.start_worker(FIBO, name="warm-fz")
    address = zr.address
    assert address is not None
    host, port = address.removeprefix("tcp://").split(":")
    good = zr.client(timeout=30)
    assert good.map(FIBO, [{"n": 5}] * 20) == [5] * 20
    deadline = time.monotonic() + BUDGET_S
    ctx = zmq.Context()
    sent = 0
    try:
        # Raw TCP garbage and ZMTP tricks.
        tcp = _raw_tcp(host, int(port), rnd, deadline)

        # DEALERs with tricky routing ids: shared among themselves, the real worker's (ROUTER_HANDOVER gives
        # it to the hostile peer; the worker hears no heartbeats, reconnects and registers again), the
        # longest allowed; random and mutated messages, frames over MAXMSGSIZE, thousands of frames.
        # (Not a client's: a client whose routing id is taken over keeps a dead connection, see the README.)
        idents = [b"fz-a", b"fz-a", b"fz-b", b"warm-fz", b"x" * 255, None]
        dealers = []
        for ident in idents:
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.SNDHWM, 0)
            if ident is not None:
                d.setsockopt(zmq.ROUTING_ID, ident)
            d.connect(address)
            dealers.append(d)
        for i in range(2500):
            if time.monotonic() > deadline:
                break
            d = dealers[i % len(dealers)] if i % 97 else dealers[-1]
            if i % 500 == 7:
                frames = [P.header(P.CLIENT, P.C_SUBMIT), b"z" * (MAX_MESSAGE + 1000)]  # over MAXMSGSIZE
            elif i % 500 == 11:
                frames = [b"f"] * 3000  # many frames
            else:
                frames = _junk_frames(rnd)
            try:
                d.send_multipart(frames, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                pass
            while d.poll(0):
                d.recv_multipart()

        # A worker that registers, then reports junk and results for jobs it does not hold.
        w = ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.LINGER, 0)
        w.setsockopt(zmq.ROUTING_ID, b"fz-worker")
        w.connect(address)
        w.send_multipart([P.H_W_READY, orjson.dumps({"script": "nobody.py:f", "credit": 1, "heartbeat": 60})])
        sup = ctx.socket(zmq.DEALER)  # and a peer posing as the real worker's supervisor
        sup.setsockopt(zmq.LINGER, 0)
        sup.connect(address)
        for i in range(300):
            w.send_multipart([P.H_W_RESULT, orjson.dumps({"worker": "x", "batch": i, "results": [
                {"id": "nope", "attempt": 1, "status": "success", "result": 1}, {"id": [1]}, "junk", None]})])
            sup.send_multipart([P.H_W_SUP_EXITED, orjson.dumps({"worker": "warm-fz", "started": ["x", None],
                                                                "results": [{"id": "nope", "attempt": 1}]})])
            sent += 2

        # Other socket types: REQ (an envelope the router does not expect), ROUTER to ROUTER, PUB, PUSH.
        others = []
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(address)
        req.send_multipart([P.header(P.CLIENT, P.C_STATUS), b"{}"])
        rtr = ctx.socket(zmq.ROUTER)
        rtr.setsockopt(zmq.LINGER, 0)
        rtr.setsockopt(zmq.CONNECT_ROUTING_ID, b"the-router")
        rtr.connect(address)
        for sock_type in (zmq.PUB, zmq.PUSH):
            s = ctx.socket(sock_type)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            others.append(s)
        time.sleep(0.3)  # let the connections come up
        for _ in range(100):
            for s in others:
                try:
                    s.send_multipart(_junk_frames(rnd), zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            try:
                rtr.send_multipart([b"the-router", *_junk_frames(rnd)], zmq.NOBLOCK)
                sent += 1
            except zmq.ZMQError:
                pass
        others += [req, rtr, w, sup, *dealers]

        # The router is still there, and answers a hostile peer that behaves with one readable line.
        probe = ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(address)
        probe.send_multipart([P.header(P.CLIENT, P.C_GET), orjson.dumps({"req": 42, "id": 7})])
        assert probe.poll(20_000), "no answer from the router after the fuzz"
        head, body = probe.recv_multipart()
        err = orjson.loads(body)
        assert head == P.H_ERROR and err["req"] == 42 and "\n" not in err["error"], (head, err)
        others.append(probe)
        for s in others:
            s.close(0)
    finally:
        ctx.destroy(0)
    assert tcp >= 50 and sent >= 2000, (tcp, sent)
    print(f"socket fuzz: {tcp} raw TCP connections, {sent} hostile messages")

    # Alive, serving: the client that ran jobs before and a fresh one run jobs (the worker is back).
    assert router.alive(), router.output()[-3000:]
    assert good.run(FIBO, {"n": 12}, wait_timeout=60) == 144
    fresh = zr.client(timeout=30)
    assert fresh.run(FIBO, {"n": 10}, wait_timeout=60) == 55
    assert fresh.map(FIBO, [{"n": 6}] * 50) == [8] * 50
    status = fresh.status()
    assert "warm-fz" in [w["name"] for w in status["workers"]]  # no hostile report dropped the real worker
    dropped = status["dropped"]
    assert dropped.get("malformed", 0) + dropped.get("bad_request", 0) >= 1000, dropped
    assert "Traceback" not in router.output(), router.output()[-5000:]
    check = zr.cli("log", "check", str(zr.data_dir), address=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert router.stop() == 0, router.output()[-3000:]
    check = zr.cli("log", "check", str(zr.data_dir), "--json", address=False)
    assert check.returncode == 0 and orjson.loads(check.stdout)["status"] == "healthy", check.stdout
    wait_until(lambda: not router.alive(), 5, what="router exit")
