"""One writer per run: whatever starts a run (a CLI command or a worker) holds it exclusively.

Two processes writing one run would both write the same batches (duplicate rows, two ROUGE pools). The holder
keeps a row of `run_lock` fresh from a heartbeat thread; a second process finds a fresh row and stops at once
with a message naming the holder (exit 1). A holder that died (kill -9) stops heartbeating, and its row counts
as released once its heartbeat is older than the timeout; the next starter takes it over. A holder in the starter's
own process namespace (same boot, same PID namespace: not merely the same hostname, which two containers with
`--network host` share) whose process is gone is taken over at once, so rerunning a killed command resumes at once.

A lease, safe across machines:
- Every time is the database server's clock (`server_now`), so machines need no synchronized clocks.
- Fencing: while a run is held, every commit of a session on the holder's engine first updates, in the same
  transaction, the row that carries this holder's token (its heartbeat, so a takeover waits for that commit); no
  such row means the run was taken over. A holder paused past the timeout (SIGSTOP, a long GC, a
  network partition) whose run was taken over therefore commits nothing after it wakes: its next commit raises
  LeaseLost. A heartbeat that updates no row (taken over) marks the lease lost at once.

The row lives in the store, so the lock is the same on SQLite (one machine) and PostgreSQL (many machines):
file locks would not span machines and SQLite has no advisory locks.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from sqlalchemy import Float, cast, delete, event, insert, literal, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, func, select

from datagen.errors import DatagenError
from storage.tables import RunLock

TIMEOUT_S = float(os.environ.get("DATAGEN_RUN_LOCK_TIMEOUT", "60"))
"""A holder whose heartbeat is older than this (on the database server's clock) is taken for dead. It heartbeats
every TIMEOUT_S / 4, so a stalled database or a long pause of the holder has three beats' grace before another process
may take over; a holder that stalled longer commits nothing more (fencing)."""


class RunHeld(DatagenError):
    """Another live process is writing this run (exit 1)."""


class LeaseLost(DatagenError):
    """This process held the run, but went silent past the timeout and another may have taken it over: it stops
    before its next commit (exit 1)."""


def server_now(engine: Engine) -> ColumnElement[float]:
    """Unix seconds on the database server's clock, as an SQL expression (the lease's only clock)."""
    if engine.dialect.name == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)  # numeric otherwise
    return (func.julianday("now") - literal(2440587.5)) * literal(86400.0)  # SQLite: one machine, its clock


def live_holders(engine: Engine, timeout_s: float = TIMEOUT_S) -> dict[str, str]:
    """run name -> holder, for every run whose lock's heartbeat is younger than the timeout on the server's clock.
    A run stored `running` that is not here was interrupted (its writer died, or was cut off past the timeout)."""
    with Session(engine) as session:
        rows = session.exec(select(RunLock.run_name, RunLock.holder).where(RunLock.heartbeat_at >= server_now(engine) - timeout_s)).all()
    return dict(rows)


def holder_of(engine: Engine, run_name: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """The live holder of a run, or None when it is free or its holder's heartbeat is stale."""
    with Session(engine) as session:
        return session.exec(
            select(RunLock.holder).where(RunLock.run_name == run_name, RunLock.heartbeat_at >= server_now(engine) - timeout_s)
        ).first()


def describe_holder() -> str:
    """Who this process is, for the message a second starter reads: host, pid, and DATAGEN_HOLDER (a worker sets it)."""
    label = os.environ.get("DATAGEN_HOLDER")
    return f"{label + ' ' if label else ''}pid {os.getpid()} on {socket.gethostname()}"


@cache
def process_namespace() -> str:
    """Where a pid means this process's pid: the host, its boot, and its PID namespace (two containers on one host,
    or sharing its hostname with --network host, differ here)."""
    def read(path: str) -> str:
        try:
            return (Path(path).read_text().strip() if not path.startswith("ns:") else os.readlink(path[3:]))
        except OSError:
            return "?"

    return f"{socket.gethostname()} {read('/proc/sys/kernel/random/boot_id')} {read('ns:/proc/self/ns/pid')}"


