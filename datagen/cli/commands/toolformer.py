"""`datagen toolformer`: annotate a text corpus with API calls and keep those that lower the loss (pipelines/toolformer.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from datagen import runs
from datagen.backends import BackendName, make_backend
from datagen.console import err_console, print_json, progress
from datagen.models import DEFAULT_MODEL
from datagen.cli.options import (
    ApiKeyOption,
    BackendOption,
    BaseUrlOption,
    ConcurrencyOption,
    ConfigOption,
    DbOption,
    JsonOption,
    ModelOption,
    TimeoutOption,
    notify,
    server_options,
)
from pipelines import toolformer as tf
from pipelines.toolformer import load_config  # noqa: F401  (the YAML and flags as the config: tests load shipped files with it)
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
    timeout: TimeoutOption = None,
    concurrency: ConcurrencyOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Toolformer (Schick et al. 2023): sample API calls into texts, execute them, keep the calls whose results lower the loss."""
    server = server_options(base_url, timeout, concurrency, api_key)
    config = load_config(config_file, tf.config_values(dict(tools=tools, search_corpus=search_corpus, date=date, batch_size=batch_size, seed=seed)))
    handle = runs.run_toolformer(config, corpus, lines=lines, limit=limit, model=model, store=db, name=run_name,
                                 backend=lambda: make_backend(backend, model, base_url, server, notify=notify),
                                 progress=progress_bar)  # fmt: skip
    summary = handle.summary
    report(handle.row(), summary["tools"], summary["texts"], summary["seconds"], as_json)


@contextmanager
def progress_bar(run: Run, todo: int) -> Iterator[Callable[[tf.Batch], None]]:
    with progress("texts") as bar:
        task = bar.add_task("annotating", total=todo, status="")

        def on_batch(batch: tf.Batch) -> None:
            kept = sum(c.kept for c in batch.candidates)
            bar.update(task, advance=len(batch.texts), status=f"{run.accepted} kept ({kept} in this batch)")

        yield on_batch


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
