"""The `datagen` command: one Typer app composed of one module per area (datagen/commands/).

Exit codes: 0 ok, 1 failure, 2 bad usage or bad input. A DatagenError prints one line, no traceback.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from datagen import __version__
from datagen.commands import export, generate, models, report, runs, train
from datagen.commands.toolformer import toolformer
from datagen.commands.self_instruct import self_instruct_command
from datagen.commands.alpaca import alpaca_command
from datagen.console import print_error
from datagen.commands.dedup import dedup
from datagen.commands import jobs
from datagen.errors import DatagenError

class DatagenGroup(TyperGroup):
    """Turns a DatagenError raised anywhere below into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DatagenError as err:
            print_error(str(err))
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=DatagenGroup,
    help="Generate instruction-tuning data with language models, filter it, store it, and fine-tune on it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models.app, name="models")
app.add_typer(runs.app, name="runs")
app.command("generate")(generate.generate)
app.command("self-instruct")(self_instruct_command)
app.command("alpaca")(alpaca_command)
app.command("export")(export.export_command)
app.command("report")(report.report_command)
app.command("dedup")(dedup)
app.command("toolformer")(toolformer)
app.command("train")(train.train)
app.add_typer(jobs.app, name="jobs")
app.command("worker")(jobs.worker)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"datagen {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """datagen: Self-Instruct, Alpaca and Toolformer data generation with a SQL store and a trainer."""


if __name__ == "__main__":
    app()
