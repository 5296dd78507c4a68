"""`datagen generate`: prompts in, completions out, every call recorded in the store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from sqlmodel import Session

from datagen import sigterm
from datagen.backends import BackendName, SamplingParams, mask_url
from datagen.console import err_console, progress, summary_table
from datagen.generate import GenerateConfig, read_requests, run_generate
from datagen.jsonl import check_output_file
from datagen.models import DEFAULT_MODEL
from datagen.backends import make_backend
from datagen.cli.options import (
    ApiKeyOption,
    BackendOption,
    BaseUrlOption,
    ConcurrencyOption,
    DbOption,
    JsonOption,
    ModelOption,
    TimeoutOption,
    notify,
    server_options,
)
from storage.store import add_run, check_store, default_run_name, open_engine, record_failure, touch
from storage.tables import Run


def generate(
    prompts: Annotated[Path, typer.Argument(help='JSONL: one {"prompt": ...} or {"messages": [...]} per line.')],
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per completion.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.9,
    n: Annotated[int, typer.Option("--n", help="Completions per prompt.")] = 1,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string; repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per backend call.")] = 16,
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name (default: generate-TIMESTAMP-RANDOM).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write completions as JSONL here instead of stdout.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
    concurrency: ConcurrencyOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Complete every prompt of a JSONL file with the chosen backend and model."""
    server = server_options(base_url, timeout, concurrency, api_key)
    # Options, output path and every prompt line are checked before a model loads or the store is touched;
    # the store is opened (a new SQLite file created) only once there is something to write.
    config = GenerateConfig(
        SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n, seed=seed, stop=tuple(stop or ())),
        batch_size=batch_size,
    )
    params = config.sampling
    if out is not None:
        check_output_file(out, "--out")
    requests = read_requests(prompts, params)
    check_store(db)  # an unreachable database fails before the model loads
    llm = make_backend(backend, model, base_url, server, notify=notify)
    try:
        engine = open_engine(db)
    except BaseException:
        llm.close()
        raise
    started = time.perf_counter()
    output = out.open("w", encoding="utf-8") if out else None
    with sigterm.stop_between_batches(), Session(engine) as session:
        run = Run(
            name=run_name or default_run_name("generate"),
            pipeline="generate",
            config={"prompts": str(prompts), "sampling": params.__dict__ | {"stop": list(params.stop)}, "batch_size": config.batch_size,
                    "base_urls": [mask_url(url) for url in base_url or ()]},
            model=model,
            backend=llm.name,
        )
        try:
            add_run(session, run)
        except BaseException:
            llm.close()
            if output:
                output.close()
            raise
        line = 0
        with progress("prompts") as bar:
            task = bar.add_task("generating", total=len(requests), status="")

            def emit(batch, results) -> None:
                nonlocal line
                for result in results:
                    line += 1
                    for completion in result.completions:
                        record = {"line": line, "text": completion.text, "finish_reason": completion.finish_reason,
                                  "completion_tokens": completion.completion_tokens}
                        if output:
                            output.write(json.dumps(record, ensure_ascii=False) + "\n")
                        elif as_json:
                            typer.echo(json.dumps(record, ensure_ascii=False))
                        else:
                            typer.echo(f"--- {line} ({completion.finish_reason})\n{completion.text}")
                bar.update(task, advance=len(batch), status=f"{run.completion_tokens / (time.perf_counter() - started):.0f} tok/s")

            try:
                run_generate(session, run, llm, requests, config.batch_size, emit)
            except BaseException as err:
                record_failure(session, run, err)
                raise
            finally:
                if output:
                    output.close()
                llm.close()
        touch(run, status="completed")
        session.add(run)
        session.commit()
        elapsed = time.perf_counter() - started
        err_console.print(
            summary_table(
                f"Run {run.name}",
                [("backend", llm.name), ("model", model), ("prompts", run.requests), ("completions", run.generated),
                 ("prompt tokens", run.prompt_tokens), ("completion tokens", run.completion_tokens),
                 ("seconds", round(elapsed, 1)), ("tokens/s", round(run.completion_tokens / elapsed, 1))],
            )
        )
