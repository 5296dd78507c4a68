"""Read queries that `datagen runs` and the run viewer (`datagen ui`) share, so both show the same numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, or_
from sqlmodel import Session, select

from storage.tables import Generation, Instance, ManualVerdict, Run, RunLock, Task

NOT_JUDGED = "target_reached"
"""The one rejection reason that is no verdict: the instruction passed the filters it met, but the run had reached its
target (Self-Instruct and Alpaca store the surplus so resume is exact). Keep rates leave these out."""


@dataclass(frozen=True)
class Figures:
    """A run's headline numbers; one meaning per word in the CLI summary, --json, `datagen runs`, the viewer, the
    report and the card.

    completions: model completions, every call (instructions, classification, instances).
    instructions: generated instructions parsed out of the completions and stored (seeds not counted).
    accepted: instructions kept (by the filters, and not rejected by hand since).
    rejected: instructions a filter or a curator rejected.
    not_judged: instructions stored as target_reached (generated after the target was met; neither kept nor rejected).
    keep_rate: accepted / (accepted + rejected), over the instructions that were judged; None before any was.
    """

    completions: int
    instructions: int
    accepted: int
    rejected: int
    rejected_by_hand: int
    not_judged: int
    keep_rate: float | None
    instances: int
    requests: int
    prompt_tokens: int
    completion_tokens: int


def keep_rate(accepted: int, rejected: int) -> float | None:
    """Kept over judged (target_reached is not counted in `rejected`)."""
    return accepted / (accepted + rejected) if accepted + rejected else None


def figures(session: Session, runs: list[Run]) -> dict[int, Figures]:
    """Figures of each run, counted from its rows (its instructions, their target_reached and their hand verdicts) in two
    grouped queries; completions, requests, instances and tokens from the run's counters."""
    ids = [r.id for r in runs]
    counted: dict[int, tuple[int, int, int]] = {}
    by_hand: dict[int, int] = {}
    if ids:
        rows = session.exec(
            select(Task.run_id, func.count(), func.sum(case((Task.status == "accepted", 1), else_=0)),
                   func.sum(case((Task.reason == NOT_JUDGED, 1), else_=0)))
            .where(Task.run_id.in_(ids), Task.source == "generated").group_by(Task.run_id)
        ).all()  # fmt: skip
        counted = {run_id: (total, int(accepted or 0), int(surplus or 0)) for run_id, total, accepted, surplus in rows}
        by_hand = dict(
            session.exec(
                select(Task.run_id, func.count()).where(Task.run_id.in_(ids), Task.status == "accepted", Task.id.in_(hand_rejected_ids()))
                .group_by(Task.run_id)
            ).all()
        )  # fmt: skip
    result = {}
    for run in runs:
        total, kept, surplus = counted.get(run.id, (0, 0, 0))
        hand = by_hand.get(run.id, 0)
        accepted, rejected = kept - hand, total - kept - surplus + hand
        result[run.id] = Figures(
            completions=run.generated, instructions=total, accepted=accepted, rejected=rejected, rejected_by_hand=hand,
            not_judged=surplus, keep_rate=keep_rate(accepted, rejected), instances=run.instances, requests=run.requests,
            prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens,
        )  # fmt: skip
    return result


def hand_rejected_ids():
    """SELECT of the task ids whose latest manual verdict is a rejection (a later "restored" row undoes one)."""
    latest = select(func.max(ManualVerdict.id)).group_by(ManualVerdict.task_id)
    return select(ManualVerdict.task_id).where(ManualVerdict.id.in_(latest), ManualVerdict.verdict == "rejected")


@dataclass(frozen=True)
class Interrupted:
    """A run stored as running whose writer stopped heartbeating its run lock (killed, or its machine gone)."""

    writer: str
    gone_since: datetime
    """The writer's last heartbeat (UTC)."""
    resume: str

    def describe(self) -> str:
        return f"interrupted (writer gone since {self.gone_since:%H:%M} UTC)"


