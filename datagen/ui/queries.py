"""What the viewer's pages read from the store, beyond the shared storage.queries: one run's items under a filter
(keyset paging), one item's lineage, a Toolformer run's texts and calls, training runs and their sources."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, and_, cast, exists, func, or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from datagen.ui.filters import MAX_ID, PAGE_SIZE, ItemFilter
from storage.queries import BY_HAND, hand_rejected_ids
from storage.tables import ApiCall, Curation, CurationVerdict, Generation, Instance, InstanceScore, Loop, LoopStage, ManualVerdict, Run, Task, ToolformerText, TrainingRun, TrainingRunSource


@dataclass
class Page:
    """One page of rows in id order, and where the pages before and after it start (None: no rows that way)."""

    rows: list
    total: int
    previous_before: int | None
    """`before=` for the previous page."""
    next_after: int | None
    """`after=` for the next page."""

    @property
    def first_id(self) -> int | None:
        return self.rows[0].id if self.rows else None

    @property
    def last_id(self) -> int | None:
        return self.rows[-1].id if self.rows else None


def _like(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, with LIKE's own wildcards taken literally (escape character \\)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def item_conditions(run: Run, item_filter: ItemFilter) -> list:
    """SQL conditions on Task for a run's generated instructions under the filter."""
    conditions = [Task.run_id == run.id, Task.source == "generated"]
    by_hand = Task.id.in_(hand_rejected_ids())
    if item_filter.status == "accepted":
        conditions += [Task.status == "accepted", ~by_hand]
    elif item_filter.status == "rejected":
        conditions.append(or_(Task.status == "rejected", by_hand))
    if item_filter.reason == BY_HAND:
        conditions += [Task.status == "accepted", by_hand]
    elif item_filter.reason:
        conditions.append(Task.reason == item_filter.reason)
    if item_filter.min_similarity is not None:
        conditions.append(Task.similarity >= item_filter.min_similarity)
    if item_filter.max_similarity is not None:
        conditions.append(Task.similarity <= item_filter.max_similarity)
    if item_filter.classification == "yes":
        conditions.append(Task.is_classification == True)  # noqa: E712 (SQL, not Python truth)
    elif item_filter.classification == "no":
        conditions.append(Task.is_classification == False)  # noqa: E712
    elif item_filter.classification == "unknown":
        conditions.append(Task.is_classification.is_(None))
    if item_filter.search:
        conditions.append(Task.instruction.ilike(_like(item_filter.search), escape="\\"))
    return conditions + score_conditions(item_filter)


def keyset_page(session: Session, model, conditions: list, after: int | None, before: int | None, size: int = PAGE_SIZE) -> Page:
    """Rows of `model` matching `conditions`, `size` at a time in id order: after an id, before one, or from the start.
    Each page is an indexed range scan (id > x ORDER BY id LIMIT n), never an OFFSET that reads every earlier row.
    A cursor past either end (after the last id, before the first) is an empty page that still links back.
    """
    where = and_(*conditions)
    if before is not None:
        rows = list(session.exec(select(model).where(where, model.id < before).order_by(model.id.desc()).limit(size + 1)).all())
        more_before, rows = len(rows) > size, rows[:size][::-1]
        more_after = _exists(session, model, where, model.id >= (rows[-1].id + 1 if rows else before))
    else:
        query = select(model).where(where)
        if after is not None:
            query = query.where(model.id > after)
        rows = list(session.exec(query.order_by(model.id).limit(size + 1)).all())
        more_after, rows = len(rows) > size, rows[:size]
        more_before = after is not None and _exists(session, model, where, model.id < (rows[0].id if rows else after + 1))
    total = session.exec(select(func.count()).select_from(model).where(where)).one()
    previous_before = (rows[0].id if rows else (min(after + 1, MAX_ID) if after is not None else before)) if more_before else None
    next_after = (rows[-1].id if rows else (max(before - 1, 0) if before is not None else after)) if more_after else None
    return Page(rows, total, previous_before, next_after)


