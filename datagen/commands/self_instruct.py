"""`datagen self-instruct`: Self-Instruct bootstrapping from seed tasks (pipelines/self_instruct.py).

`execute` is shared with `datagen alpaca`: open or resume the run, run the pipeline under a progress bar, summarize.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from sqlmodel import Session, func, select

from datagen import sigterm
from datagen.backends import BackendName
from datagen.console import err_console, print_json, progress, summary_table
from datagen.errors import BadInput
from datagen.models import DEFAULT_MODEL
from datagen.options import (
    BackendOption,
    BaseUrlOption,
    ConfigOption,
    DbOption,
    JsonOption,
    ModelOption,
    make_backend,
    option_names,
    read_config_file,
    typed_options,
)
from pipelines import bootstrap, self_instruct
from pipelines.seeds import SeedTask, read_seeds
from storage.run_lock import hold_run
from storage import queries
from storage.store import add_generations, add_run, default_run_name, find_run, open_engine, record_failure, touch
from storage.tables import Run, Task


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
) -> None:
    """Grow seed tasks into new instructions with instances (Self-Instruct, Wang et al. 2023)."""
    flags = dict(num_instructions=num_instructions, prompt_style=prompt_style, request_batch_size=request_batch_size,
                 max_tokens=max_tokens, temperature=temperature, top_p=top_p, instance_max_tokens=instance_max_tokens,
                 rouge_threshold=rouge_threshold, tokenizer=tokenizer, generate_classification=generate_classification,
                 instance_demos=instance_demos,
                 require_ascii_start=None if allow_non_ascii is None else not allow_non_ascii, max_requests=max_requests,
                 seed=seed, pipelined=pipelined, instance_samples=instance_samples, instance_pick=instance_pick)  # fmt: skip
    execute("self-instruct", self_instruct.SelfInstructConfig, self_instruct.run, seeds, flags, config, run_name,
            model, backend, base_url, db, as_json)  # fmt: skip


def load_config(cls, path: Path | None, flags: dict[str, Any], base: dict[str, Any] | None = None):
    """The config from, in increasing priority: a resumed run's stored config, the YAML file, the flags given.
    Types and ranges are checked here, before any store is opened or model loaded; errors name the key or option."""
    known = option_names(cls)
    values = {k: v for k, v in (base or {}).items() if k in known}
    if path is not None:
        loaded = read_config_file(path)
        for key in loaded:
            if str(key).replace("-", "_") not in known:
                raise BadInput(f"{path}: unknown option '{key}' (known: {', '.join(sorted(known))})")
        values.update(typed_options(cls, {str(k).replace("-", "_"): v for k, v in loaded.items()}, str(path)))
    values.update({k: v.value if isinstance(v, enum.Enum) else v for k, v in flags.items() if v is not None})
    return cls(**values)


def execute(
    pipeline: str,
    config_cls,
    run_pipeline: Callable,
    seeds_path: Path,
    flags: dict[str, Any],
    config_file: Path | None,
    run_name: str | None,
    model: str,
    backend: BackendName,
    base_url: list[str] | None,
    db: str | None,
    as_json: bool,
) -> None:
    """Check everything, then open or resume the run, run the pipeline under a progress bar, and summarize."""
    settings = load_config(config_cls, config_file, flags)  # bad options fail before anything is written
    seeds = read_seeds(seeds_path)  # every line checked before anything is written
    needs_instances = getattr(settings, "instance_demos", "seeds") == "seeds"  # Alpaca shows seed records: always
    bootstrap.check_seeds(seeds, str(seeds_path), needs_instances)
    engine = open_engine(db)
    # One writer per run, held before the model loads (storage/run_lock.py); SIGTERM stops between batches.
    with sigterm.stop_between_batches(), hold_run(engine, run_name):
        with Session(engine) as session:
            run = find_run(session, run_name) if run_name else None
            if run is not None:
                settings = check_resume(session, run, pipeline, config_cls, config_file, flags, seeds, seeds_path, model)
        llm = make_backend(backend, model, base_url)
        settings = bootstrap.for_backend(settings, llm.name)  # stored filled in: a resumed run keeps them
        started = time.perf_counter()
        with Session(engine) as session:
            run = find_run(session, run_name) if run_name else None
            config = {"seeds": str(seeds_path), **bootstrap.config_dict(settings)}
            try:
                if run is None:
                    run = add_run(session, Run(name=run_name or default_run_name(pipeline), pipeline=pipeline, config=config,
                                               model=model, backend=llm.name))  # fmt: skip
                if not session.exec(select(Task.id).where(Task.run_id == run.id, Task.source == "seed")).first():
                    start_run(session, run, llm, seeds, settings, pipeline)  # committed with the status below
                touch(run, status="running", error=None, config=config)
                session.add(run)
                session.commit()
                start_accepted, start_tokens = run.accepted, run.completion_tokens
                with progress("instructions") as bar:
                    bar_task = bar.add_task(pipeline, total=settings.num_instructions, completed=run.accepted, status="")

                    def on_batch(run: Run, stats: bootstrap.BatchStats) -> None:
                        seen = run.accepted + run.rejected
                        rate = (run.completion_tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
                        bar.update(bar_task, completed=run.accepted, status=f"keep {run.accepted / max(seen, 1):.0%} · {rate:.0f} tok/s")

                    totals = run_pipeline(session, run, llm, settings, on_batch)
            except BaseException as err:
                if run is not None and run.id is not None:
                    record_failure(session, run, err)
                else:
                    session.rollback()
                raise
            finally:
                llm.close()
            summary = summarize(session, run, totals, time.perf_counter() - started, run.accepted - start_accepted)
    if as_json:
        print_json(summary)
    else:
        rows = [(k.replace("_", " "), v) for k, v in summary.items() if k not in ("rejected_by_reason", "message")]
        rows += [(f"  rejected: {k}", v) for k, v in summary["rejected_by_reason"].items()]
        err_console.print(summary_table(f"{pipeline} run {run.name}", rows))
    if run.status == "stopped":
        err_console.print(f"stopped before the target: {run.error}", markup=False)
        raise typer.Exit(1)


RESUMABLE = ("num_instructions", "max_requests", "max_stalled_batches")
"""Options a resumed run may change: where it stops, not how it decides. Any other change would make the resumed
run something the uninterrupted one is not, so it is refused."""


def check_resume(session, run: Run, pipeline, config_cls, config_file, flags, seeds: list[SeedTask], seeds_path, model):
    """The resumed run's stored config under the file and flags given now; same pipeline, model, seeds and options."""
    if run.pipeline != pipeline:
        raise BadInput(f"run '{run.name}' is a {run.pipeline} run, not {pipeline}: choose another --run name")
    if run.model != model:
        raise BadInput(f"run '{run.name}' was started with --model {run.model}; resume it with the same model")
    stored = bootstrap.load_seeds(session, run)
    if stored and not same_seeds(stored, seeds):
        raise BadInput(f"run '{run.name}' was started with other seed tasks than {seeds_path}; resume it with the same file")
    # A run stored before `pipelined` existed ran its batches one after another.
    base = {"pipelined": False, **run.config} if "pipelined" in option_names(config_cls) else run.config
    settings = load_config(config_cls, config_file, flags, base=base)
    now = bootstrap.config_dict(settings)
    changed = [f"{key} {run.config[key]!r} -> {value!r}" for key, value in now.items()
               if key in run.config and key not in RESUMABLE and run.config[key] != value]  # fmt: skip
    if changed:
        raise BadInput(f"run '{run.name}' was started with other options ({', '.join(changed)}): resume it with the "
                       f"options it was started with, or start a new --run")  # fmt: skip
    return settings


