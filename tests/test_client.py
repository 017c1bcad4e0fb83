"""The Python Client against a real router: map, cancel, get, idempotent job ids, timeouts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import FIBO, Cluster, write_script
from zmqrun import Client, JobFailed

ECHO = "zmqrun.examples.demo:main"
FAIL = "zmqrun.examples.demo:fail"
NOBODY = "nobody.serves.this:main"


def test_map_returns_results_in_input_order(router: Cluster, client: Client) -> None:
    # Two workers running two jobs each: completion order differs from input order.
    router.start_worker(ECHO, name="echo-1", concurrency=2, prefetch=8)
    router.start_worker(ECHO, name="echo-2", concurrency=2, prefetch=8)
    n = 500
    t0 = time.monotonic()
    results = client.map(ECHO, ({"i": i, "pad": "x" * (i % 7)} for i in range(n)), batch_size=64, window=200)
    assert results == [{"echo": {"i": i, "pad": "x" * (i % 7)}} for i in range(n)]
    assert time.monotonic() - t0 < 60
    workers = {r.worker for r in client.list_jobs(status="success", limit=n)}
    assert workers == {"echo-1", "echo-2"}
    assert client.status()["counts"]["finished"] == n


def test_map_failures_raise_or_are_returned(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-map")
    router.start_worker(FAIL, name="fail-map")
    with pytest.raises(JobFailed) as info:
        client.map(FAIL, [{"message": "first"}, {"message": "second"}])
    assert info.value.type == "ValueError" and info.value.message == "first"
    out = client.map(FIBO, [{"n": 5}, {"n": "not a number"}, {"n": 6}], return_exceptions=True)
    assert out[0] == 5 and out[2] == 8
    assert isinstance(out[1], JobFailed) and out[1].type == "TypeError"


def test_cancel_queued_and_scheduled_jobs(router: Cluster, client: Client) -> None:
    queued = client.submit(NOBODY, {"a": 1})
    scheduled = client.submit(FIBO, {"n": 3}, delay=60)
    for job in (queued, scheduled):
        res = client.cancel(job.id, reason="changed my mind")
        assert res.canceled is True and bool(res) is True and res.status == "canceled"
        with pytest.raises(JobFailed) as info:
            job.result(timeout=5)
        assert info.value.status == "canceled" and info.value.type == "Canceled"
        assert "changed my mind" in info.value.message
        rec = client.get(job.id)
        assert rec.status == "canceled" and rec.finished_at is not None and rec.started_at is None
    # Canceling again: nothing changes.
    again = queued.cancel()
    assert again.canceled is False and again.status == "canceled"
    counts = client.status()["counts"]
    assert (counts["queued"], counts["scheduled"], counts["finished"]) == (0, 0, 2)
    # A canceled scheduled job never runs, even with a worker for it.
    router.start_worker(FIBO, name="fibo-cancel")
    assert client.run(FIBO, {"n": 4}, wait_timeout=30) == 3
    assert client.get(scheduled.id).status == "canceled"


def test_cancel_finished_and_unknown_jobs(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-done")
    job = client.submit(FIBO, {"n": 8})
    assert job.result(timeout=30) == 21
    res = client.cancel(job.id)
    assert res.canceled is False and not res
    assert res.status == "success" and "finished" in res.message
    rec = client.get(job.id)
    assert rec.status == "success" and rec.result == 21 and rec.error is None
    unknown = client.cancel("no-such-job-id")
    assert unknown.canceled is False and unknown.status is None


def test_get_unknown_id_raises_key_error(client: Client) -> None:
    with pytest.raises(KeyError):
        client.get("0192f1c2-0000-7000-8000-000000000000")
    with pytest.raises(KeyError):
        client.get("nope")


def test_resubmitting_a_job_id_creates_no_second_job(router: Cluster, client: Client) -> None:
    first = client.submit(NOBODY, {"v": 1}, job_id="my-job-1")
    second = client.submit(NOBODY, {"v": 2}, job_id="my-job-1")
    assert first.id == second.id == "my-job-1"
    jobs = client.list_jobs()
    assert [j.id for j in jobs] == ["my-job-1"]
    assert client.get("my-job-1").args == {"v": 1}
    assert client.status()["counts"]["queued"] == 1
    # Same after it finished: the resubmit returns the original outcome and runs nothing.
    router.start_worker(FIBO, name="fibo-idem")
    job = client.submit(FIBO, {"n": 10}, job_id="fib-10")
    assert job.result(timeout=30) == 55
    other = Client(router.address, timeout=10)
    try:
        again = other.submit(FIBO, {"n": 11}, job_id="fib-10")
        assert again.result(timeout=10) == 55
        assert other.run(FIBO, {"n": 12}, job_id="fib-10", wait_timeout=10) == 55
    finally:
        other.close()
    rec = client.get("fib-10")
    assert rec.attempts == 1 and rec.args == {"n": 10}
    assert len(client.list_jobs(script=FIBO)) == 1


def test_result_timeout_raises_timeout_error(client: Client) -> None:
    job = client.submit(NOBODY)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        job.result(timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 5
    assert client.get(job.id).status == "queued"


def test_job_handle_from_another_client(router: Cluster, client: Client) -> None:
    router.start_worker(FIBO, name="fibo-handle")
    job = client.submit(FIBO, {"n": 9})
    other = router.client()
    assert other.job(job.id).result(timeout=30) == 34
    assert other.wait([job.id], timeout=5) == [34]


def test_unread_outcomes_stay_bounded_and_evicted_results_are_fetched_again(router: Cluster,
                                                                            client: Client) -> None:
    """A producer that submits and never reads results keeps at most ``max_unclaimed`` outcomes;
    an evicted job's result() still works (the router answers from its archive)."""
    router.start_worker("zmqrun.examples.demo:main")
    client.max_unclaimed = 5
    jobs = [client.submit("zmqrun.examples.demo:main", {"i": i}) for i in range(30)]
    # Wait until every job finished, pumping the pushed outcomes through status() calls.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and client.status()["counts"]["finished"] < 30:
        time.sleep(0.05)
    client.status()
    assert len(client._outcomes) <= 5
    assert [j.result(timeout=10) for j in jobs] == [{"echo": {"i": i}} for i in range(30)]
    # map's own outcomes are never evicted, whatever the cap.
    assert client.map("zmqrun.examples.demo:main", [{"i": i} for i in range(50)]) == \
        [{"echo": {"i": i}} for i in range(50)]


def test_map_with_jobs_not_yet_sent_survives_a_quiet_spell(router: Cluster, tmp_path: Path) -> None:
    """Window 1, jobs longer than the client timeout: the liveness check asks only about sent jobs
    (asking about unsent ones made the router answer "unknown" and map() raise)."""
    write_script(tmp_path, "slowjob.py", "import time\n\ndef main(s):\n    time.sleep(s)\n    return s\n")
    router.start_worker("slowjob.py:main", cwd=tmp_path, prefetch=0)
    c = router.client(timeout=0.5)
    assert c.map("slowjob.py:main", [{"s": 0.8}, {"s": 0.8}], window=1) == [0.8, 0.8]
