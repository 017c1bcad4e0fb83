"""Records larger than 16 MiB in the job log: a job's args or result may be up to 64 MiB by default
(--max-args-bytes, --max-result-bytes), and each is one log record, so the log must read back batches
that large.  Before the fix a batch over 16 MiB was "corruption": after one such job the router refused
to start on its own data dir (and `zmqrun log repair` would have dropped that job and everything after it).

The process test takes ~3-6 s (about 100 MB of memory in router, worker and client); the unit test < 1 s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conftest import Cluster, write_script
from zmqrun import joblog
from zmqrun.joblog import FsyncPolicy, JobLog
from zmqrun.logcheck import check

BIG = 17 * 2**20  # bytes: over the old 16 MiB bound, under the 64 MiB default limits

ECHO_BIG = """\
def big(n, pad=""):
    return "r" * n
"""


def test_a_job_with_args_and_result_over_16_mib_survives_a_restart(zr: Cluster, tmp_path: Path) -> None:
    script = f"{write_script(tmp_path, 'bigjob.py', ECHO_BIG)}:big"
    zr.start_router(fsync="never")
    address = zr.address
    zr.start_worker(script, name="big-worker")
    c = zr.client(timeout=60)
    job = c.submit(script, {"n": BIG, "pad": "a" * BIG})  # a SUBMIT record over 16 MiB...
    assert len(job.result(timeout=60)) == BIG  # ...and a FINISH record over 16 MiB
    c.close()
    router = zr.router_proc
    assert router is not None and router.stop() == 0
    rep = check(zr.data_dir)
    try:
        assert not rep.errors, [str(f) for f in rep.errors]
    finally:
        rep.close()
    zr.start_router(fsync="never", address=address)  # fails the test if the router refuses to start
    rec = zr.client(timeout=30).get(job.id)
    assert rec.status == "success" and len(rec.result) == BIG and len(rec.args["pad"]) == BIG


def test_a_torn_write_of_a_batch_over_16_mib_is_a_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    """A kill -9 in the middle of writing a big batch leaves its (valid) header and part of its body: a torn
    tail the router truncates, not corruption that stops it."""
    log = JobLog(tmp_path, FsyncPolicy("always"))
    list(log.recover())
    log.start()
    small = log.append(joblog.SUBMIT, b'{"n": 1}')
    log.flush(need_durable=True)
    good_end = log.active_bytes
    log.append(joblog.SUBMIT, b"x" * BIG)
    log.flush(need_durable=True)
    assert log.active_bytes > good_end + BIG
    log._fd, fd = -1, log._fd  # kill -9: no close

    os.ftruncate(fd, good_end + joblog.BATCH_HEADER_SIZE + BIG // 2)  # what a torn write leaves
    os.close(fd)
    log.close()
    caplog.set_level(logging.WARNING, logger="zmqrun.log")
    again = JobLog(tmp_path, FsyncPolicy("always"))
    try:
        assert [seq for seq, _t, _p in again.recover()] == [small]
        seg = joblog.list_segments(tmp_path)[-1]
        assert seg.stat().st_size == good_end
        assert f"torn tail at offset {good_end}" in caplog.text
    finally:
        again.close()
