"""The ``zmqrun`` command line (click).

Every command prints one readable line on stderr and exits non-zero on error.
Client commands take ``--address`` (default ``$ZMQRUN_ADDRESS`` or
tcp://127.0.0.1:5555).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from . import protocol as P
from .livelogs import DEFAULT_MAX_LOG_BYTES, MAX_LOG_BYTES_LIMIT
from .model import MAX_PRIORITY

ADDRESS_HELP = "router endpoint (env ZMQRUN_ADDRESS)"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3}


class ByteSize(click.ParamType):
    """A size in bytes: ``1048576``, ``64MiB``/``64M`` (binary) or ``64MB`` (decimal); K, M, G."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        num = text.rstrip("kmgib")
        try:
            size = float(num) * _SIZE_UNITS[text[len(num):]]
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (e.g. 500000, 512KiB, 64MiB, 2GB)", param, ctx)
        if not 0 < size < 2**63:
            self.fail(f"{value!r} must be above 0", param, ctx)
        return int(size)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


_ONE_LINE_ERRORS = frozenset({"ScriptError", "ScriptNotAllowed", "Timeout", "WorkerLost", "Canceled",
                              "ResultTooLarge", "ProcessDied"})


class ZmqrunGroup(click.Group):
    """Turns any expected failure into one ``zmqrun: error: ...`` line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from .client import JobFailed, ZmqrunError

        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except JobFailed as e:
            # The job's id ends the line: its output is one `zmqrun jobs logs ID` away.
            click.echo(f"zmqrun: job failed: {e.type}: {e.message} (job {e.job_id})", err=True)
            # zmqrun's own error types say it all in one line (their traceback is zmqrun's or importlib's
            # internals; `zmqrun jobs show ID` still has it); the job's own exceptions get theirs.
            if e.traceback and e.type not in _ONE_LINE_ERRORS:
                click.echo(e.traceback.rstrip(), err=True)
            sys.exit(1)
        except (ZmqrunError, ConnectionError, TimeoutError, ValueError, TypeError, OSError) as e:
            click.echo(f"zmqrun: error: {e}", err=True)
            sys.exit(1)
        except KeyError as e:
            click.echo(f"zmqrun: error: {e.args[0] if e.args else e}", err=True)
            sys.exit(1)



@click.group(cls=ZmqrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zmqrun")
def main() -> None:
    """zmqrun: a fast job runner on ZeroMQ with warm dedicated workers and a durable job log."""


# -- router and workers -------------------------------------------------------------------


@main.command()
@click.option("--bind", default=P.DEFAULT_ADDRESS, show_default=True, help="ZeroMQ endpoint to bind")
@click.option("--data-dir", default="./zmqrun-data", show_default=True, help="where the job log lives")
@click.option("--fsync", default="always", show_default=True,
              help="always (ack after fdatasync), interval[=MS] (ack after write, sync every MS), never")
@click.option("--heartbeat", default=P.HEARTBEAT_INTERVAL, show_default=True, type=click.FloatRange(0.01, 60),
              help="seconds between heartbeats")
@click.option("--liveness", default=P.HEARTBEAT_LIVENESS, show_default=True, type=click.IntRange(1, 100),
              help="missed heartbeats before a worker is declared lost")
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 1000),
              help="dispatches before a lost job fails (WorkerLost)")
@click.option("--segment-mb", default=64.0, show_default=True, type=click.FloatRange(0.004, 4096),
              help="roll the log to a new segment at this size (MiB); a snapshot may follow each roll")
@click.option("--retain-days", default=None, type=click.FloatRange(min=0, min_open=True),
              help="drop whole old log segments of finished jobs older than this [default: keep forever]")
@click.option("--retain-bytes", default=None, type=ByteSize(),
              help="drop the oldest segments of finished jobs while the log is larger than this "
                   "(bytes, or e.g. 512MiB, 10GB)")
@click.option("--recovery-lease", default=None, type=click.FloatRange(0, 3600),
              help="after a restart, seconds jobs that were running wait for their worker to report them "
                   "before they are queued again [default: heartbeat x liveness + 1]")
@click.option("--sndhwm", default=0, show_default=True, type=click.IntRange(0, 10_000_000),
              help="send high-water mark per peer in messages (0: none); a full peer's messages wait in the router")
@click.option("--max-message-bytes", default="256MiB", show_default=True, type=ByteSize(),
              help="largest message frame accepted (ZeroMQ MAXMSGSIZE; at least 1KiB); a peer that sends a "
                   "larger one is disconnected")
@click.option("--curve-secret", default=None, metavar="FILE",
              help="CURVE: the router's NAME.key_secret (with --clients-keys and --workers-keys)")
@click.option("--clients-keys", default=None, metavar="DIR", help="CURVE: directory of the client public keys (*.key)")
@click.option("--workers-keys", default=None, metavar="DIR", help="CURVE: directory of the worker public keys (*.key)")
@click.option("--max-args-bytes", default="64MiB", show_default=True, type=ByteSize(),
              help="largest job args (as JSON) a submit may carry; a larger job is rejected")
@click.option("--insecure", is_flag=True, default=False,
              help="allow binding a non-loopback address without CURVE (anyone who reaches it can run jobs)")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def router(bind: str, data_dir: str, fsync: str, heartbeat: float, liveness: int, max_attempts: int,
           segment_mb: float, retain_days: float | None, retain_bytes: int | None, recovery_lease: float | None,
           sndhwm: int, max_message_bytes: int, curve_secret: str | None, clients_keys: str | None,
           workers_keys: str | None, max_args_bytes: int, insecure: bool, log_level: str) -> None:
    """Run the router: the queue, dispatch and the job log."""
    import zmq

    from .joblog import DataDirError, LogCorruption
    from .router import run_router
    from .security import router_curve

    _setup_logging(log_level)
    try:
        code = run_router(bind, data_dir, fsync, heartbeat=heartbeat, liveness=liveness, max_attempts=max_attempts,
                          segment_bytes=max(4096, int(segment_mb * 1024 * 1024)), retain_days=retain_days,
                          retain_bytes=retain_bytes,
                          recovery_lease=recovery_lease, sndhwm=sndhwm,
                          max_message_size=max_message_bytes, max_args_bytes=max_args_bytes,
                          curve=router_curve(curve_secret, clients_keys, workers_keys), insecure=insecure)
    except zmq.ZMQError as e:
        click.echo(f"zmqrun: error: cannot bind {bind}: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"zmqrun: error: {e.strerror or e}{where} (data dir {data_dir})", err=True)
        sys.exit(2)
    except (LogCorruption, DataDirError, ValueError) as e:
        click.echo(f"zmqrun: error: {e}", err=True)
        sys.exit(2)
    sys.exit(code)


@main.command()
@click.option("--connect", envvar="ZMQRUN_ADDRESS", default=P.DEFAULT_ADDRESS, show_default=True,
              help="router endpoint (env ZMQRUN_ADDRESS)")
@click.option("--dedicated", "script", default=None, metavar="SCRIPT",
              help="serve only this script, imported once and kept warm (package.module:function or file.py:function)")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 10_000), help="jobs run at once")
@click.option("--prefetch", default=None, type=click.IntRange(0, 100_000),
              help="jobs the router may send ahead of free slots [default: 256 dedicated, 0 normal]")
@click.option("--heartbeat", default=P.HEARTBEAT_INTERVAL, show_default=True, type=click.FloatRange(0.01, 60),
              help="seconds between heartbeats")
@click.option("--name", default=None, help="worker name shown in job records and status")
@click.option("--timeout", default=None, type=click.FloatRange(0, None, min_open=True),
              help="seconds a job without its own timeout may run before it is killed [default: no limit]")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="take only jobs submitted with this tag (repeat for several); without --tag, only untagged jobs")
@click.option("--untagged", is_flag=True, default=False, help="with --tag: take untagged jobs too")
@click.option("--scripts", "roots", multiple=True, metavar="DIR|MODULE",
              help="normal worker: run only scripts under this directory or module prefix (repeat for several) "
                   "[default: the working directory]")
@click.option("--max-result-bytes", default="64MiB", show_default=True, type=ByteSize(),
              help="largest job result (as JSON); a larger one ends the job failure with ResultTooLarge")
@click.option("--curve-secret", envvar="ZMQRUN_CURVE_SECRET", default=None, metavar="FILE",
              help="CURVE: this worker's NAME.key_secret (env ZMQRUN_CURVE_SECRET)")
@click.option("--router-key", envvar="ZMQRUN_ROUTER_KEY", default=None, metavar="FILE",
              help="CURVE: the router's public key file (env ZMQRUN_ROUTER_KEY)")
@click.option("--max-log-bytes", default=DEFAULT_MAX_LOG_BYTES, show_default=True,
              type=click.IntRange(1, MAX_LOG_BYTES_LIMIT),
              help="bytes of output kept per job, streamed and archived; the rest is dropped and counted in a "
                   "marker at the end of the job's logs")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def worker(connect: str, script: str | None, concurrency: int, prefetch: int | None, heartbeat: float,
           name: str | None, timeout: float | None, tags: tuple[str, ...], untagged: bool, roots: tuple[str, ...],
           max_result_bytes: int, curve_secret: str | None, router_key: str | None, max_log_bytes: int,
           log_level: str) -> None:
    """Run a worker: dedicated (--dedicated SCRIPT, warm) or normal (any script, a fresh process per job).

    A dedicated worker is two processes: a supervisor (this one: heartbeats, timeouts, cancels) and a
    warm child that imports SCRIPT once and runs the jobs; a timed-out or canceled job kills the child
    and a new one starts.
    """
    from .scripts import ScriptError
    from .security import curve_keys

    _setup_logging(log_level)
    try:
        curve = curve_keys(curve_secret, router_key)
        if script is not None:
            from .supervisor import run_supervised

            if roots:
                raise ValueError("--scripts is for normal workers: a dedicated worker runs only its own script")
            code = run_supervised(connect, script, concurrency=concurrency, prefetch=prefetch, heartbeat=heartbeat,
                                  name=name, timeout=timeout, log_level=log_level, tags=tags,
                                  untagged=untagged or not tags, curve=curve, max_result_bytes=max_result_bytes,
                                  max_log_bytes=max_log_bytes)
        else:
            from .worker import run_worker

            code = run_worker(connect, None, concurrency=concurrency, prefetch=prefetch, heartbeat=heartbeat,
                              name=name, timeout=timeout, tags=tags, untagged=untagged or not tags, curve=curve,
                              scripts=roots or None, max_result_bytes=max_result_bytes, max_log_bytes=max_log_bytes)
    except (ScriptError, ValueError) as e:
        click.echo(f"zmqrun: error: {e}", err=True)
        sys.exit(2)
    sys.exit(code)


# -- client commands ------------------------------------------------------------------------


def _client(address: str | None, timeout: float) -> Any:
    from .client import Client
    from .security import curve_keys

    meta = click.get_current_context().meta
    curve = curve_keys(meta.get("zmqrun.curve_secret"), meta.get("zmqrun.router_key"))
    return Client(address, timeout=timeout, curve=curve)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"zmqrun.{param.name}"] = value  # read by _client: the commands' signatures stay as they are
    return value


_address_option = click.option("--address", envvar="ZMQRUN_ADDRESS", default=P.DEFAULT_ADDRESS,
                               show_default=True, help=ADDRESS_HELP)
_curve_secret_option = click.option("--curve-secret", envvar="ZMQRUN_CURVE_SECRET", default=None, metavar="FILE",
                                    expose_value=False, callback=_remember,
                                    help="CURVE: your NAME.key_secret (env ZMQRUN_CURVE_SECRET)")
_router_key_option = click.option("--router-key", envvar="ZMQRUN_ROUTER_KEY", default=None, metavar="FILE",
                                  expose_value=False, callback=_remember,
                                  help="CURVE: the router's public key file (env ZMQRUN_ROUTER_KEY)")


def address_option(f: Any) -> Any:
    """--address, and the CURVE options --curve-secret and --router-key, for every command that connects."""
    return _address_option(_curve_secret_option(_router_key_option(f)))
timeout_option = click.option("--timeout-s", "client_timeout", default=10.0, show_default=True,
                              type=click.FloatRange(0.1, 3600), help="seconds to wait for the router to answer")


@main.command()
@click.argument("script")
@click.option("--args", "args_json", default=None, help='job arguments as a JSON object, e.g. \'{"n": 10}\'')
@click.option("--delay", default=None, type=float, help="seconds to wait before the job is due")
@click.option("--priority", default=0, show_default=True, type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY),
              help="higher runs first")
@click.option("--timeout", default=None, type=float, help="seconds the job may run")
@click.option("--id", "job_id", default=None, help="your own job id (resubmitting it creates no second job)")
@click.option("--retries", default=0, show_default=True, type=click.IntRange(0, 1000),
              help="run a failed attempt again up to this many times")
@click.option("--backoff", default=None, metavar="SPEC",
              help="wait before a retry: SECONDS (constant) or exponential:SECONDS[,factor=F][,max=S][,jitter=J] "
                   "[default: exponential:1,factor=2,max=3600,jitter=0.1]")
@click.option("--tag", default=None, help="run only on workers started with --tag TAG")
@click.option("--wait", is_flag=True, help="wait and print the result as JSON")
@click.option("--wait-timeout", default=None, type=click.FloatRange(0, None, min_open=True),
              help="with --wait: give up waiting after this many seconds (the job itself goes on)")
@address_option
@timeout_option
def submit(script: str, args_json: str | None, delay: float | None, priority: int, timeout: float | None,
           job_id: str | None, retries: int, backoff: str | None, tag: str | None, wait: bool,
           wait_timeout: float | None, address: str, client_timeout: float) -> None:
    """Submit a job for SCRIPT; print its id (or, with --wait, its result as JSON)."""
    args = None
    if args_json is not None:
        try:
            args = json.loads(args_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--args is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise ValueError("--args must be a JSON object, e.g. '{\"n\": 10}'")
    if backoff is not None and not retries:
        from .model import parse_backoff

        parse_backoff(backoff)  # a bad spec is the error to show, not the note below
        click.echo("zmqrun: note: --backoff applies only to retried attempts; without --retries it has no effect",
                   err=True)
    with _client(address, client_timeout) as c:
        job = c.submit(script, args, priority=priority, delay=delay, timeout=timeout, job_id=job_id,
                       retries=retries, backoff=backoff, tag=tag)
        _print_or_wait(job, wait, wait_timeout)


def _print_or_wait(job: Any, wait: bool, wait_timeout: float | None) -> None:
    """Print the job's id, or with ``wait`` its result as JSON (raises what ``Job.result`` raises)."""
    if not wait:
        click.echo(job.id)
        return
    try:
        value = job.result(wait_timeout)
    except KeyboardInterrupt:
        click.echo(f"zmqrun: stopped waiting; job {job.id} is still queued or running", err=True)
        sys.exit(130)
    except TimeoutError:
        raise TimeoutError(f"job {job.id} not finished within {wait_timeout:g} s; it goes on "
                           f"(see zmqrun jobs show {job.id})") from None
    click.echo(json.dumps(value))


