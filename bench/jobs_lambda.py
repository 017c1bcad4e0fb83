"""AWS Lambda handler serving the bench jobs through the real ``awslambdaric``.

Started as ``python -m awslambdaric bench.jobs_lambda.handler``; the event is
``{"job": "<name in bench.jobs.JOB_FUNC>", "args": {...}}`` and the response is
the job's JSON return value, exactly what a zmqrun worker returns.
"""

from __future__ import annotations

from typing import Any

from bench.jobs import JOB_FUNC


def handler(event: dict[str, Any], context: object) -> Any:
    """Run ``JOB_FUNC[event["job"]](**event["args"])`` and return its JSON value."""
    return JOB_FUNC[event["job"]](**event.get("args", {}))
