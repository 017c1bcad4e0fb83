"""The ``zmqrun`` command line against a real router: submit, jobs show/list/logs/cancel, status,
``--address`` and ``ZMQRUN_ADDRESS``, and one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from conftest import FIBO, WORDS, Cluster
from zmqrun import Client, JobFailed

NOBODY = "nobody.serves.this:main"  # a script no worker serves: its jobs stay queued


def one_error_line(proc) -> str:
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zmqrun: error:"), proc.stderr
    return lines[0]


def test_submit_wait_prints_json_result(router: Cluster) -> None:
    router.start_worker(FIBO, name="warm-cli")
    router.start_worker(WORDS, name="warm-cli-words")
    proc = router.cli("submit", FIBO, "--args", '{"n": 10}', "--wait")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "55\n"
    proc = router.cli("submit", WORDS, "--args", '{"text": "b a b", "top": 1}', "--wait")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"words": 3, "distinct": 2, "top": [["b", 2]]}


def test_submit_wait_on_failing_job_exits_non_zero(router: Cluster) -> None:
    router.start_worker("zmqrun.examples.demo:fail", name="warm-fail")
    proc = router.cli("submit", "zmqrun.examples.demo:fail", "--args", '{"message": "nope"}', "--wait")
    assert proc.returncode != 0
    assert proc.stderr.startswith("zmqrun: job failed: ValueError: nope (job ")
    assert 'raise ValueError(message)' in proc.stderr  # the traceback follows
    job_id = proc.stderr.split("(job ", 1)[1].split(")", 1)[0]  # named, for `zmqrun jobs logs ID`
    shown = router.cli("jobs", "show", job_id)
    assert shown.returncode == 0 and "failure" in shown.stdout, shown.stderr


def test_submit_show_list_logs(router: Cluster, client: Client) -> None:
    router.start_worker(WORDS, name="warm-words")
    proc = router.cli("submit", WORDS, "--args", '{"text": "x y x", "top": 1}')
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", job_id), proc.stdout
    assert client.job(job_id).result(timeout=30) == {"words": 3, "distinct": 2, "top": [["x", 2]]}
    queued_id = router.cli("submit", NOBODY).stdout.strip()
    assert client.get(queued_id).status == "queued"

    show = router.cli("jobs", "show", job_id)
    assert show.returncode == 0, show.stderr
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", show.stdout, re.M))
    assert fields["id"] == job_id and fields["status"] == "success" and fields["script"] == WORDS
    assert fields["worker"] == "warm-words" and fields["attempts"] == "1"
    assert json.loads(fields["result"]) == {"words": 3, "distinct": 2, "top": [["x", 2]]}
    assert "tokenized 3 words" in show.stdout

    show_json = router.cli("jobs", "show", job_id, "--json")
    assert show_json.returncode == 0, show_json.stderr
    rec = json.loads(show_json.stdout)
    assert rec["id"] == job_id and rec["status"] == "success" and rec["args"] == {"text": "x y x", "top": 1}
    assert rec["result"] == {"words": 3, "distinct": 2, "top": [["x", 2]]}
    assert rec["created_at"].endswith("Z") and rec["attempts"] == 1
    assert rec["logs"] == "tokenized 3 words\n2 distinct words\nmost common: x=2\n"

    listed = router.cli("jobs", "list", "--status", "success")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and queued_id not in listed.stdout
    listed = router.cli("jobs", "list", "--status", "queued")
    assert queued_id in listed.stdout and job_id not in listed.stdout
    listed = router.cli("jobs", "list", "--json")
    assert {r["id"] for r in json.loads(listed.stdout)} == {job_id, queued_id}

    logs = router.cli("jobs", "logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "tokenized 3 words\n2 distinct words\nmost common: x=2\n"

    line = one_error_line(router.cli("jobs", "show", "no-such-job"))
    assert "no-such-job" in line


def test_jobs_cancel_queued_job(router: Cluster, client: Client) -> None:
    job_id = router.cli("submit", NOBODY, "--args", '{"a": 1}').stdout.strip()
    assert client.get(job_id).status == "queued"
    proc = router.cli("jobs", "cancel", job_id)
    assert proc.returncode == 0, proc.stderr
    assert job_id in proc.stdout
    rec = client.get(job_id)
    assert rec.status == "canceled" and rec.finished_at is not None and rec.error["type"] == "Canceled"
    with pytest.raises(JobFailed) as info:
        client.job(job_id).result(timeout=5)
    assert info.value.status == "canceled"
    # Canceling it again changes nothing and says so.
    line = one_error_line(router.cli("jobs", "cancel", job_id))
    assert "not canceled" in line


def test_status_shows_workers_by_script_with_credit(router: Cluster) -> None:
    router.start_worker(FIBO, name="warm-status", concurrency=2, prefetch=3)
    router.start_worker(None, name="cold-status", concurrency=1)
    router.cli("submit", NOBODY, "--delay", "60")  # scheduled: the cold worker does not take it yet
    proc = router.cli("status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.search(r"queued 0, scheduled 1, running 0, finished 0", lines[0]), lines[0]
    assert "2 worker(s)" in proc.stdout
    warm = [ln for ln in lines if "warm-status" in ln]
    cold = [ln for ln in lines if "cold-status" in ln]
    assert len(warm) == 1 and FIBO in warm[0] and re.search(r"\b0/5\b", warm[0]), warm
    assert len(cold) == 1 and "any script" in cold[0] and re.search(r"\b0/1\b", cold[0]), cold
    st = json.loads(router.cli("status", "--json").stdout)
    by_name = {w["name"]: w for w in st["workers"]}
    assert by_name["warm-status"]["script"] == FIBO and by_name["warm-status"]["credit"] == 5
    assert by_name["cold-status"]["script"] is None and by_name["cold-status"]["credit"] == 1


def test_status_shows_queued_tagged_jobs_and_tags_no_worker_has(router: Cluster) -> None:
    """(Found by a new-user session: a tagged job waiting next to idle untagged workers was not explained.)"""
    router.start_worker(None, name="cold-gpu", extra=("--tag", "gpu"))
    for tag in ("nobody", "nobody", "gpu-later"):
        proc = router.cli("submit", NOBODY, "--tag", tag)
        assert proc.returncode == 0, proc.stderr
    st = json.loads(router.cli("status", "--json").stdout)
    assert st["queued_by_tag"] == {"nobody": 2, "gpu-later": 1}
    out = router.cli("status").stdout
    assert re.search(r"^  nobody: 2  \(no worker has this tag\)$", out, re.M), out
    assert re.search(r"^  gpu-later: 1  \(no worker has this tag\)$", out, re.M), out


def test_an_out_of_range_priority_gets_the_usage_hint(router: Cluster) -> None:
    """As the README says of out-of-range options: click's usage hint and exit 2 (found by a new-user session)."""
    proc = router.cli("submit", NOBODY, "--priority", "99999999999")
    assert proc.returncode == 2 and "Invalid value for '--priority'" in proc.stderr, proc.stderr


