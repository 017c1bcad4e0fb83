"""zmqrun.queue.JobQueue without sockets: dispatch order, due vs scheduled, credit, worker choice."""

from __future__ import annotations

import pytest

from zmqrun.model import QUEUED, RUNNING
from zmqrun.queue import Job, JobQueue, WorkerSlot

NOW = 1_000.0


def add_job(q: JobQueue, jid: str, script: str = "s", priority: int = 0, sched: float | None = None,
            now: float = NOW) -> Job:
    job = Job(jid, script, {}, priority, now if sched is None else sched, None, now, q.next_order())
    q.add(job, now)
    return job


def add_worker(q: JobQueue, name: str, script: str | None = None, credit: int = 1) -> WorkerSlot:
    w = WorkerSlot(name.encode(), name, script, credit, 1.0, float("inf"))
    q.add_worker(w)
    return w


def finish(q: JobQueue, w: WorkerSlot, job: Job) -> None:
    """What the router does with a result: the slot is freed and the job leaves the live set."""
    del w.in_flight[job.id]
    q.remove(job.id)


def dispatched(q: JobQueue, now: float = NOW) -> dict[str, list[str]]:
    return {w.name: [j.id for j in jobs] for w, jobs in q.dispatch(now)}


def drain_one_by_one(q: JobQueue, w: WorkerSlot, now: float = NOW) -> list[str]:
    """Run everything through a credit-1 worker, one job at a time; return the dispatch order."""
    order = []
    for _ in range(100):
        out = q.dispatch(now)
        if not out:
            return order
        [(slot, jobs)] = out
        assert slot is w and len(jobs) == 1
        order.append(jobs[0].id)
        finish(q, w, jobs[0])
    raise AssertionError("dispatch never ran dry")


def test_order_priority_then_scheduled_for_then_submission() -> None:
    q = JobQueue()
    add_job(q, "a", priority=0, sched=NOW - 10)
    add_job(q, "b", priority=5, sched=NOW - 5)
    add_job(q, "c", priority=0, sched=NOW - 20)
    add_job(q, "d", priority=5, sched=NOW - 5)
    add_job(q, "e", priority=0, sched=NOW - 10)
    add_job(q, "f", priority=-1, sched=NOW - 100)
    add_job(q, "g", priority=5, sched=NOW - 6)
    w = add_worker(q, "w", "s", credit=1)
    assert drain_one_by_one(q, w) == ["g", "b", "d", "c", "a", "e", "f"]


def test_one_batch_to_a_single_worker_keeps_the_same_order() -> None:
    q = JobQueue()
    for i, p in enumerate([0, 3, 0, 3, 1]):
        add_job(q, f"j{i}", priority=p)
    add_worker(q, "w", "s", credit=10)
    assert dispatched(q) == {"w": ["j1", "j3", "j4", "j0", "j2"]}
    assert all(j.status == RUNNING and j.attempts == 1 and j.worker == "w" and j.started_at == NOW
               for j in q.jobs.values())


def test_scheduled_jobs_wait_until_due() -> None:
    q = JobQueue()
    later = add_job(q, "later", priority=100, sched=NOW + 10)
    add_job(q, "now", priority=0)
    w = add_worker(q, "w", "s", credit=5)
    assert q.counts(NOW) == {"queued": 1, "scheduled": 1, "running": 0}
    assert dispatched(q) == {"w": ["now"]}
    assert later.status == QUEUED and later.attempts == 0
    assert q.dispatch(NOW + 5) == []
    promoted, next_due = q.promote_due(NOW + 5)
    assert (promoted, next_due) == (0, NOW + 10)
    assert q.dispatch(NOW + 9.999) == []
    promoted, next_due = q.promote_due(NOW + 10)
    assert (promoted, next_due) == (1, None)
    assert dispatched(q, NOW + 10) == {"w": ["later"]}
    assert q.counts(NOW + 10) == {"queued": 0, "scheduled": 0, "running": 2}
    assert len(w.in_flight) == 2


