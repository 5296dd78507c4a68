"""`datagen worker`: a DBOS process that runs the job runs its queue hands it, each as the pipeline's own command.

The glue over DBOS (dbos-inc/dbos-transact-py) is two workflows. Every job's schedule starts a firing (run_job),
which queues the job's run as its own workflow (job_run) with DBOS's deduplication id set to the run's name: while that
run is queued or running, DBOS refuses a second one, and the firing is recorded `skipped`. The run:
  1. plan_run (a step, so a recovered run keeps its plan): skip it if a command outside the jobs writes the run
     (storage/run_lock.py), else the command line `datagen PIPELINE OPTIONS --run JOB --db URL` with the target
     raised by the job's --target from where the run is now;
  2. run_pipeline (a step): that command in a child process. The pipeline resumes the run from the store by itself,
     so a retried or recovered step continues where the last one stopped. DBOS retries it with backoff only when it
     was interrupted by something that passes (a dead writer's run lock, the store unreachable, the child killed);
     bad input (exit 2) and a failed run (exit 1) end the workflow in ERROR with the child's last error line.
A sharded Toolformer job (datagen/shards.py) plans one command per shard instead, each with its shard's --lines and
run, and the firing queues each as its own workflow (run_shard, step 2 alone), deduplicated on the shard's run name:
the workers take the shards as they take any job run, the queue's limit at a time each.
DBOS provides the queue (its per-worker concurrency limit, set before launch), the schedules, the retries and the
recovery of this process's own pending workflows at restart. What self-hosted DBOS leaves out is a worker that dies and
never comes back: its workflows stay pending under its executor id. So each worker heartbeats into `worker_beat`, and
a live worker puts back on the queue, through DBOS's public cancel and rewind calls, the pending workflows of every
worker whose beat is stale, and the workflows of another datagen version that no worker of it takes (an upgrade or a
rollback; README, "Upgrading workers"). A `--once` worker sweeps before it exits.
Each run's command writes to a log file of its own (log_file), and a worker deletes its queue's finished firings
older than its History policy through DBOS's delete call (prune_history).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from dbos import DBOS, SetEnqueueOptions
from dbos import error as dbos_error
from sqlalchemy import delete, insert, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from datagen.console import err_console
from datagen.errors import StoppedEarly
from datagen.jobs.schedules import (APP_NAME, APP_VERSION, JOB_RUN, LOG_EVENT, RUN_JOB, RUN_SHARD, dbos_client, due_between, on_failure_command,
                                    schedule_context, set_worker_limit)  # fmt: skip
from datagen.shards import plan_shards
from storage.run_lock import TIMEOUT_S as RUN_LOCK_TIMEOUT_S
from storage.run_lock import holder_of, server_now
from storage.store import database_url, find_run, open_engine
from storage.tables import Job, JobMissed, WorkerBeat

WORKER_TIMEOUT_S = float(os.environ.get("DATAGEN_WORKER_TIMEOUT", "30"))
"""A worker whose heartbeat is older than this is taken for dead and its workflows are recovered by another.
It beats every WORKER_TIMEOUT_S / 6."""

RETRIES = 5
"""Attempts of one job run interrupted by something that passes (JobRunInterrupted) before its workflow ends in ERROR:
1 + 4 retries, waiting RUN_LOCK_TIMEOUT_S / 2 and doubling, which outlasts a dead holder's run lock (a recovered run
waits for it) and a short database outage. Bad input (exit 2) and a failed run (exit 1) are not retried."""


@dataclass
class _Worker:
    """This process's settings; DBOS registers workflows at import, so they read them from here."""

    url: str = ""
    executor_id: str = ""
    queue: str = ""
    last_beat: float = 0.0
    trusted_from: float = 0.0
    """Server time before which this worker declares no other worker dead: one timeout after its own beats resumed
    from a gap (it was paused, or the database was unreachable to it or to all: a failover), so that the others have
    had the time to beat again."""
    stopping: threading.Event = field(default_factory=threading.Event)
    log_dir: Path = Path("job-logs")
    """Where each job run's output goes (log_file)."""
    history: "History" = field(default_factory=lambda: History())
    pruned_at: float = 0.0
    """Server time of this worker's last prune_history."""
    children: dict[subprocess.Popen, str] = field(default_factory=dict)
    """Each running pipeline command, with the workflow it runs for."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class History:
    """What a worker keeps of its queue's finished firings (DBOS workflows, with the runs they queued), the runs' log
    files and the missed-firing rows: those of the last `keep_days` days, and each job's last `keep_last` firings
    whatever their age (`datagen worker --keep-days --keep-last`)."""

    keep_days: float = 30.0
    """0: keep everything."""
    keep_last: int = 10
    every_s: float = 3600.0
    """How often a worker prunes (and once when it starts)."""


_worker = _Worker()


def say(message: str) -> None:
    err_console.print(f"[{datetime.now():%H:%M:%S}] {message}", markup=False, highlight=False, soft_wrap=True)


@DBOS.workflow(name=RUN_JOB)
def run_job(scheduled_at: datetime, context: Any) -> dict[str, Any]:
    """A firing: queue the job's run (or each shard's run) as its own workflow, deduplicated by DBOS on the run's
    name, so a run is in one workflow at a time: a firing while the previous run is queued or running is skipped."""
    job_name, _ = schedule_context(context)
    plan = plan_firing(job_name)
    if "skipped" in plan:
        say(f"job {job_name}: skipped ({plan['skipped']})")
        return {"outcome": "skipped", "reason": plan["skipped"], "run": job_name}
    queued, skipped = [], []
    for run in plan["runs"]:
        try:
            with SetEnqueueOptions(deduplication_id=run["run"]):
                if run["argv"] is None:
                    DBOS.enqueue_workflow(plan["queue"], job_run, job_name)
                else:
                    DBOS.enqueue_workflow(plan["queue"], run_shard, run["run"], run["argv"])
            queued.append(run["run"])
        except dbos_error.DBOSQueueDeduplicatedError:
            skipped.append(run["run"])
    if not queued:
        reason = f"its previous run is still queued or running: {', '.join(skipped)}"
        say(f"job {job_name}: skipped ({reason})")
        return {"outcome": "skipped", "reason": reason, "run": job_name}
    say(f"job {job_name}: queued {', '.join(queued)}" + (f"; skipped {', '.join(skipped)} (still queued or running)" if skipped else ""))
    return {"outcome": "sharded" if plan["sharded"] else "queued", "run": job_name, "queued": queued, "skipped": skipped}


@DBOS.workflow(name=JOB_RUN)
def job_run(job_name: str) -> dict[str, Any]:
    """The job's run: planned now that it is the only workflow of its run (the target raised from where the run is)."""
    plan = plan_run(job_name)
    if "skipped" in plan:
        say(f"job {job_name}: skipped ({plan['skipped']})")
        return {"outcome": "skipped", "reason": plan["skipped"], "run": job_name}
    return run_to_end(job_name, plan["argv"])


