"""The `datagen` command: one Typer app composed of one module per area (datagen/cli/commands/).

Exit codes: 0 ok, 1 failure, 2 bad usage or bad input, 3 a run stopped before its target (StoppedEarly). A DatagenError, or a database failure in the middle
of a command (a lock held too long, a lost connection), prints one line, no traceback.
"""

from __future__ import annotations

from datagen.models import set_offline_environment

# Before anything imports huggingface_hub, transformers or datasets: they read HF_HUB_OFFLINE and friends
# once, at import, so setting them later (in a backend) has no effect.
set_offline_environment()

from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402
from typer.core import TyperGroup, TyperOption  # noqa: E402

from datagen import __version__  # noqa: E402
from datagen.cli.commands import e2e, eval_long, export, generate, jobs, long_data, models, report, runs, train  # noqa: E402
from datagen.cli.commands.alpaca import alpaca_command  # noqa: E402
from datagen.cli.commands.curate import curate_command  # noqa: E402
from datagen.cli.commands.dedup import dedup  # noqa: E402
from datagen.cli.commands.score import score_command  # noqa: E402
from datagen.cli.commands.self_instruct import self_instruct_command  # noqa: E402
from datagen.cli.commands.toolformer import toolformer  # noqa: E402
from datagen.cli.commands.ui import ui  # noqa: E402
from datagen.console import err_console, print_error  # noqa: E402
from datagen.errors import DatagenError, StoppedEarly  # noqa: E402
from storage.store import operational_error_message  # noqa: E402


def _flag_type(self: TyperOption, ctx) -> str | None:
    """A boolean flag takes no value, so its help shows no type. Typer 0.2x's rich help labels every option with its
    type, flags too (`--overwrite <bool>`, `--version <bool>`), as if they took one; the value column stays empty for flags."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type


class DatagenGroup(TyperGroup):
    """Turns a DatagenError raised anywhere below into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StoppedEarly as err:  # an outcome, not an error: its line after the run's summary
            err_console.print(str(err), markup=False)
            raise typer.Exit(err.exit_code) from None
        except DatagenError as err:
            print_error(str(err))
            raise typer.Exit(err.exit_code) from None
        except OperationalError as err:
            print_error(operational_error_message(err))
            raise typer.Exit(1) from None


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
app.command("long-data")(long_data.long_data)
app.command("eval-long")(eval_long.eval_long)
app.command("ui")(ui)
app.add_typer(jobs.app, name="jobs")
app.command("worker")(jobs.worker)
app.command("e2e")(e2e.e2e)
app.command("score")(score_command)
app.command("curate")(curate_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"datagen {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """datagen: Self-Instruct, Alpaca and Toolformer data generation with a SQL store and a trainer."""


def main() -> None:
    app()
