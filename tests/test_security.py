"""Security: CURVE keys and roles, the loopback bind rule, and what a normal worker may run.

One CURVE cluster (router, dedicated worker, normal worker) serves most tests of this module; the
bind tests make their own second host address (a dummy network interface, removed after).
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
import zmq

from zmqrun import AsyncClient, Client, CurveKeys, RouterUnavailable
from zmqrun import protocol as P
from zmqrun.allowlist import ScriptPolicy
from zmqrun.security import generate_keys, is_loopback_endpoint
from zmqrun.worker import Worker

from conftest import FIBO, Cluster, free_port, subprocess_env, wait_until, write_script

OUTSIDE = "def main():\n    open(__file__ + '.ran', 'w').close()\n    return 'outside ran'\n"


class Keys:
    """A router keypair, client keys (alice), worker keys (w1) and a key the router does not know (eve)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.router_pub, self.router_sec = generate_keys("router", root / "router")
        _, self.alice = generate_keys("alice", root / "clients")
        _, self.w1 = generate_keys("w1", root / "workers")
        _, self.eve = generate_keys("eve", root / "strangers")

    def router_args(self) -> tuple[str, ...]:
        return ("--curve-secret", str(self.router_sec), "--clients-keys", str(self.root / "clients"),
                "--workers-keys", str(self.root / "workers"))

    def peer_args(self, secret: Path) -> tuple[str, ...]:
        return ("--curve-secret", str(secret), "--router-key", str(self.router_pub))

    def curve(self, secret: Path) -> CurveKeys:
        return CurveKeys(str(secret), str(self.router_pub))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Keys]]:
    """A CURVE router with a dedicated FIBO worker and a normal worker whose only root is ``root/`` (its cwd)."""
    tmp = tmp_path_factory.mktemp("secure")
    keys = Keys(tmp / "keys")
    root = tmp / "root"
    root.mkdir()
    write_script(root, "ok.py", "def main(x=1):\n    return x * 2\n")
    write_script(root, "okmod.py", "def main():\n    return 'okmod'\n")
    write_script(root, "ticker.py", "import time\ndef main():\n    print('tick', end='', flush=True)\n"
                 "    time.sleep(3)\n    return 'done'\n")
    write_script(tmp, "outside.py", OUTSIDE)
    (root / "link.py").symlink_to(tmp / "outside.py")
    cluster = Cluster(tmp)
    cluster.curve = keys.curve(keys.alice)
    try:
        cluster.start_router(extra=keys.router_args())
        cluster.start_worker(FIBO, name="warm-sec", extra=keys.peer_args(keys.w1))
        cluster.start_worker(None, name="cold-sec", cwd=root, extra=("--scripts", str(root), *keys.peer_args(keys.w1)))
        yield cluster, keys
    finally:
        cluster.close()


@pytest.fixture
def sec(secure: tuple[Cluster, Keys], request: pytest.FixtureRequest) -> tuple[Cluster, Keys]:
    request.node._zmqrun_cluster = secure[0]
    return secure


# -- keys ------------------------------------------------------------------------------------


def test_keys_generate_writes_private_files_and_never_overwrites(zr: Cluster) -> None:
    folder = zr.tmp / "new" / "keys"
    proc = zr.cli("keys", "generate", "alice", "--dir", str(folder), address=False)
    assert proc.returncode == 0, proc.stderr
    secret, public = folder / "alice.key_secret", folder / "alice.key"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"secret-key" in secret.read_bytes() and b"secret-key" not in public.read_bytes()
    before = secret.read_bytes()
    again = zr.cli("keys", "generate", "alice", "--dir", str(folder), address=False)
    assert again.returncode == 1
    assert "exists already" in again.stderr and str(public) in again.stderr
    assert secret.read_bytes() == before


# -- CURVE end to end and roles ----------------------------------------------------------------


