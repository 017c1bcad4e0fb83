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
