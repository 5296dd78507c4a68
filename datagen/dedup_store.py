"""Dedup against the store: the accepted instructions of the store or of one run as texts kept before the
candidates, a stored run's accepted instructions as candidates, and --apply's marking of the dropped ones. The
engine (indexes, decisions) is datagen/dedup.py; `datagen dedup` (datagen/cli/commands/dedup.py), the e2e loop and the
library's `dedup_run` call this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import func
from sqlmodel import Session, select

from datagen.dedup import DedupIndex, Decision, Method
from datagen.errors import BadInput
from datagen.jsonl import read_records, require_str
from storage.store import get_run, touch
from storage.tables import Instance, Run, StageTime, Task

STORE = "store"
"""`--against store`: every accepted instruction of every run, seeds included. `run:NAME` (or `run:ID`): one run's."""


class StoredInstruction(NamedTuple):
    run: str
    task_id: int
    source: str
    """seed or generated."""
    instruction: str


def stored_instructions(session: Session, against: str = STORE, exclude_run_id: int | None = None) -> list[StoredInstruction]:
    """Accepted instructions (seeds included) of the whole store or of one run, oldest run first, then in insertion order.

    One row per distinct text (its first occurrence): runs that share seed tasks store them once each, and a repeated
    text cannot change a decision. `exclude_run_id` leaves out a run whose own rows are being filtered, so its
    instructions are not compared with themselves. An unknown `run:NAME` is a BadInput (exit 2).
    """
    query = select(Run.name, Task.id, Task.source, Task.instruction).join(Run, Task.run_id == Run.id)
    query = query.where(Task.status == "accepted").order_by(Task.run_id, Task.id)
    if against.startswith("run:"):
        query = query.where(Task.run_id == get_run(session, against.removeprefix("run:")).id)
    elif against != STORE:
        raise BadInput(f"--against {against!r} is neither 'store' nor 'run:NAME' (for a file named {against}, write ./{against})")
    if exclude_run_id is not None:
        query = query.where(Task.run_id != exclude_run_id)
    seen: set[str] = set()
    rows = []
    for row in session.exec(query):
        if row.instruction not in seen:
            seen.add(row.instruction)
            rows.append(StoredInstruction(*row))
    return rows


def load_store_texts(session: Session, against: str = STORE, exclude_run_id: int | None = None) -> list[str]:
    """The texts of `stored_instructions`: what a pipeline adds to its index before filtering new instructions."""
    return [row.instruction for row in stored_instructions(session, against, exclude_run_id)]


@dataclass(frozen=True)
class Text:
    """One text to compare, with where it came from ("file.jsonl:12", "run:demo/task:7") and its whole record."""

    source: str
    text: str
    record: dict[str, Any]


def read_texts(path: Path, field: str) -> list[Text]:
    """Every record's `field`; a missing, non-string or empty value stops with file:line (exit 2) before any work."""
    return [Text(f"{path}:{line}", require_str(path, line, record, field), record) for line, record in read_records(path)]


def is_store_source(against: str) -> bool:
    return against == STORE or against.startswith("run:")


def store_texts(session: Session, against: str, exclude_run_id: int | None) -> list[Text]:
    """`--against store` or `run:NAME`: accepted instructions, seeds included (datagen.dedup.stored_instructions)."""
    return [
        Text(f"run:{row.run}/task:{row.task_id}", row.instruction, row._asdict())
        for row in stored_instructions(session, against, exclude_run_id)
    ]


def run_tasks(session: Session, run: Run) -> tuple[list[Text], list[Task]]:
    """A stored run's seed tasks (texts kept before anything else) and its accepted generated instructions, in id order."""
    rows = session.exec(select(Task).where(Task.run_id == run.id).order_by(Task.id)).all()
    seeds = [task_text(run, t) for t in rows if t.source == "seed"]
    return seeds, [t for t in rows if t.source == "generated" and t.status == "accepted"]


def task_text(run: Run, task: Task) -> Text:
    record = {"run": run.name, "task_id": task.id, "source": task.source, "instruction": task.instruction,
              "is_classification": task.is_classification}  # fmt: skip
    return Text(f"run:{run.name}/task:{task.id}", task.instruction, record)