def interrupted_runs(session: Session, runs: list[Run], timeout_s: float | None = None) -> dict[int, Interrupted]:
    """The running runs among `runs` whose lock heartbeat is older than the lock timeout (storage/run_lock.py), read
    against the database's own clock. Only reads the lock table. A run with no lock row (a run under a generated name
    holds none) cannot be told apart from a live one, and is not listed."""
    from storage.run_lock import TIMEOUT_S

    running = {r.name: r for r in runs if r.status == "running"}
    if not running:
        return {}
    rows = session.exec(select(RunLock.run_name, RunLock.holder, RunLock.heartbeat_at).where(RunLock.run_name.in_(list(running)))).all()
    if not rows:
        return {}
    now = database_now(session)
    limit = TIMEOUT_S if timeout_s is None else timeout_s
    return {
        running[name].id: Interrupted(holder, datetime.fromtimestamp(beat, timezone.utc), resume_command(running[name]))
        for name, holder, beat in rows
        if now - beat > limit
    }


def database_now(session: Session) -> float:
    """Unix seconds on the database's clock, the one every lock heartbeat is written with (storage/run_lock.py)."""
    from storage.run_lock import server_now

    return float(session.exec(select(server_now(session.get_bind()))).one())


def resume_command(run: Run) -> str:
    """How to carry an interrupted run on: its pipeline's command again under its name (the store holds its options
    and refuses different ones)."""
    seeds = run.config.get("seeds") if isinstance(run.config, dict) else None
    return f"datagen {run.pipeline} --run {run.name}" + (f" --seeds {seeds}" if isinstance(seeds, str) else "") + " (same options as the first start)"


def run_summary(run: Run, numbers: Figures | None = None, interrupted: Interrupted | None = None) -> dict[str, Any]:
    """One run for --json and the viewer's polling: `numbers` from figures() (the stored counters when not given)."""
    if numbers is None:
        numbers = Figures(
            completions=run.generated, instructions=run.accepted + run.rejected, accepted=run.accepted, rejected=run.rejected,
            rejected_by_hand=0, not_judged=0, keep_rate=keep_rate(run.accepted, run.rejected), instances=run.instances,
            requests=run.requests, prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens,
        )  # fmt: skip
    return {
        "id": run.id,
        "name": run.name,
        "pipeline": run.pipeline,
        "model": run.model,
        "backend": run.backend,
        "status": run.status,
        "shown_status": interrupted.describe() if interrupted else run.status,
        "interrupted": None if interrupted is None else {"writer": interrupted.writer, "gone_since": interrupted.gone_since.isoformat(),
                                                         "resume": interrupted.resume},  # fmt: skip
        "error": run.error,
        "created_at": _utc(run.created_at),
        "updated_at": _utc(run.updated_at),
        **asdict(numbers),
    }