@main.group()
def jobs() -> None:
    """Look up, list, cancel and retry jobs."""


def _fmt_backoff(b: dict[str, Any] | None) -> str:
    if not b:
        return "none"
    if b.get("kind") == "exponential":
        return (f"exponential from {b['seconds']:g} s, x{b['factor']:g}, at most {b['max']:g} s, "
                f"jitter {b['jitter']:g}")
    return f"constant {b.get('seconds', 0):g} s" + (f", jitter {b['jitter']:g}" if b.get("jitter") else "")


def _fmt_record(r: Any) -> str:
    lines = [f"id:            {r.id}", f"script:        {r.script}", f"status:        {r.status}",
             f"args:          {json.dumps(r.args)}", f"priority:      {r.priority}",
             f"created_at:    {r.created_at}", f"scheduled_for: {r.scheduled_for}",
             f"started_at:    {r.started_at}", f"finished_at:   {r.finished_at}",
             f"worker:        {r.worker}", f"attempts:      {r.attempts}", f"timeout:       {r.timeout}"]
    if r.tag is not None:
        lines.append(f"tag:           {r.tag}")
    if r.retries:
        lines.append(f"retries:       {r.retries} (backoff {_fmt_backoff(r.backoff)})")
    if r.retry_of:
        lines.append(f"retry_of:      {r.retry_of}")
    if r.attempt_errors:
        lines.append("attempt errors (retried):")
        for e in r.attempt_errors:
            err = e.get("error") or {}
            lines.append(f"  #{e.get('attempt')} {e.get('finished_at')} on {e.get('worker')}: "
                         f"{err.get('type')}: {err.get('message')}")
    if r.status == "success":
        lines.append(f"result:        {json.dumps(r.result)}")
    if r.error:
        lines.append(f"error:         {r.error.get('type')}: {r.error.get('message')}")
        if r.error.get("traceback"):
            lines.append("traceback:\n" + r.error["traceback"].rstrip())
    if r.logs:
        lines.append("logs:\n" + r.logs.rstrip())
    return "\n".join(lines)


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the whole record as JSON")
@address_option
@timeout_option
def jobs_show(job_id: str, as_json: bool, address: str, client_timeout: float) -> None:
    """Show one job's record."""
    with _client(address, client_timeout) as c:
        r = c.get(job_id)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else _fmt_record(r))


