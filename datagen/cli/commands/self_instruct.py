"""`datagen self-instruct`: Self-Instruct bootstrapping from seed tasks (pipelines/self_instruct.py).

`execute` is shared with `datagen alpaca`: the flags as the pipeline's config, one library call (datagen/runs.py:
hold, open or resume, run, summarize) under a progress bar, and the summary printed.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from sqlmodel import Session

from datagen import runs
from datagen.backends import BackendName, ServerOptions, make_backend
from datagen.console import err_console, print_json, progress, summary_table
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
    notify,
    server_options,
)
from pipelines import bootstrap
from pipelines.bootstrap import load_config
from pipelines.seeds import SeedTask
from storage.queries import NOT_JUDGED
from storage.store import find_run
from storage.tables import Run


class PromptStyle(str, enum.Enum):
    auto = "auto"
    raw = "raw"
    chat = "chat"


class InstanceDemos(str, enum.Enum):
    builtin = "builtin"
    seeds = "seeds"


class RougeTokenizer(str, enum.Enum):
    rouge = "rouge"
    unicode = "unicode"


class InstancePick(str, enum.Enum):
    consistent = "consistent"
    ifd = "ifd"


InstanceSamplesOption = Annotated[Optional[int], typer.Option(help="Best-of-k: answers drawn per instruction, each with its own seed; one is kept by --instance-pick, all are stored (default: 1, the reference's one answer).")]
InstancePickOption = Annotated[Optional[InstancePick], typer.Option(help="Best-of-k's rule: consistent (highest mean ROUGE-L to the other answers) or ifd (lowest IFD under the generating model) (default: consistent).")]
SeedsOption = Annotated[Path, typer.Option("--seeds", help="Seed tasks: Self-Instruct or Alpaca records, JSONL or a JSON array.")]
NumOption = Annotated[Optional[int], typer.Option("--num-instructions", "-n", help="Accepted instructions to reach (default: 100).")]
RunOption = Annotated[Optional[str], typer.Option("--run", help="Run name; an existing run of that name is resumed (default: PIPELINE-TIMESTAMP-RANDOM).")]
StyleOption = Annotated[Optional[PromptStyle], typer.Option(help="raw: the paper's completion prompt; chat: the same request through the chat template; auto: chat when the model has one (default: auto).")]


def self_instruct_command(
    seeds: SeedsOption,
    num_instructions: NumOption = None,
    run_name: RunOption = None,
    model: ModelOption = DEFAULT_MODEL,
    backend: BackendOption = BackendName.auto,
    base_url: BaseUrlOption = None,
    prompt_style: StyleOption = None,
    request_batch_size: Annotated[Optional[int], typer.Option(help="Instruction requests per batch (default: a ramp from the reference's 5, growing while a batch adds at most 10% of the machine pool, up to 16 on transformers, 64 on vllm/openai).")] = None,
    pipelined: Annotated[Optional[bool], typer.Option("--pipelined/--sequential", help="Send a batch's instruction requests with the previous batch's instance requests (default: on for vllm/openai).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Tokens per instruction request (default: 1024, the reference's).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="(default: 0.7)")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="(default: 0.5)")] = None,
    instance_max_tokens: Annotated[Optional[int], typer.Option(help="Tokens per instance request (default: 300 for a classification task, 350 for any other, the reference's).")] = None,
    rouge_threshold: Annotated[Optional[float], typer.Option(help="Reject above this ROUGE-L F-measure (default: 0.7).")] = None,
    tokenizer: Annotated[Optional[RougeTokenizer], typer.Option(help="ROUGE tokenizer: rouge (rouge-score's) or unicode (non-English data).")] = None,
    allow_non_ascii: Annotated[Optional[bool], typer.Option("--allow-non-ascii", help="Keep instructions that start with a non-ASCII character (non-English data).")] = None,
    generate_classification: Annotated[Optional[bool], typer.Option("--generate-classification", help="Generate classification tasks only.")] = None,
    instance_demos: Annotated[Optional[InstanceDemos], typer.Option(help="Worked examples of the instance step: builtin (tasks with several instances, all labels) or seeds (default: builtin).")] = None,
    max_requests: Annotated[Optional[int], typer.Option(help="Stop after this many instruction requests.")] = None,
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
    """Grow seed tasks into new instructions with instances (Self-Instruct, Wang et al. 2023)."""
    params = dict(locals())
    execute("self-instruct", params)


def execute(pipeline: str, params: dict[str, Any]) -> None:
    """A Self-Instruct or Alpaca command: its flags as the config (bad options fail before anything is written), the
    resumed run's stored options under them, one library call, the summary."""
    server = server_options(params["base_url"], params["timeout"], params["concurrency"], params["api_key"])
    config_cls = runs.PIPELINES[pipeline]
    flags = bootstrap.config_values(params, config_cls)
    settings = load_config(config_cls, params["config"], flags)
    seeds, name, model = params["seeds"], params["run_name"], params["model"]
    runs.read_checked_seeds(seeds, settings)  # every line checked before the store is opened
    store = runs.Store(params["db"])
    with store.session() as session:
        run = find_run(session, name) if name else None
        if run is not None and run.pipeline == pipeline:  # resumed: the stored options, under the file and flags
            settings = load_config(config_cls, params["config"], flags, base=runs.stored_options(run, config_cls))
    handle = runs.run_bootstrap(pipeline, settings, seeds, backend=lambda: backend(params, server), model=model, store=store,
                                name=name, progress=progress_bar(pipeline, settings.num_instructions))  # fmt: skip
    summary = handle.summary
    if params["as_json"]:
        print_json(summary)
    else:
        rows = [(k.replace("_", " "), v) for k, v in summary.items() if k not in ("rejected_by_reason", "message")]
        rows += [(f"  {'not judged' if k == NOT_JUDGED else 'rejected'}: {k}", v) for k, v in summary["rejected_by_reason"].items()]
        err_console.print(summary_table(f"{pipeline} run {handle.name}", rows))
    handle.raise_if_stopped()  # StoppedEarly: its line, exit 3 (datagen/cli/app.py)


def backend(params: dict[str, Any], server: ServerOptions):
    return make_backend(params["backend"], params["model"], params["base_url"], server, notify=notify)


def progress_bar(pipeline: str, target: int):
    """The run's progress: accepted instructions of the target, keep rate and this session's tokens per second."""

    @contextmanager
    def bar_for(run: Run) -> Iterator[runs.OnBatch]:
        started, start_tokens = time.perf_counter(), run.completion_tokens
        with progress("instructions") as bar:
            bar_task = bar.add_task(pipeline, total=target, completed=run.accepted, status="")

            def on_batch(run: Run, stats: bootstrap.BatchStats) -> None:
                seen = run.accepted + run.rejected
                rate = (run.completion_tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
                bar.update(bar_task, completed=run.accepted, status=f"keep {run.accepted / max(seen, 1):.0%} · {rate:.0f} tok/s")

            yield on_batch

    return bar_for


def check_resume(session: Session, run: Run, pipeline: str, config_cls, config_file: Path | None, flags: dict[str, Any],
                 seeds: list[SeedTask], seeds_path: Path, model: str):  # fmt: skip
    """The resumed run's stored config under the file and flags given now, checked as the library checks a resume."""
    settings = load_config(config_cls, config_file, flags, base=runs.stored_options(run, config_cls))
    runs.check_resume(session, run, pipeline, settings, seeds, str(seeds_path), model)
    return settings