def test_address_option_and_environment_variable(router: Cluster) -> None:
    router.start_worker(FIBO, name="warm-env")
    by_env = router.cli("submit", FIBO, "--args", '{"n": 7}', "--wait", address=False,
                        env={"ZMQRUN_ADDRESS": router.address})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == "13\n"
    status = router.cli("status", address=False, env={"ZMQRUN_ADDRESS": router.address})
    assert status.returncode == 0 and "warm-env" in status.stdout
    # --address wins over the environment.
    both = router.cli("status", env={"ZMQRUN_ADDRESS": "tcp://127.0.0.1:1"})
    assert both.returncode == 0 and "warm-env" in both.stdout
    # A worker takes ZMQRUN_ADDRESS for its --connect.
    p = router.spawn("worker-env", ["worker", "--dedicated", WORDS, "--name", "warm-by-env", "--heartbeat", "0.5"],
                     env={"ZMQRUN_ADDRESS": router.address})
    router.wait_worker("warm-by-env", proc=p)


@pytest.mark.parametrize("bad, words", [("{n: 10}", "not valid JSON"), ("[1, 2]", "JSON object"),
                                         ('"text"', "JSON object")])
def test_bad_args_json_is_a_one_line_error(router: Cluster, client: Client, bad: str, words: str) -> None:
    line = one_error_line(router.cli("submit", FIBO, "--args", bad))
    assert "--args" in line and words in line, line
    assert client.list_jobs() == []


def test_byte_size_option_accepts_plain_binary_and_decimal_units_and_refuses_junk() -> None:
    import click

    from zmqrun.cli import ByteSize

    size = ByteSize()
    assert size.convert("500000", None, None) == 500_000
    assert size.convert("512KiB", None, None) == 512 * 1024
    assert size.convert("64M", None, None) == 64 * 1024**2
    assert size.convert("2GB", None, None) == 2 * 10**9
    assert size.convert("1.5 GiB", None, None) == int(1.5 * 1024**3)
    for bad in ("12X", "", "MiB", "-5", "0", "1e400"):
        with pytest.raises(click.BadParameter):
            size.convert(bad, None, None)


def test_submit_wait_on_a_script_that_cannot_be_imported_prints_one_line(router: Cluster) -> None:
    """zmqrun's own error types (here ScriptError from a cold worker) print one line, not importlib's
    traceback; `jobs show` keeps the traceback."""
    router.start_worker(None, name="cold-one-line")
    proc = router.cli("submit", "zmqrun.examples.nosuchmodule:main", "--wait")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zmqrun: job failed: ScriptError:"), proc.stderr
