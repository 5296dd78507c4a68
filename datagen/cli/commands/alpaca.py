"""`datagen alpaca`: Stanford Alpaca's 20-tasks-per-request generation (pipelines/alpaca.py)."""

from __future__ import annotations

import enum
from typing import Annotated, Optional

import typer

from datagen.backends import BackendName
from datagen.cli.commands.self_instruct import (
    InstancePickOption,
    InstanceSamplesOption,
    NumOption,
    RougeTokenizer,
    RunOption,
    SeedsOption,
    StyleOption,
    execute,
)
from datagen.models import DEFAULT_MODEL
from datagen.cli.options import (
    ApiKeyOption,
    BackendOption,
    BaseUrlOption,
    ConcurrencyOption,
    ConfigOption,
    DbOption,
    JsonOption,
    ModelOption,
    TimeoutOption,
)


class Requirements(str, enum.Enum):
    reference = "reference"
    concise = "concise"


def alpaca_command(
    seeds: SeedsOption,
    num_instructions: NumOption = None,
    run_name: RunOption = None,
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    prompt_style: StyleOption = None,
    request_batch_size: Annotated[Optional[int], typer.Option(help="Requests per batch (default: a ramp from the reference's 5, growing while a batch adds at most 10% of the pool, up to 8 on transformers, 32 on vllm/openai).")] = None,
    requirements: Annotated[Optional[Requirements], typer.Option(help="The prompt's task description: reference (Stanford Alpaca's prompt.txt, verbatim) or concise (ours) (default: reference).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Tokens per request (default: 3072, the reference's).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="(default: 1.0)")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="(default: 1.0)")] = None,
    rouge_threshold: Annotated[Optional[float], typer.Option(help="Reject above this ROUGE-L F-measure (default: 0.7).")] = None,
    tokenizer: Annotated[Optional[RougeTokenizer], typer.Option(help="ROUGE tokenizer: rouge (rouge-score's) or unicode (non-English data).")] = None,
    allow_non_ascii: Annotated[Optional[bool], typer.Option("--allow-non-ascii", help="Keep instructions that start with a non-ASCII character.")] = None,
    max_requests: Annotated[Optional[int], typer.Option(help="Stop after this many requests.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of example sampling and generation (default: 0).")] = None,
    instance_samples: InstanceSamplesOption = None,
    instance_pick: InstancePickOption = None,
    config: ConfigOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = None,
    concurrency: ConcurrencyOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Generate instruction/input/output records, 20 asked per request, from 3 seed records (Stanford Alpaca)."""
    execute("alpaca", dict(locals()))
