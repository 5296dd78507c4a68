"""`datagen curate`: keep or drop a run's accepted instances by a rule over their stored scores (pipelines/curate.py);
`datagen export` then leaves the dropped ones out.

    datagen curate --run demo --keep "ifd < 0.9 and not degenerate"
    datagen curate --run demo --keep "ifd <= 1" --top 0.1 --by ifd
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Optional

import typer
from sqlmodel import Session

from datagen.console import err_console, print_json, summary_table
from datagen.models import DEFAULT_MODEL
from datagen.cli.options import DbOption, JsonOption
from pipelines.curate import CurationRule, curate_run
from storage.store import open_engine


def curate_command(
    run: Annotated[str, typer.Option("--run", help="Run name or id to curate (its scores come from `datagen score`).")],
    keep: Annotated[
        Optional[str], typer.Option("--keep", help='Keep instances for which this is true, e.g. "ifd < 0.9 and not degenerate".')
    ] = None,
    top: Annotated[Optional[float], typer.Option("--top", help="Keep this fraction (0, 1] of the instances, ranked by --by.")] = None,
    by: Annotated[Optional[str], typer.Option("--by", help="The score --top ranks by (highest first), e.g. ifd or judge_accuracy.")] = None,
    lowest: Annotated[bool, typer.Option("--lowest", help="--top keeps the lowest scores instead of the highest.")] = False,
    model: Annotated[str, typer.Option("--model", "-m", help="Whose IFD scores the rule reads (`datagen score --model`).")] = DEFAULT_MODEL,
    judge_model: Annotated[Optional[str], typer.Option(help="Whose judge_<rubric> scores the rule reads (default: the only judge).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mark each accepted instance of a run kept or dropped by a rule over its scores; a rerun replaces the run's curation."""
    rule = CurationRule(keep=keep, top=top, by=by, lowest=lowest, model=model, judge_model=judge_model)
    with Session(open_engine(db)) as session:
        result = curate_run(session, run, rule)
    if as_json:
        print_json(asdict(result))
        return
    rows = [("rule", result.rule), ("scores", ", ".join(result.scores)), ("instances", result.instances), ("kept", result.kept),
            ("dropped", result.dropped)]  # fmt: skip
    rows += [(f"  {reason}", n) for reason, n in result.dropped_by_reason.items()]
    rows += [("replaced an earlier curation", "yes")] if result.replaced else []
    err_console.print(summary_table(f"Curation of {result.run}", rows))