@contextmanager
def hold_run(engine: Engine, run_name: str | None, timeout_s: float = TIMEOUT_S) -> Iterator[None]:
    """Hold `run_name` for the duration of the block, or raise RunHeld naming the live holder; every commit on `engine`
    inside the block is fenced (LeaseLost once this process lost the run).

    None (a new run under a generated name, which no other process can be writing) holds nothing.
    """
    if run_name is None:
        yield
        return
    token = uuid.uuid4().hex
    _acquire(engine, run_name, token, timeout_s)
    lost = threading.Event()
    fence = _fence(engine, run_name, token, timeout_s, lost)
    event.listen(OrmSession, "before_commit", fence)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(engine, run_name, token, timeout_s / 4, stop, lost), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        event.remove(OrmSession, "before_commit", fence)
        try:
            with engine.begin() as connection:
                connection.execute(delete(RunLock).where(RunLock.run_name == run_name, RunLock.token == token))
        except SQLAlchemyError:
            pass  # the row goes stale on its own


def _fence(engine: Engine, run_name: str, token: str, timeout_s: float, lost: threading.Event):
    def check(session: OrmSession) -> None:
        if session.bind is not engine:
            return
        if not lost.is_set():
            # The token, checked and refreshed in the commit's own transaction, is the fence: a takeover changes it,
            # and none can happen between this statement and the commit (the row lock on PostgreSQL, the write lock
            # on SQLite). A stale heartbeat alone is no loss: on SQLite the heartbeat thread cannot write while this
            # process's own batch holds the write lock, however long the batch runs.
            refreshed = session.execute(
                update(RunLock).where(RunLock.run_name == run_name, RunLock.token == token).values(heartbeat_at=server_now(engine))
            ).rowcount
            if refreshed == 1:
                return
            lost.set()
        raise LeaseLost(
            f"run '{run_name}': this process went {timeout_s:g} s without a heartbeat (paused, or cut off from the "
            f"database) and lost the run to another writer; it stops, committing nothing more"
        )

    return check


def _acquire(engine: Engine, run_name: str, token: str, timeout_s: float) -> None:
    """Insert the lock row, or take over a stale one; each is one statement, atomic on SQLite and PostgreSQL, and the
    staleness is judged in the statement on the server's clock."""
    holder, here = describe_holder(), process_namespace()
    mine = {"holder": holder, "host": here, "pid": os.getpid(), "token": token}
    for _ in range(3):  # the row may vanish between a failed insert and the takeover: try again
        try:
            with engine.begin() as connection:
                now = server_now(engine)
                connection.execute(insert(RunLock).values(run_name=run_name, acquired_at=now, heartbeat_at=now, **mine))
            return
        except IntegrityError:
            pass
        with engine.begin() as connection:
            lock = connection.execute(select(RunLock.holder, RunLock.host, RunLock.pid, RunLock.token, RunLock.heartbeat_at,
                                             server_now(engine).label("now")).where(RunLock.run_name == run_name)).first()  # fmt: skip
            if lock is None:
                continue
            dead_here = lock.host == here and not _alive(lock.pid)
            stale = RunLock.heartbeat_at < server_now(engine) - timeout_s
            taken = connection.execute(
                update(RunLock)
                .where(RunLock.run_name == run_name, RunLock.token == lock.token, *(() if dead_here else (stale,)))
                .values(acquired_at=server_now(engine), heartbeat_at=server_now(engine), **mine)
            ).rowcount
            if taken == 1:
                return
        raise RunHeld(
            f"run '{run_name}' is being written by {lock.holder} (heartbeat {max(lock.now - lock.heartbeat_at, 0):.0f} s ago): "
            f"one writer per run; wait for it to finish, stop it, or choose another --run name"
        )
    raise RunHeld(f"run '{run_name}' changed hands three times while starting; try again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _heartbeat(engine: Engine, run_name: str, token: str, every_s: float, stop: threading.Event, lost: threading.Event) -> None:
    """Keep the row fresh until stopped. A beat that finds no row of this token (taken over) marks the lease lost; a
    failed beat (database briefly unreachable) is retried at the next one, and the fence refuses commits once the
    last successful beat is older than the timeout."""
    while not stop.wait(every_s):
        try:
            with engine.begin() as connection:
                updated = connection.execute(
                    update(RunLock).where(RunLock.run_name == run_name, RunLock.token == token).values(heartbeat_at=server_now(engine))
                ).rowcount
            if updated == 0:
                lost.set()
                return
        except SQLAlchemyError:
            continue