def test_authenticated_end_to_end(sec: tuple[Cluster, Keys]) -> None:
    cluster, keys = sec
    c = cluster.client()
    assert c.run(FIBO, {"n": 15}, wait_timeout=30) == 610  # the dedicated worker
    assert c.run("ok.py", {"x": 21}, wait_timeout=30) == 42  # the normal worker, a script under its root
    assert c.map(FIBO, [{"n": i} for i in range(10)]) == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
    assert {w["name"] for w in c.status()["workers"]} >= {"warm-sec", "cold-sec"}

    async def run_async() -> Any:
        async with AsyncClient(cluster.address, timeout=10, curve=keys.curve(keys.alice)) as ac:
            return await ac.run(FIBO, {"n": 10}, wait_timeout=30)

    assert asyncio.run(run_async()) == 55
    env = {"ZMQRUN_CURVE_SECRET": str(keys.alice), "ZMQRUN_ROUTER_KEY": str(keys.router_pub)}
    proc = cluster.cli("submit", FIBO, "--args", '{"n": 12}', "--wait", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "144", proc.stderr
    proc = cluster.cli("status", "--json", *keys.peer_args(keys.alice))
    assert proc.returncode == 0, proc.stderr


def test_live_logs_stream_over_curve(sec: tuple[Cluster, Keys]) -> None:
    """The worker's live-log pump has its own socket: it must connect with the worker's key too."""
    cluster, keys = sec
    c = cluster.client()
    job = c.submit("ticker.py")
    follow = c.logs(job.id, follow=True)
    first = next(follow)
    while "tick" not in first:
        first += next(follow)
    assert c.get(job.id).status == "running"  # the chunk came while the job slept
    rest = "".join(follow)  # ends with the job
    assert job.result(timeout=30) == "done"
    assert first + rest == c.get(job.id).logs == "tick"


@pytest.mark.parametrize("who", ["unknown key", "no CURVE", "wrong router key"])
def test_unknown_or_missing_key_is_refused_with_a_clear_error(sec: tuple[Cluster, Keys], who: str) -> None:
    cluster, keys = sec
    curve = {"unknown key": keys.curve(keys.eve), "no CURVE": None,
             "wrong router key": CurveKeys(str(keys.alice), str(keys.root / "clients" / "alice.key"))}[who]
    t0 = time.monotonic()
    with Client(cluster.address, timeout=1, curve=curve) as c:
        with pytest.raises(RouterUnavailable) as e:
            c.status()
    assert time.monotonic() - t0 < 10
    assert "handshake" in str(e.value) or "refused this client's CURVE key" in str(e.value)
    if who == "unknown key":
        assert "refused this client's CURVE key" in str(e.value)


def test_worker_with_unknown_key_never_registers(sec: tuple[Cluster, Keys]) -> None:
    cluster, keys = sec
    p = cluster.start_worker(FIBO, name="warm-eve", wait=False, extra=keys.peer_args(keys.eve))
    try:
        wait_until(lambda: "refused this client's CURVE key" in p.output(), 15, what="the worker to log the refusal")
        assert p.alive()
        assert "warm-eve" not in cluster.worker_names()
    finally:
        p.stop()


def _raw_peer(cluster: Cluster, keys: Keys, secret: Path, identity: bytes) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    P.configure_peer_socket(sock, identity, linger_ms=0)
    keys.curve(secret).apply(sock)
    sock.connect(cluster.address)
    assert sock.poll(5000, zmq.POLLOUT), "no connection to the router"
    return sock


def _replies(sock: zmq.Socket, seconds: float) -> list[list[bytes]]:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        if sock.poll(50):
            out.append(sock.recv_multipart())
    return out


def test_client_key_cannot_register_nor_report_results(sec: tuple[Cluster, Keys]) -> None:
    cluster, keys = sec
    c = cluster.client()
    # A job no worker takes (a tag nobody serves): it stays queued, so a forged result would show.
    job = c.submit("ok.py", {"x": 1}, tag="nobody")
    jid = job.id
    before = c.status()
    # The attacker knows the normal worker's name and claims it as its routing id (ROUTER_HANDOVER).
    attacker = _raw_peer(cluster, keys, keys.alice, b"cold-sec")
    try:
        ready = {"script": None, "credit": 100, "heartbeat": 1.0, "name": "evil", "pid": 1, "supervisor": None,
                 "tags": [], "untagged": True}
        attacker.send_multipart([P.H_W_READY, orjson.dumps(ready)])
        result = {"worker": "evil", "batch": 1, "results": [{"id": jid, "attempt": 1, "status": "success",
                                                             "result": "forged", "logs": "", "started_at": 1.0,
                                                             "finished_at": 2.0}]}
        for _ in range(3):
            attacker.send_multipart([P.H_W_RESULT, orjson.dumps(result)])
        attacker.send_multipart([P.H_W_HEARTBEAT])
        attacker.send_multipart([P.header(P.WORKER, P.W_SUP_EXITED), orjson.dumps({"worker": "cold-sec"})])
        replies = _replies(attacker, 1.0)
        # The jobs of the worker whose name it claimed still go to that worker, not to the attacker.
        assert c.run("ok.py", {"x": 5}, wait_timeout=30) == 10
        replies += _replies(attacker, 0.3)
    finally:
        attacker.close(0)
    errors = [orjson.loads(f[1])["error"] for f in replies if f[0] == P.H_ERROR]
    assert len(errors) == 6 and all(e.startswith("role: key 'alice' is a client key") for e in errors), replies
    assert all(f[0] == P.H_ERROR for f in replies), f"the attacker received more than errors: {replies}"
    after = c.status()
    assert "evil" not in {w["name"] for w in after["workers"]}
    assert [w["name"] for w in after["workers"]] == [w["name"] for w in before["workers"]]
    record = c.get(jid)
    assert record.status == "queued" and record.result is None and record.attempts == 0
    assert after["dropped"].get("role_refused", 0) - before["dropped"].get("role_refused", 0) == 6
    c.cancel(jid)
    # At most one warning per key every 10 s in the router log.
    log_text = cluster.router_proc.output()  # type: ignore[union-attr]
    assert log_text.count("refused role: key 'alice'") == 1, log_text[-3000:]


def test_worker_key_cannot_submit(sec: tuple[Cluster, Keys]) -> None:
    cluster, keys = sec
    with Client(cluster.address, timeout=5, curve=keys.curve(keys.w1)) as c:
        with pytest.raises(ValueError, match="role: key 'w1' is a worker key"):
            c.submit(FIBO, {"n": 3})


# -- the loopback bind rule --------------------------------------------------------------------


def test_which_endpoints_count_as_loopback() -> None:
    for ep in ("tcp://127.0.0.1:5555", "tcp://127.3.2.1:1", "tcp://[::1]:5555", "tcp://localhost:5555",
               "ipc:///tmp/x.sock", "inproc://x"):
        assert is_loopback_endpoint(ep), ep
    for ep in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.1:5555", "tcp://[::]:5555", "tcp://eth0:5555",
               "tcp://example.com:5555", "pgm://eth0;239.192.1.1:5555", "nonsense"):
        assert not is_loopback_endpoint(ep), ep