def test_promote_due_skips_canceled_and_orders_by_time() -> None:
    q = JobQueue()
    add_job(q, "t3", sched=NOW + 3)
    add_job(q, "t1", sched=NOW + 1)
    gone = add_job(q, "t2", sched=NOW + 2)
    q.remove(gone.id)  # canceled while scheduled
    assert q.promote_due(NOW) == (0, NOW + 1)
    assert q.promote_due(NOW + 2.5) == (1, NOW + 3)
    w = add_worker(q, "w", "s", credit=1)
    assert drain_one_by_one(q, w, NOW + 2.5) == ["t1"]
    assert q.promote_due(NOW + 3) == (1, None)
    assert drain_one_by_one(q, w, NOW + 3) == ["t3"]


def test_credit_is_respected() -> None:
    q = JobQueue()
    jobs = [add_job(q, f"j{i}") for i in range(5)]
    w = add_worker(q, "w", "s", credit=2)
    assert dispatched(q) == {"w": ["j0", "j1"]}
    assert w.free == 0
    assert q.dispatch(NOW) == []
    finish(q, w, jobs[0])
    assert dispatched(q) == {"w": ["j2"]}
    assert len(w.in_flight) == 2
    finish(q, w, jobs[1])
    finish(q, w, jobs[2])
    assert dispatched(q) == {"w": ["j3", "j4"]}
    assert q.dispatch(NOW) == []


def test_no_workers_or_no_matching_worker_dispatches_nothing() -> None:
    q = JobQueue()
    add_job(q, "j", script="s")
    assert q.dispatch(NOW) == []
    add_worker(q, "other", "t", credit=5)
    assert q.dispatch(NOW) == []
    assert q.jobs["j"].status == QUEUED


def test_dedicated_worker_preferred_over_normal() -> None:
    q = JobQueue()
    normal = add_worker(q, "normal", None, credit=5)  # registered first
    add_worker(q, "ded", "s", credit=5)
    add_job(q, "s1", "s")
    add_job(q, "t1", "t")
    add_job(q, "s2", "s")
    assert dispatched(q) == {"ded": ["s1", "s2"], "normal": ["t1"]}
    assert normal.free == 4


def test_normal_worker_takes_overflow_and_best_job_of_any_script() -> None:
    q = JobQueue()
    add_worker(q, "ded", "s", credit=1)
    add_worker(q, "normal", None, credit=1)
    add_job(q, "s1", "s", priority=0)
    add_job(q, "s2", "s", priority=0)
    add_job(q, "t1", "t", priority=1)
    # The dedicated worker takes s1; the normal one the best remaining due job: t1 (priority 1) over s2.
    assert dispatched(q) == {"ded": ["s1"], "normal": ["t1"]}


def test_least_loaded_worker_first_then_lru() -> None:
    q = JobQueue()
    a = add_worker(q, "a", "s", credit=4)
    b = add_worker(q, "b", "s", credit=4)
    for i in range(4):
        add_job(q, f"j{i}")
    out = dispatched(q)
    assert sorted(len(v) for v in out.values()) == [2, 2]
    assert len(a.in_flight) == len(b.in_flight) == 2


def test_least_loaded_is_relative_to_credit() -> None:
    q = JobQueue()
    big = add_worker(q, "big", "s", credit=10)
    small = add_worker(q, "small", "s", credit=2)
    for i in range(3):
        add_job(q, f"pre{i}")
    q.dispatch(NOW)  # spreads the first jobs
    assert len(big.in_flight) + len(small.in_flight) == 3
    # Make the loads explicit: big 2/10, small 1/2.
    for w in (big, small):
        for jid in list(w.in_flight):
            finish(q, w, q.jobs[jid])
    big.in_flight.update({"x1": 1, "x2": 1})
    small.in_flight.update({"x3": 1})
    add_job(q, "next")
    assert dispatched(q) == {"big": ["next"]}


def test_lru_breaks_ties() -> None:
    q = JobQueue()
    a = add_worker(q, "a", "s", credit=1)
    b = add_worker(q, "b", "s", credit=1)
    first = add_job(q, "first")
    out = dispatched(q)
    assert list(out.values()) == [["first"]]
    got = a if out.get("a") else b
    other = b if got is a else a
    finish(q, got, first)
    add_job(q, "second")
    assert dispatched(q) == {other.name: ["second"]}  # equal load: the one used least recently


