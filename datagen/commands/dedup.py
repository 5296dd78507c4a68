"""`datagen dedup`: drop the records of a JSONL file, or the accepted instructions of a stored run, that are near
duplicates of earlier ones (or of --against texts: files, the whole store, another run).

    datagen dedup machine.jsonl --against examples/seed_tasks.jsonl --out kept.jsonl --pairs dropped_pairs.jsonl
    datagen dedup --run demo --against store --pairs dropped_pairs.jsonl          # a report; the store is unchanged
    datagen dedup --run demo --against store --apply                              # also mark the dropped rows rejected

The default is Self-Instruct's rule: drop a record whose ROUGE-L F-measure with any text kept before it (the
--against texts first, then the file's kept records in order) is above 0.7. With --run the candidates are the run's
accepted generated instructions in insertion order, and its own seed tasks always come first. Dropped pairs go to
--pairs so a person can check what the filter removed.

--run only reports unless --apply is given: then, in one transaction, each dropped instruction becomes
status='rejected' with reason 'duplicate_<method>' and the nearest kept text and its score, and the run's accepted,
rejected and instances counters move with it (its instances stay stored but are no longer exported). Resuming the
run afterwards generates replacements up to its target.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from sqlalchemy import func
from sqlmodel import Session, select

from datagen.console import err_console, print_error, print_json, progress, summary_table
from datagen.dedup import SELF_INSTRUCT_THRESHOLD, STORE, Decision, FuzzyScorer, Method, Tokenizer, make_index, stored_instructions
from datagen.errors import BadInput, DatagenError
from datagen.jsonl import check_output_file, read_records, require_str, write_records
from datagen.options import DbOption, JsonOption
from storage.store import get_run, open_engine, touch
from storage.tables import Instance, Run, StageTime, Task


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
    seeds = [_task_text(run, t) for t in rows if t.source == "seed"]
    return seeds, [t for t in rows if t.source == "generated" and t.status == "accepted"]


def _task_text(run: Run, task: Task) -> Text:
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


def dedup(
    file: Annotated[Optional[Path], typer.Argument(help="JSONL input, one record per line (or use --run).")] = None,
    run: Annotated[
        Optional[str], typer.Option("--run", help="Dedup a stored run's accepted generated instructions (name or id) instead of a file.")
    ] = None,
    field: Annotated[str, typer.Option(help="The record field to compare (FILE and --against files).")] = "instruction",
    method: Annotated[Method, typer.Option(help="rougeL: Self-Instruct's filter; exact; fuzzy; minhash (large corpora).")] = Method.rougeL,
    threshold: Annotated[
        float,
        typer.Option(help="Drop a record scoring above this, in [0, 1]: ROUGE-L F, fuzzy ratio/100, or MinHash Jaccard. Self-Instruct: 0.7."),
    ] = SELF_INSTRUCT_THRESHOLD,
    tokenizer: Annotated[
        Tokenizer, typer.Option(help="rougeL only. rouge: rouge-score's (drops non-ASCII); unicode: any script, CJK per character.")
    ] = Tokenizer.rouge,
    stemmer: Annotated[bool, typer.Option("--stemmer", help="rougeL, rouge tokenizer: Porter stemming (rouge-score's use_stemmer=True).")] = False,
    fuzzy_scorer: Annotated[FuzzyScorer, typer.Option(help="fuzzy only: ratio, or token_set_ratio to ignore word order.")] = FuzzyScorer.ratio,
    against: Annotated[
        Optional[list[str]],
        typer.Option(
            "--against",
            help="Texts kept before the candidates; repeatable: a JSONL file (same --field), 'store' (every run's accepted "
            "instructions and seeds, except --run's own), or 'run:NAME' (one stored run's).",
        ),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Write the kept records here; without it a FILE's go to stdout (not with --json).")
    ] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Write one line per dropped record: its text, score and nearest kept text.")] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="With --run: mark the dropped instructions rejected (reason duplicate_METHOD) in the store.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Threads for scoring; -1 uses every core.")] = -1,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Drop near-duplicate records (Self-Instruct's ROUGE-L > 0.7 rule by default), in file or run order."""
    try:
        index = make_index(method, threshold, tokenizer, stemmer, fuzzy_scorer, workers)  # bad options fail before any reading
        if file is not None and run is not None:
            raise BadInput("give a JSONL FILE or --run NAME (a stored run), not both")
        if file is None and run is None:
            raise BadInput("give a JSONL FILE or --run NAME (a stored run)")
        if apply and run is None:
            raise BadInput("--apply marks the rows of a stored run: use it with --run NAME")
        for path, option in ((out, "--out"), (pairs, "--pairs")):
            if path is not None:
                check_output_file(path, option)
        against = against or []
        uses_store = run is not None or any(is_store_source(spec) for spec in against)
        # Only --apply writes to the store; reading a database that does not exist must not create it.
        with Session(open_engine(db, create=False)) if uses_store else nullcontext() as session:
            summary = _dedup(session, file, run, field, index, method, threshold, tokenizer, against, out, pairs, apply, as_json)
    except DatagenError as err:  # also handled by the main CLI; here so the command works on its own
        print_error(str(err))
        raise typer.Exit(code=err.exit_code) from None
    if as_json:
        print_json(summary)


