"""`datagen self-instruct`: Self-Instruct bootstrapping from seed tasks (pipelines/self_instruct.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from sqlmodel import Session

from datagen.backends import BackendName
from datagen.console import err_console, print_json, progress, summary_table
from datagen.errors import BadInput
from datagen.models import DEFAULT_MODEL
from datagen.options import BackendOption, BaseUrlOption, ConfigOption, DbOption, JsonOption, ModelOption, make_backend
from pipelines import self_instruct
from pipelines.seeds import read_seeds
from storage.store import find_run, open_engine, touch
from storage.tables import Run, utcnow


def load_config_file(path: Path | None, cls, overrides: dict):
    """A YAML file of config fields, then the flags that were given on the command line."""
    values: dict = {}
    if path is not None:
        if not path.is_file():
            raise BadInput(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise BadInput(f"{path}: invalid YAML ({err})") from None
        if not isinstance(values, dict):
            raise BadInput(f"{path}: expected a mapping of option names to values")
        known = set(cls.__dataclass_fields__)
        for key in values:
            if key.replace("-", "_") not in known:
                raise BadInput(f"{path}: unknown option '{key}'")
        values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def self_instruct_command(
    seeds: Annotated[Path, typer.Option("--seeds", help="Seed tasks: Self-Instruct or Alpaca format, JSONL or JSON array.")],
    num_instructions: Annotated[Optional[int], typer.Option("--num-instructions", "-n", help="Accepted instructions to reach (default: 100).")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name; an existing run is resumed.")] = None,
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    prompt_style: Annotated[Optional[str], typer.Option(help="raw, chat, or auto (chat if the model has a chat template).")] = None,
    request_batch_size: Annotated[Optional[int], typer.Option(help="Requests per backend call (default: 16).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Token budget per instruction request (default: 1024).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="(default: 0.7)")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="(default: 0.5)")] = None,
    rouge_threshold: Annotated[Optional[float], typer.Option(help="Reject above this ROUGE-L F (default: 0.7).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="ROUGE tokenizer: rouge or unicode (non-English data).")] = None,
    generate_classification: Annotated[Optional[bool], typer.Option("--generate-classification", help="Generate classification tasks only.")] = None,
    max_requests: Annotated[Optional[int], typer.Option(help="Stop after this many instruction requests.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: 0).")] = None,
    config: ConfigOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grow seed tasks into new instructions with instances (Self-Instruct, Wang et al. 2023)."""
    settings = load_config_file(config, self_instruct.SelfInstructConfig, dict(
        num_instructions=num_instructions, prompt_style=prompt_style, request_batch_size=request_batch_size,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, rouge_threshold=rouge_threshold,
        tokenizer=tokenizer, generate_classification=generate_classification, max_requests=max_requests, seed=seed))
    seed_tasks = read_seeds(seeds)  # every line checked before anything is written
    self_instruct.check_seeds(seed_tasks)
    execute("self-instruct", seed_tasks, settings, self_instruct.run, run_name, model, backend, base_url, seeds, db, as_json)


def execute(pipeline, seed_tasks, settings, run_fn, run_name, model, backend, base_url, seeds_path, db, as_json) -> None:
    """Shared by self-instruct and alpaca: open or resume the run, run the loop with a progress bar, summarize."""
    engine = open_engine(db)
    with Session(engine) as session:
        existing = find_run(session, run_name) if run_name else None
        if existing and existing.pipeline != pipeline:
            raise BadInput(f"run '{run_name}' is a {existing.pipeline} run, not {pipeline}")
    llm = make_backend(backend, model, base_url)
    started = time.perf_counter()
    with Session(engine) as session:
        run_row = find_run(session, run_name) if run_name else None
        if run_row is None:
            if pipeline == "self-instruct":
                seed_tasks = self_instruct.label_seeds(llm, seed_tasks)
            run_row = Run(name=run_name or f"{pipeline}-{utcnow():%Y%m%d-%H%M%S}", pipeline=pipeline,
                          config={"seeds": str(seeds_path), **self_instruct.config_dict(settings)}, model=model, backend=llm.name)
            session.add(run_row)
            session.flush()
            self_instruct.store_seeds(session, run_row, seed_tasks)
            session.commit()
        else:
            touch(run_row, status="running", error=None, config=run_row.config | {"num_instructions": settings.num_instructions})
            session.add(run_row)
            session.commit()
        start_accepted = run_row.accepted
        with progress("instructions") as bar:
            task = bar.add_task(pipeline, total=settings.num_instructions, completed=run_row.accepted, status="")

            def on_batch(run: Run, stats) -> None:
                seen = run.accepted + run.rejected
                rate = run.completion_tokens / max(time.perf_counter() - started, 1e-9)
                bar.update(task, completed=run.accepted,
                           status=f"keep {run.accepted / seen if seen else 0:.0%} · {rate:.0f} tok/s")

            try:
                totals = run_fn(session, run_row, llm, seed_tasks, settings, on_batch)
            except Exception as err:
                session.rollback()
                touch(run_row, status="failed", error=str(err))
                session.add(run_row)
                session.commit()
                raise
            finally:
                llm.close()
        elapsed = time.perf_counter() - started
        summary = {
            "run": run_row.name, "status": run_row.status, "message": run_row.error,
            "accepted": run_row.accepted, "accepted_this_session": run_row.accepted - start_accepted,
            "rejected": run_row.rejected, "rejected_by_reason": totals.rejected, "instances": run_row.instances,
            "candidates": run_row.accepted + run_row.rejected, "keep_rate": run_row.accepted / max(run_row.accepted + run_row.rejected, 1),
            "requests": run_row.requests, "prompt_tokens": run_row.prompt_tokens, "completion_tokens": run_row.completion_tokens,
            "seconds": round(elapsed, 1), "generate_seconds": round(totals.generate_seconds, 1),
        }
    if as_json:
        print_json(summary)
    else:
        rows = [(k, v) for k, v in summary.items() if k != "rejected_by_reason" and v is not None]
        rows += [(f"rejected: {k}", v) for k, v in sorted(totals.rejected.items(), key=lambda kv: -kv[1])]
        err_console.print(summary_table(f"{pipeline} run {run_row.name}", rows))
    if run_row.status == "stopped":
        err_console.print(f"stopped early: {run_row.error}")
        raise typer.Exit(1)
