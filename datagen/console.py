"""Terminal output shared by all commands: progress bars with rate and ETA, summary tables, errors.

Progress and tables go to stderr so stdout stays clean for `--json` and JSONL output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

err_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s", style="cyan")


def progress(unit: str = "items") -> Progress:
    """A bar with count, rate and ETA. Put live figures (keep rate, tokens/s) in the task's `status` field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
    )


def summary_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, shown(value))
    return table


def shown(value: Any) -> str:
    """A float to 3 significant digits, but never in exponent notation from 1,000 up (5,960 seconds, not 5.96e+03)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")


def print_error(message: str) -> None:
    """One line on stderr; the message is plain text (no rich markup inside it)."""
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
