"""Celery app for the peer rows: the bench jobs as Celery tasks (Redis broker and backend).

The worker is started as ``celery -A bench.peer_tasks worker --pool solo``, with
the Redis URL in ``BENCH_REDIS_URL``; the bench's client builds its own app with
:func:`make_app` and sends tasks by name. Tasks call the same functions as every
other scenario. JSON serialisation, otherwise Celery's defaults.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench import jobs


def make_app(redis_url: str) -> Celery:
    """A Celery app using ``redis_url`` as broker and result backend."""
    app = Celery("bench", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.task(name="bench.noop")
def noop(**kwargs: Any) -> Any:
    """Celery wrapper of :func:`bench.jobs.noop`."""
    return jobs.noop(**kwargs)
