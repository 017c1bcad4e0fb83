"""Child process of the cold path: ``python -m zmqrun._coldstart RESULT_FD`` runs one job.

Reads ``{"script": spec, "args": {...}}`` as JSON on stdin, imports the script,
calls it, and writes the outcome fragment (see :func:`zmqrun.execute.run_job`)
to file descriptor ``RESULT_FD``.  Its stdout and stderr are the job's logs.
Imports only stdlib, orjson and zmqrun.scripts/execute, never zmq: every
import here is paid on every cold job.
"""

from __future__ import annotations

import os
import sys


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process if its worker dies, so a killed
    worker leaves no orphan job behind (the job is re-queued and runs elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(1)


def main() -> int:
    result_fd = int(sys.argv[1])
    if len(sys.argv) > 2:
        _die_with_parent(int(sys.argv[2]))
    import orjson

    from .execute import error_report, run_job
    from .scripts import ScriptError, load_function

    job = orjson.loads(sys.stdin.buffer.read())
    try:
        func = load_function(job["script"])
    except ScriptError as e:
        frag = b'"status":"failure","error":' + orjson.dumps(
            {"type": "ScriptError", "message": str(e), "traceback": error_report(e)["traceback"]})
    else:
        frag, _started, _finished = run_job(func, job.get("args") or {})
    sys.stdout.flush()
    sys.stderr.flush()
    with os.fdopen(result_fd, "wb") as out:
        out.write(frag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