@jobs.command("list")
@click.option("--status", default=None, type=click.Choice(["queued", "running", "success", "failure", "canceled"]))
@click.option("--script", default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
@address_option
@timeout_option
def jobs_list(status: str | None, script: str | None, limit: int, as_json: bool, address: str,
              client_timeout: float) -> None:
    """List jobs, newest first."""
    with _client(address, client_timeout) as c:
        records = c.list_jobs(status=status, script=script, limit=limit)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    click.echo(f"{'ID':36}  {'STATUS':8}  {'ATTEMPTS':>8}  {'CREATED':27}  SCRIPT")
    for r in records:
        click.echo(f"{r.id:36}  {r.status:8}  {r.attempts:>8}  {r.created_at or '':27}  {r.script}")


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True,
              help="print the output as the job prints it, until the job ends (exit 1 unless it succeeded)")
@address_option
@timeout_option
def jobs_logs(job_id: str, follow: bool, address: str, client_timeout: float) -> None:
    """Print a job's captured stdout and stderr (a running job: its output so far)."""
    with _client(address, client_timeout) as c:
        if not follow:
            logs = "".join(c.logs(job_id))
            if logs:
                click.echo(logs, nl=not logs.endswith("\n"))
            return
        stream = c.logs(job_id, follow=True)
        last = "\n"
        try:
            for chunk in stream:
                last = chunk[-1]
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # unsubscribe
            if last != "\n":
                sys.stdout.write("\n")
            click.echo(f"zmqrun: stopped following job {job_id}; it goes on", err=True)
            sys.exit(130)
        if last != "\n":
            sys.stdout.write("\n")
            sys.stdout.flush()
        status = c.get(job_id).status
    if status != "success":
        click.echo(f"zmqrun: job {job_id} ended {status} (see zmqrun jobs show {job_id})", err=True)
        sys.exit(1)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--reason", default=None, help="why (recorded in the job's error with who canceled it)")
@address_option
@timeout_option
def jobs_cancel(job_id: str, reason: str | None, address: str, client_timeout: float) -> None:
    """Cancel a queued, scheduled or running job (a running one is killed)."""
    with _client(address, client_timeout) as c:
        res = c.cancel(job_id, reason)
    if not res.canceled:
        raise ValueError(f"not canceled: {res.message}")
    click.echo(f"canceled {job_id}" + (f" ({res.message})" if res.message != "canceled" else ""))


@jobs.command("retry")
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="wait and print the new job's result as JSON")
@click.option("--wait-timeout", default=None, type=click.FloatRange(0, None, min_open=True),
              help="with --wait: give up waiting after this many seconds (the job goes on)")
