"""zmqrun wire protocol: frame layout, command bytes and socket defaults.

Majordomo-style (18/MDP, ZeroMQ Guide ch. 4): one ROUTER endpoint serves both
clients and workers, which are DEALERs.  Every message is two frames after the
ROUTER's identity frame::

    [header, body]

``header`` is 5 bytes: a 4-byte peer-kind-and-version tag (``ZRC1`` for
clients, ``ZRW1`` for workers, ``ZRR1`` for the router) followed by one command
byte.  ``body`` is an orjson-encoded object (may be empty for HEARTBEAT and
DISCONNECT).  Jobs always travel in batches (a list of one or more), so one
message can carry one job at low latency or a thousand under load; frames per
message dominate pyzmq's CPU cost, so the header stays one small frame.

A dedicated worker's supervisor (:mod:`zmqrun.supervisor`) is a third kind of
peer that speaks with the worker tag: its own DEALER and routing id, never
registered itself.  The worker's READY names it; its SUP_HEARTBEATs keep that
worker alive, SUP_EXITED reports the worker's process ended (with outcomes of
the jobs it killed), and the router sends it CANCEL for that worker's jobs.

Live logs (:mod:`zmqrun.livelogs`): a worker's log pump, a fourth kind of peer
with the worker tag and its own DEALER (never registered), sends W_LOG chunks of
the output of jobs that have run for a while; a client subscribes with C_LOGS
and the router pushes R_LOGS to it.  Chunks are relayed, never written to the
job log: the logs the job log keeps are those of the final RESULT.
"""

from __future__ import annotations

from typing import Any, Callable, Final

import zmq

CLIENT: Final = b"ZRC1"
WORKER: Final = b"ZRW1"
ROUTER: Final = b"ZRR1"

# client -> router
C_SUBMIT: Final = 0x01  # {"req", "jobs": [job, ...]}                -> ACK after fdatasync
C_WAIT: Final = 0x02  # {"req", "ids": [...]}                         -> REPLY, then RESULT pushes
C_GET: Final = 0x03  # {"req", "id"}                                  -> REPLY {"job": record|null}
C_LIST: Final = 0x04  # {"req", "status", "script", "limit"}          -> REPLY {"jobs": [...]}
C_CANCEL: Final = 0x05  # {"req", "id", "reason", "by"}               -> REPLY {"canceled", "status", "message"}
C_STATUS: Final = 0x06  # {"req"}                                     -> REPLY {"workers", "counts"}
C_LOGS: Final = 0x07  # {"req", "id", "follow": bool, "from": [attempt, chars] | null, "stop"?: true}
#                        -> REPLY {"job": null} (unknown id) or {"status", "attempt", "offset", "text", "end"};
#                        with follow (and the job not finished) R_LOGS pushes follow until one has "end";
#                        "stop": unsubscribe (REPLY {}).  Offsets and "from" count characters of one attempt's output.

# worker -> router
W_READY: Final = 0x11  # {"script": str|None, "credit": int, "heartbeat": s, "name": str, "pid": int,
#                          "supervisor": routing id of its supervisor (str) or null,
#                          "running": [[id, attempt], ...] jobs it still runs from before (a router restart or
#                          a dropped session): the router gives them back to it if their attempt is still open,
#                          "unstarted": [[id, attempt], ...] jobs it had buffered and dropped unstarted when its
#                          last session ended: queued again without counting the attempt, if it is still open}
W_RESULT: Final = 0x14  # {"results": [result, ...]}  (MDP FINAL; each result returns one credit)
W_HEARTBEAT: Final = 0x15
W_DISCONNECT: Final = 0x16  # empty, or {"unstarted": [id, ...]}: jobs a stopping worker hands back unstarted
# supervisor -> router (a dedicated worker's supervisor process; its own DEALER, its own routing id,
# never registered itself: the worker's READY names it)
W_SUP_HEARTBEAT: Final = 0x17  # empty: the worker it supervises is alive (even if busy in a long job)
W_SUP_EXITED: Final = 0x18  # {"worker": routing id of the ended child, "reason", "results": [result, ...],
#                              "started": [id, attempt] it started last | null: none (absent: unknown),
#                              "in_order": true if its results came back in start order (one job at a time)}
# log pump -> router (a worker's live-log thread; its own DEALER and routing id, never registered)
W_LOG: Final = 0x19  # {"logs": [[id, attempt, offset, text], ...]}: output of running jobs since the last chunk;
#                       offset = characters of that attempt's output before text.  No reply; not logged.