def test_lost_worker_requeues_its_running_jobs() -> None:
    q = JobQueue()
    a = add_worker(q, "a", "s", credit=2)
    j0, j1 = add_job(q, "j0"), add_job(q, "j1")
    assert dispatched(q) == {"a": ["j0", "j1"]}
    back = q.remove_worker(a.identity, NOW + 1)
    assert {j.id for j in back} == {"j0", "j1"}
    assert all(j.status == QUEUED and j.worker is None for j in (j0, j1))
    assert q.counts(NOW + 1) == {"queued": 2, "scheduled": 0, "running": 0}
    b = add_worker(q, "b", "s", credit=2)
    assert dispatched(q, NOW + 1) == {"b": ["j0", "j1"]}
    assert j0.attempts == j1.attempts == 2 and j0.worker == "b"
    assert set(b.in_flight) == {"j0", "j1"}
    assert q.remove_worker(b"nobody", NOW) == []


@pytest.mark.parametrize("credit", [1, 3, 7])
def test_many_jobs_many_workers_never_exceed_credit(credit: int) -> None:
    q = JobQueue()
    workers = [add_worker(q, f"w{i}", "s", credit=credit) for i in range(3)]
    normal = add_worker(q, "n", None, credit=credit)
    jobs = [add_job(q, f"j{i}", priority=i % 4) for i in range(50)]
    seen: list[str] = []
    for _ in range(200):
        out = q.dispatch(NOW)
        for w in [*workers, normal]:
            assert len(w.in_flight) <= credit
        if not out:
            break
        for w, given in out:
            for job in given:
                seen.append(job.id)
                finish(q, w, job)
    assert sorted(seen) == sorted(j.id for j in jobs)
    assert len(seen) == len(set(seen))


# -- tags (worker groups) ------------------------------------------------------------------------

def tagged_job(q: JobQueue, jid: str, tag: str | None, script: str = "s", priority: int = 0) -> Job:
    job = Job(jid, script, {}, priority, NOW, None, NOW, q.next_order())
    job.tag = tag
    q.add(job, NOW)
    return job


def tagged_worker(q: JobQueue, name: str, script: str | None, tags: set[str | None], credit: int = 10) -> WorkerSlot:
    w = WorkerSlot(name.encode(), name, script, credit, 1.0, float("inf"), tags=frozenset(tags))
    q.add_worker(w)
    return w


def test_a_tagged_job_goes_only_to_a_worker_with_its_tag() -> None:
    q = JobQueue()
    tagged_worker(q, "plain", "s", {None})  # started without --tag
    tagged_worker(q, "cpu", "s", {"cpu"})
    tagged_worker(q, "plain-any", None, {None})  # a normal (any-script) untagged worker
    tagged_job(q, "g1", "gpu")
    tagged_job(q, "g2", "gpu")
    assert q.dispatch(NOW) == []  # no gpu worker: neither the untagged nor the cpu worker takes them
    assert all(q.jobs[j].status == QUEUED for j in ("g1", "g2"))
    gpu = tagged_worker(q, "gpu", "s", {"gpu"})
    assert dispatched(q) == {"gpu": ["g1", "g2"]}
    assert set(gpu.in_flight) == {"g1", "g2"}


def test_an_untagged_job_goes_only_to_workers_that_take_untagged_jobs() -> None:
    q = JobQueue()
    tagged_worker(q, "gpu", "s", {"gpu"})
    tagged_worker(q, "gpu-any", None, {"gpu"})
    tagged_job(q, "u1", None)
    assert q.dispatch(NOW) == []  # tagged workers keep their credit for their tag
    tagged_worker(q, "gpu-also-untagged", "s", {"gpu", None})  # --tag gpu --untagged
    assert dispatched(q) == {"gpu-also-untagged": ["u1"]}


