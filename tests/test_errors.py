"""Error handling: unreachable router, bad script specs, unserializable args and results, and
malformed frames from a raw ZeroMQ socket."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

import zmqrun
from conftest import FIBO, Cluster, subprocess_env, unused_address, wait_until, write_script
from zmqrun import Client, JobFailed, RouterUnavailable

RESULTS = """\
class Thing:
    pass

def bad(kind):
    if kind == "set":
        return {1, 2}
    if kind == "object":
        return Thing()
    if kind == "nan":
        return float("nan")
    if kind == "nested-inf":
        return {"values": [1.0, float("inf")]}
    if kind == "int-keys":
        return {1: "a", 2: "b"}
    if kind == "unprintable-exception":
        raise Exception(Thing())
    return {"ok": kind}
"""


def test_client_raises_router_unavailable_quickly() -> None:
    address = unused_address()
    with Client(address, timeout=1) as c:
        t0 = time.monotonic()
        with pytest.raises(RouterUnavailable) as info:
            c.submit(FIBO, {"n": 1})
        elapsed = time.monotonic() - t0
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, zmqrun.ZmqrunError)
    assert address in str(info.value)
    assert 0.5 <= elapsed < 5, elapsed


def test_cli_submit_to_unreachable_router_fails_with_one_line(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "zmqrun", "submit", FIBO, "--args", '{"n": 3}',
                           "--address", unused_address(), "--timeout-s", "1"],
                          capture_output=True, text=True, timeout=30, env=subprocess_env(), cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert time.monotonic() - t0 < 10
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zmqrun: error:"), proc.stderr
    assert "every connection attempt failed" in lines[0], lines[0]  # why, not only "not reachable"
    assert proc.stdout == ""


@pytest.mark.parametrize("spec, named", [("no_such_module:main", "no_such_module"), ("bad spec!", "bad spec!")])
def test_worker_with_bad_script_spec_exits_2_without_registering(router: Cluster, client: Client, spec: str,
                                                                  named: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "zmqrun", "worker", "--connect", router.address,
                           "--dedicated", spec, "--name", "bad-worker"], capture_output=True, text=True,
                          timeout=30, env=subprocess_env(), cwd=router.tmp, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zmqrun: error:") and named in lines[0], lines[0]
    assert client.status()["workers"] == []
    assert "bad-worker" not in router.router_proc.output()


def test_cold_path_unknown_script_fails_with_script_error(router: Cluster, client: Client, tmp_path: Path) -> None:
    router.start_worker(None, name="cold-err")
    with pytest.raises(JobFailed) as info:
        client.submit("no_such_module_zq:main").result(timeout=30)
    assert info.value.type == "ScriptError"
    assert "no_such_module_zq" in info.value.message
    with pytest.raises(JobFailed) as info:
        client.submit(f"{tmp_path / 'missing.py'}:main").result(timeout=30)
    assert info.value.type == "ScriptError"
    assert "missing.py" in info.value.message
    # The worker is still serving.
    assert client.submit(FIBO, {"n": 6}).result(timeout=30) == 8


@pytest.mark.parametrize("args", [{"x": object()}, {"x": {1, 2}}, {"x": [1, {"y": object()}]}],
                         ids=["object", "set", "nested-object"])
def test_unserializable_args_raise_type_error_before_sending(router: Cluster, client: Client, args: dict) -> None:
    with pytest.raises(TypeError):
        client.submit(FIBO, args)
    with pytest.raises(TypeError):
        client.run(FIBO, args, wait_timeout=5)
    with pytest.raises(TypeError):
        client.map(FIBO, [{"n": 1}, args])
    assert client.list_jobs() == []
    counts = client.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["running"], counts["finished"]) == (0, 0, 0, 0)


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_unserializable_results_fail_and_worker_keeps_serving(router: Cluster, client: Client, tmp_path: Path,
                                                              path: str) -> None:
    script = f"{write_script(tmp_path, 'results.py', RESULTS)}:bad"
    router.start_worker(script if path == "warm" else None, name=f"{path}-results")
    expect = {"set": "not JSON-serializable", "object": "not JSON-serializable", "nan": "NaN",
              "nested-inf": "infinity", "int-keys": "not JSON-serializable"}
    for kind, words in expect.items():
        job = client.submit(script, {"kind": kind})
        with pytest.raises(JobFailed) as info:
            job.result(timeout=30)
        assert info.value.status == "failure"
        assert info.value.type == "TypeError", (kind, info.value.type, info.value.message)
        assert words in info.value.message, (kind, info.value.message)
        rec = client.get(job.id)
        assert rec.status == "failure" and rec.result is None
    job = client.submit(script, {"kind": "unprintable-exception"})
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.type == "Exception" and "Thing object" in info.value.message
    assert client.submit(script, {"kind": "fine"}).result(timeout=30) == {"ok": "fine"}


INTERRUPTS = """
import os