# router -> peer
R_ACK: Final = 0x21  # {"req", "accepted": [id...], "rejected": [{"id", "error"}]}
R_RESULT: Final = 0x22  # {"results": [{"id", "status", "result"|"error"}]}
R_REPLY: Final = 0x23  # {"req", ...}
R_JOBS: Final = 0x24  # {"jobs": [{"id", "attempt", "script", "args", "timeout"}]}
R_HEARTBEAT: Final = 0x25
R_DISCONNECT: Final = 0x26  # {"reason"}: the worker must reconnect and send READY again
R_CANCEL: Final = 0x27  # {"id", "attempt", "reason"}: stop this running job (to the supervisor if it has one)
R_LOGS: Final = 0x28  # to a follower: {"id", "attempt", "offset", "text"}; the last one adds "end": true and
#                        "status" (its text: the final logs from offset on; sent once the job is durable, as RESULT)
R_ERROR: Final = 0x2F  # {"req"?, "error": "one readable line"}

# Paranoid Pirate defaults (ZeroMQ Guide ch. 4, 6/PPP).
HEARTBEAT_INTERVAL: Final = 1.0  # seconds
HEARTBEAT_LIVENESS: Final = 3  # missed intervals before a peer is declared dead
RECONNECT_INITIAL: Final = 1.0  # seconds, doubled up to RECONNECT_MAX, plus jitter
RECONNECT_MAX: Final = 32.0

RECONNECT_IVL_MAX_MS: Final = 1000  # libzmq's TCP reconnect backoff cap for clients and workers (see configure_peer_socket)
MAX_MESSAGE_SIZE: Final = 256 * 1024 * 1024  # bytes; router MAXMSGSIZE (zmqrun router --max-message-bytes)
MAX_ARGS_BYTES: Final = 64 * 1024 * 1024  # bytes of a job's args as JSON (router --max-args-bytes, Client max_args_bytes)
MAX_RESULT_BYTES: Final = 64 * 1024 * 1024  # bytes of a job's result as JSON (worker --max-result-bytes)
DEFAULT_ADDRESS: Final = "tcp://127.0.0.1:5555"


def header(kind: bytes, command: int) -> bytes:
    """Return the 5-byte header frame for ``kind`` (e.g. :data:`ROUTER`) and ``command``."""
    return kind + bytes((command,))


# Pre-built headers for the hot path (avoid building them per message).
H_ACK: Final = header(ROUTER, R_ACK)
H_RESULT: Final = header(ROUTER, R_RESULT)
H_REPLY: Final = header(ROUTER, R_REPLY)
H_JOBS: Final = header(ROUTER, R_JOBS)
H_R_HEARTBEAT: Final = header(ROUTER, R_HEARTBEAT)
H_R_DISCONNECT: Final = header(ROUTER, R_DISCONNECT)
H_ERROR: Final = header(ROUTER, R_ERROR)
H_W_READY: Final = header(WORKER, W_READY)
H_W_RESULT: Final = header(WORKER, W_RESULT)
H_W_HEARTBEAT: Final = header(WORKER, W_HEARTBEAT)
H_W_DISCONNECT: Final = header(WORKER, W_DISCONNECT)
H_W_SUP_HEARTBEAT: Final = header(WORKER, W_SUP_HEARTBEAT)
H_W_SUP_EXITED: Final = header(WORKER, W_SUP_EXITED)
H_R_CANCEL: Final = header(ROUTER, R_CANCEL)
H_LOGS: Final = header(ROUTER, R_LOGS)
H_W_LOG: Final = header(WORKER, W_LOG)


# Plain ints, not pyzmq's enum flags: enum arithmetic costs microseconds per frame on the hot path.
NOBLOCK: Final = int(zmq.NOBLOCK)
MORE_NOBLOCK: Final = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# pyzmq's send without its Python wrapper (zmq.Socket.send adds only the DRAFT routing_id/group handling,
# which zmqrun's ROUTER and DEALER sockets never use): ~0.2 µs less per frame.  For a real zmq.Socket only
# (tests drive the router and worker with stand-in sockets that keep their own send).
RAW_SEND: Final = zmq.backend.Socket.send


