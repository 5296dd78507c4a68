"""Job definitions in the store, each mirrored by a DBOS schedule (DBOS's scheduler fires it; workers run it).

DBOS keeps its system tables in the store's own database (schema `dbos` on PostgreSQL, the same file on SQLite),
so one `--db` names everything. The job's row holds what to run; the schedule holds when, and its firings and
their outcomes are DBOS workflows, read back here for `datagen jobs list/show`.
"""

from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from datagen import __version__
from datagen.errors import BadInput
from datagen.jobs.definition import JobDefinition
from storage.store import database_url
from storage.tables import Job, JobMissed

APP_NAME = "datagen"
APP_VERSION = os.environ.get("DATAGEN_APP_VERSION") or f"datagen-{__version__}"
"""Fixed, not DBOS's hash of the workflow code. Only a worker registers it (and makes it the latest, which schedules
fire for); a worker also reruns another version's stranded runs (datagen/jobs/worker.py). DATAGEN_APP_VERSION
overrides it: the tests' second datagen version."""
RUN_JOB = "run_job"
"""The workflow every schedule starts (datagen/jobs/worker.py); its context argument is the job's name."""
JOB_RUN = "job_run"
"""The workflow of one run of a job that a firing queues, deduplicated on the run's name."""
LOG_EVENT = "log"
"""The DBOS event in which a run's workflow keeps its log file's path (datagen/jobs/worker.py)."""
RUN_SHARD = "run_shard"
"""The workflow a sharded job's firing queues for each shard (datagen/shards.py), a child of the firing."""


@contextmanager
def dbos_client(url: str | None, migrate: bool = True) -> Iterator[Any]:
    """A DBOS client on the store's database, its system tables created first (the client itself never migrates);
    readers pass migrate=False: a store with jobs has them."""
    from dbos import DBOS, DBOSClient

    url = database_url(url)
    if migrate:
        DBOS.migrate(url)
    client = DBOSClient(system_database_url=url, application_name=APP_NAME)
    try:
        yield client
    finally:
        client.destroy()


def set_worker_limit(client: Any, queue: str, concurrency: int | None) -> int:
    """The queue's job runs at a time per worker, set (with `concurrency`) before a worker launches, so its first
    poll already keeps it. DBOS keeps one limit per queue in the system database, read by every worker at each poll:
    setting it sets it for every worker of the queue, so machines of different sizes take different queues."""
    current = client.retrieve_queue(queue)
    limit = concurrency or (current.worker_concurrency if current is not None else None) or 1
    if current is None or current.worker_concurrency != limit:
        client.register_queue(queue, worker_concurrency=limit, on_conflict="always_update")
    return limit


def schedule_context(context: Any) -> tuple[str, str]:
    """(job name, backfill policy) from a schedule's context; a job added before --backfill has its name only."""
    return (context["job"], context.get("backfill", "latest")) if isinstance(context, dict) else (str(context), "latest")


def on_failure_command(context: Any) -> str | None:
    """The job's --on-failure shell command, kept in its schedule's context with the backfill policy."""
    return context.get("on_failure") if isinstance(context, dict) else None


def get_job(session: Session, name: str) -> Job:
    job = session.exec(select(Job).where(Job.name == name)).first()
    if job is None:
        raise BadInput(f"no job named '{name}' in this database (datagen jobs list)")
    return job


def add_job(engine: Engine, url: str | None, job: JobDefinition, every: str | None) -> Job:
    """Store the job and create its schedule; a name already taken is BadInput and nothing is stored.

    No store transaction stays open across a DBOS call: DBOS's first migration of a PostgreSQL database waits for them.
    """
    with Session(engine) as session:
        if session.exec(select(Job.id).where(Job.name == job.name)).first() is not None:
            raise BadInput(f"NAME: a job named '{job.name}' exists already (datagen jobs remove {job.name})")
    row = Job(name=job.name, pipeline=job.pipeline, args=job.args, schedule=job.schedule, timezone=job.timezone, every=every,
              target=job.target, shard_size=job.shard_size, queue=job.queue)  # fmt: skip
    with dbos_client(url) as client:
        # A new queue runs one job run per worker until a worker's --concurrency says otherwise (set_worker_limit).
        client.register_queue(job.queue, worker_concurrency=1, on_conflict="never_update")
        # DBOS's scheduler reads the cron in the job's time zone (cron_timezone), and so does its backfill.
        client.create_schedule(schedule_name=job.name, workflow_name=RUN_JOB, schedule=job.schedule, queue_name=job.queue,
                               cron_timezone=job.timezone, context={"job": job.name, "backfill": job.backfill, "on_failure": job.on_failure})  # fmt: skip
        try:
            with Session(engine, expire_on_commit=False) as session:
                session.add(row)
                session.commit()
        except BaseException:
            client.delete_schedule(job.name)
            raise
    return row


