"""A job definition checked before anything is stored: its schedule, and its pipeline options read as the pipeline's
command reads them (FLAGS), then checked by the pipeline's config class through the command's own flag->config
function, with the same seeds or corpus file check."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from croniter import croniter

from datagen.errors import BadInput

PIPELINES = ("self-instruct", "alpaca", "toolformer", "e2e")
WORKER_OPTIONS = ("--run", "--name", "--db", "--json")
"""Set by the worker for every job run (the job's run, or for e2e the loop's name; the worker's store); a job may not
set them."""
SHARD_OPTIONS = ("--lines", "--limit")
"""Set by the worker for each shard of a sharded job (datagen/shards.py); such a job may not set them."""

_EVERY = re.compile(r"(\d+)([smhd])")
_EVERY_FIELDS = {"s": (60, "*/{n} * * * * *"), "m": (60, "0 */{n} * * * *"), "h": (24, "0 0 */{n} * * *"), "d": (1, "0 0 0 * * *")}
"""--every as a DBOS cron expression (seconds first): only intervals that divide the next unit evenly, so runs are
evenly spaced (every 7m would fire at :56 and then :00 again)."""


@dataclass(frozen=True)
class JobDefinition:
    name: str
    pipeline: str
    args: list[str]
    """The pipeline command's options as typed after `--`, e.g. ["--seeds", "seeds.jsonl", "--config", "si.yaml"]."""
    schedule: str
    """Cron with seconds first, as DBOS's scheduler reads it: "0 0 */6 * * *" for --every 6h."""
    target: int | None
    """Per run: accepted instructions (self-instruct, alpaca) or corpus texts (toolformer) beyond what the run has."""
    shard_size: int | None
    """Toolformer: corpus texts per shard, each shard its own run (datagen/shards.py); None: one run."""
    queue: str
    backfill: str = "latest"
    """Firings that fell while no worker ran: run the latest one late, or all, or none; each is recorded either way."""
    on_failure: str | None = None
    """A shell command the worker runs when a run of the job fails or firings were missed, with DATAGEN_JOB and
    DATAGEN_REASON set: `--on-failure 'mail -s "$DATAGEN_JOB failed" ops@example.com <<< "$DATAGEN_REASON"'`."""
    timezone: str = "UTC"
    """The IANA time zone the schedule is read in (check_timezone): 03:00 in Europe/Paris stays 03:00 there across
    daylight saving time."""


BACKFILL = ("latest", "all", "none")


def cron_of(every: str | None, cron: str | None) -> str:
    """The schedule as six-field cron; a five-field expression gets second 0. Exactly one of the two is given."""
    if (every is None) == (cron is None):
        raise BadInput("--every or --cron: give exactly one (e.g. --every 6h, --cron '0 3 * * *')")
    if every is not None:
        match = _EVERY.fullmatch(every.strip())
        limit, pattern = _EVERY_FIELDS[match.group(2)] if match else (0, "")
        n = int(match.group(1)) if match else 0
        if not match or n < 1 or limit % n:
            raise BadInput(f"--every: '{every}' is not an interval like 30s, 15m, 6h or 1d that divides a minute, hour or day evenly")
        return pattern.format(n=n)
    fields = cron.split()
    expression = " ".join(["0", *fields] if len(fields) == 5 else fields)
    if len(fields) not in (5, 6) or not croniter.is_valid(expression, second_at_beginning=True):
        raise BadInput(f"--cron: '{cron}' is not a cron expression (minute hour day month weekday, e.g. '0 3 * * *')")
    return expression


def check_job(name: str, pipeline: str, args: list[str], every: str | None, cron: str | None, target: int | None,
              shard_size: int | None, queue: str, backfill: str = "latest", on_failure: str | None = None) -> JobDefinition:  # fmt: skip
    """Every check `datagen PIPELINE ARGS` would make before writing, without loading a model; BadInput names the field."""
    if pipeline not in PIPELINES:
        raise BadInput(f"pipeline: unknown '{pipeline}' (known: {', '.join(PIPELINES)})")
    if target is not None and target < 1:
        raise BadInput(f"--target: {target} is not a positive number")
    if target is not None and pipeline == "e2e":
        raise BadInput("--target: an e2e loop's size is in its config (generate.num_instructions, rounds); leave out --target")
    if shard_size is not None:
        if pipeline != "toolformer":
            raise BadInput(f"--shard-size: only toolformer jobs are sharded, not {pipeline}")
        if shard_size < 1:
            raise BadInput(f"--shard-size: {shard_size} is not a positive number")
        if target is not None:
            raise BadInput("--shard-size: each firing annotates the whole corpus, shard by shard; leave out --target")
    if backfill not in BACKFILL:
        raise BadInput(f"--backfill: '{backfill}' is not one of {', '.join(BACKFILL)}")
    schedule = cron_of(every, cron)
    for arg in args:
        option = arg.split("=")[0]
        if option in WORKER_OPTIONS:
            raise BadInput(f"{option}: set by the worker for each job run; leave it out of the job's options")
        if shard_size is not None and option in SHARD_OPTIONS:
            raise BadInput(f"{option}: set by the worker for each shard of a sharded job; leave it out of the job's options")
    check_pipeline_options(pipeline, args)
    return JobDefinition(name=name, pipeline=pipeline, args=list(args), schedule=schedule, target=target, shard_size=shard_size,
                         queue=queue, backfill=backfill, on_failure=on_failure)  # fmt: skip


SERVER = {"--model": "model", "-m": "model", "--backend": "backend", "-b": "backend", "--base-url": "base_url",
          "--timeout": "timeout", "--concurrency": "concurrency", "--api-key": "api_key", "--db": "db", "--json": "as_json"}
BOOTSTRAP = {**SERVER, "--seeds": "seeds", "--num-instructions": "num_instructions", "-n": "num_instructions", "--run": "run_name",
             "--prompt-style": "prompt_style", "--request-batch-size": "request_batch_size", "--max-tokens": "max_tokens",
             "--temperature": "temperature", "--top-p": "top_p", "--rouge-threshold": "rouge_threshold", "--tokenizer": "tokenizer",
             "--allow-non-ascii": "allow_non_ascii", "--max-requests": "max_requests", "--seed": "seed", "--config": "config",
             "-c": "config", "--instance-samples": "instance_samples", "--instance-pick": "instance_pick"}  # fmt: skip
FLAGS: dict[str, dict[str, str]] = {
    "self-instruct": {**BOOTSTRAP, "--pipelined": "pipelined", "--sequential": "pipelined", "--instance-max-tokens": "instance_max_tokens",
                      "--generate-classification": "generate_classification", "--instance-demos": "instance_demos"},
    "alpaca": {**BOOTSTRAP, "--requirements": "requirements"},
    "toolformer": {**SERVER, "--corpus": "corpus", "--tools": "tools", "--search-corpus": "search_corpus", "--date": "date",
                   "--run": "run_name", "--limit": "limit", "--lines": "lines", "--batch-size": "batch_size", "--seed": "seed",
                   "--config": "config_file", "-c": "config_file"},
    "e2e": {"--config": "config", "-c": "config", "--rounds": "rounds", "-r": "rounds", "--out": "out", "-o": "out", "--name": "name",
            "--eval": "eval_file", "--epochs": "epochs", "--replicates": "replicates", "--db": "db", "--json": "as_json"},
}  # fmt: skip
"""Each pipeline command's options (`datagen PIPELINE --help`) by the parameter they set: what a job's arguments may
hold. tests/test_api.py checks them against the Typer commands, so a new flag cannot be missed here."""
SWITCHES = {"--json": True, "--allow-non-ascii": True, "--generate-classification": True, "--pipelined": True, "--sequential": False}
"""Options that take no value, and the value they set."""
REPEATABLE = ("--base-url",)
REQUIRED = {"self-instruct": "seeds", "alpaca": "seeds", "toolformer": "corpus", "e2e": "config"}
NUMBERS = {"num_instructions": int, "request_batch_size": int, "max_tokens": int, "temperature": float, "top_p": float,
           "rouge_threshold": float, "max_requests": int, "seed": int, "instance_max_tokens": int, "timeout": float,
           "concurrency": int, "limit": int, "batch_size": int, "rounds": int, "epochs": float, "replicates": int}  # fmt: skip


def pipeline_params(pipeline: str, args: list[str]) -> dict:
    """The options as the pipeline command reads them, by parameter name: {"corpus": "c.jsonl", "limit": None, ...};
    an unknown option, a missing value, a value that is not a number where one is expected, or a missing required
    option is BadInput, as the command's own parser would refuse it."""
    flags = FLAGS[pipeline]
    params: dict = {name: None for name in flags.values()} | {"base_url": None, "as_json": False}
    i = 0
    while i < len(args):
        option, has_value, value = args[i].partition("=")
        if option not in flags:
            raise BadInput(f"{pipeline} options: No such option: {option}")
        name = flags[option]
        if option in SWITCHES:
            if has_value:
                raise BadInput(f"{pipeline} options: Option '{option}' does not take a value.")
            params[name] = SWITCHES[option]
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(args):
                raise BadInput(f"{pipeline} options: Option '{option}' requires an argument.")
            value = args[i + 1]
            i += 1
        i += 1
        if name in NUMBERS:
            try:
                value = NUMBERS[name](value)
            except ValueError:
                kind = "integer" if NUMBERS[name] is int else "float"
                raise BadInput(f"{pipeline} options: Invalid value for '{option}': '{value}' is not a valid {kind}.") from None
        if option in REPEATABLE:
            params[name] = [*(params[name] or []), value]
        else:
            params[name] = value
    required = REQUIRED[pipeline]
    if params[required] is None:
        option = next(flag for flag, name in flags.items() if name == required and flag.startswith("--"))
        raise BadInput(f"{pipeline} options: Missing option '{option}'.")
    for name in ("limit", "batch_size"):
        if pipeline == "toolformer" and params[name] is not None and params[name] < 1:
            raise BadInput(f"{pipeline} options: Invalid value for '--{name.replace('_', '-')}': {params[name]} is not in the range x>=1.")
    return params


def check_pipeline_options(pipeline: str, args: list[str]) -> None:
    """Read the options as the pipeline command does, build its config with the pipeline's config class (the
    command's own flag->config mapping), and read its input file."""
    params = pipeline_params(pipeline, args)
    from datagen.backends import BackendName, ServerOptions

    if params.get("backend") is not None and params["backend"] not in BackendName.__members__:
        raise BadInput(f"{pipeline} options: Invalid value for '--backend': '{params['backend']}' is not one of {', '.join(BackendName.__members__)}.")
    if params.get("timeout") is not None or params.get("concurrency") is not None:
        if not params.get("base_url"):
            raise BadInput("--timeout and --concurrency are for --backend openai with --base-url")
        ServerOptions(params.get("timeout"), params.get("concurrency"))
    if pipeline == "e2e":
        from datagen.e2e import load_loop_config
        from pipelines.seeds import read_seeds

        overrides = {k: params[k] for k in ("rounds", "out", "eval_file", "epochs", "replicates")}
        config = load_loop_config(Path(params["config"]), overrides)
        read_seeds(config.seeds)  # every line checked, as the loop's first stage does
        return
    if pipeline == "toolformer":
        from pipelines.toolformer import config_values, load_config, read_corpus, select_lines
        from pipelines.tools import search_index

        config_file = Path(params["config_file"]) if params["config_file"] else None
        config = load_config(config_file, config_values(params))
        select_lines(read_corpus(Path(params["corpus"])), params["lines"])
        search_index(config.tools, config.search_corpus)  # a missing search corpus is refused here too
        return
    from datagen.runs import PIPELINES, read_checked_seeds
    from pipelines.bootstrap import config_values, load_config

    config_cls = PIPELINES[pipeline]
    settings = load_config(config_cls, Path(params["config"]) if params["config"] else None, config_values(params, config_cls))
    read_checked_seeds(Path(params["seeds"]), settings)  # as `datagen self-instruct` checks them


def check_timezone(name: str) -> str:
    """An IANA time zone name, as DBOS's scheduler reads the cron in it (zoneinfo)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(f"--timezone: '{name}' is not an IANA time zone (e.g. UTC, Europe/Paris, America/New_York)") from None
    return name