def recv_ready(sock: zmq.Socket, limit: int, ready: bool = False) -> list[list[bytes]]:
    """Every whole message waiting on ``sock`` (at most ``limit``), without blocking.

    Checks ``EVENTS`` instead of catching ``zmq.Again``: the socket FD is
    edge-triggered, so a reader must drain it, and an exception per drain costs ~10 µs.
    A frame's ``more`` flag comes with the frame (``copy=False``, read in C) instead of a
    getsockopt(RCVMORE) per frame, which runs pyzmq's option lookup through a Python enum
    (measured ~0.6 µs less per three-frame message, and no Python-level enum code on every
    message of the router's, worker's and client's hot paths).  ``ready``: the caller's own
    EVENTS check just found a message (one getsockopt, two system calls, saved).
    """
    out: list[list[bytes]] = []
    recv, getsockopt = sock.recv, sock.getsockopt
    while len(out) < limit and (ready or getsockopt(_EVENTS) & _POLLIN):
        ready = False
        frame = recv(NOBLOCK, copy=False)
        frames = [frame.bytes]
        while frame.more:  # the rest of a message is there with its first frame
            frame = recv(NOBLOCK, copy=False)
            frames.append(frame.bytes)
        out.append(frames)
    return out


def has_input(sock: zmq.Socket) -> bool:
    """True if a message is waiting on ``sock`` (no syscall when one is already queued)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def sender(sock: zmq.Socket) -> Callable[[Any, int], Any]:
    """``sock``'s send(frame, flags): :data:`RAW_SEND` bound to it for a real zmq.Socket, else its own."""
    return RAW_SEND.__get__(sock) if type(sock) is zmq.Socket else sock.send


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Send a multipart message without blocking; raises zmq.Again (no connection) or zmq.ZMQError."""
    send = sender(sock)
    for f in frames[:-1]:
        send(f, MORE_NOBLOCK)
    send(frames[-1], NOBLOCK)


def tcp_port_ok(endpoint: str, bind: bool = False) -> bool:
    """False for a tcp:// address without host or port, or whose port libzmq would misread ("tcp://HOST:99999"
    as port 34463, the number mod 65536, and "5591x" as 5591); True for any other address.  ``bind``: port
    0 and "*" (any free port) are fine too."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return True
    host, colon, port = rest.rpartition(":")
    if not (colon and host):
        return False
    if bind and port == "*":
        return True
    return port.isdigit() and (0 if bind else 1) <= int(port) <= 65535


def ipc_in_use(endpoint: str) -> bool:
    """True if ``endpoint`` is an ipc:// path on which a process accepts connections now.  libzmq's bind
    removes an existing socket file first, so a second router would silently take the path over from a
    running one (clients then reach the newcomer, and the first stays unreachable); a stale file (its
    router gone: connection refused) is no obstacle."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):  # abstract names: bind refuses itself
        return False
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(endpoint[len("ipc://"):])
        return True
    except OSError:  # no such file, refused (stale), not a socket
        return False
    finally:
        probe.close()


def check_endpoint(endpoint: str) -> None:
    """Raise ValueError with one readable line if ZeroMQ cannot parse ``endpoint`` (tcp://host:port, ipc://path)."""
    if not isinstance(endpoint, str):
        raise ValueError(f"invalid router address {endpoint!r}: a string such as tcp://127.0.0.1:5555")
    if not tcp_port_ok(endpoint):
        raise ValueError(f"invalid router address {endpoint!r} (the port must be a number from 1 to 65535); "
                         f"use tcp://HOST:PORT or ipc://PATH")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as e:
        raise ValueError(f"invalid router address {endpoint!r} ({e.strerror}); use tcp://HOST:PORT or "
                         f"ipc://PATH") from None
    finally:
        sock.close(0)


def configure_peer_socket(sock: zmq.Socket, identity: bytes, linger_ms: int = 500) -> None:
    """Apply the DEALER options every zmqrun client and worker uses.

    - ROUTING_ID: a stable identity so the router (ROUTER_HANDOVER) can route
      to a peer that reconnected.
    - IMMEDIATE: nothing queues toward an absent router; the application owns
      resends and timeouts.
    - LINGER: bounded, so closing never hangs on unsent messages (S8).
    - TCP keepalive: idle NAT/conntrack drops are noticed by the kernel.
    - IPV6: an ``tcp://[::1]:PORT`` address works (IPv4 ones still do).
    - RECONNECT_IVL 100 ms, RECONNECT_IVL_MAX 1 s: libzmq doubles the retry interval while the router
      is down; capped at 1 s, a worker is back within ~1.1 s of a router restart however long the
      outage, inside the router's recovery lease (heartbeat x liveness + 1 s, 4 s by default), so the
      jobs it kept running are not queued again and run twice (a 5 s cap let them: found by a
      new-user session after a 25 s outage).  One connect attempt per second is nothing on a LAN.
    """
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
