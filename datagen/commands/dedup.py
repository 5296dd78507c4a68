"""`datagen dedup`: drop the records of a JSONL file that are near duplicates of earlier ones (or of --against texts).

    datagen dedup machine.jsonl --against examples/seed_tasks.jsonl --out kept.jsonl --pairs dropped_pairs.jsonl

The default is Self-Instruct's rule: drop a record whose ROUGE-L F-measure with any text kept before it (the
--against texts first, then the file's kept records in order) is above 0.7. Dropped pairs go to --pairs so a person
can check what the filter removed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from datagen.console import err_console, print_error, print_json, progress, summary_table
from datagen.dedup import SELF_INSTRUCT_THRESHOLD, FuzzyScorer, Method, Tokenizer, make_index
from datagen.errors import DatagenError
from datagen.jsonl import read_records, require_str, write_records
from datagen.options import JsonOption


@dataclass(frozen=True)
class Text:
    """One text to compare, with where it came from ("file.jsonl:12") and its whole record."""

    source: str
    text: str
    record: dict[str, Any]


def read_texts(path: Path, field: str) -> list[Text]:
    """Every record's `field`; a missing, non-string or empty value stops with file:line (exit 2) before any work."""
    return [Text(f"{path}:{line}", require_str(path, line, record, field), record) for line, record in read_records(path)]


def dedup(
    file: Annotated[Path, typer.Argument(help="JSONL input, one record per line.")],
    field: Annotated[str, typer.Option(help="The record field to compare.")] = "instruction",
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
        Optional[list[Path]],
        typer.Option("--against", help="JSONL of texts kept before this file (seeds, earlier data), same --field; repeatable."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the kept records here; without it they go to stdout (not with --json).")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Write one line per dropped record: its text, score and nearest kept text.")] = None,
    workers: Annotated[int, typer.Option(help="Threads for scoring; -1 uses every core.")] = -1,
    as_json: JsonOption = False,
) -> None:
    """Drop near-duplicate records (Self-Instruct's ROUGE-L > 0.7 rule by default), in file order."""
    try:
        _dedup(file, field, method, threshold, tokenizer, stemmer, fuzzy_scorer, against or [], out, pairs, workers, as_json)
    except DatagenError as err:  # also handled by the main CLI; here so the command works on its own
        print_error(str(err))
        raise typer.Exit(code=err.exit_code) from None


def _dedup(
    file: Path,
    field: str,
    method: Method,
    threshold: float,
    tokenizer: Tokenizer,
    stemmer: bool,
    fuzzy_scorer: FuzzyScorer,
    against: list[Path],
    out: Path | None,
    pairs: Path | None,
    workers: int,
    as_json: bool,
) -> None:
    index = make_index(method, threshold, tokenizer, stemmer, fuzzy_scorer, workers)  # bad options fail before any reading
    # Store sources (--run ID, --against a stored run) will read into the same list[Text] here once storage/ lands.
    earlier = [text for path in against for text in read_texts(path, field)]
    candidates = read_texts(file, field)

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
    elif not as_json:
        for record in kept:
            typer.echo(json.dumps(record, ensure_ascii=False))
    if pairs:
        write_records(pairs, dropped)

    summary = {
        "file": str(file),
        "field": field,
        "method": method.value,
        "threshold": None if method is Method.exact else threshold,
        "tokenizer": tokenizer.value if method is Method.rougeL else None,
        "against": len(earlier),
        "records": len(candidates),
        "kept": len(kept),
        "dropped": len(dropped),
        "seconds": round(seconds, 3),
        "out": str(out) if out else None,
        "pairs": str(pairs) if pairs else None,
    }
    if as_json:
        print_json(summary)
    err_console.print(
        summary_table(
            f"dedup {file}",
            [("drop", rule), ("against", len(earlier)), ("records", len(candidates)),
             ("kept", len(kept)), ("dropped", len(dropped)), ("seconds", round(seconds, 2)),
             ("records/s", round(len(candidates) / seconds) if seconds > 0 else "-")],
        )
    )
