"""One writer per run: whatever starts a run (a CLI command or a worker) holds it exclusively.

Two processes writing one run would both write the same batches (duplicate rows, two ROUGE pools). The holder
keeps a row of `run_lock` fresh from a heartbeat thread; a second process finds a fresh row and stops at once
with a message naming the holder (exit 1). A holder that died (kill -9) stops heartbeating, and its row counts
as released once its heartbeat is older than the timeout; the next starter takes it over. A holder on the starter's
own machine whose process is gone is taken over at once, so rerunning a killed command resumes without waiting.

The row lives in the store, so the lock is the same on SQLite (one machine) and PostgreSQL (many machines):
file locks would not span machines and SQLite has no advisory locks. Heartbeats are wall-clock seconds of the
writing machine, so machines sharing a PostgreSQL store need synchronized clocks (NTP), as any lease does.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from datagen.errors import DatagenError
from storage.tables import RunLock

TIMEOUT_S = float(os.environ.get("DATAGEN_RUN_LOCK_TIMEOUT", "60"))
"""A holder whose heartbeat is older than this is taken for dead. It heartbeats every TIMEOUT_S / 4, so a
stalled database or a long pause of the holder has three beats' grace before another process may take over."""


class RunHeld(DatagenError):
    """Another live process is writing this run (exit 1)."""


def describe_holder() -> str:
    """Who this process is, for the message a second starter reads: host, pid, and DATAGEN_HOLDER (a worker sets it)."""
    label = os.environ.get("DATAGEN_HOLDER")
    return f"{label + ' ' if label else ''}pid {os.getpid()} on {socket.gethostname()}"


def holder_of(engine: Engine, run_name: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """The live holder of a run, or None when it is free or its holder's heartbeat is stale."""
    with Session(engine) as session:
        row = session.get(RunLock, run_name)
        if row is None or time.time() - row.heartbeat_at > timeout_s:
            return None
        return row.holder


@contextmanager
def hold_run(engine: Engine, run_name: str | None, timeout_s: float = TIMEOUT_S) -> Iterator[None]:
    """Hold `run_name` for the duration of the block, or raise RunHeld naming the live holder.

    None (a new run under a generated name, which no other process can be writing) holds nothing.
    """
    if run_name is None:
        yield
        return
    token = uuid.uuid4().hex
    _acquire(engine, run_name, token, timeout_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(engine, run_name, token, timeout_s / 4, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with engine.begin() as connection:
            connection.execute(delete(RunLock).where(RunLock.run_name == run_name, RunLock.token == token))


def _acquire(engine: Engine, run_name: str, token: str, timeout_s: float) -> None:
    """Insert the lock row, or take over a stale one; each is one statement, atomic on SQLite and PostgreSQL."""
    holder = describe_holder()
    for _ in range(3):  # the row may vanish between a failed insert and the takeover: try again
        now = time.time()
        try:
            with engine.begin() as connection:
                connection.execute(insert(RunLock).values(run_name=run_name, holder=holder, host=socket.gethostname(), pid=os.getpid(),
                                                          token=token, acquired_at=now, heartbeat_at=now))  # fmt: skip
            return
        except IntegrityError:
            pass
        with engine.begin() as connection:
            row = connection.execute(select(RunLock).where(RunLock.run_name == run_name)).first()
            if row is None:
                continue
            stale = row.heartbeat_at < now - timeout_s or (row.host == socket.gethostname() and not _alive(row.pid))
            taken = stale and connection.execute(
                update(RunLock)
                .where(RunLock.run_name == run_name, RunLock.token == row.token)
                .values(holder=holder, host=socket.gethostname(), pid=os.getpid(), token=token, acquired_at=now, heartbeat_at=now)
            ).rowcount
            if taken == 1:
                return
        if row is not None:
            raise RunHeld(
                f"run '{run_name}' is being written by {row.holder} (heartbeat {max(now - row.heartbeat_at, 0):.0f} s ago): "
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


def _heartbeat(engine: Engine, run_name: str, token: str, every_s: float, stop: threading.Event) -> None:
    """Keep the row fresh until stopped; a failed beat (database briefly unreachable) is retried at the next one."""
    while not stop.wait(every_s):
        try:
            with engine.begin() as connection:
                connection.execute(
                    update(RunLock).where(RunLock.run_name == run_name, RunLock.token == token).values(heartbeat_at=time.time())
                )
        except SQLAlchemyError:
            continue
