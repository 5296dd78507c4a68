"""The store on real SQLite and real PostgreSQL: round trips, provenance links, schema version, errors."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from datagen.backends import Completion, Request, Result, SamplingParams
from datagen.errors import BadInput, StoreError
from storage.store import add_generations, check_store, get_run, open_engine
from storage.tables import SCHEMA_VERSION, Generation, Instance, Job, Run, SchemaInfo, Task


class _Backend:
    name = "transformers"
    model = "smollm2-135m"


def _round_trip(url: str) -> None:
    engine = open_engine(url)
    params = SamplingParams(temperature=0.7, top_p=0.5, max_tokens=32, stop=("\n\n",), seed=3)
    request = Request(prompt="1. Write a poem.\n2.", params=params)
    result = Result(
        prompt="1. Write a poem.\n2.",
        prompt_tokens=9,
        completions=(Completion(" Sing a song.\n3. Plan a trip.", "stop", 11), Completion(" Paint.", "length", 32)),
        latency_s=0.25,
    )
    with Session(engine) as session:
        run = Run(name="r1", pipeline="self-instruct", config={"num_instructions": 5, "nested": {"a": [1, 2]}}, model="m", backend="b")
        session.add(run)
        session.commit()
        (rows,) = add_generations(session, run, _Backend(), "instructions", 0, [request], [result])
        task = Task(run_id=run.id, generation_id=rows[0].id, instruction="Sing a song.", status="accepted", nearest="Write a poem.", similarity=0.4)
        session.add(task)
        session.flush()
        session.add(Instance(task_id=task.id, generation_id=rows[0].id, input="", output="La la la."))
        session.add(Task(run_id=run.id, generation_id=rows[1].id, instruction="Paint.", status="rejected", reason="too_short"))
        session.commit()

    with Session(open_engine(url)) as session:
        run = get_run(session, "r1")
        assert run.config == {"num_instructions": 5, "nested": {"a": [1, 2]}}
        assert (run.requests, run.generated, run.prompt_tokens, run.completion_tokens) == (1, 2, 9, 43)
        generations = session.exec(select(Generation).order_by(Generation.id)).all()
        assert [g.completion for g in generations] == [" Sing a song.\n3. Plan a trip.", " Paint."]
        assert generations[0].sampling["stop"] == ["\n\n"] and generations[0].sampling["seed"] == 3
        assert generations[1].finish_reason == "length"
        accepted = session.exec(select(Task).where(Task.status == "accepted")).one()
        # Provenance: the accepted instruction traces back to the exact prompt and raw completion.
        origin = session.get(Generation, accepted.generation_id)
        assert origin.prompt == "1. Write a poem.\n2." and "Sing a song." in origin.completion
        instance = session.exec(select(Instance)).one()
        assert instance.task_id == accepted.id and instance.output == "La la la."
        rejected = session.exec(select(Task).where(Task.status == "rejected")).one()
        assert rejected.reason == "too_short"
        assert get_run(session, str(run.id)).name == "r1"
        with pytest.raises(BadInput, match="no run"):
            get_run(session, "missing")


def test_sqlite_round_trip(db_url):
    _round_trip(db_url)


@pytest.mark.postgres
def test_postgres_round_trip(postgres_url):
    engine = open_engine(postgres_url)
    with engine.begin() as connection:  # a clean schema, so the test can be rerun against the same server
        for table in ("instance", "task", "generation", "run"):
            connection.execute(text(f"DELETE FROM {table}"))
    _round_trip(postgres_url)


def test_sqlite_uses_wal(db_url):
    with open_engine(db_url).connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_newer_schema_is_refused(db_url):
    engine = open_engine(db_url)
    with Session(engine) as session:
        info = session.get(SchemaInfo, "schema_version")
        assert info.value == str(SCHEMA_VERSION)
        info.value = str(SCHEMA_VERSION + 1)
        session.add(info)
        session.commit()
    with pytest.raises(StoreError, match="newer than this datagen"):
        open_engine(db_url)


@pytest.mark.parametrize("create", [True, False], ids=["writer", "reader"])
def test_a_version_1_store_gains_job_shard_size_and_timezone(db_url, create):
    """Version 2 added job.shard_size, version 3 job.timezone: the next open of a version-1 store adds both, a
    reader's too; a job stored before reads its schedule in UTC, as it was."""
    with open_engine(db_url).begin() as connection:
        connection.exec_driver_sql("ALTER TABLE job DROP COLUMN shard_size")
        connection.exec_driver_sql("ALTER TABLE job DROP COLUMN timezone")
        connection.exec_driver_sql("INSERT INTO job (name, pipeline, args, schedule, queue, enabled, created_at) "
                                   "VALUES ('old', 'alpaca', '[]', '0 0 3 * * *', 'datagen', 1, '2026-01-01 00:00:00')")  # fmt: skip
        connection.exec_driver_sql("UPDATE schema_info SET value = '1'")
    engine = open_engine(db_url, create=create)
    with Session(engine) as session:
        assert session.get(SchemaInfo, "schema_version").value == str(SCHEMA_VERSION) == "3"
        assert session.exec(select(Job.name, Job.shard_size, Job.timezone)).all() == [("old", None, "UTC")]


def test_unreachable_database_is_one_clear_error():
    with pytest.raises(StoreError, match=r"cannot open the database postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x"):
        open_engine("postgresql+psycopg://u:secret@127.0.0.1:1/x")


def test_sqlite_path_in_a_missing_folder_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="the folder .*no/such/dir does not exist"):
        open_engine(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert not (tmp_path / "no").exists()


def test_reading_never_creates_a_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'datagen.db'}"
    with pytest.raises(BadInput, match="no database at .*datagen.db: nothing is stored there yet"):
        open_engine(url, create=False)
    check_store(url)  # a new file would be fine: nothing is made yet
    assert not any(tmp_path.iterdir())
    with pytest.raises(BadInput, match="the folder .*nowhere does not exist"):
        check_store(f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}")
    open_engine(url).dispose()
    with Session(open_engine(url, create=False)) as session:
        assert session.exec(select(Run)).all() == []


def test_schema_creation_is_idempotent(tmp_path, postgres_url):
    for url in (f"sqlite:///{tmp_path / 'datagen.db'}", postgres_url):
        for _ in range(3):
            open_engine(url).dispose()
        with Session(open_engine(url, create=False)) as session:
            assert session.exec(select(SchemaInfo.key, SchemaInfo.value)).all() == [("schema_version", str(SCHEMA_VERSION))]


def test_a_reader_of_an_older_store_gets_the_tables_this_version_added(db_url):
    """A store made before wave 2 has no manual_verdict (or jobs, run_lock...) table; export, runs and the viewer
    read through create=False and must find the new tables, empty, instead of failing on them."""
    from storage.tables import ManualVerdict

    open_engine(db_url).dispose()
    with open_engine(db_url).begin() as connection:
        connection.execute(text("DROP TABLE manual_verdict"))
    with Session(open_engine(db_url, create=False)) as session:
        assert session.exec(select(ManualVerdict)).all() == []
