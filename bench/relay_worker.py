"""Raw relay worker: a DEALER that runs bench jobs for :mod:`bench.relay`.

Request frames ``[client_id, hdr, body]`` where body is the same JSON a zmqrun
job carries (``{"script": "bench.jobs:noop", "args": {...}}``); the worker
decodes it, calls the function (imported once, as a dedicated worker does) and
replies ``[client_id, hdr, orjson(result)]``. Prints ``READY`` once connected.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

import orjson
import zmq


def _resolve(spec: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    fn = cache.get(spec)
    if fn is None:
        mod, _, name = spec.partition(":")
        fn = cache[spec] = getattr(importlib.import_module(mod), name)
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--connect", required=True)
    ap.add_argument("--no-ready", action="store_true", help="for the C proxy (DEALER back end)")
    args = ap.parse_args()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.connect)
    if not args.no_ready:
        sock.send(b"READY")
    print("READY", flush=True)
    cache: dict[str, Callable[..., Any]] = {}
    loads, dumps = orjson.loads, orjson.dumps
    while True:
        client, hdr, body = sock.recv_multipart()
        job = loads(body)
        result = _resolve(job["script"], cache)(**job["args"])
        sock.send_multipart([client, hdr, dumps(result)])


if __name__ == "__main__":
    main()
