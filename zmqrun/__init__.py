"""zmqrun: a brokerless, high-throughput job runner on ZeroMQ.

Public API: :class:`Client`, :class:`Job`, :class:`AsyncClient` and
:class:`AsyncJob` (asyncio), :class:`JobRecord`, and the errors
:class:`ZmqrunError`, :class:`JobFailed`, :class:`RouterUnavailable`,
:class:`RequestRejected`; :class:`CurveKeys` (CURVE settings of a client).  Imports are lazy so that the cold path's child
process (``python -m zmqrun._coldstart``) does not pay for zmq.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "Job", "AsyncClient", "AsyncJob", "JobRecord", "CancelResult", "ZmqrunError", "JobFailed",
           "RouterUnavailable", "RequestRejected", "CurveKeys", "__version__"]

_CLIENT_NAMES = {"Client", "Job", "CancelResult", "ZmqrunError", "JobFailed", "RouterUnavailable", "RequestRejected"}


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    if name in ("AsyncClient", "AsyncJob"):
        from . import aio

        return getattr(aio, name)
    if name == "CurveKeys":
        from .security import CurveKeys

        return CurveKeys
    if name == "JobRecord":
        from .model import JobRecord

        return JobRecord
    raise AttributeError(f"module 'zmqrun' has no attribute {name!r}")