def _exists(session: Session, model, *conditions) -> bool:
    return session.exec(select(model.id).where(*conditions).limit(1)).first() is not None


@dataclass(frozen=True)
class SortKey:
    label: str
    """What the sort menu says."""
    expression: Any
    """A numeric SQL expression over Task (a column, or a scalar subquery on another table keyed by Task.id)."""


SORT_KEYS: dict[str, SortKey] = {
    "id": SortKey("id (order stored)", Task.id),
    "similarity": SortKey("ROUGE-L to the nearest earlier instruction", Task.similarity),
}
"""The run page's sort whitelist: `sort=NAME` orders the items by NAME's expression (order=asc|desc), server-side,
keyset-paged on (value, id). A new sortable column is one entry here."""
NO_VALUE = 1e300
"""Stands in for a missing value (an instruction rejected before the similarity filter has none) so those rows sort
last in either order and the keyset compares plain numbers."""


def sorted_page(session: Session, conditions: list, key: SortKey, descending: bool, after: int | None, before: int | None, size: int = PAGE_SIZE) -> Page:
    """Tasks matching `conditions` in `key` order (ties, and missing values, in id order), `size` at a time after or
    before the task whose id is given: keyset paging on (value, id), no OFFSET. A cursor whose task is not in the store
    gives an empty page (the pager then links to the first page)."""
    value = func.coalesce(key.expression, -NO_VALUE if descending else NO_VALUE)
    where = and_(*conditions)
    total = session.exec(select(func.count()).select_from(Task).where(where)).one()
    cursor_id = after if after is not None else before
    if cursor_id is not None:
        cursor = session.exec(select(value).where(Task.id == cursor_id)).first()
        if cursor is None:
            return Page([], total, None, None)
        later = or_(value < cursor, and_(value == cursor, Task.id > cursor_id)) if descending else or_(value > cursor, and_(value == cursor, Task.id > cursor_id))
        earlier = or_(value > cursor, and_(value == cursor, Task.id < cursor_id)) if descending else or_(value < cursor, and_(value == cursor, Task.id < cursor_id))
    forward = (value.desc() if descending else value.asc(), Task.id.asc())
    backward = (value.asc() if descending else value.desc(), Task.id.desc())
    if before is not None:
        rows = list(session.exec(select(Task).where(where, earlier).order_by(*backward).limit(size + 1)).all())
        more_before, rows = len(rows) > size, rows[:size][::-1]
        more_after = _exists(session, Task, where, or_(later, Task.id == cursor_id))
    else:
        query = select(Task).where(where, later) if after is not None else select(Task).where(where)
        rows = list(session.exec(query.order_by(*forward).limit(size + 1)).all())
        more_after, rows = len(rows) > size, rows[:size]
        more_before = after is not None and _exists(session, Task, where, or_(earlier, Task.id == cursor_id))
    if not rows:
        return Page([], total, None, None)
    return Page(rows, total, rows[0].id if more_before else None, rows[-1].id if more_after else None)


@dataclass
class ItemPage:
    page: Page
    by_hand: dict[int, ManualVerdict]
    """task id → the hand rejection in force."""
    nearest: dict[int, Task]
    """task id → the earlier instruction the similarity filter found closest, where it is in the store."""
    nearest_by_hand: dict[int, ManualVerdict]


def item_page(session: Session, run: Run, item_filter: ItemFilter) -> ItemPage:
    """A page of the run's instructions under the filter, the hand rejections in force among them, and each one's
    nearest earlier instruction (one query for the page)."""
    conditions = item_conditions(run, item_filter)
    if item_filter.sort == "id" and item_filter.order == "asc":
        page = keyset_page(session, Task, conditions, item_filter.after, item_filter.before)
    else:
        page = sorted_page(session, conditions, SORT_KEYS[item_filter.sort], item_filter.order == "desc", item_filter.after, item_filter.before)
    nearest = nearest_tasks(session, run, page.rows)
    return ItemPage(page, hand_rejections(session, [t.id for t in page.rows]), nearest, hand_rejections(session, [t.id for t in nearest.values()]))