@DBOS.workflow(name=RUN_SHARD)
def run_shard(run_name: str, argv: list[str]) -> dict[str, Any]:
    if (holder := holder_of(open_engine(_worker.url), run_name)) is not None:  # a command outside the jobs writes it
        return {"outcome": "skipped", "reason": f"written by {holder}", "run": run_name}
    return run_to_end(run_name, argv)


def run_to_end(run_name: str, argv: list[str]) -> dict[str, Any]:
    """The pipeline's step; when DBOS gives up retrying it, the workflow's error is the last attempt's, not DBOS's count.
    A failure runs the job's --on-failure command."""
    try:
        return run_pipeline(run_name, argv)
    except dbos_error.DBOSMaxStepRetriesExceeded as err:
        failure = JobRunFailed(f"{err.errors[-1] if err.errors else err} ({err.max_retries} attempts)")
    except JobRunFailed as err:
        failure = err
    alert(run_name.split(".shard-")[0], f"run {run_name} failed: {failure}")
    raise failure


@DBOS.step()
def alert(job_name: str, reason: str) -> None:
    """The job's --on-failure command, if it has one (a step: run once, not again when the workflow is recovered)."""
    schedule = DBOS.get_schedule(job_name)
    command = on_failure_command(schedule["context"]) if schedule else None
    if not command:
        return
    try:
        done = subprocess.run(command, shell=True, env={**os.environ, "DATAGEN_JOB": job_name, "DATAGEN_REASON": reason},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode:
            say(f"job {job_name}: --on-failure exited {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
    except subprocess.TimeoutExpired:
        say(f"job {job_name}: --on-failure still running after 60 s; left behind")


@DBOS.step()
def plan_firing(job_name: str) -> dict[str, Any]:
    """The runs a firing queues: the job's run, or one per shard of the corpus as it is now, with its command line."""
    engine = open_engine(_worker.url)
    with Session(engine) as session:
        job = session.exec(select(Job).where(Job.name == job_name)).first()
    if job is None:
        return {"skipped": "the job was removed"}
    if job.shard_size is None:
        return {"queue": job.queue, "sharded": False, "runs": [{"run": job.name, "argv": None}]}
    from datagen.jobs.definition import pipeline_params
    from pipelines.toolformer import read_corpus

    shards = plan_shards(job.name, read_corpus(Path(pipeline_params(job.pipeline, job.args)["corpus"])), job.shard_size)
    return {"queue": job.queue, "sharded": True,
            "runs": [{"run": s.run, "argv": [job.pipeline, *job.args, "--lines", s.lines, "--run", s.run, "--db", _worker.url]} for s in shards]}  # fmt: skip


@DBOS.step()
def plan_run(job_name: str) -> dict[str, Any]:
    """The command line; skipped while a command outside the jobs writes the run (storage/run_lock.py)."""
    engine = open_engine(_worker.url)
    with Session(engine) as session:
        job = session.exec(select(Job).where(Job.name == job_name)).first()
        if job is None:
            return {"skipped": "the job was removed"}
        holder = holder_of(engine, job.name)
        if holder is not None:
            return {"skipped": f"its previous run is still going, written by {holder}"}
        return {"argv": pipeline_argv(session, job, _worker.url)}


def pipeline_argv(session: Session, job: Job, url: str) -> list[str]:
    """The job's command line: its options, its run, this worker's store, and the target raised from where the run is.
    An e2e job's loop is named after the job, and each firing resumes it (a completed loop returns at once)."""
    if job.pipeline == "e2e":
        return ["e2e", *job.args, "--name", job.name, "--db", url]
    argv = [job.pipeline, *job.args, "--run", job.name, "--db", url]
    if job.target is not None:
        run = find_run(session, job.name)
        if job.pipeline == "toolformer":
            from pipelines.toolformer import done_lines

            argv += ["--limit", str((len(done_lines(session, run)) if run else 0) + job.target)]
        else:
            argv += ["--num-instructions", str((run.accepted if run else 0) + job.target)]
    return argv


class JobRunFailed(Exception):
    """The pipeline's command failed for a reason a retry does not fix: bad input (exit 2), or the run itself failed
    (exit 1: too many failed batches, a model error). The workflow ends in ERROR with the child's last error line."""


class JobRunInterrupted(JobRunFailed):
    """A failure that passes: the run still held by a writer that died (its lock expires), the store unreachable, the
    child killed (out of memory). DBOS retries the step with backoff."""


TRANSIENT = ("one writer per run", "cannot open the database", "database error:", "the database is locked")
"""The last error lines of `datagen` (exit 1) that a later attempt may not meet: the run lock (storage/run_lock.py) and
the store's connection errors (storage/store.py)."""


def _is_transient(err: BaseException) -> bool:
    return isinstance(err, JobRunInterrupted)


@DBOS.step(retries_allowed=True, max_attempts=RETRIES, interval_seconds=RUN_LOCK_TIMEOUT_S / 2, backoff_rate=2.0,
           should_retry=_is_transient)  # fmt: skip
def run_pipeline(job_name: str, argv: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    say(f"job {job_name}: running datagen {' '.join(argv)}")
    code, tail = _run_child(argv, DBOS.workflow_id or "")
    if _worker.stopping.is_set():
        threading.Event().wait()  # shutting down: record nothing, the workflow stays pending for recovery
    seconds = round(time.monotonic() - started, 1)
    if code == 0:
        say(f"job {job_name}: completed in {seconds} s")
        return {"outcome": "completed", "run": job_name, "seconds": seconds}
    if code == StoppedEarly.exit_code:  # the run's own rule stopped it (request budget, stall guard): a result
        reason = tail[-1] if tail else "stopped before the target"
        say(f"job {job_name}: {reason}")
        return {"outcome": "stopped", "run": job_name, "seconds": seconds, "reason": reason}
    last = tail[-1].removeprefix("error: ") if tail else "no error line"
    if code < 0 or (code == 1 and any(mark in last for mark in TRANSIENT)):
        cause = f"killed by signal {-code}" if code < 0 else f"exit 1: {last}"
        say(f"job {job_name}: interrupted after {seconds} s ({cause}); DBOS retries it with backoff")
        raise JobRunInterrupted(cause)
    kind = "bad input" if code == 2 else "run failed"
    say(f"job {job_name}: failed after {seconds} s (exit {code}, {kind}, not retried): {last}")
    raise JobRunFailed(f"exit {code}, {kind}: {last}")


def _run_child(argv: list[str], workflow_id: str) -> tuple[int, list[str]]:
    """Run `datagen ARGV` in a session of its own, dying with this process (datagen/jobs/child.py), its output (stdout
    and stderr) appended to the run's log file; returns its exit code and its last 5 lines."""
    log = log_file(_worker.log_dir, argv, workflow_id)
    DBOS.set_event(LOG_EVENT, str(log))
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DATAGEN_HOLDER": f"worker {_worker.executor_id[:8]}", "DATAGEN_WORKER_PID": str(os.getpid())}
    with log.open("ab") as out:
        out.write(f"== {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC, worker {_worker.executor_id[:8]} ({APP_VERSION}): datagen {' '.join(argv)}\n".encode())
        out.flush()
        start = out.tell()
        child = subprocess.Popen([sys.executable, "-m", "datagen.jobs.child", *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)  # fmt: skip
        with _worker.lock:
            _worker.children[child] = workflow_id
        say(f"job run {workflow_id}: output in {log}")
        code = child.wait()
        with _worker.lock:
            _worker.children.pop(child, None)
        tail = last_lines(log, start)
        out.write(f"== exit {code}\n".encode())
    return code, tail


def log_file(log_dir: Path, argv: list[str], workflow_id: str) -> Path:
    """LOG_DIR/RUN/WORKFLOW.log: one file per firing's run (a retry or a recovery appends to it), under its run's name."""
    flag = "--name" if argv[0] == "e2e" else "--run"
    run = argv[argv.index(flag) + 1] if flag in argv else "run"
    return log_dir / _file_name(run) / f"{_file_name(workflow_id)}.log"


def _file_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def last_lines(path: Path, start: int, n: int = 5) -> list[str]:
    """The last n non-blank lines written after `start`; a progress bar's carriage returns end lines too."""
    with path.open("rb") as f:
        f.seek(max(start, path.stat().st_size - 65536))
        text = f.read().decode("utf-8", errors="replace")
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-n:]


def serve(url: str | None, concurrency: int | None, queue: str, once: bool, log_dir: Path = Path("job-logs"), history: History | None = None) -> None:
    """Run job runs from `queue`, `concurrency` at a time (None: the queue's limit), until SIGTERM (or, with `once`,
    until nothing is queued or stranded); each run's output goes to a file under `log_dir`; older history is pruned."""
    url = database_url(url)
    _worker.log_dir, _worker.history = log_dir.resolve(), history or History()
    with dbos_client(url) as client:
        concurrency = set_worker_limit(client, queue, concurrency)
    engine = open_engine(url)
    _worker.url, _worker.executor_id, _worker.queue = url, uuid.uuid4().hex, queue
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    started = _beat(engine, holder)  # before DBOS takes work, so no live worker takes this one for dead
    DBOS(config={"name": APP_NAME, "system_database_url": url, "executor_id": _worker.executor_id,
                 "application_version": APP_VERSION, "log_level": "WARNING",
                 "scheduler_polling_interval_sec": 5})  # fmt: skip
    DBOS.listen_queues([queue])
    for handler in logging.getLogger("dbos").handlers:
        handler.addFilter(_one_line)
    signal.signal(signal.SIGTERM, lambda *_: _stop(engine))
    DBOS.launch()
    # Schedules fire for the latest registered version: this one from now on, after an upgrade and after a rollback.
    DBOS.set_latest_application_version(APP_VERSION)
    say(f"worker {_worker.executor_id[:8]} ({holder}, {APP_VERSION}) on queue '{queue}', {concurrency} at a time")
    backfill(engine, queue, started)
    if once:
        # --once (cron, Slurm): sweep first, then run until nothing is queued, running here, or stranded by a dead
        # worker whose beat has not yet gone stale (it never beats again after this worker started).
        idle = 0
        while not _worker.stopping.is_set():
            _beat_and_sweep_once(engine, holder)
            idle = idle + 1 if not _has_work(engine, started) else 0
            if idle >= 2:
                say("nothing queued or stranded: exiting (--once)")
                DBOS.destroy()
                with engine.begin() as connection:  # gone for good: no row left behind
                    connection.execute(delete(WorkerBeat).where(WorkerBeat.executor_id == _worker.executor_id))
                return
            _worker.stopping.wait(min(1.0, WORKER_TIMEOUT_S / 6))
        return
    sweeper = threading.Thread(target=_beat_and_sweep, args=(engine, holder), daemon=True)
    sweeper.start()
    _worker.stopping.wait()


MAX_MISSED = 1000
"""Missed firings looked at per job (the latest ones): a 30 s job down for a month is not 86,400 rows."""


def backfill(engine, queue: str, started: float) -> None:
    """The firings of this queue's active jobs that fell while no worker ran (after the schedule last fired, or the
    job was added, and before this worker started): each recorded in `job_missed`, and run late as the job's
    --backfill says (latest, all, none) through DBOS's backfill call, whose workflow ids are the live scheduler's, so
    two workers starting at once queue each firing once."""
    from sqlalchemy.exc import IntegrityError

    with Session(engine) as session:
        jobs = {j.name: j for j in session.exec(select(Job).where(Job.queue == queue, Job.enabled)).all()}
    until = datetime.fromtimestamp(started - 10, timezone.utc)  # a firing due in the last seconds is the scheduler's
    for schedule in DBOS.list_schedules(status="ACTIVE"):
        name, policy = schedule_context(schedule["context"])
        job = jobs.get(schedule["schedule_name"])
        if job is None:
            continue
        since = datetime.fromisoformat(schedule["last_fired_at"]) if schedule["last_fired_at"] else job.created_at
        since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
        missed = due_between(job, since, until, MAX_MISSED)
        late = missed if policy == "all" else missed[:1] if policy == "latest" else []
        for t in late:
            DBOS.backfill_schedule(schedule["schedule_name"], t - timedelta(milliseconds=1), t + timedelta(milliseconds=1))
        recorded = 0
        for t in missed:
            try:
                with Session(engine) as session:
                    session.add(JobMissed(job=name, scheduled_at=t, backfilled=t in late))
                    session.commit()
                recorded += 1
            except IntegrityError:
                pass  # recorded by another worker starting at the same time
        if recorded:
            alert(name, f"{len(missed)} firing(s) missed while no worker ran, the latest due {missed[0]:%Y-%m-%d %H:%M:%S} UTC; {len(late)} run late")
            say(f"job {name}: {len(missed)} firing(s) missed while no worker ran, the latest due {missed[0]:%Y-%m-%d %H:%M:%S} UTC; "
                f"--backfill {policy}: {len(late)} run late")  # fmt: skip


def _one_line(record: logging.LogRecord) -> bool:
    """DBOS's own warnings (its pollers while the database is down) as one line each: the message, and in place of
    a formatted traceback its last line, the error."""
    lines = [line.strip() for line in record.getMessage().strip().splitlines() if line.strip()] or [""]
    head, traceback_mark, _ = lines[0].partition("Traceback (most recent call last):")
    record.msg = f"{head.strip()} {lines[-1]}" if traceback_mark else lines[0]
    record.args, record.exc_info, record.exc_text = (), None, None
    return True


def _has_work(engine, started: float) -> bool:
    """Queued on this queue (any version), running here, or pending under a worker that has not beaten since this
    one started (dead, or about to be found dead: a live worker beats every WORKER_TIMEOUT_S / 6)."""
    waiting = DBOS.list_workflows(status=["ENQUEUED", "PENDING"], queue_name=_worker.queue, load_input=False, load_output=False)
    if any(w.status == "ENQUEUED" or w.executor_id == _worker.executor_id for w in waiting):
        return True
    with Session(engine) as session:
        beating = set(session.exec(select(WorkerBeat.executor_id).where(WorkerBeat.beat_at > started)).all())
    return any(w.executor_id not in beating for w in waiting)


def _stop(engine) -> None:
    """SIGTERM: pass it on to each child pipeline, which finishes and commits its batch in flight, stores its run as
    `stopped` and exits (datagen/sigterm.py); then drop this worker's heartbeat so another recovers its pending runs at
    once (they resume after the last committed batch), and exit 0. A child killed before that loses its batch only."""
    _worker.stopping.set()
    say("SIGTERM: the current job runs stop after their batch in flight; another worker (or the next start) resumes them")
    with _worker.lock:
        children = list(_worker.children)
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        child.wait()
    try:
        with engine.begin() as connection:
            connection.execute(delete(WorkerBeat).where(WorkerBeat.executor_id == _worker.executor_id))
    except SQLAlchemyError:
        pass  # its beat goes stale on its own
    os._exit(0)


def _beat(engine, holder: str) -> float:
    """Refresh this worker's row, or insert it again if a sweeper took this worker for dead and deleted it; returns
    the beat's time. Beats are the database server's clock (storage/run_lock.py's server_now): no clock skew between
    machines makes a live worker look dead."""
    with engine.begin() as connection:
        now = connection.execute(select(server_now(engine))).scalar_one()
        values = {"holder": holder, "beat_at": now}
        if not connection.execute(update(WorkerBeat).where(WorkerBeat.executor_id == _worker.executor_id).values(**values)).rowcount:
            connection.execute(insert(WorkerBeat).values(executor_id=_worker.executor_id, **values))
    return float(now)


def _beat_and_sweep(engine, holder: str) -> None:
    """Every WORKER_TIMEOUT_S / 6: heartbeat and sweep; an unreachable store is retried with doubling waits, one line
    each, and said when it is back."""
    every = WORKER_TIMEOUT_S / 6
    wait, failing = every, False
    while not _worker.stopping.wait(wait):
        try:
            _beat_and_sweep_once(engine, holder)
            if failing:
                say("store reachable again")
            wait, failing = every, False
        except Exception as err:  # the store or DBOS's system tables unreachable: keep trying
            wait, failing = min(wait * 2, 60.0), True
            first = str(getattr(err, "orig", None) or err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            say(f"store unreachable ({first}); retrying in {wait:.0f} s")


def _beat_and_sweep_once(engine, holder: str) -> None:
    """Heartbeat, then put back on the queue, for any worker of this version, each workflow that no live worker will
    finish: pending under a worker whose beat is stale (dead), or of another datagen version and queued longer than the
    timeout or pending under a dead worker (after an upgrade or a rollback; see README, "Upgrading workers").
    Through DBOS's public calls: cancel it, then rewind it to its first unfinished step on this version and queue,
    so its finished steps (the plan) are kept and the queue's concurrency limit holds for it."""
    now = _beat(engine, holder)
    if now - _worker.pruned_at >= _worker.history.every_s:
        _worker.pruned_at = now
        prune_history(engine, now)
    last, _worker.last_beat = _worker.last_beat, now
    if now - last > WORKER_TIMEOUT_S / 2:  # this worker was itself paused or cut off: others may not have beaten yet
        _worker.trusted_from = now + WORKER_TIMEOUT_S
    with Session(engine) as session:
        fresh = set(session.exec(select(WorkerBeat.executor_id).where(WorkerBeat.beat_at >= now - WORKER_TIMEOUT_S)).all())
    if now < _worker.trusted_from:
        fresh |= {w.executor_id for w in DBOS.list_workflows(status="PENDING", queue_name=_worker.queue, load_input=False, load_output=False)}
    waiting = DBOS.list_workflows(status=["ENQUEUED", "PENDING"], queue_name=_worker.queue, load_input=False, load_output=False)
    now_ms = now * 1000
    stranded = [w for w in waiting
                if (w.status == "PENDING" and w.executor_id not in fresh)
                or (w.status == "ENQUEUED" and w.app_version != APP_VERSION and now_ms - (w.created_at or now_ms) > WORKER_TIMEOUT_S * 1000)]  # fmt: skip
    dead = sorted({w.executor_id[:8] for w in stranded if w.status == "PENDING" and w.executor_id})
    if dead:
        say(f"recovering the pending job runs of worker(s) {', '.join(dead)} (no heartbeat for {WORKER_TIMEOUT_S:.0f} s)")
    for w in stranded:
        if w.app_version != APP_VERSION:
            say(f"job run {w.workflow_id} of {w.app_version}: no live worker of that version runs it; rerun here as {APP_VERSION}")
        _requeue(w.workflow_id)
    _stop_cancelled()
    if dead:
        with engine.begin() as connection:
            connection.execute(delete(WorkerBeat).where(WorkerBeat.executor_id.in_([w.executor_id for w in stranded if w.executor_id])))


def prune_history(engine, now: float) -> None:
    """Delete the finished firings of this queue's jobs (and of removed jobs) older than the policy's days, but each
    job's last ones (History), with the runs they queued (DBOS's delete_workflows, children included) and those runs'
    log files on this machine; and the missed-firing rows as old. A firing whose run is still queued or running stays."""
    policy = _worker.history
    if not policy.keep_days:
        return
    cutoff = datetime.fromtimestamp(now, timezone.utc) - timedelta(days=policy.keep_days)
    with Session(engine) as session:  # a cancelled firing has left its queue: its job says whose it is (any worker's if removed)
        elsewhere = set(session.exec(select(Job.name).where(Job.queue != _worker.queue)).all())
    old = [w for w in DBOS.list_workflows(name=RUN_JOB, status=["SUCCESS", "ERROR", "CANCELLED"], end_time=cutoff.isoformat(), load_input=False, load_output=False)
           if w.schedule_name not in elsewhere]  # fmt: skip
    doomed = []
    for job in {w.schedule_name for w in old}:
        latest = DBOS.list_workflows(name=RUN_JOB, schedule_name=job, sort_desc=True, limit=policy.keep_last, load_input=False, load_output=False) if policy.keep_last else []
        kept = {w.workflow_id for w in latest}
        doomed += [w.workflow_id for w in old if w.schedule_name == job and w.workflow_id not in kept]
    runs = DBOS.list_workflows(parent_workflow_id=doomed, load_input=False, load_output=False) if doomed else []
    going = {w.parent_workflow_id for w in runs if w.status in ("ENQUEUED", "PENDING", "DELAYED")}
    doomed = [d for d in doomed if d not in going]
    logs = [DBOS.get_event(w.workflow_id, LOG_EVENT, timeout_seconds=0) for w in runs if w.parent_workflow_id in doomed]
    if doomed:
        DBOS.delete_workflows(doomed, delete_children=True)
    for log in (Path(p) for p in logs if p):
        if log.is_relative_to(_worker.log_dir):  # this worker's own files only
            log.unlink(missing_ok=True)
    with engine.begin() as connection:
        missed = connection.execute(delete(JobMissed).where(JobMissed.scheduled_at < cutoff)).rowcount
    if doomed or missed:
        say(f"history: deleted {len(doomed)} firing(s) and {missed} missed-firing row(s) older than {policy.keep_days:g} days "
            f"(each job keeps its last {policy.keep_last})")  # fmt: skip


def _stop_cancelled() -> None:
    """SIGTERM (stop after the batch in flight) each pipeline command whose workflow is no longer this worker's:
    cancelled (`datagen jobs cancel`), or requeued by another worker that took this one for dead while it was stalled."""
    with _worker.lock:
        running = dict(_worker.children)
    if not running:
        return
    states = {w.workflow_id: w for w in DBOS.list_workflows(workflow_ids=list(running.values()), load_input=False, load_output=False)}
    for child, workflow_id in running.items():
        w = states.get(workflow_id)
        if w is not None and (w.status == "CANCELLED" or (w.status in ("ENQUEUED", "PENDING") and w.executor_id != _worker.executor_id)):
            why = "cancelled" if w.status == "CANCELLED" else "taken over by another worker"
            say(f"job run {workflow_id}: {why}; its command stops after its batch in flight")
            with _worker.lock:
                _worker.children.pop(child, None)
            child.send_signal(signal.SIGTERM)


def _requeue(workflow_id: str) -> None:
    steps = DBOS.list_workflow_steps(workflow_id)
    finished = [s["function_id"] for s in steps if s["completed_at_epoch_ms"] is not None or s["output"] is not None or s["error"] is not None]
    start = 1
    while start in finished:
        start += 1
    DBOS.cancel_workflow(workflow_id)
    try:
        DBOS.rewind_workflow(workflow_id, start_step=start, application_version=APP_VERSION, queue_name=_worker.queue)
    except Exception as err:  # another sweeper rewound it first
        say(f"job run {workflow_id}: not requeued ({str(err).splitlines()[0]})")
