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
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from sqlmodel import Session

from datagen.console import err_console, print_error, print_json, progress, summary_table
from datagen.dedup import SELF_INSTRUCT_THRESHOLD, FuzzyScorer, Method, Tokenizer, make_index
from datagen.dedup_store import decide, dedup_run, is_store_source
from datagen.errors import BadInput, DatagenError
from datagen.jsonl import check_output_file, write_records
from datagen.cli.options import DbOption, JsonOption
from storage.store import get_run, open_engine


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
    rule = "exact duplicates" if method is Method.exact else f"{method.value} > {threshold}"
    note = lambda line: err_console.print(f"note: {line}")  # noqa: E731
    with progress("records") as bar:
        task = bar.add_task("dedup", total=None, status=rule)

        def advance(done: int) -> None:
            bar.update(task, advance=done)

        def start(candidates: int) -> None:
            bar.update(task, total=candidates)

        if run is not None:
            decided = dedup_run(session, run, index, method, against, apply, advance, start) if apply else \
                decide(session, index, run, None, field, against, advance, note, start)  # fmt: skip
        else:
            decided = decide(session, index, None, file, field, against, advance, note, start)
    kept, dropped, seconds = decided.kept(), decided.dropped(), decided.seconds
    candidates = decided.candidates
    if out:
        write_records(out, kept)
    elif run is None and not as_json:
        for record in kept:
            typer.echo(json.dumps(record, ensure_ascii=False))
    if pairs:
        write_records(pairs, dropped)
    what = f"run {run.name}" if run else str(file)
    rows = [("drop", rule), ("against", len(decided.earlier)), ("records", len(candidates)), ("kept", len(kept)),
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
        "against": len(decided.earlier),
        "records": len(candidates),
        "kept": len(kept),
        "dropped": len(dropped),
        "applied": apply,
        "seconds": round(seconds, 3),
        "out": str(out) if out else None,
        "pairs": str(pairs) if pairs else None,
    }