def test_tagged_normal_worker_takes_the_best_job_among_its_tags_only() -> None:
    q = JobQueue()
    tagged_job(q, "a-low", "a", script="s1", priority=0)
    tagged_job(q, "b-high", "b", script="s2", priority=9)
    tagged_job(q, "c-top", "c", script="s3", priority=99)
    tagged_job(q, "u-top", None, script="s4", priority=100)
    tagged_worker(q, "ab", None, {"a", "b"}, credit=1)
    assert dispatched(q) == {"ab": ["b-high"]}  # c and untagged jobs are not its to take
    q.remove("b-high")
    q.workers[b"ab"].in_flight.clear()
    assert dispatched(q) == {"ab": ["a-low"]}


def test_mixed_tags_and_scripts_never_cross() -> None:
    q = JobQueue()
    workers = [tagged_worker(q, "ded-s-gpu", "s", {"gpu"}, 2), tagged_worker(q, "ded-s", "s", {None}, 2),
               tagged_worker(q, "ded-t-gpu", "t", {"gpu"}, 2), tagged_worker(q, "any-gpu", None, {"gpu"}, 2),
               tagged_worker(q, "any", None, {None}, 2)]
    jobs = [tagged_job(q, f"j{i}", [None, "gpu", "tpu"][i % 3], script=["s", "t", "u"][i % 5 % 3])
            for i in range(60)]
    by_id = {j.id: j for j in jobs}
    for _ in range(100):
        out = q.dispatch(NOW)
        if not out:
            break
        for w, given in out:
            for job in given:
                assert job.tag in w.tags, (job.id, job.tag, w.name)
                assert w.script is None or w.script == job.script
                finish(q, w, job)
    left = [j for j in jobs if j.id in q.jobs]
    assert left and all(j.tag == "tpu" for j in left)  # nobody serves tpu: those wait, all else ran
    assert len(left) == sum(1 for j in by_id.values() if j.tag == "tpu")
    assert all(len(w.in_flight) == 0 for w in workers)


# -- retries: re-queueing with a backoff ----------------------------------------------------------

def test_retry_requeues_at_its_time_and_old_heap_entries_go_stale() -> None:
    q = JobQueue()
    w = add_worker(q, "w", "s", credit=5)
    job = add_job(q, "j")
    other = add_job(q, "k")
    assert dispatched(q) == {"w": ["j", "k"]}
    del w.in_flight["j"]
    q.retry(job, NOW + 5, NOW)
    assert job.status == QUEUED and job.scheduled_for == NOW + 5 and job.worker is None
    assert q.counts(NOW) == {"queued": 0, "scheduled": 1, "running": 1}
    assert q.dispatch(NOW + 1) == [] and q.promote_due(NOW + 4.9) == (0, NOW + 5)
    assert q.promote_due(NOW + 5) == (1, None)
    assert dispatched(q, NOW + 5) == {"w": ["j"]}
    assert job.attempts == 2 and other.attempts == 1


def test_a_stale_ready_entry_cannot_dispatch_a_job_before_its_retry_time() -> None:
    """A job put back by a lost worker has a ready entry; if the lost worker's late failure report is
    then accepted and retried, that entry must not dispatch it before the backoff ends."""
    q = JobQueue()
    a = add_worker(q, "a", "s", credit=1)
    job = add_job(q, "j")
    assert dispatched(q) == {"a": ["j"]}
    q.remove_worker(a.identity, NOW)  # back to the queue: a ready entry exists now
    assert q.settle(job, 1)  # the lost worker reports attempt 1 (a failure) after all
    q.retry(job, NOW + 10, NOW)
    add_worker(q, "b", "s", credit=1)
    assert q.dispatch(NOW + 1) == []
    q.promote_due(NOW + 10)
    assert dispatched(q, NOW + 10) == {"b": ["j"]}