def set_enabled(engine: Engine, url: str | None, name: str, enabled: bool) -> None:
    with Session(engine) as session:
        get_job(session, name)
    with dbos_client(url) as client:
        (client.resume_schedule if enabled else client.pause_schedule)(name)
    with Session(engine) as session:
        job = get_job(session, name)
        job.enabled = enabled
        session.add(job)
        session.commit()


def remove_job(engine: Engine, url: str | None, name: str) -> None:
    """The definition and its schedule go; the job's run and its rows stay in the store."""
    with Session(engine) as session:
        get_job(session, name)
    with dbos_client(url) as client:
        client.delete_schedule(name)
    with Session(engine) as session:
        session.delete(get_job(session, name))
        session.commit()


def run_now(engine: Engine, url: str | None, name: str) -> str:
    """Enqueue a firing now (a paused job too); returns its workflow id."""
    with Session(engine) as session:
        get_job(session, name)
    with dbos_client(url) as client:
        if not client.list_application_versions():
            # Firings go to the latest version a worker registered. Before any worker ever started there is none, and
            # DBOSClient has no public call to register one: this is the only private DBOS call left, and it never
            # registers a version over a worker's.
            client._sys_db.create_application_version(APP_VERSION, APP_NAME)
        return client.trigger_schedule(name).get_workflow_id()


def cancel_runs(engine: Engine, url: str | None, name: str) -> list[str]:
    """Cancel the job's queued and running firings and runs (its shards' too); a worker running one stops its command
    after the batch in flight, which stores the run `stopped`. Returns the workflow ids cancelled."""
    with Session(engine) as session:
        job = get_job(session, name)
    with dbos_client(url, migrate=False) as client:
        active = client.list_workflows(status=["ENQUEUED", "PENDING"], queue_name=job.queue, load_output=False)
        ids = [w.workflow_id for w in active if _of_job(w, name)]
        for workflow_id in ids:
            client.cancel_workflow(workflow_id)
    return ids


def _of_job(w, name: str) -> bool:
    """A firing of the job, its run, or one of its shards' runs."""
    if w.schedule_name == name:
        return True
    run = _run_name(w)
    return w.name in (JOB_RUN, RUN_SHARD) and (run == name or run.startswith(f"{name}.shard-"))


@dataclass
class RunPart:
    """A run workflow a firing queued: the job's run, or one shard's."""

    run: str
    workflow_id: str
    status: str
    outcome: str | None
    """completed, stopped, skipped; the error for ERROR."""
    log: str | None = None
    """The file its command's output went to, on the worker's machine (`datagen worker --log-dir`); None before it ran."""


@dataclass
class JobRun:
    """One firing of a job, as the operator reads it: the firing's DBOS workflow, and the status and outcome of the
    run(s) it queued, which the firing itself does not wait for."""

    workflow_id: str
    status: str
    """DBOS's, of the firing's runs once it queued them: ENQUEUED, PENDING (running), SUCCESS, ERROR, CANCELLED."""
    outcome: str | None
    """completed, stopped, skipped (the previous run was still queued or running) or sharded; the error for ERROR."""
    executor: str | None
    created_at: dt.datetime | None
    seconds: float | None
    """From the first run's start to the last one's end: the time run, not the time queued."""
    parts: list[RunPart]