def _utc(moment: datetime) -> str:
    """ISO 8601 with its zone: the store's times are UTC (SQLite hands them back without a zone)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def list_runs(session: Session) -> list[Run]:
    """Every run, newest first."""
    return list(session.exec(select(Run).order_by(Run.id.desc())).all())


BY_HAND = "by_hand"
"""The reason shown (and filtered on) for instructions the pipeline accepted and a curator rejected since."""


def rejected_by_reason(session: Session, run: Run) -> dict[str, int]:
    """Rejected instructions of the run by reason, most common first; hand rejections of accepted instructions as
    "by_hand", and target_reached (not judged) included under its own name."""
    rows = session.exec(
        select(Task.reason, func.count()).where(Task.run_id == run.id, Task.status == "rejected").group_by(Task.reason)
    ).all()
    counts = {reason or "unspecified": count for reason, count in rows}
    hand = session.exec(
        select(func.count()).select_from(Task).where(Task.run_id == run.id, Task.status == "accepted", Task.id.in_(hand_rejected_ids()))
    ).one()
    if hand:
        counts[BY_HAND] = hand
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def instances_rejected_by_reason(session: Session, run: Run) -> dict[str, int]:
    """Rejected instances of the run's generated instructions by reason, most common first (the report and the card)."""
    rows = session.exec(
        select(Instance.reason, func.count()).join(Task)
        .where(Task.run_id == run.id, Task.source == "generated", Instance.status == "rejected").group_by(Instance.reason)
    ).all()  # fmt: skip
    return dict(sorted(((reason or "unspecified", n) for reason, n in rows), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class RunCounts:
    """One run's identity and what its filters did, with one meaning per word: the part of a run's summary that the
    report (datagen/report.py RunReport) and the dataset card (datagen/export_config.py RunFacts) share, both built
    on it (`run_counts`); `datagen runs`, --json and the viewer show the same words from `figures`.

    instructions: generated instructions stored (seeds not counted); accepted: those kept and not rejected by hand
    since; rejected_by_reason: every other one by reason (`rejected_by_reason`: by_hand, and target_reached, which is
    not a verdict); instances_accepted: accepted instances of the accepted instructions; instances_rejected_by_reason:
    rejected instances of the generated instructions (`instances_rejected_by_reason`)."""

    name: str
    pipeline: str
    model: str
    backend: str
    status: str
    instructions: int
    accepted: int
    rejected_by_reason: dict[str, int]
    instances_accepted: int
    instances_rejected_by_reason: dict[str, int]

    @property
    def not_judged(self) -> int:
        return self.rejected_by_reason.get(NOT_JUDGED, 0)

    @property
    def rejected(self) -> int:
        """Rejected by a filter or by hand; target_reached is not a rejection (Figures)."""
        return sum(self.rejected_by_reason.values()) - self.not_judged

    @property
    def keep_rate(self) -> float | None:
        return keep_rate(self.accepted, self.rejected)


def run_counts(session: Session, run: Run) -> dict[str, Any]:
    """The RunCounts fields of a run, as keyword arguments for RunCounts or a summary built on it."""
    generated = (Task.run_id == run.id, Task.source == "generated")
    kept = (*generated, Task.status == "accepted", Task.id.not_in(hand_rejected_ids()))
    return {
        "name": run.name, "pipeline": run.pipeline, "model": run.model, "backend": run.backend, "status": run.status,
        "instructions": session.exec(select(func.count()).select_from(Task).where(*generated)).one(),
        "accepted": session.exec(select(func.count()).select_from(Task).where(*kept)).one(),
        "rejected_by_reason": rejected_by_reason(session, run),
        "instances_accepted": session.exec(
            select(func.count()).select_from(Instance).join(Task).where(*kept, Instance.status == "accepted")
        ).one(),
        "instances_rejected_by_reason": instances_rejected_by_reason(session, run),
    }  # fmt: skip


def accepted_instances(session: Session, run: Run) -> int:
    """Accepted instances of the run's generated instructions (seed tasks' own instances are not counted)."""
    return session.exec(
        select(func.count()).select_from(Instance).join(Task)
        .where(Task.run_id == run.id, Task.source == "generated", Instance.status == "accepted")
    ).one()


def keep_by_batch(session: Session, run_ids: list[int]) -> dict[int, list[tuple[int, int, int]]]:
    """(batch, accepted, rejected) generated instructions per batch, for each run, in batch order; one grouped query.
    target_reached rows are left out (not judged), as in the keep rate."""
    if not run_ids:
        return {}
    rows = session.exec(
        select(Task.run_id, Generation.batch, Task.status, func.count())
        .join(Generation, Task.generation_id == Generation.id)
        .where(Task.run_id.in_(run_ids), Task.source == "generated", or_(Task.reason.is_(None), Task.reason != NOT_JUDGED))
        .group_by(Task.run_id, Generation.batch, Task.status)
    ).all()
    counts: dict[int, dict[int, list[int]]] = {}
    for run_id, batch, status, count in rows:
        counts.setdefault(run_id, {}).setdefault(batch, [0, 0])[status != "accepted"] += count
    return {run_id: [(b, a, r) for b, (a, r) in sorted(batches.items())] for run_id, batches in counts.items()}
