"""Drive a real :class:`zmqrun.router.Router` in-process, without a socket loop (tests of crash points
and storage invariants): messages go in through ``Router._handle`` and one loop iteration's second half
runs through ``Router._commit``; what the router sends is captured instead of sent."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson

from zmqrun import protocol as P
from zmqrun.fsio import RealFS
from zmqrun.joblog import FsyncPolicy, JobLog
from zmqrun.router import Router

CLIENT = b"client-1"
WORKER = b"worker-1"


class FakeSocket:
    """Records (identity, frames) of every message the router sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[bytes]]] = []
        self._cur: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self._cur.append(bytes(frame))
        if not flags & 2:  # zmq.SNDMORE == 2
            ident, *rest = self._cur
            self.sent.append((ident, rest))
            self._cur = []


class Driver:
    """A router on ``data_dir`` with one client and one dedicated worker, both simulated."""

    def __init__(self, data_dir: Path, segment_bytes: int = 4096, fs: RealFS | None = None,
                 background: bool = False, credit: int = 8, fsync: str = "always", **kw: Any) -> None:
        self.router = Router("tcp://127.0.0.1:0", data_dir, FsyncPolicy(fsync), segment_bytes=segment_bytes,
                             background_checkpoints=background, **kw)
        self.router.log = JobLog(data_dir, self.router.policy, segment_bytes, fs=fs)
        self.router.recover()
        self.sock = FakeSocket()
        self.router.sock = self.sock  # type: ignore[assignment]
        self.acked: set[str] = set()
        self.finished: dict[str, Any] = {}
        self.running: list[dict[str, Any]] = []  # jobs the worker holds
        self._req = 0
        self.router._handle([WORKER, P.header(P.WORKER, P.W_READY),
                             orjson.dumps({"script": "s.py:f", "credit": credit, "name": "w1"})])

    def submit(self, n: int = 1, **extra: Any) -> list[str]:
        self._req += 1
        ids = [f"job-{self._req:05d}-{i}" for i in range(n)]
        jobs = [{"id": jid, "script": "s.py:f", "args": {"i": i}, **extra} for i, jid in enumerate(ids)]
        self.router._handle([CLIENT, P.header(P.CLIENT, P.C_SUBMIT), orjson.dumps({"req": self._req, "jobs": jobs})])
        return ids

    def work(self, rng: random.Random | None = None) -> None:
        """The worker reports a result for some (default: all) of the jobs it holds."""
        if not self.running:
            return
        k = len(self.running) if rng is None else rng.randint(1, len(self.running))
        done, self.running = self.running[:k], self.running[k:]
        body = {"worker": "w1", "results": [{"id": j["id"], "attempt": j["attempt"], "status": "success",
                                             "result": j["args"]["i"] * 2, "logs": f"log {j['id']}\n",
                                             "started_at": 1.0, "finished_at": 2.0} for j in done]}
        self.router._handle([WORKER, P.header(P.WORKER, P.W_RESULT), orjson.dumps(body)])

    def tick(self) -> bool:
        """One loop iteration's second half; collect what was sent.  False if the log failed."""
        ok = self.router._commit()
        for ident, frames in self.sock.sent:
            head, body = frames[0], orjson.loads(frames[1]) if len(frames) > 1 else {}
            if ident == CLIENT and head == P.H_ACK:
                self.acked.update(body["accepted"])
            elif ident == CLIENT and head == P.H_RESULT:
                for r in body["results"]:
                    self.finished[r["id"]] = r
            elif ident == WORKER and head == P.H_JOBS:
                self.running.extend(body["jobs"])
        self.sock.sent.clear()
        return ok

    def run(self, n: int) -> None:
        """``n`` rounds of: submit one job, commit, the worker reports what it holds, commit."""
        for _ in range(n):
            self.submit(1)
            self.tick()
            self.work()
            self.tick()

    def close(self) -> None:
        if self.router._child is not None:
            self.router._reap_child(block=True)
        self.router.log.close()
