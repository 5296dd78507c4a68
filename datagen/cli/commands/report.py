"""`datagen report`: a run's counts, distributions and samples as report.md with PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

from datagen.console import err_console, print_json, summary_table
from datagen.cost import load_prices
from datagen.cli.options import DbOption, JsonOption, PricesOption
from datagen.report import SAMPLES, collect, report_json, summary, write_report
from storage.store import open_engine


def report_command(
    run: Annotated[str, typer.Option("--run", help="Run name or id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md and the PNG plots (created if needed).")],
    samples: Annotated[int, typer.Option(min=0, help="Random accepted and rejected items shown in the report.")] = SAMPLES,
    seed: Annotated[int, typer.Option(help="Seed for choosing the samples.")] = 0,
    prices: PricesOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a quality report of one run: counts, keep rate per batch, lengths, similarity to seeds, verbs, samples."""
    price_table = load_prices(prices)  # a bad table fails before any work
    with Session(open_engine(db, create=False)) as session:
        report = collect(session, run, samples=samples, seed=seed, prices=price_table)
    files = write_report(report, out)
    if as_json:
        print_json(report_json(report) | {"files": [str(f) for f in files]})
        return
    s = summary(report)
    rows = [
        ("model / backend", f"{s['model']} / {s['backend']}"),
        ("completions", s["completions"]),
        ("instructions generated", s["instructions"]),
        ("accepted", s["accepted"]),
        ("keep rate", f"{s['keep_rate']:.1%}"),
        *((f"rejected: {reason}", n) for reason, n in s["rejected_by_reason"].items()),
        ("instances accepted", s["instances_accepted"]),
        *((f"instances rejected: {reason}", n) for reason, n in s["instances_rejected_by_reason"].items()),
        ("instructions without instances", s["tasks_without_instances"]),
        ("median words: instruction / output", f"{s['median_instruction_words']} / {s['median_output_words']}"),
        ("median ROUGE-L to nearest seed", s["median_rouge_l_to_nearest_seed"]),
        ("top verbs", ", ".join(f"{v} {n}" for v, n in s["top_verbs"].items())),
        ("cost", s["cost"]["shown"]),
        ("written", str(out / "report.md")),
    ]
    err_console.print(summary_table(f"Report on {s['run']}", rows))