def nearest_tasks(session: Session, run: Run, tasks: list[Task]) -> dict[int, Task]:
    """For each task with a stored nearest instruction, the earliest row of the run with that text before it."""
    texts = {t.nearest for t in tasks if t.nearest is not None}
    if not texts:
        return {}
    candidates: dict[str, list[Task]] = {}
    for row in session.exec(select(Task).where(Task.run_id == run.id, Task.instruction.in_(list(texts))).order_by(Task.id)).all():
        candidates.setdefault(row.instruction, []).append(row)
    found = {}
    for task in tasks:
        earlier = [c for c in candidates.get(task.nearest or "", []) if c.id < task.id]
        if earlier:
            found[task.id] = earlier[0]
    return found


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """Word-level differences from `old` to `new`: (kind, text) runs, kind "same", "del" or "ins" (difflib's opcodes)."""
    import difflib

    a, b = old.split(), new.split()
    runs: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            runs.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            runs.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            runs.append(("ins", " ".join(b[j1:j2])))
    return runs

def hand_rejections(session: Session, task_ids: list[int]) -> dict[int, ManualVerdict]:
    """task id → the manual rejection in force (the task's latest manual verdict, when it is a rejection)."""
    if not task_ids:
        return {}
    latest = select(func.max(ManualVerdict.id)).where(ManualVerdict.task_id.in_(task_ids)).group_by(ManualVerdict.task_id)
    rows = session.exec(select(ManualVerdict).where(ManualVerdict.id.in_(latest), ManualVerdict.verdict == "rejected")).all()
    return {row.task_id: row for row in rows}


# --- one item's lineage ---------------------------------------------------------------------------------------------

STAGES = {
    "self-instruct": [
        ("parse", ("cut_by_length",)),
        ("heuristic filters", ("too_short", "too_long", "blacklist", "write_a_program", "starts_with_punctuation", "non_ascii_start")),
        ("ROUGE-L similarity", ("rouge_similarity",)),
        ("target not yet reached", ("target_reached",)),
        ("instances", ("no_valid_instances",)),
    ],
    "alpaca": [
        ("parse", ("cut_by_length", "malformed_record")),
        ("heuristic filters", ("too_short", "too_long", "blacklist", "write_a_program", "starts_with_punctuation", "non_ascii_start")),
        ("ROUGE-L similarity", ("rouge_similarity",)),
        ("instances", ("no_valid_instances",)),
        ("target not yet reached", ("target_reached",)),
    ],
}
"""Each pipeline's filters in the order it applies them (pipelines/self_instruct.py process_batch, pipelines/alpaca.py),
with the reasons each can give. The store keeps the first failing filter's reason, so the stages after it did not run."""


@dataclass(frozen=True)
class Verdict:
    stage: str
    outcome: str
    """passed, failed or not run."""
    reason: str | None = None


def filter_verdicts(pipeline: str, status: str, reason: str | None) -> list[Verdict]:
    """Each filter's verdict on one instruction, from its stored status and first failing reason."""
    stages = STAGES.get(pipeline, STAGES["self-instruct"])
    if status == "accepted":
        return [Verdict(stage, "passed") for stage, _ in stages]
    code = (reason or "").split(":", 1)[0]
    failed = next((i for i, (_, reasons) in enumerate(stages) if code in reasons), None)
    if failed is None:  # a reason no pipeline stage gives (e.g. set by hand): it overrides every stage
        return [Verdict("other", "failed", reason)]
    return [
        Verdict(stage, "passed" if i < failed else "failed" if i == failed else "not run", reason if i == failed else None)
        for i, (stage, _) in enumerate(stages)
    ]