def test_retry_delay_counts_failed_attempts_and_skips_canceled() -> None:
    from zmqrun.queue import retry_delay

    job = Job("j", "s", {}, 0, NOW, None, NOW, 1)
    assert retry_delay(job, {"type": "ValueError"}, 0.5) is None  # no retries asked for
    job.retries, job.backoff = 2, {"kind": "exponential", "seconds": 1.0, "factor": 3.0, "max": 100.0, "jitter": 0.0}
    assert retry_delay(job, {"type": "ValueError"}, 0.5) == 1.0
    job.attempt_errors = [{"attempt": 1}]
    assert retry_delay(job, {"type": "ValueError"}, 0.5) == 3.0
    assert retry_delay(job, {"type": "Canceled"}, 0.5) is None
    job.attempt_errors.append({"attempt": 2})
    assert retry_delay(job, {"type": "ValueError"}, 0.5) is None  # both retries used


# -- leases after a router restart ----------------------------------------------------------------

def test_leased_jobs_wait_for_their_worker_then_go_back_to_the_queue() -> None:
    q = JobQueue()
    held = Job("held", "s", {}, 0, NOW, None, NOW, q.next_order())
    held.attempts, held.worker = 1, "w-old"
    reported = Job("reported", "s", {}, 0, NOW, None, NOW, q.next_order())
    reported.attempts = 2
    q.lease(held, NOW + 3)
    q.lease(reported, NOW + 3)
    add_worker(q, "w", "s", credit=5)
    assert q.counts(NOW) == {"queued": 0, "scheduled": 0, "running": 2}
    assert q.dispatch(NOW) == []  # leased jobs are not dispatched
    assert not q.settle(reported, 1)  # an older attempt: no
    assert q.settle(reported, 2) and "reported" not in q.leases
    assert not q.settle(reported, 2)  # settled once
    assert q.expire_leases(NOW + 2.9) == []
    back = q.expire_leases(NOW + 3)
    assert back == [held] and held.status == QUEUED and held.worker == "w-old"  # the caller logs who
    assert dispatched(q, NOW + 3) == {"w": ["held"]} and held.attempts == 2
    assert not q.settle(held, 1)  # dispatched again: the old attempt is closed


def test_a_put_back_job_is_settled_once_by_a_late_report() -> None:
    q = JobQueue()
    a = add_worker(q, "a", "s", credit=1)
    job = add_job(q, "j")
    assert dispatched(q) == {"a": ["j"]}
    q.remove_worker(a.identity, NOW)  # put back: attempt 1 is still open
    assert job.status == QUEUED
    assert q.settle(job, 1) and job.status == RUNNING
    assert not q.settle(job, 1)  # the same report twice (a re-sent batch) settles nothing more
    add_worker(q, "b", "s", credit=1)
    assert q.dispatch(NOW) == []  # being settled: not dispatched again


def test_backoff_parsing_and_delays() -> None:
    from zmqrun.model import backoff_delay, parse_backoff

    assert parse_backoff(None) is None
    assert parse_backoff(5) == {"kind": "constant", "seconds": 5.0, "jitter": 0.0}
    assert parse_backoff("2.5") == {"kind": "constant", "seconds": 2.5, "jitter": 0.0}
    exp = parse_backoff("exp:1,factor=3,max=20,jitter=0.5")
    assert exp == {"kind": "exponential", "seconds": 1.0, "factor": 3.0, "max": 20.0, "jitter": 0.5}
    assert parse_backoff({"kind": "exponential", "seconds": 2}) == \
        {"kind": "exponential", "seconds": 2.0, "factor": 2.0, "max": 3600.0, "jitter": 0.1}
    for bad in ("fast", "exponential:1,speed=2", -1, {"kind": "linear"}, {"kind": "constant", "factor": 2},
                "exp:1,factor=0.5", "constant:1,jitter=2", float("nan"), True):
        with pytest.raises(ValueError):
            parse_backoff(bad)
    no_jitter = {**exp, "jitter": 0.0}
    assert [backoff_delay(no_jitter, n, 0.9) for n in (1, 2, 3, 4, 5)] == [1.0, 3.0, 9.0, 20.0, 20.0]
    assert backoff_delay(no_jitter, 10**6, 0.5) == 20.0  # no overflow for a huge retry count
    assert backoff_delay(exp, 2, 0.0) == pytest.approx(1.5) and backoff_delay(exp, 2, 0.999999) == pytest.approx(4.5)
    assert backoff_delay(parse_backoff(0), 3, 0.7) == 0.0