def _dedup(session, file, run_ref, field, index, method, threshold, tokenizer, against, out, pairs, apply, as_json) -> dict:
    run = get_run(session, run_ref) if run_ref is not None else None
    if apply and run.status == "running":
        raise BadInput(f"run '{run.name}' is running: --apply would race its counters; wait for it to finish "
                       "(a killed run: resume it to completion first), or drop --apply for a report")  # fmt: skip

    # Kept before any candidate, in this order: the run's own seeds, then each --against source.
    earlier, tasks = run_tasks(session, run) if run else ([], [])
    for spec in against:
        if is_store_source(spec):
            texts = store_texts(session, spec, run.id if run else None)
            if spec == STORE and not texts:
                other = " of another run" if run else ""
                err_console.print(f"note: --against store: the store holds no accepted instruction{other}")
            earlier += texts
        else:
            earlier += read_texts(Path(spec), field)
    first: dict[str, Text] = {}
    for text in earlier:
        first.setdefault(text.text, text)  # each text once, at its first source: a repeat cannot change a decision
    earlier = list(first.values())
    candidates = [_task_text(run, t) for t in tasks] if run else read_texts(file, field)

    rule = "exact duplicates" if method is Method.exact else f"{method.value} > {threshold}"
    started = time.perf_counter()
    index.add([t.text for t in earlier])
    with progress("records") as bar:
        task = bar.add_task("dedup", total=len(candidates), status=rule)
        decisions = index.filter([t.text for t in candidates], progress=lambda done: bar.update(task, advance=done))
    seconds = time.perf_counter() - started

    sources = [t.source for t in earlier] + [t.source for t, d in zip(candidates, decisions) if d.kept]
    kept = [t.record for t, d in zip(candidates, decisions) if d.kept]
    dropped = [
        {"source": t.source, "text": t.text, "score": d.score, "nearest": d.nearest_text, "nearest_source": sources[d.nearest_index]}
        for t, d in zip(candidates, decisions)
        if not d.kept
    ]
    if out:
        write_records(out, kept)
    elif run is None and not as_json:
        for record in kept:
            typer.echo(json.dumps(record, ensure_ascii=False))
    if pairs:
        write_records(pairs, dropped)
    if apply:
        # the run's dedup seconds, for cost accounting (datagen/cost.py), committed with the marks
        session.add(StageTime(run_id=run.id, stage="dedup", device="cpu", seconds=seconds))
        mark_duplicates(session, run, [(t, d) for t, d in zip(tasks, decisions) if not d.kept], method)

    what = f"run {run.name}" if run else str(file)
    rows = [("drop", rule), ("against", len(earlier)), ("records", len(candidates)), ("kept", len(kept)),
            ("dropped", len(dropped)), ("seconds", round(seconds, 2)),
            ("records/s", round(len(candidates) / seconds) if seconds > 0 else "-")]  # fmt: skip
    if run:
        rows.append(("marked rejected in the store", len(dropped)) if apply else ("store unchanged (--apply marks them)", "-"))
    err_console.print(summary_table(f"dedup {what}", rows))
    return {
        "file": str(file) if file else None,
        "run": run.name if run else None,
        "field": field,
        "method": method.value,
        "threshold": None if method is Method.exact else threshold,
        "tokenizer": tokenizer.value if method is Method.rougeL else None,
        "against": len(earlier),
        "records": len(candidates),
        "kept": len(kept),
        "dropped": len(dropped),
        "applied": apply,
        "seconds": round(seconds, 3),
        "out": str(out) if out else None,
        "pairs": str(pairs) if pairs else None,
    }