def missed_firings(engine: Engine, name: str, limit: int = 10) -> list[JobMissed]:
    """The job's firings that fell while no worker ran, newest first (datagen/jobs/worker.py backfill)."""
    with Session(engine) as session:
        return list(session.exec(select(JobMissed).where(JobMissed.job == name).order_by(JobMissed.scheduled_at.desc()).limit(limit)).all())


def next_due(job: Job, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the job fires next, in its time zone (as DBOS's scheduler computes it: croniter from now in that zone)."""
    if not job.enabled:
        return None
    now = (now or dt.datetime.now(dt.timezone.utc)).astimezone(ZoneInfo(job.timezone))
    return croniter(job.schedule, now, second_at_beginning=True).get_next(dt.datetime)


def due_between(job: Job, since: dt.datetime, until: dt.datetime, limit: int) -> list[dt.datetime]:
    """The job's firing times after `since` and up to `until`, newest first, at most `limit`, in UTC; the cron read in
    the job's time zone, so a daily 03:00 in Europe/Paris is 02:00 UTC in winter and 01:00 UTC in summer."""
    due, times = croniter(job.schedule, until.astimezone(ZoneInfo(job.timezone)), second_at_beginning=True), []
    while len(times) < limit and (t := due.get_prev(dt.datetime)) > since:
        times.append(t.astimezone(dt.timezone.utc))
    return times


def job_runs(url: str | None, names: list[str], limit: int = 10) -> dict[str, list[JobRun]]:
    """The latest firings of each job, newest first, each with the runs it queued."""
    if not names:
        return {}
    runs = {}
    with dbos_client(url, migrate=False) as client:
        for name in names:
            firings = client.list_workflows(schedule_name=name, sort_desc=True, limit=limit, load_input=False)
            runs[name] = [_job_run(f, client.list_workflows(parent_workflow_id=f.workflow_id) if _queued(f) else []) for f in firings]
            for part in (p for r in runs[name] for p in r.parts):
                part.log = client.get_event(part.workflow_id, LOG_EVENT, timeout_seconds=0)
    return runs


def _queued(w) -> bool:
    return w.status == "SUCCESS" and isinstance(w.output, dict) and w.output.get("outcome") in ("queued", "sharded")


def _run_name(w) -> str:
    """A run workflow's first argument is its run's name (job_run: the job's; run_shard: the shard's)."""
    args = w.input.get("args") if isinstance(w.input, dict) else None
    return str(args[0]) if args else w.workflow_id


def _outcome(w) -> str | None:
    return w.output.get("outcome") if isinstance(w.output, dict) else (str(w.error) if w.error else None)


def _job_run(firing, children: list) -> JobRun:
    created = dt.datetime.fromtimestamp(firing.created_at / 1000, dt.timezone.utc) if firing.created_at else None
    parts = [RunPart(run=_run_name(w), workflow_id=w.workflow_id, status=w.status, outcome=_outcome(w)) for w in children]
    if not _queued(firing):
        seconds = (firing.updated_at - firing.created_at) / 1000 if firing.status in ("SUCCESS", "ERROR") and firing.updated_at and firing.created_at else None
        return JobRun(workflow_id=firing.workflow_id, status=firing.status, outcome=_outcome(firing), executor=firing.executor_id,
                      created_at=created, seconds=seconds, parts=parts)  # fmt: skip
    statuses = {w.status for w in children}
    status = next((s for s in ("PENDING", "ENQUEUED", "ERROR", "CANCELLED") if s in statuses), "SUCCESS" if children else firing.status)
    failed = next((w for w in children if w.status == "ERROR"), None)
    if firing.output["outcome"] == "sharded":
        outcome = "sharded" if failed is None else f"sharded: {_run_name(failed)}: {failed.error}"
    else:
        outcome = _outcome(children[0]) if children else None
    starts = [w.dequeued_at for w in children if w.dequeued_at]
    ends = [w.completed_at for w in children if w.completed_at]
    seconds = (max(ends) - min(starts)) / 1000 if status in ("SUCCESS", "ERROR") and starts and ends else None
    executor = children[0].executor_id if len(children) == 1 else None
    return JobRun(workflow_id=firing.workflow_id, status=status, outcome=outcome, executor=executor, created_at=created,
                  seconds=seconds, parts=parts)  # fmt: skip
