"""`datagen jobs` (recurring generation jobs in the store, scheduled by DBOS) and `datagen worker` (runs them)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, replace
from pathlib import Path
from zoneinfo import ZoneInfo
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from sqlmodel import Session, select

from datagen.console import err_console, print_json, summary_table
from datagen.jobs import schedules
from datagen.jobs.definition import check_job, check_timezone
from datagen.cli.options import DbOption, JsonOption
from storage.store import open_engine
from storage.tables import Job

app = typer.Typer(help="Recurring generation jobs: add, list, show, pause, resume, remove, run-now, cancel.", no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="Job name; also the name of the run each firing resumes.")]


@app.command("add", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def add(
    ctx: typer.Context,
    name: NameArg,
    pipeline: Annotated[str, typer.Argument(help="self-instruct, alpaca, toolformer or e2e; its options follow after --.")],
    every: Annotated[Optional[str], typer.Option("--every", help="Interval: 30s, 15m, 6h, 1d (dividing a minute, hour or day).")] = None,
    cron: Annotated[Optional[str], typer.Option("--cron", help="Cron expression in --timezone: '0 3 * * *' (5 fields) or with seconds first (6).")] = None,
    timezone: Annotated[str, typer.Option("--timezone", help="IANA time zone the schedule is read in (Europe/Paris: 03:00 there, summer and winter).")] = "UTC",
    target: Annotated[Optional[int], typer.Option("--target", help="Per run: accepted instructions (toolformer: texts) to add beyond what the run has.")] = None,
    shard_size: Annotated[Optional[int], typer.Option("--shard-size", help="toolformer: texts per shard; each firing queues one run per shard, JOB.shard-0000, ...")] = None,
    queue: Annotated[str, typer.Option("--queue", help="DBOS queue the job's runs go to; `datagen worker --queue` takes from it.")] = "datagen",
    backfill: Annotated[str, typer.Option("--backfill", help="Firings due while no worker ran: latest (run the latest one late), all, or none; each is recorded as missed either way.")] = "latest",
    on_failure: Annotated[Optional[str], typer.Option("--on-failure", help="Shell command run by the worker when a run fails or firings were missed; DATAGEN_JOB and DATAGEN_REASON are set.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a job: `datagen jobs add nightly self-instruct --every 1d --target 500 -- --seeds seeds.jsonl --config si.yaml`.

    The options after -- are checked as `datagen PIPELINE` checks them (config, seeds or corpus file); nothing is stored unless all pass."""
    job = check_job(name, pipeline, list(ctx.args), every, cron, target, shard_size, queue, backfill, on_failure)
    job = replace(job, timezone=check_timezone(timezone))
    row = schedules.add_job(open_engine(db), db, job, every)
    show_jobs([row], {}, as_json, title=f"Added job {row.name}")