@address_option
@timeout_option
def jobs_retry(job_id: str, wait: bool, wait_timeout: float | None, address: str, client_timeout: float) -> None:
    """Run a finished job again as a new job (same script, args and options); print the new id."""
    with _client(address, client_timeout) as c:
        _print_or_wait(c.retry(job_id), wait, wait_timeout)


@main.command()
@address_option
@timeout_option
@click.option("--json", "as_json", is_flag=True)
def status(address: str, client_timeout: float, as_json: bool) -> None:
    """Show workers by script with their credit, and queued / scheduled / running counts."""
    with _client(address, client_timeout) as c:
        st = c.status()
    st.pop("req", None)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    counts = st["counts"]
    leased = f" ({st['leased']} leased after a restart)" if st.get("leased") else ""
    click.echo(f"router {st['endpoint']} (fsync {st['fsync']}): queued {counts['queued']}, scheduled "
               f"{counts['scheduled']}, running {counts['running']}{leased}, finished {counts['finished']}")
    lg = st.get("log", {})
    if lg.get("syncs"):
        # Batches and syncs are this process's: set them against the records it wrote, not the whole log's.
        new = lg.get("records_since_start", lg["records"])
        click.echo(f"log: {lg['records']} records in all; since this router started {new} in {lg['batches']} "
                   f"batches, {lg['syncs']} fdatasyncs ({new / lg['syncs']:.1f} records per sync)")
    if st.get("dropped"):
        click.echo("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(st["dropped"].items())))
    click.echo(f"{len(st['workers'])} worker(s):")
    for w in sorted(st["workers"], key=lambda w: (w["script"] or "", w["name"])):
        tags = ""
        if w.get("tags"):
            tags = f"  tags {','.join(w['tags'])}{' +untagged' if w.get('untagged') else ''}"
        click.echo(f"  {w['name']:40}  {w['script'] or '(any script, cold)':40}  "
                   f"busy {w['in_flight']}/{w['credit']}{tags}")
    if st.get("queued_by_script"):
        click.echo("queued by script:")
        for script, n in sorted(st["queued_by_script"].items()):
            click.echo(f"  {script}: {n}")
    if st.get("queued_by_tag"):
        served = {t for w in st["workers"] for t in w.get("tags") or ()}
        click.echo("queued by tag (a tagged job runs only on a worker started with that --tag):")
        for tag, n in sorted(st["queued_by_tag"].items()):
            click.echo(f"  {tag}: {n}{'' if tag in served else '  (no worker has this tag)'}")


# -- job log tools ------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """CURVE keys for the router, its clients and workers."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True,
              help="where to write NAME.key and NAME.key_secret (created with mode 0700 if missing)")