class OtherHost:
    """A network namespace joined to this host by a veth pair: this host gets the non-loopback address
    ``address``, and commands run with :meth:`run` come from the namespace's ``peer`` address (another host)."""

    def __init__(self) -> None:
        n = os.getpid() % 60000
        self.ns, self.dev = f"zrsec{n}", f"vzr{n}"
        self.address, self.peer = f"10.213.{n % 250 + 1}.1", f"10.213.{n % 250 + 1}.2"

    def create(self) -> None:
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.dev, "type", "veth", "peer", "name", self.dev + "p"],
                    ["ip", "link", "set", self.dev + "p", "netns", self.ns],
                    ["ip", "addr", "add", f"{self.address}/30", "dev", self.dev],
                    ["ip", "link", "set", self.dev, "up"],
                    ["ip", "-n", self.ns, "addr", "add", f"{self.peer}/30", "dev", self.dev + "p"],
                    ["ip", "-n", self.ns, "link", "set", self.dev + "p", "up"],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, **kw)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    """A second host address (see :class:`OtherHost`), made for the test and removed after."""
    host = OtherHost()
    try:
        host.create()
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
        host.remove()
        pytest.skip(f"cannot create a network namespace and veth pair for a second host address "
                    f"(needs root and ip netns): {getattr(e, 'stderr', None) or e}")
    try:
        yield host
    finally:
        host.remove()


def test_plain_non_loopback_bind_refused_without_insecure(zr: Cluster, other_host: OtherHost) -> None:
    for bind in (f"tcp://{other_host.address}:{free_port()}", f"tcp://*:{free_port()}", f"tcp://0.0.0.0:{free_port()}"):
        p = zr.spawn("router-refused", ["router", "--bind", bind, "--data-dir", str(zr.tmp / "data")])
        assert p.popen.wait(20) == 2
        out = p.output()
        assert f"refusing to bind {bind} without CURVE" in out and "--insecure" in out, out
    assert not (zr.tmp / "data").exists()  # refused before touching the data dir


