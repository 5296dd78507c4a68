"""`datagen jobs` and `datagen worker` (datagen/jobs/) on real DBOS over real SQLite and PostgreSQL stores, with real
worker processes. The job runs are Toolformer runs on texts no tool's pre-filter passes, through the OpenAI backend at
a closed port: the real command runs, stores each text and completes without a model (output does not matter here);
one test runs the embedded model. The SIGTERM tests run Self-Instruct against a scripted OpenAI-compatible server whose
instruction requests take 3 s, so that a batch is in flight when the signal comes.

Bad definitions are refused at `jobs add` (exit 2, one line naming the field, nothing stored); 3 workers run 10 due
jobs, each exactly once; a worker killed with -9 mid-run is finished by another after the timeout; a job due while
its previous run is still going is skipped, not started twice; a worker given SIGTERM lets the batch in flight commit,
stores the run stopped and exits 0, and another worker resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from datagen.cli import app
from datagen.jobs.schedules import job_runs
from storage.store import open_engine
from storage.tables import Generation, Job, Run, Task, ToolformerText
from tests.conftest import REPO, SEEDS, JsonHandler, scripted_server, slow_self_instruct, start_holder, wait_for
from tests.test_self_instruct import NOVEL

TIMEOUT = 8.0
TEXTS = ["The river flows quietly past the old mill.", "A small bird sang in the garden at dawn.", "She painted the door a bright shade of blue."]
NO_MODEL = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"]


def env(timeout: float = TIMEOUT) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DATAGEN_RUN_LOCK_TIMEOUT": str(timeout), "DATAGEN_WORKER_TIMEOUT": str(timeout)}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def jobs(*args: str, code: int = 0):
    result = CliRunner().invoke(app, ["jobs", *args])
    assert result.exit_code == code, result.output
    return result


def start_worker(url: str, log: Path, *args: str, timeout: float = TIMEOUT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datagen.cli", "worker", "--db", url, "--log-dir", str(log.parent / "job-logs"), *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env(timeout))  # fmt: skip


def job_children(url: str) -> list[int]:
    """The pids of the job runs' commands that workers started on the store `url` (datagen/jobs/child.py)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"datagen.jobs.child" in argv or b"datagen.cli" in argv) and b"worker" not in argv and url.encode() in argv:  # the child execs datagen.cli
            pids.append(int(proc.name))
    return pids


def stop(worker: subprocess.Popen) -> int:
    worker.send_signal(signal.SIGTERM)
    return worker.wait(timeout=60)


# ---- definitions ---------------------------------------------------------------------------------------------------

