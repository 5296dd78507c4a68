"""Opening the store, and the few queries every command shares.

SQLite by default (`datagen.db` in the working directory), any SQLAlchemy URL through `--db` or
DATAGEN_DB (PostgreSQL for many workers). SQLite runs in WAL mode with a busy timeout so readers
and one writer at a time coexist; pipelines write each batch in one transaction, so a crash loses
at most the batch in flight. Sessions are passed explicitly; there is no module-level engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, select

from datagen.errors import BadInput, StoreError
from storage.tables import SCHEMA_VERSION, Generation, Run, SchemaInfo, utcnow

if TYPE_CHECKING:
    from datagen.backends import Backend, Request, Result

DEFAULT_URL = "sqlite:///datagen.db"


def database_url(url: str | None = None) -> str:
    return url or os.environ.get("DATAGEN_DB") or DEFAULT_URL


def open_engine(url: str | None = None) -> Engine:
    """Connect, create missing tables, and check the schema version. Errors are one readable line."""
    url = database_url(url)
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        with engine.begin() as connection:
            SQLModel.metadata.create_all(connection)
            _check_schema_version(connection)
    except ModuleNotFoundError as err:
        raise StoreError(f"database driver missing for {_safe(url)}: {err.msg}; for PostgreSQL: pip install 'datagen[postgres]'") from None
    except OperationalError as err:
        raise StoreError(f"cannot open the database {_safe(url)}: {str(err.orig).strip().splitlines()[0]}") from None
    except SQLAlchemyError as err:
        raise StoreError(f"cannot open the database {_safe(url)}: {err}") from None
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _check_schema_version(connection) -> None:
    row = connection.execute(select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")).first()
    if row is None:
        connection.execute(SchemaInfo.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"this database has schema version {row[0]}, newer than this datagen's {SCHEMA_VERSION}: upgrade datagen"
        )
    elif int(row[0]) < SCHEMA_VERSION:
        # Versions so far only add tables, which create_all has just made.
        connection.execute(
            SchemaInfo.__table__.update().where(SchemaInfo.key == "schema_version").values(value=str(SCHEMA_VERSION))
        )


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

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
