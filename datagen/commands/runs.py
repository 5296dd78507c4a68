"""`datagen runs`: what is in the store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from sqlmodel import Session

from datagen.console import err_console, print_json, summary_table
from datagen.options import DbOption, JsonOption
from storage import queries
from storage.queries import accepted_instances, rejected_by_reason, run_summary
from storage.store import get_run, open_engine

app = typer.Typer(help="List and inspect runs in the store.", no_args_is_help=True)


@app.command("list")
def list_runs(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List runs, newest first."""
    with Session(open_engine(db, create=False)) as session:
        rows = [run_summary(r) for r in queries.list_runs(session)]
    if as_json:
        print_json(rows)
        return
    table = Table(title="Runs")
    for column in ("id", "name", "pipeline", "model", "backend", "status", "accepted", "rejected", "updated_at"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("id", "name", "pipeline", "model", "backend", "status", "accepted", "rejected", "updated_at")))
    err_console.print(table)


@app.command("show")
def show(
    run: Annotated[str, typer.Argument(help="Run name or id.")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: its configuration, counters, and rejections by reason."""
    with Session(open_engine(db, create=False)) as session:
        found = get_run(session, run)
        summary = run_summary(found)
        summary["config"] = found.config
        summary["rejected_by_reason"] = rejected_by_reason(session, found)
        summary["accepted_instances"] = accepted_instances(session, found)
    if as_json:
        print_json(summary)
        return
    rows = [(k, v) for k, v in summary.items() if k not in ("config", "rejected_by_reason")]
    rows += [(f"rejected: {k}", v) for k, v in summary["rejected_by_reason"].items()]
    err_console.print(summary_table(f"Run {found.name}", rows))
    err_console.print_json(data=summary["config"])