@app.command("list")
def list_jobs(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Jobs with their schedule, next due time and last run's outcome."""
    with Session(open_engine(db, create=False)) as session:  # a mistyped --db is refused, not created
        jobs = list(session.exec(select(Job).order_by(Job.name)).all())
    show_jobs(jobs, schedules.job_runs(db, [j.name for j in jobs], limit=1), as_json, title="Jobs")


@app.command("show")
def show(name: NameArg, last: Annotated[int, typer.Option(help="Runs to list.", min=1)] = 10, db: DbOption = None, as_json: JsonOption = False) -> None:
    """One job's definition, next due time, and its last runs with their outcomes."""
    engine = open_engine(db, create=False)
    with Session(engine) as session:
        job = schedules.get_job(session, name)
    runs = schedules.job_runs(db, [name], limit=last)[name]
    missed = schedules.missed_firings(engine, name, limit=last)
    if as_json:
        print_json({**job_dict(job), "runs": [run_dict(r) for r in runs],
                    "missed": [{"scheduled_at": m.scheduled_at.isoformat(), "backfilled": m.backfilled} for m in missed]})  # fmt: skip
        return
    err_console.print(summary_table(f"Job {job.name}", [(k, v) for k, v in job_dict(job).items() if k != "name"]))
    table = Table(title=f"Last {len(runs)} runs", title_justify="left")
    for column in ("workflow", "status", "outcome", "worker", "created", "seconds"):
        table.add_column(column, overflow="fold")  # whole ids, wrapped, never cut to "sched-r-trigge..."
    for r in runs:
        outcome = "see below" if r.status == "ERROR" else r.outcome or ""
        table.add_row(r.workflow_id, r.status, outcome, (r.executor or "")[:8], f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else "",
                      "" if r.seconds is None else f"{r.seconds:.1f}")  # fmt: skip
    err_console.print(table)
    for r in runs:  # the reason of each failure on its own line, whole; a sharded firing's shard runs; the log files
        if r.status == "ERROR":
            err_console.print(f"{r.workflow_id}: {r.outcome}", markup=False, highlight=False, soft_wrap=True)
        for part in r.parts:
            if len(r.parts) > 1:
                err_console.print(f"  {part.run}: {part.status} {part.outcome or ''}", markup=False, highlight=False, soft_wrap=True)
            if part.log:
                where = f"  {part.run}" if len(r.parts) > 1 else r.workflow_id
                err_console.print(f"{where} log: {part.log}", markup=False, highlight=False, soft_wrap=True)
    for m in missed:
        due = (m.scheduled_at if m.scheduled_at.tzinfo else m.scheduled_at.replace(tzinfo=dt.timezone.utc)).astimezone(ZoneInfo(job.timezone))
        err_console.print(f"missed while no worker ran: {due:%Y-%m-%d %H:%M:%S} {job.timezone} ({'run late' if m.backfilled else 'not run'})",
                          markup=False, highlight=False)  # fmt: skip


@app.command("pause")
def pause(name: NameArg, db: DbOption = None) -> None:
    """Stop firing the job (a run in progress goes on)."""
    schedules.set_enabled(open_engine(db), db, name, False)
    err_console.print(f"job {name}: paused")


@app.command("resume")
def resume(name: NameArg, db: DbOption = None) -> None:
    """Fire the job on its schedule again."""
    schedules.set_enabled(open_engine(db), db, name, True)
    err_console.print(f"job {name}: resumed")


@app.command("remove")
def remove(name: NameArg, db: DbOption = None) -> None:
    """Delete the job and its schedule; its run and generated rows stay in the store."""
    schedules.remove_job(open_engine(db), db, name)
    err_console.print(f"job {name}: removed (its run stays in the store)")


@app.command("run-now")
def run_now(name: NameArg, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Queue a run of the job now, whatever its schedule (a worker takes it)."""
    workflow_id = schedules.run_now(open_engine(db), db, name)
    if as_json:
        print_json({"job": name, "workflow_id": workflow_id})
    else:
        err_console.print(f"job {name}: queued as {workflow_id}")


@app.command("cancel")
def cancel(name: NameArg, db: DbOption = None) -> None:
    """Cancel the job's queued and running runs: a running one stops after its batch in flight (stored `stopped`)."""
    cancelled = schedules.cancel_runs(open_engine(db, create=False), db, name)
    err_console.print(f"job {name}: cancelled {len(cancelled)} queued or running workflow(s)" + (f": {', '.join(cancelled)}" if cancelled else ""))


def worker(
    once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty instead of waiting for more.")] = False,
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", min=1,
                           help="Job runs at a time in each worker of --queue; DBOS keeps one such limit per queue, so this sets it for all its workers (default: the queue's, 1 for a new queue).")] = None,
    queue: Annotated[str, typer.Option("--queue", help="Queue to take job runs from.")] = "datagen",
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Each job run's output goes to LOG_DIR/RUN/WORKFLOW.log (jobs show prints the path).")] = Path("job-logs"),
    keep_days: Annotated[float, typer.Option("--keep-days", min=0, help="History kept: finished firings, their runs' log files and missed-firing rows of the last DAYS days (0: all).")] = 30,
    keep_last: Annotated[int, typer.Option("--keep-last", min=0, help="...and each job's last N firings, however old.")] = 10,
    db: DbOption = None,
) -> None:
    """Run due job runs (each as its pipeline's command) until SIGTERM; start one per GPU machine against one PostgreSQL."""
    from datagen.jobs.worker import History, serve

    serve(db, concurrency, queue, once, log_dir, History(keep_days=keep_days, keep_last=keep_last))


def job_dict(job: Job) -> dict[str, Any]:
    due = schedules.next_due(job)
    return {"name": job.name, "pipeline": job.pipeline, "options": " ".join(job.args), "schedule": job.every and f"every {job.every}" or job.schedule,
            "cron": job.schedule, "timezone": job.timezone, "target": job.target, "shard_size": job.shard_size, "queue": job.queue, "enabled": job.enabled,
            "next_due": due.isoformat() if due else None}  # fmt: skip


def run_dict(run: schedules.JobRun) -> dict[str, Any]:
    return {**asdict(run), "created_at": run.created_at.isoformat() if run.created_at else None}


def show_jobs(jobs: list[Job], runs: dict[str, list[schedules.JobRun]], as_json: bool, title: str) -> None:
    rows = [{**job_dict(j), "last_run": run_dict(runs[j.name][0]) if runs.get(j.name) else None} for j in jobs]
    if as_json:
        print_json(rows)
        return
    table = Table(title=title, title_justify="left")
    for column in ("name", "pipeline", "schedule", "timezone", "target", "enabled", "next due", "last run"):
        table.add_column(column, overflow="fold")  # wrapped, never cut
    for row in rows:
        last = row["last_run"]
        table.add_row(row["name"], row["pipeline"], row["schedule"], row["timezone"], str(row["target"] or ""), "yes" if row["enabled"] else "paused",
                      row["next_due"] or "", f"{last['status']} {last['outcome'] or ''}".strip() if last else "")  # fmt: skip
    err_console.print(table)