def test_insecure_allows_a_plain_non_loopback_bind(zr: Cluster, other_host: OtherHost) -> None:
    address = f"tcp://{other_host.address}:{free_port()}"
    zr.start_router(address=address, extra=("--insecure",))
    zr.start_worker(FIBO, name="warm-insecure")
    # A client on the other host reaches it: exactly what --insecure allows.
    proc = other_host.run([sys.executable, "-m", "zmqrun", "submit", FIBO, "--args", '{"n": 7}', "--wait",
                           "--address", address], timeout=30, env=subprocess_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "13", proc.stderr


def test_curve_router_binds_non_loopback(zr: Cluster, other_host: OtherHost) -> None:
    keys = Keys(zr.tmp / "keys")
    zr.curve = keys.curve(keys.alice)
    address = f"tcp://{other_host.address}:{free_port()}"
    zr.start_router(address=address, extra=keys.router_args())
    base = [sys.executable, "-m", "zmqrun", "status", "--json", "--timeout-s", "2", "--address", address]
    proc = other_host.run([*base, *keys.peer_args(keys.alice)], timeout=30, env=subprocess_env())
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["counts"]["queued"] == 0, proc.stderr
    proc = other_host.run(base, timeout=30, env=subprocess_env())  # no key: the handshake fails
    assert proc.returncode == 1 and "handshake" in proc.stderr, proc.stderr


# -- what a worker may run ------------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    "{tmp}/outside.py",          # an absolute path elsewhere
    "../outside.py",             # .. out of the root (relative to the worker's working directory)
    "sub/../../outside.py",
    "link.py",                   # a symlink in the root that points out of it
    "json:dumps",                # a module not under the root
    "os:getcwd",
    "zmqrun.examples.demo:main",  # not under this worker's root
])
def test_script_not_allowed(sec: tuple[Cluster, Keys], spec: str) -> None:
    cluster, _keys = sec
    tmp = cluster.tmp
    marker = tmp / "outside.py.ran"
    c = cluster.client()
    with pytest.raises(Exception) as e:
        c.run(spec.format(tmp=tmp), {}, wait_timeout=30)
    assert getattr(e.value, "type", None) == "ScriptNotAllowed", e.value
    record = c.get(e.value.job_id)  # type: ignore[attr-defined]
    assert record.status == "failure" and record.worker == "cold-sec" and record.logs == ""
    assert not marker.exists(), "the refused script was executed"


def test_scripts_under_the_root_run(sec: tuple[Cluster, Keys]) -> None:
    c = sec[0].client()
    assert c.run("okmod:main", wait_timeout=30) == "okmod"
    assert c.run(f"{sec[0].tmp}/root/ok.py", {"x": 4}, wait_timeout=30) == 8
    assert c.run("./sub/../ok.py", {"x": 1}, wait_timeout=30) == 2  # .. that stays inside the root


def test_script_policy_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    for d in (root / "pkg", other / "outpkg"):
        d.mkdir(parents=True)
    write_script(root / "pkg", "__init__.py", "raise SystemExit('imported')\n")
    write_script(root / "pkg", "mod.py", "def main():\n    return 1\n")
    write_script(other / "outpkg", "__init__.py", "raise SystemExit('imported')\n")
    write_script(other / "outpkg", "mod.py", "def main():\n    return 1\n")
    (root / "outpkg").symlink_to(other / "outpkg")  # a package in the root that is a symlink out of it
    monkeypatch.syspath_prepend(str(root))
    policy = ScriptPolicy([str(root), "zmqrun.examples"], cwd=str(root))
    assert policy.why_not("pkg.mod:main") is None  # found without importing pkg (its __init__ would exit)
    assert policy.why_not("pkg:main") is None
    assert policy.why_not("zmqrun.examples.demo:fibo") is None  # a module prefix
    assert "not under" in (policy.why_not("outpkg.mod:main") or "")
    assert policy.why_not("zmqrun.examplesx:main") is not None
    assert policy.why_not("zmqrun.scripts:load_function") is not None
    assert policy.why_not("sys:exit") is not None  # built in: no file at all
    assert policy.why_not("pkg.nope:main") is None  # nothing to run: the job fails with ScriptError
    assert policy.why_not("no_such_module_zq:main") is None
    assert policy.why_not("outpkg.nope:main") is not None  # importing outpkg would run its code
    assert "pkg" not in sys.modules
    with pytest.raises(ValueError, match="neither an existing directory nor a module name"):
        ScriptPolicy(["no/such/dir"], cwd=str(root))
    assert ScriptPolicy(None, cwd=str(root)).dirs == [str(root.resolve())]  # default: the working directory


def test_a_typo_in_a_module_under_a_package_outside_the_roots_reads_as_not_found(tmp_path: Path) -> None:
    """A new user's `zmqrun.exmples.demo:fibo` was refused as "module zmqrun ... is not under the roots",
    which reads like a permission problem: the message says the module was not found."""
    policy = ScriptPolicy([str(tmp_path), "zmqrun.examples"], cwd=str(tmp_path))
    why = policy.why_not("zmqrun.exmples.demo:fibo") or ""
    assert why.startswith("module zmqrun.exmples.demo not found"), why
    assert (policy.why_not("zmqrun.scripts:load_function") or "").startswith("module zmqrun (")  # exists


