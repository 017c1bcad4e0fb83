"""Child process of a dedicated worker: ``python -m zmqrun._warmchild`` (settings in ``ZMQRUN_WARM_CHILD_CONFIG``).

Started by :mod:`zmqrun.supervisor`.  Imports the script, maps the job board
from the inherited descriptor, registers with the router under its own routing
id (naming its supervisor in READY) and serves jobs like any worker.  Dies with
its supervisor (Linux ``PR_SET_PDEATHSIG``).  Exit codes: 0 after a clean stop,
2 if the script cannot be imported (the error is printed on stderr).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import orjson


def main() -> int:
    # From the environment (argv is world-readable in /proc); removed so job subprocesses do not inherit it.
    cfg = orjson.loads(os.environ.pop("ZMQRUN_WARM_CHILD_CONFIG"))
    from ._coldstart import _die_with_parent

    _die_with_parent(cfg["parent_pid"])
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "info")).upper(), logging.INFO),
                        stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .board import JobBoard
    from .scripts import ScriptError
    from .security import CurveKeys
    from .worker import Worker

    w = Worker(cfg["connect"], cfg["script"], concurrency=cfg["concurrency"], prefetch=cfg["prefetch"],
               heartbeat=cfg["heartbeat"], liveness=cfg["liveness"], name=cfg["name"], timeout=cfg["timeout"],
               board=JobBoard.attach(cfg["board_fd"], cfg["concurrency"]), identity=cfg["identity"],
               supervisor=cfg["supervisor"], tags=tuple(cfg.get("tags") or ()), untagged=cfg.get("untagged"),
               curve=CurveKeys(**cfg["curve"]) if cfg.get("curve") else None,
               max_result_bytes=cfg["max_result_bytes"],
               **({"max_log_bytes": cfg["max_log_bytes"]} if "max_log_bytes" in cfg else {}))
    try:
        w.start()
    except (ScriptError, ValueError) as e:
        print(f"zmqrun: error: {e}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, w.stop)
    # Ctrl-C reaches the supervisor, which stops this process with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(w._wake_w)
    return w.run()


if __name__ == "__main__":
    sys.exit(main())
