"""Opening the store, and the few queries every command shares.

SQLite by default (`datagen.db` in the working directory), any SQLAlchemy URL through `--db` or
DATAGEN_DB (PostgreSQL for many workers). SQLite runs in WAL mode with a busy timeout so readers
and one writer at a time coexist; pipelines write each batch in one transaction, so a crash loses
at most the batch in flight. Sessions are passed explicitly; there is no module-level engine.

The schema is made by `open_engine`: SQLModel's create_all, in one transaction that holds the database's
write lock, so any number of processes may open one new database at once. Adding a table: define its
`table=True` class in storage/tables.py; the next open of any existing database creates it, and an older
datagen ignores it, so SCHEMA_VERSION stays. Changing an existing table's columns needs a migration step in
`_check_schema_version` and a SCHEMA_VERSION bump (an older datagen then refuses the database).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, select

from datagen.errors import BadInput, Stopped, StoreError
from storage.tables import SCHEMA_VERSION, Generation, Run, SchemaInfo, utcnow

if TYPE_CHECKING:
    from datagen.backends import Backend, Request, Result

DEFAULT_URL = "sqlite:///datagen.db"
LOCK_TIMEOUT_S = 30.0
"""How long a SQLite write waits for another process's write lock (DATAGEN_DB_LOCK_TIMEOUT overrides it):
SQLite's busy handler retries the write with growing sleeps (1 ms to 100 ms) until then, and the write
fails with "database is locked" after it."""
_SCHEMA_LOCK = 0x64617461  # "data": the PostgreSQL advisory lock key that serializes schema creation


def database_url(url: str | None = None) -> str:
    return url or os.environ.get("DATAGEN_DB") or DEFAULT_URL


def lock_timeout() -> float:
    value = os.environ.get("DATAGEN_DB_LOCK_TIMEOUT")
    if value is None:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e6:
        raise BadInput(f"DATAGEN_DB_LOCK_TIMEOUT must be a number of seconds >= 0, got {value!r}")
    return seconds


def open_engine(url: str | None = None, create: bool = True) -> Engine:
    """Connect and check the schema version; with `create`, also make the database and any missing tables.

    Commands that only read (runs, dedup --run, export) pass create=False: then a SQLite file that does not
    exist is a BadInput naming it, and nothing is created, so a typo in --db or --run leaves no empty
    database behind. Commands that write call it once they are about to write. Errors are one readable line.
    """
    url = database_url(url)
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        if not create:
            raise BadInput(f"no database at {sqlite_file}: nothing is stored there yet (--db or DATAGEN_DB names the store)")
        if not sqlite_file.parent.is_dir():
            raise BadInput(f"--db {_safe(url)}: the folder {sqlite_file.parent} does not exist")
    try:
        if url.startswith("sqlite"):
            timeout = lock_timeout()
            engine = create_engine(url, connect_args={"timeout": timeout})
            event.listen(engine, "connect", lambda connection, _record: _sqlite_pragmas(connection, timeout))
        else:
            engine = create_engine(url, pool_pre_ping=True)
        _open_schema(engine, create)
    except ModuleNotFoundError as err:
        raise StoreError(f"database driver missing for {_safe(url)}: {err.msg}; for PostgreSQL: pip install 'datagen[postgres]'") from None
    except OperationalError as err:
        raise StoreError(f"cannot open the database {_safe(url)}: {str(err.orig).strip().splitlines()[0]}") from None
    except SQLAlchemyError as err:
        raise StoreError(f"cannot open the database {_safe(url)}: {err}") from None
    return engine


def check_store(url: str | None = None) -> None:
    """Fail now, creating nothing, if `open_engine(url)` will fail later: a writing command calls this before
    the slow work (loading a model) and opens the store when it has something to write."""
    url = database_url(url)
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        lock_timeout()
        if not sqlite_file.parent.is_dir():
            raise BadInput(f"--db {_safe(url)}: the folder {sqlite_file.parent} does not exist")
        return
    open_engine(url, create=False).dispose()


def _sqlite_file(url: str) -> Path | None:
    """The file of a sqlite URL (None for other databases and for in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError as err:
        raise BadInput(f"--db {url}: {err}") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _sqlite_pragmas(dbapi_connection, timeout: float) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _open_schema(engine: Engine, create: bool) -> None:
    """Make missing tables and record or check the schema version, in one transaction that holds the
    database's write lock, so that processes opening one new database at once make it exactly once: the
    others wait for that transaction, then find every table made (create_all's checkfirst) and the version
    written. SQLite: BEGIN IMMEDIATE takes the write lock at once (a deferred BEGIN would let two processes
    both see no tables, then both CREATE). PostgreSQL: DDL is transactional, and a transaction-level advisory
    lock serializes the creators. Other databases get create_all's checkfirst only.

    A reader (create=False) of a store that an older datagen made adds the tables and columns this version added,
    the same way: a read of a new table or column must not fail on an old store."""
    if not create:
        create = _is_older(engine)
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE" if create else "BEGIN")
        elif engine.dialect.name == "postgresql" and create:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        if create:
            SQLModel.metadata.create_all(connection)
        _check_schema_version(connection, create)
        connection.commit()


def _is_older(engine: Engine) -> bool:
    """A datagen store (it has schema_info) without some table of this version's schema, or of an older version."""
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        if SchemaInfo.__tablename__ not in tables:
            return False
        version = connection.execute(select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")).scalar()
    return not set(SQLModel.metadata.tables) <= tables or (version is not None and int(version) < SCHEMA_VERSION)


def _check_schema_version(connection, create: bool) -> None:
    if not create and not inspect(connection).has_table(SchemaInfo.__tablename__):
        return  # a database no datagen has written to: readers find no rows
    row = connection.execute(select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")).first()
    if row is None:
        if create:
            connection.execute(SchemaInfo.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"this database has schema version {row[0]}, newer than this datagen's {SCHEMA_VERSION}: upgrade datagen"
        )
    elif int(row[0]) < SCHEMA_VERSION and create:
        # Added tables create_all has just made; added columns are added here.
        columns = {c["name"] for c in inspect(connection).get_columns("job")}
        if "shard_size" not in columns:  # version 2
            connection.exec_driver_sql("ALTER TABLE job ADD COLUMN shard_size INTEGER")
        if "timezone" not in columns:  # version 3
            connection.exec_driver_sql("ALTER TABLE job ADD COLUMN timezone VARCHAR NOT NULL DEFAULT 'UTC'")
        connection.execute(
            SchemaInfo.__table__.update().where(SchemaInfo.key == "schema_version").values(value=str(SCHEMA_VERSION))
        )


def error_text(err: BaseException) -> str:
    """What a failed run stores as its error: one line for a database failure (not the SQL and its
    parameters), the message of anything else."""
    if isinstance(err, OperationalError):
        return operational_error_message(err)
    return str(err) or type(err).__name__


FAILURE_WRITE_ATTEMPTS = 4
"""How many lock timeouts `record_failure` waits out: when the run failed because another process held the
write lock, storing the failure meets the same lock, and a run left `running` would misreport what happened."""


def record_failure(session: Session, run: Run, err: BaseException) -> None:
    """After a run's command failed (or was interrupted, or stopped by SIGTERM between batches: `stopped`), roll back
    the batch in flight and store the run's status with its one-line error; what earlier batches committed stays."""
    session.rollback()
    status = "stopped" if isinstance(err, Stopped) or not isinstance(err, Exception) else "failed"
    error = error_text(err)
    for attempt in range(FAILURE_WRITE_ATTEMPTS):
        touch(run, status=status, error=error)
        session.add(run)
        try:
            session.commit()
            return
        except OperationalError as locked:
            session.rollback()
            if "database is locked" not in str(locked.orig) or attempt == FAILURE_WRITE_ATTEMPTS - 1:
                raise


def operational_error_message(err: OperationalError) -> str:
    """One line for a database failure in the middle of a command (the CLI prints it, exit 1)."""
    reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
    if "database is locked" in reason:
        return (
            f"the database is locked: another process held its write lock for more than {lock_timeout():g} s "
            "(DATAGEN_DB_LOCK_TIMEOUT); everything committed before is kept"
        )
    return f"database error: {reason}"


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def get_run(session: Session, run: str | int) -> Run:
    """A run by name or numeric id; BadInput if there is none."""
    found = session.exec(select(Run).where(Run.name == str(run))).first()
    if found is None and str(run).isdigit():
        found = session.get(Run, int(run))
    if found is None:
        raise BadInput(f"no run named or numbered '{run}' in this database")
    return found


def find_run(session: Session, name: str) -> Run | None:
    return session.exec(select(Run).where(Run.name == name)).first()


def default_run_name(pipeline: str) -> str:
    """`PIPELINE-YYYYMMDD-HHMMSS-xxxxxx`: the start time for people, and 6 random hex digits so that processes started
    in the same second (a shell loop, a worker's shards) never share a name."""
    return f"{pipeline}-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def add_run(session: Session, run: Run) -> Run:
    """Store a new run; a name another process stored first is one line (exit 2), not an IntegrityError traceback."""
    session.add(run)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise BadInput(f"--run: a run named '{run.name}' exists already in this store; choose another name") from None
    return run


def touch(run: Run, **changes) -> None:
    for key, value in changes.items():
        setattr(run, key, value)
    run.updated_at = utcnow()


def add_generations(
    session: Session, run: Run, backend: Backend, purpose: str, batch: int, requests: Sequence[Request], results: Sequence[Result]
) -> list[list[Generation]]:
    """Add one Generation row per completion and update the run's counters; flushed, so rows have ids.

    The caller commits, together with whatever it derived from these completions, so a crash never
    leaves a generation without its verdicts or a verdict without its generation.
    """
    rows = []
    for request, result in zip(requests, results, strict=True):
        rows.append(
            [
                Generation(
                    run_id=run.id,
                    purpose=purpose,
                    batch=batch,
                    prompt=result.prompt,
                    completion=completion.text,
                    finish_reason=completion.finish_reason,
                    sampling=asdict(request.params),
                    model=backend.model,
                    backend=backend.name,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    latency_s=result.latency_s,
                )
                for completion in result.completions
            ]
        )
        run.requests += 1
        run.generated += len(result.completions)
        run.prompt_tokens += result.prompt_tokens
        run.completion_tokens += sum(c.completion_tokens for c in result.completions)
    session.add_all(row for group in rows for row in group)
    touch(run)
    session.add(run)
    session.flush()
    return rows