def keys_generate(name: str, directory: str) -> None:
    """Write a CURVE keypair: NAME.key (public: give it to the router or its peers) and NAME.key_secret
    (mode 0600: keep it).  Refuses to overwrite existing files."""
    from .security import generate_keys

    public, secret = generate_keys(name, directory)
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")


@main.group("log")
def log_group() -> None:
    """Check and repair a data dir's job log offline (exit 0 healthy, 1 corrupt, 2 unreadable)."""


@log_group.command("check")
@click.argument("data_dir")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def log_check(data_dir: str, as_json: bool) -> None:
    """Verify every segment, index file, snapshot and CURRENT of DATA_DIR without changing anything.

    Says what the router would do on start: load which snapshot, truncate a torn tail (a warning,
    exit 0) or refuse to start (corruption, exit 1, with the file and byte offset).
    """
    from .logcheck import CheckError, check, format_report

    try:
        rep = check(data_dir)
    except CheckError as e:
        click.echo(f"zmqrun: error: {e}", err=True)
        sys.exit(2)
    try:
        click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else format_report(rep))
    finally:
        rep.close()
    sys.exit(rep.exit_code)


@log_group.command("repair")
@click.argument("data_dir")
@click.option("--truncate-at-corruption", "truncate", is_flag=True,
              help="do it: cut the log at its first bad batch (without it, only print what would be dropped)")