def mark_duplicates(session: Session, run: Run, dropped: list[tuple[Task, Decision]], method: Method) -> None:
    """--apply: each dropped instruction becomes rejected with its nearest kept text and score, and the run's counters
    follow (accepted and rejected count generated instructions, instances the accepted instances of accepted ones),
    all in one transaction."""
    instances = dict(
        session.exec(
            select(Instance.task_id, func.count())
            .join(Task, Instance.task_id == Task.id)
            .where(Task.run_id == run.id, Task.status == "accepted", Instance.status == "accepted")
            .group_by(Instance.task_id)
        ).all()
    )
    for task, decision in dropped:
        task.status, task.reason = "rejected", f"duplicate_{method.value}"
        task.nearest, task.similarity = decision.nearest_text, decision.score
        session.add(task)
    touch(run, accepted=run.accepted - len(dropped), rejected=run.rejected + len(dropped),
          instances=run.instances - sum(instances.get(task.id, 0) for task, _ in dropped))  # fmt: skip
    session.add(run)
    session.commit()



@dataclass
class Decided:
    """The candidates of one dedup in order with their decisions, and the texts kept before them."""

    earlier: list[Text]
    candidates: list[Text]
    decisions: list[Decision]
    tasks: list[Task]
    """With a run: the candidates' task rows (for --apply)."""
    seconds: float

    def kept(self) -> list[dict[str, Any]]:
        return [t.record for t, d in zip(self.candidates, self.decisions) if d.kept]

    def dropped(self) -> list[dict[str, Any]]:
        """One record per dropped candidate: its text and source, score, nearest kept text and that text's source."""
        sources = [t.source for t in self.earlier] + [t.source for t, d in zip(self.candidates, self.decisions) if d.kept]
        return [{"source": t.source, "text": t.text, "score": d.score, "nearest": d.nearest_text, "nearest_source": sources[d.nearest_index]}
                for t, d in zip(self.candidates, self.decisions) if not d.kept]  # fmt: skip


def decide(session: Session | None, index: DedupIndex, run: Run | None, file: Path | None, field: str, against: Sequence[str],
           progress: Callable[[int], None] = lambda done: None, note: Callable[[str], None] = lambda line: None,
           start: Callable[[int], None] = lambda candidates: None) -> Decided:  # fmt: skip
    """Kept before any candidate, in this order: the run's own seeds, then each `against` source (a JSONL file,
    'store', 'run:NAME'), each text once at its first source; then the candidates (the run's accepted generated
    instructions in id order, or the file's records) decided in order."""
    earlier, tasks = run_tasks(session, run) if run else ([], [])
    for spec in against:
        if is_store_source(spec):
            texts = store_texts(session, spec, run.id if run else None)
            if spec == STORE and not texts:
                other = " of another run" if run else ""
                note(f"--against store: the store holds no accepted instruction{other}")
            earlier += texts
        else:
            earlier += read_texts(Path(spec), field)
    first: dict[str, Text] = {}
    for text in earlier:
        first.setdefault(text.text, text)  # a repeat cannot change a decision
    earlier = list(first.values())
    candidates = [task_text(run, t) for t in tasks] if run else read_texts(file, field)
    start(len(candidates))
    started = time.perf_counter()
    index.add([t.text for t in earlier])
    decisions = index.filter([t.text for t in candidates], progress=progress)
    return Decided(earlier, candidates, decisions, tasks, time.perf_counter() - started)


def dedup_run(session: Session, run: Run, index: DedupIndex, method: Method, against: Sequence[str] = (STORE,), apply: bool = True,
              progress: Callable[[int], None] = lambda done: None, start: Callable[[int], None] = lambda candidates: None) -> Decided:  # fmt: skip
    """A stored run's accepted generated instructions against its seeds and `against`; with `apply`, the dropped ones
    marked rejected (reason duplicate_METHOD) in one transaction. A rerun after a kill meets the same store minus the
    rows marked before, so its decisions are those of one uninterrupted dedup."""
    if apply and run.status == "running":
        raise BadInput(f"run '{run.name}' is running: --apply would race its counters; wait for it to finish "
                       "(a killed run: resume it to completion first), or drop --apply for a report")  # fmt: skip
    decided = decide(session, index, run, None, "instruction", against, progress, start=start)
    if apply:
        # the run's dedup seconds, for cost accounting (datagen/cost.py), committed with the marks
        session.add(StageTime(run_id=run.id, stage="dedup", device="cpu", seconds=decided.seconds))
        mark_duplicates(session, run, [(t, d) for t, d in zip(decided.tasks, decided.decisions) if not d.kept], method)
    return decided
