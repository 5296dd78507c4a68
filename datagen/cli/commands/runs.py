"""`datagen runs`: what is in the store."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from sqlmodel import Session, select

from datagen.console import err_console, print_json, summary_table
from datagen import cost
from datagen.cli.options import DbOption, JsonOption, PricesOption
from storage import queries
from storage.queries import NOT_JUDGED, accepted_instances, rejected_by_reason, run_summary
from storage.store import get_run, open_engine
from storage.tables import Loop, LoopStage, Run, TrainingRun

app = typer.Typer(help="List and inspect runs in the store.", no_args_is_help=True)


@app.command("list")
def list_runs(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List runs, newest first."""
    with Session(open_engine(db, create=False)) as session:
        runs = queries.list_runs(session)
        numbers, interrupted = queries.figures(session, runs), queries.interrupted_runs(session, runs)
        rows = [run_summary(r, numbers[r.id], interrupted.get(r.id)) for r in runs]
    if as_json:
        print_json(rows)
        return
    columns = ("id", "name", "pipeline", "model", "backend", "shown_status", "instructions", "accepted", "rejected", "not_judged", "keep_rate", "updated_at")
    table = Table(title="Runs")
    for column in columns:
        table.add_column("status" if column == "shown_status" else column.replace("_", " "))
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    err_console.print(table)
    for row in rows:
        if row["interrupted"]:
            err_console.print(f"run {row['name']}: {row['shown_status']}; resume: {row['interrupted']['resume']}")


def _cell(value) -> str:
    return "—" if value is None else f"{value:.0%}" if isinstance(value, float) else str(value)


@app.command("show")
def show(
    run: Annotated[str, typer.Argument(help="Run name or id.")],
    prices: PricesOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: its configuration, counters, rejections by reason, and cost; for an e2e loop, its lineage."""
    price_table = cost.load_prices(prices)
    with Session(open_engine(db, create=False)) as session:
        if (lineage := loop_lineage(session, run)) is not None:
            loop_id = session.exec(select(Loop.id).where(Loop.name == run)).one()
            lineage["cost"] = cost.cost_dict(cost.loop_usage(session, loop_id), price_table)
            if as_json:
                print_json(lineage)
            else:
                err_console.print(lineage_table(lineage))
                err_console.print(f"cost: {lineage['cost']['shown']}", markup=False)
            return
        found = get_run(session, run)
        summary = run_summary(found, queries.figures(session, [found])[found.id], queries.interrupted_runs(session, [found]).get(found.id))
        summary["config"] = found.config
        summary["rejected_by_reason"] = rejected_by_reason(session, found)
        summary["accepted_instances"] = accepted_instances(session, found)
        summary["cost"] = cost.cost_dict(cost.run_usage(session, found), price_table)
    if as_json:
        print_json(summary)
        return
    rows = [(k, v) for k, v in summary.items() if k not in ("config", "rejected_by_reason", "interrupted", "cost")]
    if summary["interrupted"]:
        rows.append(("resume", summary["interrupted"]["resume"]))
    rows += [(f"{'not judged' if k == NOT_JUDGED else 'rejected'}: {k}", v) for k, v in summary["rejected_by_reason"].items()]
    rows += [(f"seconds: {stage}", f"{seconds:,.1f}") for stage, seconds in summary["cost"]["seconds"].items()]
    rows.append(("cost", summary["cost"]["shown"]))
    err_console.print(summary_table(f"Run {found.name}", rows))
    err_console.print_json(data=summary["config"])


def loop_lineage(session: Session, name: str) -> dict | None:
    """An e2e loop's stages in order, each with the run, training run or folder it made; None when no loop has the name."""
    loop = session.exec(select(Loop).where(Loop.name == name)).first()
    if loop is None:
        return None
    stages = session.exec(select(LoopStage).where(LoopStage.loop_id == loop.id).order_by(LoopStage.round, LoopStage.id)).all()
    rows = []
    for stage in stages:
        linked = session.get(Run, stage.run_id) if stage.run_id else session.get(TrainingRun, stage.training_run_id) if stage.training_run_id else None
        rows.append({"round": stage.round, "stage": stage.stage, "status": stage.status,
                     "row": f"{'run' if isinstance(linked, Run) else 'training_run'} {linked.name}" if linked else None,
                     "artifact": stage.artifact})  # fmt: skip
    return {"loop": loop.name, "status": loop.status, "error": loop.error, "out": loop.out, "stages": rows}


def lineage_table(lineage: dict) -> Table:
    table = Table(title=f"Loop {lineage['loop']} ({lineage['status']}) → {lineage['out']}")
    for column in ("round", "stage", "status", "row", "artifact"):
        table.add_column(column)
    for row in lineage["stages"]:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in ("round", "stage", "status", "row", "artifact")))
    return table