def main(kind="keyboard"):
    if kind == "keyboard":
        raise KeyboardInterrupt("from the job")
    if kind == "exit":
        raise SystemExit(3)
    return os.getpid()
"""


@pytest.mark.parametrize("path", ["warm", "cold"])
def test_a_job_raising_keyboard_interrupt_fails_once_and_the_worker_keeps_serving(
        router: Cluster, client: Client, tmp_path: Path, path: str) -> None:
    """(Found by a new-user session.) KeyboardInterrupt raised by a job's code is that job's failure,
    like any exception: one attempt, type and traceback; the warm process is not killed (it was: the
    job ran three times and ended WorkerLost)."""
    script = f"{write_script(tmp_path, 'interrupts.py', INTERRUPTS)}:main"
    router.start_worker(script if path == "warm" else None, name=f"{path}-interrupts")
    pid = client.run(script, {"kind": "pid"}, wait_timeout=30)
    for kind, typ in (("keyboard", "KeyboardInterrupt"), ("exit", "SystemExit")):
        job = client.submit(script, {"kind": kind})
        with pytest.raises(JobFailed) as info:
            job.result(timeout=30)
        assert info.value.type == typ and "interrupts.py" in info.value.traceback, info.value
        assert client.get(job.id).attempts == 1
    after = client.run(script, {"kind": "pid"}, wait_timeout=30)
    assert (after == pid) == (path == "warm")  # the same warm process served on; cold: a new one per job


# -- malformed frames from a raw DEALER ----------------------------------------------------

C = b"ZRC1"


def _body(obj: object) -> bytes:
    return orjson.dumps(obj)


MALFORMED = {
    "one-junk-frame": [b"x"],
    "header-only-no-body": [C + bytes([0x06])],
    "three-frames": [C + bytes([0x06]), _body({"req": 1}), b"extra"],
    "header-too-long": [C + bytes([0x06, 0x00]), _body({"req": 1})],
    "header-too-short": [C, _body({"req": 1})],
    "unknown-peer-kind": [b"XXXX" + bytes([0x06]), _body({"req": 1})],
    "newer-client-version": [b"ZRC2" + bytes([0x06]), _body({"req": 1})],
    "newer-worker-version": [b"ZRW2" + bytes([0x11]), _body({"script": None, "credit": 1})],
    "invalid-json": [C + bytes([0x06]), b"{not json"],
    "body-not-object": [C + bytes([0x06]), b"[1, 2, 3]"],
    "unknown-command": [C + bytes([0x7E]), _body({"req": 1})],
    "submit-jobs-not-list": [C + bytes([0x01]), _body({"req": 1, "jobs": {"id": "j1", "script": FIBO}})],
    "submit-jobs-empty": [C + bytes([0x01]), _body({"req": 1, "jobs": []})],
    "ready-bad-credit": [b"ZRW1" + bytes([0x11]), _body({"script": FIBO, "credit": 0, "heartbeat": 1})],
}


@pytest.fixture
def raw(shared: Cluster):
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def make() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(shared.address)
        socks.append(s)
        return s

    try:
        yield make
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def _exchange(sock: zmq.Socket, frames: list[bytes], timeout_s: float = 5.0) -> list[bytes]:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout_s * 1000)), f"no reply to {frames!r} within {timeout_s} s"
    return sock.recv_multipart()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_gets_error_reply(shared: Cluster, raw, case: str) -> None:
    client = shared.client()
    sock = raw()
    reply = _exchange(sock, MALFORMED[case])
    assert len(reply) == 2, reply
    assert reply[0] == b"ZRR1" + bytes([0x2F]), reply
    body = orjson.loads(reply[1])
    assert isinstance(body, dict)
    error = body.get("error")
    assert isinstance(error, str) and len(error) >= 10 and "\n" not in error, body
    if case.startswith("newer-"):
        assert "version" in error.lower(), error
    # The router still serves: a status from the same raw socket, and a normal job.
    reply = _exchange(sock, [C + bytes([0x06]), _body({"req": 7})])
    assert reply[0] == b"ZRR1" + bytes([0x23]) and orjson.loads(reply[1])["req"] == 7
    job = client.submit(FIBO, {"n": 10})
    assert job.result(timeout=30) == 55
    assert client.get(job.id).worker == "warm-shared"


def test_job_with_args_not_an_object_is_rejected(shared: Cluster, raw) -> None:
    """A bad job inside a SUBMIT batch: the batch is answered, that job is refused with a reason and not stored."""
    client = shared.client()
    sock = raw()
    bad = {"id": "bad-args-1", "script": FIBO, "args": [1, 2]}
    good = {"id": "good-args-1", "script": FIBO, "args": {"n": 3}}
    reply = _exchange(sock, [C + bytes([0x01]), _body({"req": 3, "jobs": [bad, good], "notify": False})])
    assert reply[0][:4] == b"ZRR1"
    body = orjson.loads(reply[1])
    if reply[0][4] == 0x2F:  # the whole request refused
        assert "args" in body["error"]
    else:  # ACK: the bad job is listed as rejected with a reason, the good one accepted
        assert reply[0][4] == 0x21, reply
        assert body["req"] == 3
        assert "bad-args-1" not in body["accepted"]
        assert [r["id"] for r in body["rejected"]] == ["bad-args-1"]
        assert "args" in body["rejected"][0]["error"]
    with pytest.raises(KeyError):
        client.get("bad-args-1")
    if reply[0][4] == 0x21:
        assert client.get("good-args-1").args == {"n": 3}


COLD_TROUBLE = """\
import os
import re
import subprocess
import sys
import time

