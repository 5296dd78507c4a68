"""`datagen score`: score a run's accepted instances with the student model (IFD, pipelines/score.py), or with an LLM
judge and a rubric (--judge, pipelines/judge.py); scores are stored per instance, model and method.

    datagen score --run demo                                  # IFD under the embedded student (the loop's base)
    datagen score --run demo --judge --model M --rubric examples/rubrics/accuracy.md
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from sqlmodel import Session

from datagen.backends import BackendName
from datagen.console import err_console, print_json, progress, summary_table
from datagen.errors import BadInput
from datagen.models import DEFAULT_MODEL
from datagen.backends import make_backend
from datagen.cli.options import (ApiKeyOption, BackendOption, BaseUrlOption, ConcurrencyOption, DbOption, JsonOption, ModelOption, TimeoutOption,
                             server_options)  # fmt: skip
from pipelines.score import CHERRY_MAX_LENGTH, ScoreConfig, score_run
from storage.store import get_run, open_engine


def score_command(
    run: Annotated[str, typer.Option("--run", help="Run name or id whose accepted instances to score.")],
    model: ModelOption = DEFAULT_MODEL,
    judge: Annotated[bool, typer.Option("--judge", help="Score with an LLM judge and --rubric instead of IFD.")] = False,
    rubric: Annotated[Optional[Path], typer.Option("--rubric", help="--judge: rubric file (e.g. examples/rubrics/accuracy.md).")] = None,
    max_length: Annotated[int, typer.Option(help="IFD: most tokens of prompt + output scored (Cherry LLM: 512).")] = CHERRY_MAX_LENGTH,
    batch_size: Annotated[int, typer.Option(help="Instances per backend call and store transaction.")] = 64,
    rescore: Annotated[bool, typer.Option(help="Replace this model's stored scores of the run instead of skipping scored instances.")] = False,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
    concurrency: ConcurrencyOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Score every accepted instance of a run: IFD under the student model (Cherry LLM), or an LLM judge's rubric score."""
    if judge:
        if rubric is None:
            raise BadInput("--judge needs --rubric FILE (e.g. examples/rubrics/accuracy.md)")
        from pipelines.judge import JudgeConfig, read_rubric

        config = JudgeConfig(model=model, rubric=read_rubric(rubric), batch_size=batch_size, rescore=rescore)
    else:
        if rubric is not None:
            raise BadInput("--rubric is for --judge")
        config = ScoreConfig(model=model, max_length=max_length, batch_size=batch_size, rescore=rescore)
    with Session(open_engine(db, create=False)) as session:
        get_run(session, run)  # an unknown run fails before the model loads
    llm = make_backend(backend, model, base_url, server_options(base_url, timeout, concurrency, api_key))
    try:
        with Session(open_engine(db)) as session, progress("items") as bar:
            task = bar.add_task("judging" if judge else "scoring", total=None, status="")

            def on_batch(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            if judge:
                from pipelines.judge import judge_run

                result = judge_run(session, llm, run, config, on_batch)
            else:
                result = score_run(session, llm, run, config, on_batch)
    finally:
        llm.close()
    summary = asdict(result)
    if as_json:
        print_json(summary)
        return
    rows = [(key.replace("_", " "), "-" if value is None else value) for key, value in summary.items()]
    err_console.print(summary_table(f"Scores of {result.run}", rows))