@dataclass
class Lineage:
    task: Task
    generation: Generation | None
    """The call whose completion this instruction was parsed from (exact prompt and raw text)."""
    parsed: list[Task]
    """Every instruction parsed out of that completion, in order, this one included."""
    verdicts: list[Verdict]
    nearest: Task | None
    """The earlier instruction (seed or generated) the similarity filter found closest, when it is in the store."""
    classification: Generation | None
    instances: list[Instance] = field(default_factory=list)
    instance_generation: Generation | None = None
    by_hand: list[ManualVerdict] = field(default_factory=list)
    """Verdicts given in `datagen ui --allow-edits`, oldest first (rejected, restored, ...)."""

    @property
    def hand_rejection(self) -> ManualVerdict | None:
        """The manual rejection in force: the latest manual verdict, when it is a rejection (a later "restored" undoes it)."""
        return self.by_hand[-1] if self.by_hand and self.by_hand[-1].verdict == "rejected" else None

    @property
    def status(self) -> str:
        """What the item is now: the pipeline's verdict, or rejected when a curator rejected it and did not undo that."""
        return "rejected" if self.hand_rejection else self.task.status


def item_lineage(session: Session, run: Run, task_id: int) -> Lineage | None:
    task = session.get(Task, task_id)
    if task is None or task.run_id != run.id:
        return None
    generation = session.get(Generation, task.generation_id) if task.generation_id else None
    parsed = list(session.exec(select(Task).where(Task.generation_id == task.generation_id).order_by(Task.id)).all()) if generation else [task]
    nearest = nearest_tasks(session, run, [task]).get(task.id)
    instances = list(session.exec(select(Instance).where(Instance.task_id == task.id).order_by(Instance.id)).all())
    instance_generation = session.get(Generation, instances[0].generation_id) if instances and instances[0].generation_id else None
    if instance_generation is not None and instance_generation.id == task.generation_id:
        instance_generation = None  # Alpaca: the instance came in the same completion as the instruction
    return Lineage(
        task=task,
        generation=generation,
        parsed=parsed,
        verdicts=filter_verdicts(run.pipeline, task.status, task.reason),
        nearest=nearest,
        classification=_classification_call(session, run, task, generation),
        instances=instances,
        instance_generation=instance_generation,
        by_hand=list(session.exec(select(ManualVerdict).where(ManualVerdict.task_id == task.id).order_by(ManualVerdict.id)).all()),
    )


class VerdictConflict(ValueError):
    """A manual verdict that would not change the item (rejecting it twice, restoring one not rejected by hand)."""


def give_verdict(session: Session, task: Task, verdict: str, reason: str, curator: str) -> ManualVerdict:
    """Record a manual verdict on one instruction (the viewer's only write): "rejected" (export leaves it out from now
    on) or "restored" (undoes the rejection in force; the history stays). Rows are only ever added. The check and the
    insert are one transaction holding the task's row (PostgreSQL) or the write lock (SQLite, BEGIN IMMEDIATE is not
    needed: the viewer serializes its own posts), so a form posted twice stores one row."""
    if verdict not in ("rejected", "restored"):
        raise VerdictConflict(f"a verdict is rejected or restored, not '{verdict}'")
    session.rollback()  # start clean: the check below must see the latest rows
    if session.get_bind().dialect.name == "postgresql":  # two viewers on one store: one verdict at a time per task
        session.exec(select(Task.id).where(Task.id == task.id).with_for_update())
    current = hand_rejections(session, [task.id]).get(task.id)
    if verdict == "rejected" and current is not None:
        session.rollback()
        raise VerdictConflict(f"already rejected by hand by {current.curator} at {current.created_at:%Y-%m-%d %H:%M} UTC")
    if verdict == "restored" and current is None:
        session.rollback()
        raise VerdictConflict("not rejected by hand: nothing to undo")
    row = ManualVerdict(task_id=task.id, verdict=verdict, reason=reason, curator=curator)
    session.add(row)
    session.commit()
    return row