def hang(seconds=30):
    print("about to hang", flush=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(f"child {child.pid}", flush=True)
    time.sleep(seconds)

def die(code=3):
    print("dying", flush=True)
    os._exit(code)
"""


def _process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (gone, or a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def test_cold_timeout_kills_the_job_and_its_children(router: Cluster, client: Client, tmp_path: Path) -> None:
    path = write_script(tmp_path, "trouble.py", COLD_TROUBLE)
    router.start_worker(None, name="cold-timeout")
    t0 = time.monotonic()
    job = client.submit(f"{path}:hang", timeout=1.0)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=20)
    assert info.value.type == "Timeout"
    assert time.monotonic() - t0 < 10
    logs = client.get(job.id).logs
    assert "about to hang" in logs
    match = re.search(r"child (\d+)", logs)
    assert match, logs
    wait_until(lambda: _process_gone(int(match.group(1))), timeout=5,
               what="the job's own child process to be killed with it")


def test_cold_process_that_dies_is_reported(router: Cluster, client: Client, tmp_path: Path) -> None:
    path = write_script(tmp_path, "trouble.py", COLD_TROUBLE)
    router.start_worker(None, name="cold-die")
    job = client.submit(f"{path}:die", {"code": 7})
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.type == "ProcessDied" and "7" in info.value.message
    assert client.get(job.id).logs == "dying\n"
    assert client.submit(FIBO, {"n": 5}).result(timeout=30) == 5


def test_a_second_router_cannot_take_over_a_served_ipc_path(zr: Cluster, tmp_path: Path) -> None:
    """(Found by a new-user session: libzmq's bind removes an existing ipc socket file, so a second router
    took the path over from a running one.)  It now exits 2 as for a busy TCP port; a stale file left by
    a router that is gone does not stop a new one."""
    address = f"ipc://{tmp_path}/r.sock"
    zr.start_router(address=address)
    busy = subprocess.run([sys.executable, "-m", "zmqrun", "router", "--bind", address, "--data-dir",
                           str(tmp_path / "other")], capture_output=True, text=True, timeout=20,
                          env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert busy.returncode == 2 and "Address already in use" in busy.stderr, busy.stderr
    assert zr.client().status()["endpoint"] == address  # the first router still serves the path
    zr.router_proc.kill9()  # leaves its socket file behind
    assert (tmp_path / "r.sock").exists()
    zr.start_router(address=address)
    assert zr.client().status()["counts"]["finished"] == 0


def test_router_refuses_a_busy_address_and_a_locked_data_dir(router: Cluster, tmp_path: Path) -> None:
    def run_router(address: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zmqrun", "router", "--bind", address, "--data-dir",
                               str(data_dir)], capture_output=True, text=True, timeout=20, env=subprocess_env(),
                              stdin=subprocess.DEVNULL)

    busy = run_router(router.address, tmp_path / "other-data")
    assert busy.returncode == 2
    assert [ln for ln in busy.stderr.splitlines() if ln.startswith("zmqrun: error:")], busy.stderr
    locked = run_router(unused_address(), router.data_dir)
    assert locked.returncode == 2
    err = [ln for ln in locked.stderr.splitlines() if ln.startswith("zmqrun: error:")]
    assert err and "in use" in err[0], locked.stderr
    # The running router is unharmed.
    assert router.router_proc.alive()
    with Client(router.address, timeout=5) as c:
        assert c.status()["counts"]["finished"] == 0


@pytest.mark.parametrize("bind, data, words", [
    ("garbage", "data", "invalid bind address 'garbage'"),  # not a security matter: not an address at all
    ("tcp://127.0.0.1:99999", "data", "invalid bind address"),  # libzmq would listen on port 34463
    ("tcp://127.0.0.1:5591x", "data", "invalid bind address"),  # ... and on 5591
    ("tcp://127.0.0.1", "data", "invalid bind address"),  # no port
    ("udp://127.0.0.1:5598", "data", "invalid bind address"),  # no transport a ROUTER can bind
    ("tcp://127.0.0.1:1", "file/data", "Not a directory"),  # names what failed and the data dir
])
def test_router_start_errors_name_the_real_problem(tmp_path: Path, bind: str, data: str, words: str) -> None:
    (tmp_path / "file").write_text("")
    out = subprocess.run([sys.executable, "-m", "zmqrun", "router", "--bind", bind, "--data-dir",
                          str(tmp_path / data)], capture_output=True, text=True, timeout=20, env=subprocess_env(),
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("zmqrun: error:") and words in line, line
    if data != "data":
        assert f"(data dir {tmp_path / data})" in line, line


@pytest.mark.parametrize("option", [{"delay": float("nan")}, {"delay": float("inf")}, {"timeout": float("inf")},
                                    {"timeout": float("nan")}, {"scheduled_for": float("nan")}])
def test_non_finite_times_are_refused_before_sending(option: dict) -> None:
    # orjson would encode NaN and infinity as null, which the router would read as "not given".
    with Client(unused_address(), timeout=1) as c:
        with pytest.raises(ValueError, match="finite"):
            c.submit("zmqrun.examples.demo:main", **option)


def test_oversize_request_is_refused_by_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past the router's MAXMSGSIZE, libzmq would just drop the connection: the client says why instead.
    monkeypatch.setattr(zmqrun.protocol, "MAX_MESSAGE_SIZE", 4096)
    with Client(unused_address(), timeout=1) as c:
        with pytest.raises(ValueError, match="exceeds the router's message limit"):
            c.submit("zmqrun.examples.demo:main", {"blob": "x" * 10_000})
