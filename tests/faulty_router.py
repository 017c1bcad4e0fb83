"""Run the zmqrun CLI on a failing disk: ``python tests/faulty_router.py router --bind ... --data-dir ...``.

The arguments are the ``zmqrun`` CLI's; two environment variables break the disk first:

- ``ZMQRUN_TEST_FSIZE=BYTES``: ``RLIMIT_FSIZE`` (soft and hard) for this process, so a write that
  would grow a file past BYTES fails with EFBIG (SIGXFSZ is ignored: CPython and the router do so).
- ``ZMQRUN_TEST_FAULT=OP:N``: the chosen system calls succeed N times, then raise ``OSError(EIO)`` on
  every later call (a disk that went bad and stays bad).  ``fdatasync`` covers ``os.fdatasync`` and
  ``os.fsync``, ``write`` covers ``os.write`` and ``os.pwrite`` (one shared count each).  The patch is
  on the ``os`` module, so it hits whatever calls ``os.<name>`` at call time (the job log does).

Used by tests/test_crash_disk_errors.py; with neither variable set it is the plain CLI.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

OPS = {"fdatasync": ("fdatasync", "fsync"), "write": ("write", "pwrite")}


def install_fault(spec: str) -> None:
    """Patch ``os`` per ``spec`` (``OP:N``, see the module docstring); raise ValueError for a bad spec."""
    op, _, n = spec.partition(":")
    if op not in OPS or not n.isdigit():
        raise ValueError(f"ZMQRUN_TEST_FAULT must be fdatasync:N or write:N, not {spec!r}")
    budget = [int(n)]

    def failing(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if budget[0] <= 0:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected into os.{name})")
            budget[0] -= 1
            return real(*args, **kwargs)

        return call

    for name in OPS[op]:
        setattr(os, name, failing(name, getattr(os, name)))


if __name__ == "__main__":
    if os.environ.get("ZMQRUN_TEST_FSIZE"):
        limit = int(os.environ["ZMQRUN_TEST_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if os.environ.get("ZMQRUN_TEST_FAULT"):
        install_fault(os.environ["ZMQRUN_TEST_FAULT"])
    from zmqrun.cli import main

    sys.argv[0] = "zmqrun"
    main()
