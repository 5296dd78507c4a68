"""`datagen toolformer`: annotate a text corpus with API calls and keep those that lower the loss (pipelines/toolformer.py)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.table import Table
from sqlmodel import Session

from datagen import sigterm
from datagen.backends import BackendName
from datagen.console import err_console, print_json, progress
from datagen.errors import BadInput
from datagen.models import DEFAULT_MODEL
from datagen.options import (
    BackendOption,
    BaseUrlOption,
    ConfigOption,
    DbOption,
    JsonOption,
    ModelOption,
    make_backend,
    read_config_file,
)
from pipelines import toolformer as tf
from pipelines.tools import build_tools, search_index
from storage.run_lock import hold_run
from storage.store import add_run, default_run_name, find_run, open_engine, record_failure, touch
from storage.tables import Run


def toolformer(
    corpus: Annotated[Path, typer.Option("--corpus", help='JSONL: {"text": ..., "date": "YYYY-MM-DD" (optional), "id": ... (optional)} per line.')],
    tools: Annotated[Optional[str], typer.Option("--tools", help="Comma-separated, from calculator,calendar,wikisearch,qa (default: calculator,calendar).")] = None,
    search_corpus: Annotated[Optional[Path], typer.Option("--search-corpus", help="Folder of .txt/.jsonl passages for wikisearch and qa.")] = None,
    date: Annotated[Optional[str], typer.Option("--date", help="Calendar date (YYYY-MM-DD) for texts without a 'date' field.")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name; rerun with the same name to resume (default: toolformer-TIMESTAMP-RANDOM).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N texts of the corpus.", min=1)] = None,
    lines: Annotated[Optional[str], typer.Option("--lines", help="Only the texts on corpus lines FIRST:LAST (from 1, both included): one shard.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Texts per batch, one transaction each (default: 8).", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the call sampling (default: 0).")] = None,
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    config_file: ConfigOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Toolformer (Schick et al. 2023): sample API calls into texts, execute them, keep the calls whose results lower the loss."""
    flags = {"tools": tools.split(",") if tools else None, "search_corpus": search_corpus, "date": date, "batch_size": batch_size, "seed": seed}
    config = load_config(config_file, {k: v for k, v in flags.items() if v is not None})
    texts = tf.select_lines(tf.read_corpus(corpus), lines)[:limit]  # every line checked before anything is written
    index = search_index(config.tools, config.search_corpus)  # so is the search corpus
    stored = {"corpus": str(corpus), "corpus_sha256": tf.corpus_digest(corpus), "lines": lines, **config.model_dump(mode="json")}
    engine = open_engine(db)
    with sigterm.stop_between_batches(), hold_run(engine, run_name), Session(engine) as session:
        run = run_to_resume(session, run_name, stored, model)
        llm = make_backend(backend, model, base_url)
        if run is None:
            run = add_run(session, Run(name=run_name or default_run_name("toolformer"), pipeline="toolformer", config=stored,
                                       model=model, backend=llm.name))  # fmt: skip
        elif run.backend != llm.name:
            llm.close()
            raise BadInput(f"run '{run.name}' ran on the {run.backend} backend; resume it with --backend {run.backend}")
        started = time.perf_counter()
        try:
            registry = build_tools(config.tools, index, llm, config.qa_max_tokens)
            todo = len(texts) - len(tf.done_lines(session, run) & {t.line for t in texts})
            with progress("texts") as bar:
                task = bar.add_task("annotating", total=todo, status="")

                def on_batch(batch: tf.Batch) -> None:
                    kept = sum(c.kept for c in batch.candidates)
                    bar.update(task, advance=len(batch.texts), status=f"{run.accepted} kept ({kept} in this batch)")

                tf.run(session, run, llm, texts, registry, config, on_batch)
        except BaseException as err:
            record_failure(session, run, err)
            raise
        finally:
            llm.close()
        touch(run, status="completed", error=None)
        session.add(run)
        session.commit()
        summaries = tf.summarize(session, run, config.tools)
        report(run, summaries, len(texts), time.perf_counter() - started, as_json)


def load_config(path: Path | None, overrides: dict[str, Any]) -> tf.ToolformerConfig:
    """The YAML file's options, then the flags given on the command line; errors name the field."""
    values = read_config_file(path) if path is not None else {}
    try:
        return tf.ToolformerConfig.model_validate(values | overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise BadInput(f"{path or 'options'}: {where}: {first['msg']}") from None


def run_to_resume(session: Session, name: str | None, stored: dict[str, Any], model: str) -> Run | None:
    """The named run if it exists and was started with the same corpus, model and options; None for a new run."""
    run = find_run(session, name) if name else None
    if run is None:
        return None
    if run.pipeline != "toolformer":
        raise BadInput(f"run '{run.name}' is a {run.pipeline} run; choose another --run name")
    changed = [key for key in stored if key not in ("corpus", "batch_size") and run.config.get(key) != stored[key]]
    if run.model != model:
        changed.insert(0, "model")
    if changed:
        raise BadInput(
            f"run '{run.name}' was started with other options ({', '.join(changed)} differ); "
            "resume it with the same ones, or start a new --run"
        )
    return run


def report(run: Run, summaries: list[tf.ToolSummary], texts: int, seconds: float, as_json: bool) -> None:
    """Per tool, the counts of each step and the paper's Table 2 (texts with a call kept at tau_f = 0.5, 1, 2)."""
    if as_json:
        print_json({"run": run.name, "texts": texts, "annotated": run.instances, "kept": run.accepted,
                    "seconds": round(seconds, 1), "tools": [asdict(s) for s in summaries]})  # fmt: skip
        return
    table = Table(
        title=f"Run {run.name}: {texts} texts, {run.instances} annotated, {seconds:.0f} s",
        caption="calls: sampled; ran: executed without error; kept: at the tool's tau_f;\n"
        "ex@t: texts with a call whose L- - L+ >= t (the paper's Table 2 counts these)",
        title_justify="left", caption_justify="left", box=None, pad_edge=False, header_style="bold underline",
    )  # fmt: skip
    table.add_column("tool", no_wrap=True)
    for column in ("texts", "positions", "calls", "parsed", "ran", "kept", *(f"ex@{t:g}" for t in tf.TABLE2_THRESHOLDS)):
        table.add_column(column, justify="right", no_wrap=True)
    for s in summaries:
        table.add_row(s.tool, *(str(v) for v in (s.texts, s.positions, s.sampled, s.parsed, s.executed, s.kept)),
                      *(str(s.examples[t]) for t in tf.TABLE2_THRESHOLDS))  # fmt: skip
    err_console.print(table)
    err_console.print(f"Annotated texts: table toolformertext, column annotated (where calls_inserted > 0), run id {run.id}.")