def _classification_call(session: Session, run: Run, task: Task, generation: Generation | None) -> Generation | None:
    """The "Is it classification?" call about this instruction (Self-Instruct asks it of the instructions that passed the
    filters, in the same batch); found by its prompt, which ends with the instruction on one line."""
    if generation is None or task.is_classification is None:
        return None
    question = f"Task: {' '.join(task.instruction.split())}\nIs it classification?"
    calls = session.exec(
        select(Generation).where(Generation.run_id == run.id, Generation.purpose == "classification", Generation.batch == generation.batch)
    ).all()
    return next((call for call in calls if question in call.prompt[-len(question) - 200 :]), None)


# --- Toolformer and training runs ----------------------------------------------------------------------------------


def toolformer_page(session: Session, run: Run, after: int | None, before: int | None) -> tuple[Page, dict[int, list[ApiCall]]]:
    """A page of the run's texts, and every sampled call of those texts (kept first, then by position)."""
    page = keyset_page(session, ToolformerText, [ToolformerText.run_id == run.id], after, before, size=20)
    calls: dict[int, list[ApiCall]] = {row.id: [] for row in page.rows}
    if calls:
        for call in session.exec(select(ApiCall).where(ApiCall.text_id.in_(list(calls))).order_by(ApiCall.position, ApiCall.id)).all():
            calls[call.text_id].append(call)
        for text_calls in calls.values():
            text_calls.sort(key=lambda c: (not c.kept, c.position))
    return page, calls


def api_call_counts(session: Session, run: Run) -> dict[str, int]:
    rows = session.exec(select(ApiCall.status, func.count()).where(ApiCall.run_id == run.id).group_by(ApiCall.status)).all()
    return dict(sorted(rows, key=lambda kv: -kv[1]))


def training_runs(session: Session, run: Run | None = None) -> list[TrainingRun]:
    """Training runs newest first; with `run`, only those that trained on its data."""
    query = select(TrainingRun).order_by(TrainingRun.id.desc())
    if run is not None:
        query = query.join(TrainingRunSource).where(TrainingRunSource.run_id == run.id)
    return list(session.exec(query).all())


def training_sources(session: Session, training_run: TrainingRun) -> list[Run]:
    return list(
        session.exec(select(Run).join(TrainingRunSource).where(TrainingRunSource.training_run_id == training_run.id).order_by(Run.id)).all()
    )