def same_seeds(stored: list[SeedTask], given: list[SeedTask]) -> bool:
    """The same tasks with the same instances; whether each is classification only where the file says (the store
    also holds the classification step's labels of seeds the file left open)."""
    if len(stored) != len(given):
        return False
    return all(
        s.instruction == g.instruction and s.instances == g.instances
        and (g.is_classification is None or s.is_classification == g.is_classification)
        for s, g in zip(stored, given)
    )  # fmt: skip


def start_run(session: Session, run: Run, llm, seeds: list[SeedTask], settings, pipeline: str) -> None:
    """A new run's seeds go to the store first; seeds that do not say whether they are classification tasks are
    labelled by the classification step (Self-Instruct only: Alpaca has none)."""
    if pipeline == "self-instruct":
        chat = bootstrap.uses_chat(llm, settings.prompt_style)
        seeds, requests, results = self_instruct.label_seeds(llm, seeds, chat)
        add_generations(session, run, llm, "classification", 0, requests, results)
    bootstrap.store_seeds(session, run, seeds)


def summarize(session: Session, run: Run, totals: bootstrap.BatchStats, seconds: float, new: int) -> dict[str, Any]:
    """The whole run's figures from the store (earlier sessions included), and this session's time."""
    reasons = session.exec(
        select(Task.reason, func.count()).where(Task.run_id == run.id, Task.source == "generated", Task.status == "rejected")
        .group_by(Task.reason).order_by(func.count().desc())
    ).all()  # fmt: skip
    numbers = queries.figures(session, [run])[run.id]  # the words `datagen runs`, the viewer, report and card use
    return {
        "run": run.name, "status": run.status, "message": run.error, "completions": numbers.completions,
        "instructions": numbers.instructions, "accepted": numbers.accepted, "accepted_this_session": new, "rejected": numbers.rejected,
        "not_judged": numbers.not_judged, "keep_rate": None if numbers.keep_rate is None else round(numbers.keep_rate, 3),
        "instances": run.instances, "requests": run.requests,
        "empty_responses_this_session": totals.empty_responses,
        "prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
        "seconds": round(seconds, 1), "generate_seconds": round(totals.generate_seconds, 1),
        "rejected_by_reason": dict(reasons),
    }  # fmt: skip