def test_module_in_the_working_directory_outside_the_roots_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (found by an attacker session): started as the `zmqrun` console script, a worker's
    sys.path[0] is its bin/ directory, but the job's process (`python -m`, same working directory)
    imports from the working directory first: a module there, outside the roots, passed the check
    as "exists nowhere" and then ran."""
    wd, root, bindir = tmp_path / "wd", tmp_path / "root", tmp_path / "bin"
    for d in (wd, root, bindir):
        d.mkdir()
    write_script(wd, "evil_in_cwd.py", "def main():\n    return 'PWNED'\n")
    monkeypatch.setattr(sys, "path", [str(bindir), *sys.path[1:]])
    policy = ScriptPolicy([str(root)], cwd=str(wd))
    why = policy.why_not("evil_in_cwd:main")
    assert why is not None and "not under" in why, why
    assert policy.why_not("evil_in_cwd.py:main") is not None
    assert "NUL" in (policy.why_not("x\0.py:main") or "")


def test_dedicated_worker_runs_only_its_own_script() -> None:
    w = Worker("tcp://127.0.0.1:9", FIBO)
    try:
        w.func = lambda **kw: "ran"  # what start() would import
        w._flush = lambda: None  # type: ignore[method-assign]  # no router here: keep the results
        w._sock_lock.acquire()
        w._pending.extend([{"id": "j-other", "attempt": 1, "script": "zmqrun.examples.demo:main", "args": {}},
                           {"id": "j-own", "attempt": 1, "script": FIBO, "args": {}}])
        w._run_inline()
        other, own = (orjson.loads(r) for r in w._results)
        assert other["id"] == "j-other" and other["status"] == "failure"
        assert other["error"]["type"] == "ScriptNotAllowed" and FIBO in other["error"]["message"]
        assert own["id"] == "j-own" and own["result"] == "ran"
    finally:
        w.ctx.term()
        os.close(w._wake_r)
        os.close(w._wake_w)


def test_cold_worker_default_root_is_its_working_directory(zr: Cluster) -> None:
    zr.start_router()
    home = zr.tmp / "home"
    home.mkdir()
    write_script(home, "here.py", "def main():\n    return 'here'\n")
    write_script(zr.tmp, "outside.py", OUTSIDE)
    # Started by hand: the conftest starter would pass --scripts.
    p = zr.spawn("worker-cold-default", ["worker", "--connect", zr.address, "--name", "cold-default", "--heartbeat",
                                         "0.5"], cwd=home)
    zr.wait_worker("cold-default", proc=p)
    c = zr.client()
    assert c.run("here.py", wait_timeout=30) == "here"
    with pytest.raises(Exception) as e:
        c.run("../outside.py", wait_timeout=30)
    assert getattr(e.value, "type", None) == "ScriptNotAllowed"
    assert not (zr.tmp / "outside.py.ran").exists()


def test_warm_child_routing_ids_are_not_on_its_command_line(sec: tuple[Cluster, Keys]) -> None:
    """Regression (found by an attacker session): the warm child's settings, including its and its
    supervisor's secret routing ids, were in its argv, which any local user can read in
    /proc/PID/cmdline; a client key could then claim the worker's routing id (ROUTER_HANDOVER) and
    receive its jobs.  They travel in the environment now (readable only by the same user)."""
    cluster, _keys = sec
    proc = next(p for p in cluster.procs if "warm-sec" in p.args)
    child = sorted(proc.family() - {proc.pid})
    assert len(child) == 1, child
    cmdline = open(f"/proc/{child[0]}/cmdline", "rb").read().decode(errors="replace")
    assert "_warmchild" in cmdline and "~" not in cmdline and "identity" not in cmdline, cmdline


def test_ipv6_loopback_address_works_end_to_end(zr: Cluster) -> None:
    """The README counts ::1 as loopback: a router binds tcp://[::1]:PORT without --insecure, and a
    worker and a client connect to it (an attacker session found the bind failing: no IPV6 option)."""
    zr.start_router(address=f"tcp://[::1]:{free_port()}")
    c = zr.client()
    assert c.status()["endpoint"].startswith("tcp://[::1]:")
    zr.start_worker(FIBO, name="warm-v6")
    assert c.run(FIBO, {"n": 10}, wait_timeout=30) == 55
