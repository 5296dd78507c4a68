"""One writer per run (storage/run_lock.py), with real processes on real SQLite and PostgreSQL stores: a second
`datagen self-instruct` or `datagen toolformer` on a held run exits 1 at once naming the holder, before any model
loads; the holder's heartbeat keeps it held past the timeout; a holder killed with -9 releases it at once on its own machine
(its pid is gone) and after the timeout from another machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from sqlmodel import Session, select

from storage.run_lock import RunHeld, hold_run
from storage.store import open_engine
from storage.tables import Run
from tests.conftest import REPO, SEEDS, scripted_server, start_holder

TIMEOUT = 2.0
def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "DATAGEN_RUN_LOCK_TIMEOUT": str(TIMEOUT), "DATAGEN_HOLDER": "test-holder"}


def holder_process(url: str, run: str) -> subprocess.Popen:
    return start_holder(url, run, env())


def datagen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "datagen.cli", *args], capture_output=True, text=True, env=env(), timeout=120)


def test_second_writer_exits_at_once_and_a_killed_holder_releases_after_the_timeout(store_url):
    holder = holder_process(store_url, "r")
    try:
        time.sleep(TIMEOUT * 1.5)  # past the timeout: only the heartbeat keeps the run held
        started = time.monotonic()
        second = datagen("self-instruct", "--seeds", str(SEEDS), "--run", "r", "--db", store_url, "--model", "smollm2-135m")
        assert second.returncode == 1, second.stderr
        assert f"test-holder pid {holder.pid}" in second.stderr and "one writer per run" in second.stderr
        assert time.monotonic() - started < 30  # at once: the model never loaded
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    engine = open_engine(store_url)
    with hold_run(engine, "r", timeout_s=TIMEOUT):  # dead on this machine: taken over at once, no timeout to wait
        pass


def test_a_dead_holder_on_another_machine_releases_after_the_timeout(store_url):
    holder = holder_process(store_url, "r2")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    engine = open_engine(store_url)
    with engine.begin() as connection:  # as if it had run on another machine, where its pid cannot be checked
        connection.exec_driver_sql("UPDATE run_lock SET host = 'other-machine' WHERE run_name = 'r2'")
    with pytest.raises(RunHeld, match="test-holder"):
        with hold_run(engine, "r2", timeout_s=TIMEOUT):
            pass
    time.sleep(TIMEOUT + 0.5)
    with hold_run(engine, "r2", timeout_s=TIMEOUT):
        with pytest.raises(RunHeld, match=f"pid {os.getpid()}"):  # now this process holds it
            with hold_run(engine, "r2", timeout_s=TIMEOUT):
                pass
    with hold_run(engine, "r2", timeout_s=TIMEOUT):  # released on exit
        pass


WRITER = """
import sys, time
from sqlmodel import Session, select
from storage.run_lock import hold_run
from storage.store import open_engine
from storage.tables import Run
engine = open_engine(sys.argv[1])
with hold_run(engine, "w"), Session(engine) as session:
    run = session.exec(select(Run).where(Run.name == "w")).one()
    while True:
        run.accepted += 1
        session.add(run)
        session.commit()
        print("committed", run.accepted, flush=True)
        time.sleep(0.2)
"""


def test_a_writer_paused_past_the_timeout_commits_nothing_after_waking(store_url):
    """SIGSTOP past the timeout, another process takes the run over, SIGCONT: the paused writer's next commit is
    refused in its own transaction (the fencing check), so the run has one writer's batches only."""
    engine = open_engine(store_url)
    with Session(engine) as session:
        session.add(Run(name="w", pipeline="generate", config={}, model="m", backend="b"))
        session.commit()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        assert writer.stdout.readline().startswith("committed"), writer.stderr.read()
        writer.send_signal(signal.SIGSTOP)
        time.sleep(TIMEOUT + 1)
        with hold_run(engine, "w", timeout_s=TIMEOUT):  # taken over: the writer's heartbeat is stale
            with Session(engine) as session:
                before = session.exec(select(Run.accepted).where(Run.name == "w")).one()
            writer.send_signal(signal.SIGCONT)
            _, stderr = writer.communicate(timeout=60)
            with Session(engine) as session:
                after = session.exec(select(Run.accepted).where(Run.name == "w")).one()
    finally:
        writer.kill()
    assert writer.returncode == 1 and "LeaseLost" in stderr and "committing nothing more" in stderr, stderr
    assert after == before


def test_toolformer_refuses_a_held_run(db_url):
    holder = holder_process(db_url, "tf")
    try:
        second = datagen("toolformer", "--corpus", str(REPO / "examples" / "toolformer_corpus.jsonl"), "--run", "tf", "--db", db_url)
        assert second.returncode == 1 and f"pid {holder.pid}" in second.stderr, second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_other_runs_and_unnamed_runs_are_not_held(db_url):
    engine = open_engine(db_url)
    with hold_run(engine, "a"), hold_run(engine, "b"), hold_run(engine, None), hold_run(engine, None):
        pass


def test_six_parallel_runs_on_one_new_store_get_distinct_default_names(store_url, tmp_path):
    """Started in the same second, as a shell loop or a worker starts them: the default name is not just the time."""
    prompts = tmp_path / "ok.jsonl"
    prompts.write_text('{"prompt": "Say ok."}\n', encoding="utf-8")
    with scripted_server(lambda prompt: " ok", finish_reason="length") as url:  # the six processes need a backend, not a model
        command = [sys.executable, "-m", "datagen.cli", "generate", str(prompts), "--max-tokens", "1", "--db", store_url, "--backend", "openai",
                   "--base-url", url, "--model", "scripted"]  # fmt: skip
        processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env()) for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, errors
    with Session(open_engine(store_url)) as session:
        names = session.exec(select(Run.name).where(Run.status == "completed")).all()
    assert len(set(names)) == 6 and all(re.fullmatch(r"generate-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names), names
    # A name another run holds is one line, not a traceback.
    again = subprocess.run([*command, "--run", names[0]], capture_output=True, text=True, env=env(), timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [f"error: --run: a run named '{names[0]}' exists already in this store; choose another name"], again.stderr