def config_differences(configs: list[dict]) -> dict[str, list]:
    """The configuration keys (nested ones dotted) whose values differ between runs, each with every run's value."""
    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    flats = [flat(c or {}) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return {k: [f.get(k) for f in flats] for k in keys if len({repr(f.get(k)) for f in flats}) > 1}


# --- runs side by side: distributions and e2e loop rounds ------------------------------------------------------------


@dataclass
class Distributions:
    lengths: list[int]
    """Words in each accepted instruction (what an export would hold; hand rejections left out)."""
    similarities: list[float]
    """ROUGE-L F of each instruction that reached the similarity filter (accepted or rejected) to its nearest earlier one."""


def distributions(session: Session, run: Run) -> Distributions:
    rows = session.exec(
        select(Task.instruction, Task.status, Task.similarity, Task.id.in_(hand_rejected_ids())).where(Task.run_id == run.id, Task.source == "generated")
    ).all()  # fmt: skip
    return Distributions(
        lengths=[len(text.split()) for text, status, _, by_hand in rows if status == "accepted" and not by_hand],
        similarities=[similarity for _, _, similarity, _ in rows if similarity is not None],
    )


@dataclass
class LoopRound:
    """One row of a loop's table: round 0 is the base model and the seeds-only model, rounds 1..R generate and train."""

    round: int
    label: str
    run: Run | None = None
    """The round's generation run."""
    kept_after_dedup: int | None = None
    exported_rows: int | None = None
    trained_rows: int | None = None
    """Rows the round's models trained on (seeds and generated, after decontamination)."""
    evaluation: dict[str, Any] | None = None
    """datagen.evaluate.summarize over the model's replicates (loss per item, ROUGE-L, degeneration, ...)."""


@dataclass
class LoopRounds:
    loop: Loop
    rounds: list[LoopRound]
    compared: list[int]
    """The ids of the compared runs that are this loop's generation runs."""


def loop_rounds(session: Session, runs: list[Run]) -> list[LoopRounds]:
    """Each e2e loop (datagen/e2e.py) one of `runs` generated for, with its rounds as its stages recorded them."""
    ids = [r.id for r in runs]
    stages = session.exec(select(LoopStage).where(LoopStage.run_id.in_(ids), LoopStage.stage == "generate")).all()
    found = []
    for loop_id in sorted({s.loop_id for s in stages}):
        loop = session.get(Loop, loop_id)
        rows: dict[tuple[int, str], LoopRound] = {}
        replicates: dict[tuple[int, str], list] = {}
        for stage in session.exec(select(LoopStage).where(LoopStage.loop_id == loop_id).order_by(LoopStage.round, LoopStage.id)).all():
            model = "base" if stage.stage == "evaluate-base" else "tuned"
            key = (stage.round, model)
            row = rows.setdefault(key, LoopRound(stage.round, "base model" if model == "base" else "seeds only" if stage.round == 0 else f"round {stage.round}"))
            if stage.stage == "generate" and stage.run_id is not None:
                row.run = session.get(Run, stage.run_id)
            elif stage.stage == "dedup":
                row.kept_after_dedup = stage.result.get("accepted_after")
            elif stage.stage == "export":
                row.exported_rows = stage.result.get("rows")
            elif stage.stage == "train.0":
                row.trained_rows = stage.result.get("rows")
            elif stage.stage.startswith("evaluate") and stage.status == "completed" and stage.result.get("items"):
                replicates.setdefault(key, []).append(stage.result["items"])
        if replicates:
            from datagen.evaluate import ItemScore, summarize

            for key, scores in replicates.items():
                rows[key].evaluation = summarize([[ItemScore(**s) for s in items] for items in scores])
        found.append(LoopRounds(loop, sorted(rows.values(), key=lambda r: (r.round, r.label != "base model")), [s.run_id for s in stages if s.loop_id == loop_id]))
    return found


# ---- scores and curation (`datagen score`, `datagen curate`) -----------------------------------------------------------

IFD = ("ifd", 1)
"""pipelines.score's IFD_METHOD and IFD_VERSION (not imported: that module pulls in the trainer's evaluation code)."""


def score_model_of(run_column):
    """The model whose IFD scores a run's page shows: the one that scored the run last (a scalar subquery)."""
    latest = aliased(InstanceScore)  # its own name: inside a query on instance_score it must not correlate to it
    return (
        select(latest.model)
        .where(latest.run_id == run_column, latest.method == IFD[0], latest.method_version == IFD[1])
        .order_by(latest.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _ifd_rows(*where):
    """IFD rows of the instances of the outer query's Task, under the run's score model."""
    return (InstanceScore.instance_id == Instance.id, Instance.task_id == Task.id, InstanceScore.method == IFD[0],
            InstanceScore.method_version == IFD[1], InstanceScore.model == score_model_of(Task.run_id), *where)  # fmt: skip


def task_score(aggregate) -> Any:
    """aggregate(...) over the IFD rows of a task's instances, as a scalar subquery keyed by Task.id."""
    return select(aggregate).where(*_ifd_rows()).scalar_subquery()


SORT_KEYS |= {
    "ifd": SortKey("IFD under the student (the instruction's lowest)", task_score(func.min(InstanceScore.score))),
    "conditioned_loss": SortKey("loss of the output given the instruction, s(A|Q)", task_score(func.min(InstanceScore.conditioned_loss))),
    "direct_loss": SortKey("loss of the output alone, s(A)", task_score(func.min(InstanceScore.direct_loss))),
    "degenerate": SortKey("degenerate (repeats, or cut at the token limit)", task_score(func.max(cast(InstanceScore.degenerate, Integer)))),
}


def _verdicts(kept: bool):
    return exists().where(CurationVerdict.instance_id == Instance.id, Instance.task_id == Task.id, CurationVerdict.kept == kept,
                          CurationVerdict.curation_id == Curation.id, Curation.run_id == Task.run_id)  # fmt: skip


def score_conditions(item_filter: ItemFilter) -> list:
    """Conditions on Task for the score filters: an instance in the IFD range, a degenerate one (or none), an instance
    the curation kept or dropped."""
    conditions = []
    if item_filter.min_ifd is not None or item_filter.max_ifd is not None:
        bounds = [InstanceScore.score >= item_filter.min_ifd] if item_filter.min_ifd is not None else []
        bounds += [InstanceScore.score <= item_filter.max_ifd] if item_filter.max_ifd is not None else []
        conditions.append(exists().where(*_ifd_rows(*bounds)))
    if item_filter.degenerate != "all":
        any_degenerate = exists().where(*_ifd_rows(InstanceScore.degenerate == True))  # noqa: E712
        conditions.append(any_degenerate if item_filter.degenerate == "yes" else ~any_degenerate)
    if item_filter.curation != "all":
        conditions.append(_verdicts(item_filter.curation == "kept"))
    return conditions


@dataclass(frozen=True)
class InstanceScores:
    """One accepted instance's IFD figures and its curation verdict, for the run page."""

    instance_id: int
    ifd: float | None
    conditioned_loss: float | None
    direct_loss: float | None
    degenerate: bool
    reason: str | None
    """Why the score is null."""
    kept: bool | None
    """The curation's verdict; None: not curated."""
    dropped_because: str | None


@dataclass(frozen=True)
class RunScores:
    model: str | None
    """The model whose scores are shown (None: the run is not scored)."""
    curation: Curation | None
    by_task: dict[int, list[InstanceScores]]


def run_scores(session: Session, run: Run, task_ids: list[int]) -> RunScores:
    """The IFD scores and curation verdicts of the accepted instances of the tasks on a page (two queries)."""
    model = session.exec(select(score_model_of(run.id))).first()
    curation = session.exec(select(Curation).where(Curation.run_id == run.id)).first()
    by_task: dict[int, list[InstanceScores]] = {}
    if not task_ids or (model is None and curation is None):
        return RunScores(model, curation, by_task)
    verdicts = {}
    if curation is not None:
        verdicts = {v.instance_id: v for v in session.exec(
            select(CurationVerdict).join(Instance, Instance.id == CurationVerdict.instance_id)
            .where(CurationVerdict.curation_id == curation.id, Instance.task_id.in_(task_ids)))}  # fmt: skip
    rows = session.exec(
        select(Instance.id, Instance.task_id, InstanceScore)
        .join(InstanceScore, and_(InstanceScore.instance_id == Instance.id, InstanceScore.model == model, InstanceScore.method == IFD[0],
                                  InstanceScore.method_version == IFD[1]), isouter=True)  # fmt: skip
        .where(Instance.task_id.in_(task_ids), Instance.status == "accepted")
        .order_by(Instance.id)
    ).all()
    for instance_id, task_id, score in rows:
        verdict = verdicts.get(instance_id)
        if score is None and verdict is None:
            continue
        by_task.setdefault(task_id, []).append(InstanceScores(
            instance_id, score.score if score else None, score.conditioned_loss if score else None, score.direct_loss if score else None,
            bool(score and score.degenerate), score.reason if score else None, verdict.kept if verdict else None,
            verdict.reason if verdict else None))  # fmt: skip
    return RunScores(model, curation, by_task)