BAD = [
    (["j", "bogus", "--every", "1h"], "pipeline: unknown 'bogus'"),
    (["j", "self-instruct", "--cron", "61 * * * *", "--", "--seeds", str(SEEDS)], "--cron: '61 * * * *'"),
    (["j", "self-instruct", "--every", "7m", "--", "--seeds", str(SEEDS)], "--every: '7m'"),
    (["j", "self-instruct", "--every", "1h"], "Missing option '--seeds'"),
    (["j", "self-instruct", "--every", "1h", "--", "--seeds", "missing.jsonl"], "missing.jsonl: no such file"),
    (["j", "self-instruct", "--every", "1h", "--", "--seeds", str(SEEDS), "--rouge-threshold", "7"], "--rouge-threshold must be in [0, 1]"),
    (["j", "self-instruct", "--every", "1h", "--", "--seeds", str(SEEDS), "--bogus", "1"], "No such option: --bogus"),
    (["j", "alpaca", "--every", "1h", "--", "--seeds", str(SEEDS), "--run", "x"], "--run: set by the worker"),
    (["j", "toolformer", "--every", "1h", "--", "--corpus", str(SEEDS), "--tools", "abacus"], "tools"),
    (["j", "self-instruct", "--every", "1h", "--shard-size", "2", "--", "--seeds", str(SEEDS)], "--shard-size: only toolformer jobs"),
    (["j", "toolformer", "--every", "1h", "--shard-size", "0", "--", "--corpus", str(REPO / "examples" / "toolformer_corpus.jsonl")], "--shard-size: 0"),
    (["j", "toolformer", "--every", "1h", "--shard-size", "2", "--target", "4", "--", "--corpus", str(REPO / "examples" / "toolformer_corpus.jsonl")],
     "leave out --target"),
    (["j", "toolformer", "--every", "1h", "--shard-size", "2", "--", "--corpus", str(REPO / "examples" / "toolformer_corpus.jsonl"), "--lines", "1:4"],
     "--lines: set by the worker for each shard"),
    (["j", "toolformer", "--every", "1h", "--", "--corpus", str(REPO / "examples" / "toolformer_corpus.jsonl"), "--lines", "9:1"], "--lines: '9:1'"),
    (["j", "e2e", "--every", "1d", "--", "--config", "missing.yaml"], "missing.yaml"),
    (["j", "e2e", "--every", "1d", "--", "--config", str(REPO / "examples" / "e2e_tiny.yaml"), "--name", "x"], "--name: set by the worker"),
    (["j", "e2e", "--every", "1d", "--target", "5", "--", "--config", str(REPO / "examples" / "e2e_tiny.yaml")], "leave out --target"),
    (["j", "e2e", "--every", "1d", "--", "--config", str(REPO / "examples" / "e2e_tiny.yaml"), "--epochs", "0"], "epochs"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_definitions_are_refused_before_anything_is_stored(tmp_path, args, message):
    db = tmp_path / "jobs.db"
    result = jobs("add", "--db", f"sqlite:///{db}", *args, code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not db.exists()


def test_list_and_show_refuse_a_store_that_does_not_exist(tmp_path):
    for command in (["list"], ["show", "j"]):
        assert "no database at" in jobs(*command, "--db", f"sqlite:///{tmp_path / 'typo.db'}", code=2).output
    assert not (tmp_path / "typo.db").exists()


def test_add_list_show_pause_resume_remove(db_url, corpus):
    added = json.loads(jobs("add", "tf", "toolformer", "--every", "6h", "--target", "2", "--db", db_url, "--json", "--", "--corpus", str(corpus)).stdout)
    assert (added[0]["cron"], added[0]["target"], added[0]["enabled"]) == ("0 0 */6 * * *", 2, True)
    assert added[0]["next_due"].endswith(("00:00:00+00:00", "06:00:00+00:00", "12:00:00+00:00", "18:00:00+00:00"))
    assert "exists already" in jobs("add", "tf", "toolformer", "--every", "1h", "--db", db_url, "--", "--corpus", str(corpus), code=2).output
    jobs("pause", "tf", "--db", db_url)
    listed = json.loads(jobs("list", "--db", db_url, "--json").stdout)
    assert [(j["name"], j["enabled"], j["next_due"], j["last_run"]) for j in listed] == [("tf", False, None, None)]
    jobs("resume", "tf", "--db", db_url)
    queued = json.loads(jobs("run-now", "tf", "--db", db_url, "--json").stdout)["workflow_id"]
    shown = json.loads(jobs("show", "tf", "--db", db_url, "--json").stdout)
    assert shown["enabled"] and [(r["workflow_id"], r["status"]) for r in shown["runs"]] == [(queued, "ENQUEUED")]
    jobs("remove", "tf", "--db", db_url)
    assert "no job named 'tf'" in jobs("show", "tf", "--db", db_url, code=2).output
    with Session(open_engine(db_url)) as session:
        assert session.exec(select(Job)).all() == []


# ---- workers -------------------------------------------------------------------------------------------------------


def test_three_workers_run_ten_due_jobs_each_exactly_once(store_url, corpus, tmp_path):
    names = [f"job{i}" for i in range(10)]
    for name in names:
        jobs("add", name, "toolformer", "--every", "1d", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
        jobs("run-now", name, "--db", store_url)
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    # The default timeouts: a loaded CI machine must not make a live worker look dead here (that case is the next test's).
    workers = [start_worker(store_url, log, timeout=60) for log in logs]
    try:
        def all_done():
            runs = job_runs(store_url, names)
            return runs if all(r and r[0].status in ("SUCCESS", "ERROR") for r in runs.values()) else None

        runs = wait_for(all_done, 600, "10 job runs finished")
    finally:
        codes = [stop(w) for w in workers]
    assert codes == [0, 0, 0]
    assert {name: [(r.status, r.outcome) for r in rs] for name, rs in runs.items()} == {name: [("SUCCESS", "completed")] for name in names}
    text = "".join(log.read_text() for log in logs)
    assert sum(f"--run {name} " in text for name in names) == 10 and "Traceback" not in text
    assert all(text.count(f"--run {name} ") == 1 for name in names), text  # each started once, by one worker
    # Each run's output in its own file, from its own command only: none lost in a worker's log, none interleaved.
    files = {name: list((tmp_path / "job-logs" / name).glob("*.log")) for name in names}
    assert all(len(f) == 1 for f in files.values()), files
    outputs = {name: f[0].read_text() for name, f in files.items()}
    assert all(o.count("--run ") == 1 and f"--run {name} " in o and o.endswith("== exit 0\n") for name, o in outputs.items()), outputs
    with Session(open_engine(store_url)) as session:
        assert sorted(session.exec(select(Run.name, Run.status)).all()) == [(n, "completed") for n in names]
        rows = session.exec(select(ToolformerText.run_id, ToolformerText.line)).all()
        assert len(rows) == len(set(rows)) == 10 * len(TEXTS)


def test_a_worker_limited_to_one_never_runs_two_and_two_firings_make_one_run(store_url, corpus, tmp_path):
    """Two due jobs on a new store, one of them fired twice: the worker's first poll already keeps its limit (set
    before DBOS launches), and DBOS refuses the second firing's run while the first is queued (deduplication id = the
    run's name), so the run reaches its target once."""
    jobs("add", "one", "toolformer", "--every", "1d", "--target", "1", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
    jobs("add", "two", "toolformer", "--every", "1d", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
    for name in ("one", "one", "two"):
        jobs("run-now", name, "--db", store_url)
    log = tmp_path / "worker.log"
    assert start_worker(store_url, log, "--once", "--concurrency", "1").wait(timeout=300) == 0, log.read_text()
    events = [line.split("] ", 1)[1].split(":")[0] + (" start" if "running datagen" in line else " end")
              for line in log.read_text().splitlines() if "running datagen" in line or ": completed in" in line]  # fmt: skip
    assert sorted(events) == ["job one end", "job one start", "job two end", "job two start"], log.read_text()
    assert all(a.endswith("start") and b == a.replace("start", "end") for a, b in zip(events[::2], events[1::2])), events
    runs = job_runs(store_url, ["one", "two"])
    assert sorted((r.status, r.outcome) for r in runs["one"]) == [("SUCCESS", "completed"), ("SUCCESS", "skipped")], log.read_text()
    assert [(r.status, r.outcome) for r in runs["two"]] == [("SUCCESS", "completed")]
    with Session(open_engine(store_url)) as session:
        run = session.exec(select(Run).where(Run.name == "one")).one()
        assert len(session.exec(select(ToolformerText).where(ToolformerText.run_id == run.id)).all()) == 1  # --target 1, once


def test_a_killed_worker_s_run_is_finished_by_a_once_worker(store_url, corpus, tmp_path):
    jobs("add", "k", "toolformer", "--every", "1d", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
    jobs("run-now", "k", "--db", store_url)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(store_url, first_log)
    wait_for(lambda: "running datagen toolformer" in first_log.read_text(), 120, "the first worker started the run")
    [child] = wait_for(lambda: job_children(store_url), 60, "the run's command started")
    assert os.getsid(child) == child != os.getsid(first.pid)  # its own session (start_new_session), no preexec_fn
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_for(lambda: not job_children(store_url), 30, "the run's command died with its worker")  # PR_SET_PDEATHSIG, set by the child
    # A cron- or Slurm-started `--once` worker: it waits for the dead worker's beat to go stale, recovers its run,
    # finishes it, and only then exits.
    assert start_worker(store_url, second_log, "--once").wait(timeout=300) == 0, second_log.read_text()
    runs = job_runs(store_url, ["k"])["k"]
    log = second_log.read_text()
    assert [(r.status, r.outcome) for r in runs] == [("SUCCESS", "completed")], log
    assert "recovering the pending job runs of worker(s)" in log and "Traceback" not in log
    with Session(open_engine(store_url)) as session:
        run = session.exec(select(Run).where(Run.name == "k")).one()
        texts = session.exec(select(ToolformerText).where(ToolformerText.run_id == run.id).order_by(ToolformerText.line)).all()
    assert run.status == "completed"
    assert [(t.line, t.text, t.annotated) for t in texts] == [(i + 1, t, t) for i, t in enumerate(TEXTS)]  # as an uninterrupted run


def test_bad_input_is_not_retried_and_jobs_show_prints_its_reason(store_url, corpus, tmp_path):
    """The corpus deleted after `jobs add`: the child exits 2, once; the firing ends in ERROR with the child's line."""
    alerts = tmp_path / "alerts.txt"
    jobs("add", "gone", "toolformer", "--every", "1d", "--on-failure", f'echo "$DATAGEN_JOB: $DATAGEN_REASON" >> {alerts}', "--db", store_url,
         "--", "--corpus", str(corpus), *NO_MODEL)  # fmt: skip
    corpus.unlink()
    jobs("run-now", "gone", "--db", store_url)
    log = tmp_path / "worker.log"
    assert start_worker(store_url, log, "--once").wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert text.count("running datagen toolformer") == 1 and "exit 2, bad input, not retried" in text, text
    [run] = job_runs(store_url, ["gone"])["gone"]
    assert run.status == "ERROR" and run.outcome.startswith("exit 2, bad input: ") and f"{corpus}" in run.outcome, run.outcome
    shown = jobs("show", "gone", "--db", store_url).output
    assert f"{run.workflow_id}: {run.outcome}" in shown.splitlines(), shown
    assert alerts.read_text() == f"gone: run gone failed: {run.outcome}\n"  # --on-failure, once


def test_read_only_commands_register_no_version_and_another_version_s_firing_is_run(store_url, corpus, tmp_path):
    """`jobs list` of another datagen registers nothing (it used to become the latest version, which firings go to and
    no live worker takes). A firing queued for an older datagen whose workers were stopped (an upgrade) is rerun by a
    worker of this version once it has waited the timeout, through DBOS's cancel and rewind."""
    from datagen.jobs.schedules import dbos_client

    jobs("add", "v", "toolformer", "--every", "1d", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
    other = {**env(), "DATAGEN_APP_VERSION": "datagen-old"}
    for command in (["list"], ["show", "v"]):
        done = subprocess.run([sys.executable, "-m", "datagen.cli", "jobs", *command, "--db", store_url], capture_output=True, text=True, env=other)
        assert done.returncode == 0, done.stderr
    with dbos_client(store_url) as client:
        assert client.list_application_versions() == []
    queued = subprocess.run([sys.executable, "-m", "datagen.cli", "jobs", "run-now", "v", "--db", store_url], capture_output=True, text=True, env=other)
    assert queued.returncode == 0, queued.stderr
    log = tmp_path / "worker.log"
    assert start_worker(store_url, log, "--once").wait(timeout=300) == 0, log.read_text()
    [run] = job_runs(store_url, ["v"])["v"]
    assert (run.status, run.outcome) == ("SUCCESS", "completed"), log.read_text()
    assert f"job run {run.workflow_id} of datagen-old: no live worker of that version runs it" in log.read_text()


def test_firings_missed_while_no_worker_ran_are_recorded_and_run_per_the_job_s_policy(store_url, corpus, tmp_path):
    """Three jobs due daily at 03:00, added three days ago, no worker since: `--backfill latest` runs the latest missed
    firing late, `--backfill all` each of them, `--backfill none` none; all record the three missed firings. The `all`
    job's 03:00 is Paris time (--timezone), so are its missed and late firings."""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    from storage.tables import utcnow

    for name, policy, zone in (("late", "latest", "UTC"), ("every", "all", "Europe/Paris"), ("skip", "none", "UTC")):
        jobs("add", name, "toolformer", "--cron", "0 3 * * *", "--timezone", zone, "--backfill", policy, "--db", store_url, "--",
             "--corpus", str(corpus), *NO_MODEL)  # fmt: skip
    engine = open_engine(store_url)
    with Session(engine) as session:
        for job in session.exec(select(Job)).all():
            job.created_at = utcnow() - timedelta(days=3, hours=1)
            session.add(job)
        session.commit()
    log = tmp_path / "worker.log"
    assert start_worker(store_url, log, "--once").wait(timeout=300) == 0, log.read_text()
    runs = job_runs(store_url, ["late", "every", "skip"])
    assert [(r.status, r.outcome) for r in runs["late"]] == [("SUCCESS", "completed")] and runs["skip"] == [], log.read_text()
    # The 3 late firings of `every` queue its one run: the first that finds it queued or running is skipped.
    assert len(runs["every"]) == 3 and {r.status for r in runs["every"]} == {"SUCCESS"} and "completed" in {r.outcome for r in runs["every"]}
    shown = {name: json.loads(jobs("show", name, "--db", store_url, "--json").stdout)["missed"] for name in ("late", "every", "skip")}
    assert [m["backfilled"] for m in shown["late"]] == [True, False, False] and [m["backfilled"] for m in shown["skip"]] == [False] * 3
    assert [m["backfilled"] for m in shown["every"]] == [True] * 3
    due = {name: [datetime.fromisoformat(m["scheduled_at"]).replace(tzinfo=timezone.utc) for m in shown[name]] for name in shown}
    assert {t.astimezone(ZoneInfo("Europe/Paris" if name == "every" else "UTC")).strftime("%H:%M:%S") for name in due for t in due[name]} == {"03:00:00"}
    assert "job late: 3 firing(s) missed while no worker ran" in log.read_text()
    assert f"missed while no worker ran: {due['every'][0].astimezone(ZoneInfo('Europe/Paris')):%Y-%m-%d} 03:00:00 Europe/Paris (run late)" in jobs(
        "show", "every", "--db", store_url).output  # fmt: skip


def test_a_job_due_while_its_previous_run_is_going_is_skipped(store_url, corpus, tmp_path):
    jobs("add", "busy", "toolformer", "--every", "1d", "--db", store_url, "--", "--corpus", str(corpus), *NO_MODEL)
    holder = start_holder(store_url, "busy", {**env(), "DATAGEN_HOLDER": "previous-run"})
    try:
        jobs("run-now", "busy", "--db", store_url)
        log = tmp_path / "worker.log"
        worker = start_worker(store_url, log, "--once")
        assert worker.wait(timeout=180) == 0, log.read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    [run] = job_runs(store_url, ["busy"])["busy"]
    assert (run.status, run.outcome) == ("SUCCESS", "skipped")
    assert "skipped (its previous run is still going, written by previous-run pid" in log.read_text()
    with Session(open_engine(store_url)) as session:
        assert session.exec(select(Run)).all() == []


@pytest.mark.postgres
def test_an_unreachable_store_is_retried_with_backoff_and_said(postgres_url, tmp_path):
    """The worker's database refuses connections for a while (ALLOW_CONNECTIONS false, its sessions ended): the
    worker says so, retries with growing waits, says when it is back, and stops cleanly; no traceback."""
    from sqlalchemy import create_engine

    name = f"down_{os.getpid()}_{time.monotonic_ns()}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    log = tmp_path / "worker.log"
    worker = start_worker(url, log)
    try:
        wait_for(lambda: "on queue 'datagen'" in log.read_text(), 120, "the worker started")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            connection.exec_driver_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        wait_for(lambda: log.read_text().count("store unreachable") >= 2, 120, "two retries said")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        wait_for(lambda: "store reachable again" in log.read_text(), 120, "back")
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        code = stop(worker)
    text = log.read_text()
    assert code == 0 and "Traceback" not in text, text
    waits = [int(line.rsplit("retrying in ", 1)[1].split()[0]) for line in text.splitlines() if "store unreachable" in line]
    assert waits == sorted(waits) and waits[-1] > waits[0], text


@pytest.mark.slow
def test_a_job_runs_the_embedded_model(db_url, tmp_path, embedded_model_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((REPO / "examples" / "toolformer_corpus.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    jobs("add", "real", "toolformer", "--every", "1d", "--target", "1", "--db", db_url, "--", "--corpus", str(corpus),
         "--tools", "calculator", "--config", str(REPO / "examples" / "toolformer_cpu.yaml"), "--backend", "transformers")  # fmt: skip
    jobs("run-now", "real", "--db", db_url)
    log = tmp_path / "worker.log"
    assert start_worker(db_url, log, "--once", timeout=60).wait(timeout=600) == 0, log.read_text()
    [run] = job_runs(db_url, ["real"])["real"]
    assert (run.status, run.outcome) == ("SUCCESS", "completed"), log.read_text()
    assert "--limit 1" in log.read_text()  # the target: one corpus text beyond the none done
    with Session(open_engine(db_url)) as session:
        stored = session.exec(select(Run).where(Run.name == "real")).one()
        texts = session.exec(select(ToolformerText).where(ToolformerText.run_id == stored.id)).all()
    assert (stored.status, stored.backend, len(texts)) == ("completed", "transformers", 1)
    assert texts[0].tools == ["calculator"]  # the text passed the calculator's pre-filter, so the model scored it


@pytest.mark.slow
@pytest.mark.training
def test_an_e2e_job_runs_the_tiny_loop_and_a_second_firing_resumes_it(db_url, tmp_path, embedded_model_path):
    """An e2e job's loop is named after the job; a worker runs it end to end, and the next firing finds every stage
    done: nothing is run or stored twice."""
    from storage.tables import Loop, LoopStage

    config = tmp_path / "tiny.yaml"
    text = (REPO / "examples" / "e2e_tiny.yaml").read_text(encoding="utf-8")
    text = text.replace("seeds: examples/seed_tasks.jsonl", f"seeds: {SEEDS}").replace("out: runs/e2e-tiny", f"out: {tmp_path / 'loop'}")
    text = text.replace("replicates: 2 ", "replicates: 1 ")  # the loop's own figures are test_e2e's; here, who runs it
    text = text.replace("num_instructions: 2 ", "num_instructions: 1 ")  # one generated instruction is a round
    assert "replicates: 1 " in text and "num_instructions: 1 " in text
    start, end = text.index("# --- curate"), text.index("# --- evaluate")
    text = text[:start] + text[end:]  # the curated arm is test_e2e's too
    config.write_text(text, encoding="utf-8")
    jobs("add", "nightly", "e2e", "--every", "1d", "--db", db_url, "--", "--config", str(config))
    stages = []
    for firing in range(2):
        jobs("run-now", "nightly", "--db", db_url)
        log = tmp_path / f"worker-{firing}.log"
        assert start_worker(db_url, log, "--once", timeout=60).wait(timeout=1200) == 0, log.read_text()
        assert "--name nightly" in log.read_text()
        with Session(open_engine(db_url)) as session:
            loop = session.exec(select(Loop)).one()
            stages.append([(s.round, s.stage, s.status) for s in session.exec(select(LoopStage).order_by(LoopStage.id)).all()])
        assert (loop.name, loop.status) == ("nightly", "completed"), log.read_text()
    assert stages[0] == stages[1] and ("generate" in {stage for _, stage, _ in stages[0]})
    assert [r.outcome for r in job_runs(db_url, ["nightly"])["nightly"]] == ["completed", "completed"]
    assert (tmp_path / "loop" / "metrics.json").exists()


# ---- a sharded Toolformer job -------------------------------------------------------------------------------------

SIX = [*TEXTS, "The cat slept on the warm windowsill.", "Rain fell softly on the quiet town.", "He read a long letter from home."]


def test_two_firings_of_a_sharded_job_run_each_shard_once_on_two_workers(store_url, tmp_path):
    corpus = tmp_path / "six.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SIX), encoding="utf-8")
    added = json.loads(jobs("add", "sh", "toolformer", "--every", "1d", "--shard-size", "2", "--db", store_url, "--json", "--",
                            "--corpus", str(corpus), "--batch-size", "1", *NO_MODEL).stdout)  # fmt: skip
    assert added[0]["shard_size"] == 2
    jobs("run-now", "sh", "--db", store_url)
    jobs("run-now", "sh", "--db", store_url)  # fired again while its shards are queued: DBOS refuses them a second time
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(store_url, log, "--once", timeout=60) for log in logs]
    codes = [w.wait(timeout=600) for w in workers]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    firings = job_runs(store_url, ["sh"])["sh"]
    assert [f.status for f in firings] == ["SUCCESS", "SUCCESS"] and "sharded" in {f.outcome for f in firings}, texts
    shards = [f"sh.shard-{k:04d}" for k in range(3)]
    assert sorted((p.run, p.status, p.outcome) for f in firings for p in f.parts) == [(name, "SUCCESS", "completed") for name in shards]
    assert all("".join(texts).count(f"--run {name} ") == 1 for name in shards), texts  # each shard started once
    assert all("--run sh.shard-" in text for text in texts), texts  # both workers took shards
    with Session(open_engine(store_url)) as session:
        runs = session.exec(select(Run).order_by(Run.name)).all()
        assert [(r.name, r.status, r.config["lines"]) for r in runs] == [(n, "completed", f"{2 * k + 1}:{2 * k + 2}") for k, n in enumerate(shards)]
        stored = session.exec(select(ToolformerText.run_id, ToolformerText.line, ToolformerText.text).order_by(ToolformerText.line)).all()
    assert [(line, text) for _, line, text in stored] == [(i + 1, t) for i, t in enumerate(SIX)]  # every text once, by its shard
    assert [run_id for run_id, _, _ in stored] == [r.id for r in runs for _ in range(2)]
    # None of these texts passes a pre-filter, so there is nothing to export; the message names the job's shards.
    result = CliRunner().invoke(app, ["export", "--run", "sh", "--format", "toolformer", "--out", str(tmp_path / "out"), "--db", store_url])
    assert result.exit_code == 2 and "the 3 shard runs of 'sh' have no accepted rows to export" in result.output, result.output


@pytest.mark.slow
def test_a_sharded_job_s_export_merges_its_shards_into_the_unsharded_run_s_dataset(db_url, tmp_path, embedded_model_path):
    """4 texts with numbers, 2 shards of 2 on 2 workers, the calculator on the embedded model at temperature 0 and a
    tau_f that keeps every executed call (so each text gets one); batches of 2, so each shard is one batch of the
    unsharded run: its export is the sharded job's, text for text."""
    import datasets

    corpus = tmp_path / "four.jsonl"
    corpus.write_text("".join((REPO / "examples" / "toolformer_corpus.jsonl").read_text(encoding="utf-8").splitlines(True)[:4]), encoding="utf-8")
    config = tmp_path / "tiny.yaml"
    config.write_text("settings:\n  calculator: {k: 1, m: 1, tau_f: -100.0}\nmax_call_tokens: 16\ntemperature: 0.0\nbatch_size: 2\n")
    options = ["--corpus", str(corpus), "--tools", "calculator", "--config", str(config), "--backend", "transformers"]
    jobs("add", "real", "toolformer", "--every", "1d", "--shard-size", "2", "--db", db_url, "--", *options)
    jobs("run-now", "real", "--db", db_url)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(db_url, log, "--once", timeout=60) for log in logs]
    assert [w.wait(timeout=900) for w in workers] == [0, 0], [log.read_text() for log in logs]
    whole = CliRunner().invoke(app, ["toolformer", *options, "--run", "whole", "--db", db_url])
    assert whole.exit_code == 0, whole.output

    def export(run: str) -> tuple[list[str], dict]:
        out = tmp_path / run
        result = CliRunner().invoke(app, ["export", "--run", run, "--format", "toolformer", "--out", str(out), "--test-size", "0", "--db", db_url])
        assert result.exit_code == 0, result.output
        return datasets.load_from_disk(str(out))["train"]["text"], json.loads((out / "datagen.json").read_text())

    merged, merged_meta = export("real")
    unsharded, _ = export("whole")
    with Session(open_engine(db_url)) as session:
        rows = {name: session.exec(select(ToolformerText.line, ToolformerText.annotated, ToolformerText.calls_inserted)
                                   .join(Run, Run.id == ToolformerText.run_id).where(Run.name.startswith(name)).order_by(ToolformerText.line)).all()
                for name in ("real.shard-", "whole")}  # fmt: skip
    assert rows["real.shard-"] == rows["whole"] and [line for line, _, _ in rows["whole"]] == [1, 2, 3, 4]
    assert merged == unsharded and sorted(merged) == sorted(a for _, a, n in rows["whole"] if n) and len(set(merged)) == len(merged) > 0
    assert merged_meta["runs"] == ["real.shard-0000", "real.shard-0001"]


# ---- SIGTERM: the batch in flight is committed ---------------------------------------------------------------------

BATCH_SECONDS = 3.0


@pytest.fixture
def slow_model():
    """The options of a Self-Instruct run of 4 batches (one instruction request each) against a scripted server whose
    instruction requests take BATCH_SECONDS and answer the next of NOVEL's instructions in turn."""
    answered = iter(range(10**6))
    answer = slow_self_instruct(lambda: f" {NOVEL[next(answered) % len(NOVEL)]}\n", BATCH_SECONDS)
    with scripted_server(answer) as url:
        yield ["--seeds", str(SEEDS), "--backend", "openai", "--base-url", url, "--model", "scripted", "--request-batch-size", "1",
               "--num-instructions", "4"]  # fmt: skip


def committed_batches(url: str, run_name: str) -> list[tuple[int, str]]:
    """The (batch, purpose) of every stored generation of the run, in order."""
    with Session(open_engine(url)) as session:
        run = session.exec(select(Run).where(Run.name == run_name)).first()
        if run is None:
            return []
        return list(session.exec(select(Generation.batch, Generation.purpose).where(Generation.run_id == run.id).order_by(Generation.id)).all())


def whole_batches(n: int) -> list[tuple[int, str]]:
    return [(b, purpose) for b in range(1, n + 1) for purpose in ("instructions", "classification", "instances")]


COMPLETED = whole_batches(4)
"""A completed run's calls: batch 4 can reach the target, so the pipelined loop sends its instances alone, with no
batch 5 (pipelines/bootstrap.py, bootstrap_pipelined)."""


def in_flight_at_sigterm(seen: set[int], stored: list[tuple[int, str]]) -> int:
    """The batches stored after SIGTERM: those committed when it came, and the ones in flight, finished. The openai
    backend's loop is pipelined (pipelines/bootstrap.py): a call carries the next batch's instruction requests with
    this batch's instance requests, so one or two batches are in flight, never none."""
    last = max(b for b, _ in stored)
    assert last - len(seen) in (1, 2), (seen, stored)
    return last


def test_sigterm_lets_the_batch_in_flight_commit_and_another_worker_resumes_the_run(store_url, slow_model, tmp_path):
    jobs("add", "si", "self-instruct", "--every", "1d", "--db", store_url, "--", *slow_model)
    jobs("run-now", "si", "--db", store_url)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(store_url, first_log)
    try:
        seen = wait_for(lambda: {b for b, _ in committed_batches(store_url, "si")}, 180, "a first batch committed")
    finally:
        code = stop(first)
    assert code == 0, first_log.read_text()
    committed = in_flight_at_sigterm(seen, committed_batches(store_url, "si"))
    assert "SIGTERM: the current job runs stop after their batch in flight" in first_log.read_text()
    with Session(open_engine(store_url)) as session:
        run = session.exec(select(Run).where(Run.name == "si")).one()
        accepted = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted")).all()
    assert (run.status, run.error) == ("stopped", f"SIGTERM: stopped after batch {committed}; rerun to resume")
    assert committed_batches(store_url, "si") == whole_batches(committed)  # no batch rolled back, none half stored
    assert run.accepted == len(accepted) == committed

    second = start_worker(store_url, second_log)
    try:
        runs = wait_for(lambda: (r := job_runs(store_url, ["si"])["si"]) and r[0].status in ("SUCCESS", "ERROR") and r, 180, "run finished")
    finally:
        assert stop(second) == 0
    log = second_log.read_text()
    assert [(r.status, r.outcome) for r in runs] == [("SUCCESS", "completed")], log
    assert "recovering the pending job runs of worker(s)" in log and "Traceback" not in first_log.read_text() + log
    with Session(open_engine(store_url)) as session:
        run = session.exec(select(Run).where(Run.name == "si")).one()
        instructions = session.exec(select(Task.instruction).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()
    assert (run.status, run.error, run.accepted) == ("completed", None, 4)
    assert committed_batches(store_url, "si") == COMPLETED  # each batch once: nothing redone, nothing lost
    assert instructions == NOVEL[:4]


def test_sigterm_to_a_command_in_a_terminal_stops_after_its_batch_and_a_rerun_resumes(db_url, slow_model):
    command = [sys.executable, "-m", "datagen.cli", "self-instruct", *slow_model, "--run", "t", "--db", db_url]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        seen = wait_for(lambda: {b for b, _ in committed_batches(db_url, "t")}, 120, "a first batch committed")
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    committed = in_flight_at_sigterm(seen, committed_batches(db_url, "t"))
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == f"error: SIGTERM: stopped after batch {committed}; rerun to resume", stderr
    assert "Traceback" not in stderr and committed_batches(db_url, "t") == whole_batches(committed)
    rerun = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    with Session(open_engine(db_url)) as session:
        run = session.exec(select(Run).where(Run.name == "t")).one()
        assert (run.status, run.accepted) == ("completed", 4)
    assert committed_batches(db_url, "t") == COMPLETED


def test_cancel_stops_a_running_job_run_after_its_batch_in_flight(db_url, slow_model, tmp_path):
    jobs("add", "c", "self-instruct", "--every", "1d", "--db", db_url, "--", *slow_model)
    jobs("run-now", "c", "--db", db_url)
    log = tmp_path / "worker.log"
    worker = start_worker(db_url, log)
    try:
        wait_for(lambda: committed_batches(db_url, "c"), 180, "a first batch committed")
        assert "cancelled 1 queued or running workflow(s)" in jobs("cancel", "c", "--db", db_url).output

        def stopped():
            with Session(open_engine(db_url)) as session:
                return session.exec(select(Run.status).where(Run.name == "c")).one() == "stopped"

        wait_for(stopped, 60, "the run stored stopped")
    finally:
        assert stop(worker) == 0
    assert "cancelled; its command stops after its batch in flight" in log.read_text()
    [firing] = job_runs(db_url, ["c"])["c"]
    assert firing.status == "CANCELLED"
    assert committed_batches(db_url, "c") == whole_batches(max(b for b, _ in committed_batches(db_url, "c")))  # none half stored


# ---- a run that fails (exit 1) -------------------------------------------------------------------------------------


class _NoSuchModel(JsonHandler):
    """An OpenAI-compatible server that serves no model named like the job's: every request is a 404, which the
    openai backend does not retry, so the pipeline command fails at once (exit 1)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.reply(404, {"error": {"message": "The model 'gone' does not exist"}})


def test_a_failed_run_is_not_retried_and_jobs_show_prints_its_reason(store_url, tmp_path):
    """The model was removed from the server after `jobs add`: the command exits 1 (the run failed), once, and the
    firing ends in ERROR with the command's last error line; the run is stored failed."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        jobs("add", "broken", "self-instruct", "--every", "1d", "--db", store_url, "--", "--seeds", str(SEEDS), "--backend", "openai",
             "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--model", "gone", "--request-batch-size", "1")  # fmt: skip
        jobs("run-now", "broken", "--db", store_url)
        log = tmp_path / "worker.log"
        assert start_worker(store_url, log, "--once").wait(timeout=300) == 0, log.read_text()
    finally:
        server.shutdown()
        server.server_close()
    text = log.read_text()
    assert text.count("running datagen self-instruct") == 1 and "exit 1, run failed, not retried" in text, text
    [run] = job_runs(store_url, ["broken"])["broken"]
    assert run.status == "ERROR" and run.outcome.startswith("exit 1, run failed: ") and "HTTP 404: The model 'gone' does not exist" in run.outcome, run.outcome
    shown = jobs("show", "broken", "--db", store_url).output
    assert f"{run.workflow_id}: {run.outcome}" in shown.splitlines(), shown
    with Session(open_engine(store_url)) as session:
        stored = session.exec(select(Run).where(Run.name == "broken")).one()
    assert stored.status == "failed" and "HTTP 404" in stored.error
    # The command's own output went to the run's log file, whose path jobs show prints, not to the worker's log.
    [part] = run.parts
    assert Path(part.log).parent == tmp_path / "job-logs" / "broken" and f"{run.workflow_id} log: {part.log}" in shown.splitlines(), shown
    output = Path(part.log).read_text()
    assert output.startswith("== ") and "datagen self-instruct --seeds" in output.splitlines()[0], output
    assert output.splitlines()[-2:] == [f"error: {stored.error}", "== exit 1"], output
    assert "error:" not in text and f"job run {part.workflow_id}: output in {part.log}" in text, text


# ---- a schedule in a time zone -------------------------------------------------------------------------------------


def test_a_job_s_cron_is_read_in_its_time_zone_across_daylight_saving_time(db_url, corpus):
    """A daily 03:00 in Europe/Paris fires at 03:00 Paris time on both sides of the 2026 clock changes (29 March,
    25 October): 02:00 UTC in winter, 01:00 UTC in summer. DBOS's scheduler (its backfill call enqueues each firing with
    the id the live scheduler gives it, sched-NAME-TIME) and datagen's own next-due and missed-firing times agree."""
    from datetime import datetime, timezone

    from datagen.jobs.schedules import dbos_client, due_between, next_due

    utc = timezone.utc
    assert "--timezone: 'Europe/Pari' is not an IANA time zone" in jobs("add", "x", "toolformer", "--cron", "0 3 * * *", "--timezone", "Europe/Pari",
                                                                        "--db", db_url, "--", "--corpus", str(corpus), code=2).output  # fmt: skip
    added = json.loads(jobs("add", "paris", "toolformer", "--cron", "0 3 * * *", "--timezone", "Europe/Paris", "--db", db_url, "--json", "--",
                            "--corpus", str(corpus)).stdout)  # fmt: skip
    assert (added[0]["cron"], added[0]["timezone"]) == ("0 0 3 * * *", "Europe/Paris")
    assert added[0]["next_due"].endswith(("T03:00:00+01:00", "T03:00:00+02:00")), added[0]["next_due"]
    shown = jobs("show", "paris", "--db", db_url).output
    assert any([c.strip() for c in line.split("│")[1:3]] == ["timezone", "Europe/Paris"] for line in shown.splitlines()), shown
    assert json.loads(jobs("list", "--db", db_url, "--json").stdout)[0]["timezone"] == "Europe/Paris"
    spring = ["2026-03-28 02:00", "2026-03-29 01:00", "2026-03-30 01:00"]
    autumn = ["2026-10-24 01:00", "2026-10-25 02:00", "2026-10-26 02:00"]
    windows = [(datetime(2026, 3, 27, 12, tzinfo=utc), datetime(2026, 3, 30, 12, tzinfo=utc)),
               (datetime(2026, 10, 23, 12, tzinfo=utc), datetime(2026, 10, 26, 12, tzinfo=utc))]  # fmt: skip
    jobs("run-now", "paris", "--db", db_url)  # a firing needs a datagen version to go to; run-now registers it on a new store
    with dbos_client(db_url) as client:
        fired = [[datetime.fromisoformat(h.get_workflow_id().removeprefix("sched-paris-")).astimezone(utc) for h in client.backfill_schedule("paris", *w)]
                 for w in windows]  # fmt: skip
    assert [[f"{t:%Y-%m-%d %H:%M}" for t in ts] for ts in fired] == [spring, autumn]
    with Session(open_engine(db_url)) as session:
        job = session.exec(select(Job).where(Job.name == "paris")).one()
    assert job.timezone == "Europe/Paris"
    assert [[f"{t:%Y-%m-%d %H:%M}" for t in reversed(due_between(job, *w, limit=10))] for w in windows] == [spring, autumn]
    assert [f"{next_due(job, t).astimezone(utc):%Y-%m-%d %H:%M}" for t in (datetime(2026, 3, 28, 12, tzinfo=utc), datetime(2026, 10, 24, 12, tzinfo=utc))] \
        == ["2026-03-29 01:00", "2026-10-25 02:00"]  # fmt: skip


# ---- history retention ---------------------------------------------------------------------------------------------


def test_a_worker_prunes_firings_and_missed_rows_older_than_its_policy(db_url, corpus, tmp_path):
    """Three firings aged 40 to 42 days (cancelled before any worker ran them), a fresh one, and a missed-firing row
    40 days old: a worker with --keep-days 30 --keep-last 2 deletes the firings past the job's last 2 (the fresh one
    and the newest old one stay) and the missed row, through DBOS's delete call."""
    import sqlite3
    from datetime import timedelta

    from datagen.jobs.schedules import dbos_client
    from storage.tables import JobMissed, utcnow

    jobs("add", "old", "toolformer", "--every", "1d", "--db", db_url, "--", "--corpus", str(corpus), *NO_MODEL)
    for _ in range(4):
        jobs("run-now", "old", "--db", db_url)
    jobs("cancel", "old", "--db", db_url)
    with dbos_client(db_url, migrate=False) as client:
        firings = client.list_workflows(schedule_name="old", sort_desc=False, load_input=False, load_output=False)
    assert [f.status for f in firings] == ["CANCELLED"] * 4
    now_ms = int(time.time() * 1000)
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:  # DBOS's tables share the store's file
        for days, f in zip((42, 41, 40), firings):
            connection.execute("UPDATE workflow_status SET created_at = ? WHERE workflow_uuid = ?", (now_ms - days * 86_400_000, f.workflow_id))
    with Session(open_engine(db_url)) as session:
        session.add(JobMissed(job="old", scheduled_at=utcnow() - timedelta(days=40), backfilled=False))
        session.commit()
    log = tmp_path / "worker.log"
    assert start_worker(db_url, log, "--once", "--keep-days", "30", "--keep-last", "2").wait(timeout=300) == 0, log.read_text()
    assert "history: deleted 2 firing(s) and 1 missed-firing row(s) older than 30 days (each job keeps its last 2)" in log.read_text(), log.read_text()
    assert [r.workflow_id for r in job_runs(db_url, ["old"])["old"]] == [firings[3].workflow_id, firings[2].workflow_id]
    assert json.loads(jobs("show", "old", "--db", db_url, "--json").stdout)["missed"] == []
