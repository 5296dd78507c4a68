"""Read queries that `datagen runs` and the run viewer (`datagen ui`) share, so both show the same numbers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from storage.tables import Generation, Instance, Run, Task

COUNTERS = ("requests", "generated", "accepted", "rejected", "instances", "prompt_tokens", "completion_tokens")


def run_summary(run: Run) -> dict[str, Any]:
    return {
        "id": run.id,
        "name": run.name,
        "pipeline": run.pipeline,
        "model": run.model,
        "backend": run.backend,
        "status": run.status,
        "error": run.error,
        "created_at": run.created_at.isoformat(),
        "updated_at": run.updated_at.isoformat(),
        **{c: getattr(run, c) for c in COUNTERS},
    }


def list_runs(session: Session) -> list[Run]:
    """Every run, newest first."""
    return list(session.exec(select(Run).order_by(Run.id.desc())).all())


def rejected_by_reason(session: Session, run: Run) -> dict[str, int]:
    """Rejected instructions of the run by reason, most common first."""
    rows = session.exec(
        select(Task.reason, func.count()).where(Task.run_id == run.id, Task.status == "rejected").group_by(Task.reason)
    ).all()
    return dict(sorted(((reason or "unspecified", count) for reason, count in rows), key=lambda kv: (-kv[1], kv[0])))


def accepted_instances(session: Session, run: Run) -> int:
    """Accepted instances of the run's generated instructions (seed tasks' own instances are not counted)."""
    return session.exec(
        select(func.count()).select_from(Instance).join(Task)
        .where(Task.run_id == run.id, Task.source == "generated", Instance.status == "accepted")
    ).one()


def keep_by_batch(session: Session, run_ids: list[int]) -> dict[int, list[tuple[int, int, int]]]:
    """(batch, accepted, rejected) generated instructions per batch, for each run, in batch order; one grouped query."""
    if not run_ids:
        return {}
    rows = session.exec(
        select(Task.run_id, Generation.batch, Task.status, func.count())
        .join(Generation, Task.generation_id == Generation.id)
        .where(Task.run_id.in_(run_ids), Task.source == "generated")
        .group_by(Task.run_id, Generation.batch, Task.status)
    ).all()
    counts: dict[int, dict[int, list[int]]] = {}
    for run_id, batch, status, count in rows:
        counts.setdefault(run_id, {}).setdefault(batch, [0, 0])[status != "accepted"] += count
    return {run_id: [(b, a, r) for b, (a, r) in sorted(batches.items())] for run_id, batches in counts.items()}
