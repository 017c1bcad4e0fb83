"""Authentication (CurveZMQ with client and worker roles) and the loopback bind rule.

All cryptography is libzmq's CurveZMQ, driven through pyzmq's :mod:`zmq.auth`
(key files, the ZAP handler); nothing here implements crypto.

Keys.  ``zmqrun keys generate NAME`` writes ``NAME.key`` (the public key, to hand
out) and ``NAME.key_secret`` (mode 0600) with :func:`zmq.auth.create_certificates`.
The router holds its own secret key and two directories of public keys: the
clients' (``--clients-keys``) and the workers' (``--workers-keys``).  A peer whose
key is in neither cannot connect (the CURVE handshake fails).

Roles.  The ZAP handler (:class:`RoleAuthenticator`, pyzmq's ThreadAuthenticator
with our key table) gives each connection a ZeroMQ User-Id naming its role(s):
``c:NAME`` for a client key, ``w:NAME`` for a worker key, ``cw:NAME`` for a key in
both directories.  The router reads the User-Id of every message it receives (a
property of the connection the message came in on, so no peer can forge it) and
refuses client commands (0x01-0x0F) from a key without the client role and worker
commands (0x11-0x1F, every ``ZRW1`` message) from a key without the worker role:
ERROR "role: ...", a rate-limited warning in its log, and nothing else happens.

Routing ids and ROUTER_HANDOVER.  The router's socket hands a routing id over to
whichever connection claims it last (so a worker that reconnects takes over its
old pipe).  Authentication cannot bind a routing id to a key (ZAP never sees the
peer's routing id), so a peer that knew a worker's routing id could connect with
it and receive that worker's jobs, even though every message it *sends* is still
checked by key.  With CURVE on, workers, supervisors and clients therefore add 128
random bits to their routing ids (:func:`secret_suffix`); the router never shows
routing ids to clients (``status`` and job records show worker *names*), so no
peer can claim another's.  (Worker keys are trusted alike: any worker key may
register under any routing id.)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .protocol import tcp_port_ok

log = logging.getLogger("zmqrun.security")

WARN_INTERVAL = 10.0  # seconds between two role warnings for the same key
ROLE_CLIENT, ROLE_WORKER = "c", "w"
ZAP_DOMAIN = "zmqrun"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SecurityError(ValueError):
    """A security setting that cannot be used (bad key file, plain bind on a non-loopback address)."""


# -- key files ------------------------------------------------------------------------------


def generate_keys(name: str, directory: str | os.PathLike[str] = ".") -> tuple[Path, Path]:
    """Write a CURVE keypair ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600) into ``directory``.

    The directory is created with mode 0700 if missing.  Returns (public file, secret file).
    Raises SecurityError for a bad name or if either file exists already (nothing is
    overwritten), OSError if the files cannot be written.
    """
    if not _NAME.match(name):
        raise SecurityError(f"invalid key name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . -, starting with a "
                            f"letter or digit")
    folder = Path(directory)
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SecurityError(f"{path} exists already; remove it first or choose another name (nothing written)")
    import zmq.auth

    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        pub, sec = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(sec, 0o600)
    os.chmod(pub, 0o644)
    return Path(pub), Path(sec)


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public key, secret key), both z85, from a ``.key_secret`` file.

    Raises SecurityError if the file cannot be read or holds no secret key.  Logs a
    warning if the file is readable by group or others.
    """
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE secret key file {path}: {e}") from None
    if not secret:
        raise SecurityError(f"{path} holds no secret key (give the NAME.key_secret file, not NAME.key)")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("CURVE secret key file %s is accessible by group or others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key of a ``.key`` (or ``.key_secret``) file; raises SecurityError if there is none."""
    import zmq.auth

    try:
        public, _secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read CURVE public key file {path}: {e}") from None
    return public


def load_key_dir(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """{z85 public key: key name} of every ``*.key`` file in ``directory``; SecurityError if it is not a
    directory."""
    folder = Path(directory)
    if not folder.is_dir():
        raise SecurityError(f"CURVE key directory {directory} does not exist or is not a directory")
    return {load_public(p): p.stem for p in sorted(folder.glob("*.key"))}


@dataclass(frozen=True)
class CurveKeys:
    """A client's or worker's CURVE settings: its own secret key file and the router's public key file.

    ``secret_file``: the ``NAME.key_secret`` written by ``zmqrun keys generate``;
    ``router_key_file``: the router's ``ROUTER.key``.  Pass as ``Client(..., curve=CurveKeys(...))``.
    Files are read when a socket is set up (:meth:`apply`).
    """

    secret_file: str
    router_key_file: str

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(own public key, own secret key, router public key), z85.  Raises SecurityError for unreadable files."""
        public, secret = load_secret(self.secret_file)
        return public, secret, load_public(self.router_key_file)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it connects) a CURVE client of the router.  Raises SecurityError for
        unreadable key files."""
        public, secret, server = self.load()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server

    def as_dict(self) -> dict[str, str]:
        """The two paths, for passing to a child process."""
        return {"secret_file": self.secret_file, "router_key_file": self.router_key_file}


def curve_keys(secret_file: str | None, router_key_file: str | None) -> CurveKeys | None:
    """CurveKeys from two optional paths (None if neither); SecurityError if only one is given."""
    if not secret_file and not router_key_file:
        return None
    if not secret_file or not router_key_file:
        raise SecurityError("CURVE needs both --curve-secret FILE (your NAME.key_secret) and --router-key FILE "
                            "(the router's public key)")
    return CurveKeys(str(secret_file), str(router_key_file))


def secret_suffix() -> str:
    """128 random bits (hex) for a routing id, so that no other peer can claim it (see the module docstring)."""
    return os.urandom(16).hex()


# -- router side --------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterCurve:
    """The router's CURVE settings: its secret key file and the public key directories per role."""

    secret_file: str
    clients_keys: str
    workers_keys: str


def router_curve(secret_file: str | None, clients_keys: str | None, workers_keys: str | None) -> RouterCurve | None:
    """RouterCurve from the three router options (None if none is given); SecurityError if some are missing."""
    given = [x for x in (secret_file, clients_keys, workers_keys) if x]
    if not given:
        return None
    if len(given) < 3:
        raise SecurityError("CURVE needs all of --curve-secret FILE, --clients-keys DIR and --workers-keys DIR")
    return RouterCurve(str(secret_file), str(clients_keys), str(workers_keys))


def key_table(curve: RouterCurve) -> dict[bytes, str]:
    """{z85 public key: User-Id} for every key of both directories (User-Id ``c:NAME``, ``w:NAME``, ``cw:NAME``).

    Raises SecurityError if a directory cannot be read or holds no key at all."""
    clients, workers = load_key_dir(curve.clients_keys), load_key_dir(curve.workers_keys)
    if not clients and not workers:
        raise SecurityError(f"no *.key files in {curve.clients_keys} or {curve.workers_keys}: nobody could connect")
    table = {}
    for key in clients.keys() | workers.keys():
        roles = (ROLE_CLIENT if key in clients else "") + (ROLE_WORKER if key in workers else "")
        table[key] = f"{roles}:{clients.get(key) or workers.get(key)}"
    return table


def make_authenticator(ctx: zmq.Context, table: dict[bytes, str]) -> Any:
    """Start pyzmq's ZAP handler (a thread) on ``ctx`` that accepts exactly the keys of ``table`` and gives
    each connection the User-Id the table names.  Start it before binding: libzmq accepts any CURVE key
    while no ZAP handler runs.  Call ``.stop()`` on the result before terminating ``ctx``."""
    from zmq.auth.thread import ThreadAuthenticator

    class RoleAuthenticator(ThreadAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            return table[zmq.utils.z85.encode(client_public_key)]

    auth = RoleAuthenticator(ctx, log=logging.getLogger("zmqrun.zap"))
    auth.start()
    auth.certs[ZAP_DOMAIN] = {key: True for key in table}
    return auth


def setup_router_socket(sock: zmq.Socket, curve: RouterCurve) -> None:
    """Make the router's ROUTER socket a CURVE server with its secret key (before bind)."""
    public, secret = load_secret(curve.secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


class RoleGuard:
    """Checks the role of every message's key (see the module docstring); used only with CURVE.

    :meth:`allowed` returns None if the key behind ``user_id`` may send ``kind``/``cmd``, else the
    error text for the peer.  Warnings go to the router log at most once per key per
    :data:`WARN_INTERVAL` seconds.
    """

    def __init__(self) -> None:
        self._warned: dict[str, float] = {}
        self._verdicts: dict[tuple[str, bytes], bool] = {}  # (User-Id, header) -> permitted
        self.refused = 0

    def permits(self, user_id: str, header: bytes) -> bool:
        """Whether the key behind ``user_id`` may send a message with this 5-byte ``header`` (cached: the
        hot path costs one dict lookup per message)."""
        key = (user_id, header)
        verdict = self._verdicts.get(key)
        if verdict is None:
            if len(self._verdicts) > 10_000:  # headers are the peer's bytes: keep the cache bounded
                self._verdicts.clear()
            verdict = self._verdicts[key] = self._need(user_id, header[:4], header[4]) is None
        return verdict

    @staticmethod
    def _need(user_id: str, kind: bytes, cmd: int) -> str | None:
        """The role the command needs that the key lacks ("client" or "worker"), or None."""
        roles = user_id.partition(":")[0]
        if kind == b"ZRW1" or 0x11 <= cmd <= 0x1F:
            return None if ROLE_WORKER in roles else "worker"
        if kind != b"ZRC1" or ROLE_CLIENT in roles:
            return None  # not a client command: the normal checks answer it
        return "client"

    def allowed(self, user_id: str, kind: bytes, cmd: int) -> str | None:
        """None if allowed; else why not (one line), counted and logged (rate-limited)."""
        need = self._need(user_id, kind, cmd)
        if need is None:
            return None
        self.refused += 1
        roles, _, name = user_id.partition(":")
        has = "a client key" if ROLE_CLIENT in roles else "a worker key" if roles else "an unknown key"
        why = f"role: key {name!r} is {has}; command {cmd:#04x} needs a {need} key"
        now = time.monotonic()
        if now - self._warned.get(user_id, -1e9) >= WARN_INTERVAL:
            if len(self._warned) > 10_000:
                self._warned.clear()
            self._warned[user_id] = now
            log.warning("refused %s (%d refusal(s) so far; at most one warning per key every %g s)", why,
                        self.refused, WARN_INTERVAL)
        return why


def recv_ready_auth(sock: zmq.Socket, limit: int) -> list[tuple[list[bytes], str]]:
    """Like :func:`zmqrun.protocol.recv_ready`, with each message's User-Id (the ZAP handler's role string).

    The routing-id frame is received without copying so its connection's metadata can be read.
    """
    out: list[tuple[list[bytes], str]] = []
    recv, getsockopt = sock.recv, sock.getsockopt
    events, pollin, rcvmore, noblock = zmq.EVENTS, zmq.POLLIN, zmq.RCVMORE, zmq.NOBLOCK
    while len(out) < limit and getsockopt(events) & pollin:
        first = recv(noblock, copy=False)
        try:
            uid = first.get("User-Id")
        except zmq.ZMQError:
            uid = ""
        frames = [first.bytes]
        while getsockopt(rcvmore):
            frames.append(recv(noblock))
        out.append((frames, uid))
    return out


# -- the bind rule ------------------------------------------------------------------------


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach: ipc://, inproc://, or tcp:// on 127.0.0.0/8, ::1 or
    localhost.  ``tcp://*``, ``0.0.0.0``, interface names and host names count as not loopback."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(endpoint: str, curve: bool, insecure: bool) -> None:
    """Raise SecurityError if a router without CURVE would bind a non-loopback ``endpoint`` without ``insecure``;
    ValueError if ``endpoint`` is not a ZeroMQ address at all (checked first: "garbage" is no security matter)."""
    scheme, sep, rest = endpoint.partition("://")
    if (not sep or not rest or scheme not in ("tcp", "ipc", "inproc", "ws", "wss", "tipc", "vmci")
            or not tcp_port_ok(endpoint, bind=True)):
        raise ValueError(f"invalid bind address {endpoint!r}; use tcp://HOST:PORT with a port from 0 to 65535 "
                         f"(e.g. tcp://127.0.0.1:5555) or ipc://PATH")
    if curve or insecure or is_loopback_endpoint(endpoint):
        return
    raise SecurityError(f"refusing to bind {endpoint} without CURVE: anyone who can reach it could run code on "
                        f"your workers; give --curve-secret/--clients-keys/--workers-keys, bind a loopback "
                        f"address, or pass --insecure")
