"""`datagen alpaca`: Alpaca's 20-tasks-per-request generation (pipelines/alpaca.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.backends import BackendName
from datagen.commands.self_instruct import execute, load_config_file
from datagen.models import DEFAULT_MODEL
from datagen.options import BackendOption, BaseUrlOption, ConfigOption, DbOption, JsonOption, ModelOption
from pipelines import alpaca
from pipelines.seeds import read_seeds
from pipelines.self_instruct import check_seeds


def alpaca_command(
    seeds: Annotated[Path, typer.Option("--seeds", help="Seed tasks: Self-Instruct or Alpaca format, JSONL or JSON array.")],
    num_instructions: Annotated[Optional[int], typer.Option("--num-instructions", "-n", help="Accepted instructions to reach (default: 100).")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help="Run name; an existing run is resumed.")] = None,
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    prompt_style: Annotated[Optional[str], typer.Option(help="raw, chat, or auto.")] = None,
    request_batch_size: Annotated[Optional[int], typer.Option(help="Requests per backend call (default: 8).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Token budget per request (default: 3072).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="(default: 1.0)")] = None,
    rouge_threshold: Annotated[Optional[float], typer.Option(help="Reject above this ROUGE-L F (default: 0.7).")] = None,
    max_requests: Annotated[Optional[int], typer.Option(help="Stop after this many requests.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default: 0).")] = None,
    config: ConfigOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate instruction/input/output triples, 20 per request, from 3 seed examples (Stanford Alpaca)."""
    settings = load_config_file(config, alpaca.AlpacaConfig, dict(
        num_instructions=num_instructions, prompt_style=prompt_style, request_batch_size=request_batch_size,
        max_tokens=max_tokens, temperature=temperature, rouge_threshold=rouge_threshold, max_requests=max_requests, seed=seed))
    seed_tasks = read_seeds(seeds)
    check_seeds(seed_tasks)
    execute("alpaca", seed_tasks, settings, alpaca.run, run_name, model, backend, base_url, seeds, db, as_json)