def log_repair(data_dir: str, truncate: bool) -> None:
    """Cut DATA_DIR's log at its first bad batch: truncate that segment, remove later segments and the
    index files and snapshots that refer past the cut.  Refuses while a router runs on DATA_DIR."""
    from .logcheck import CheckError, format_report, repair

    try:
        before, plan, after = repair(data_dir, apply=truncate)
    except (CheckError, OSError) as e:
        click.echo(f"zmqrun: error: {e}", err=True)
        sys.exit(2)
    if plan.empty:
        click.echo("nothing to repair: no bad batch, and nothing refers past the end of the log")
        for line in plan.lines():
            click.echo(line)
        sys.exit(before.exit_code)
    if after is None:
        click.echo("would drop (nothing changed; run again with --truncate-at-corruption to do it):")
        for line in plan.lines():
            click.echo(line)
        sys.exit(1)
    click.echo("dropped:")
    for line in plan.lines():
        click.echo(line)
    click.echo("\ncheck after the repair:")
    try:
        click.echo(format_report(after))
    finally:
        after.close()
    sys.exit(after.exit_code)


@main.command()
@click.option("--warm-jobs", default=500, show_default=True, help="jobs through the dedicated (warm) worker")
@click.option("--cold-jobs", default=100, show_default=True, help="jobs through the normal (cold) worker")
def demo(warm_jobs: int, cold_jobs: int) -> None:
    """Start a router and two workers on loopback, run real jobs through both paths, print latencies."""
    from .demo import run_demo

    sys.exit(run_demo(warm_jobs, cold_jobs))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Run the bench suite (alias of 'python -m bench', from a source checkout)."""
    import os

    if os.path.isdir("bench") and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the bench lives in the source checkout, not in the package
    try:
        from bench.cli import main as bench_main
    except ModuleNotFoundError as e:
        if e.name == "bench" or (e.name or "").startswith("bench."):
            raise ValueError("the bench suite lives in the source checkout: run 'zmqrun bench' from the "
                             "repo root") from None
        raise ValueError(f"the bench needs its extra ({e.name} is missing): pip install -e '.[bench]'") from None
    sys.exit(bench_main(list(ctx.args)))
