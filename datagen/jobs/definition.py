"""A job definition checked before anything is stored: its schedule, and its pipeline options checked by the same
option parser and config classes the pipeline's own command uses, with the same seeds or corpus file check."""

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


def pipeline_params(pipeline: str, args: list[str]) -> dict:
    """The options as the pipeline command itself parses them, by name: {"corpus": "c.jsonl", "limit": None, ...}."""
    from typer import TyperException
    from typer.main import get_command

    from datagen.cli import app

    command = get_command(app).commands[pipeline]
    try:
        return command.make_context(pipeline, list(args), resilient_parsing=False).params
    except TyperException as err:  # typer's click: unknown option, bad value, missing --seeds
        raise BadInput(f"{pipeline} options: {err.format_message()}") from None


def check_pipeline_options(pipeline: str, args: list[str]) -> None:
    """Parse the options with the pipeline command itself, then build its config and read its input file."""
    params = pipeline_params(pipeline, args)
    if pipeline == "e2e":
        from datagen.e2e import load_loop_config
        from pipelines.seeds import read_seeds

        overrides = {k: params[k] for k in ("rounds", "out", "eval_file", "epochs", "replicates")}
        config = load_loop_config(params["config"], overrides)
        read_seeds(config.seeds)  # every line checked, as the loop's first stage does
        return
    if pipeline == "toolformer":
        from datagen.commands.toolformer import load_config
        from pipelines.toolformer import read_corpus, select_lines
        from pipelines.tools import search_index

        tools = params["tools"]
        flags = {"tools": tools.split(",") if tools else None, "search_corpus": params["search_corpus"], "date": params["date"],
                 "batch_size": params["batch_size"], "seed": params["seed"]}  # fmt: skip
        config = load_config(params["config_file"], {k: v for k, v in flags.items() if v is not None})
        select_lines(read_corpus(Path(params["corpus"])), params["lines"])
        search_index(config.tools, config.search_corpus)  # a missing search corpus is refused here too
        return
    from dataclasses import fields

    from datagen.commands.self_instruct import load_config
    from pipelines import alpaca, bootstrap, self_instruct
    from pipelines.seeds import read_seeds

    config_cls = self_instruct.SelfInstructConfig if pipeline == "self-instruct" else alpaca.AlpacaConfig
    known = {f.name for f in fields(config_cls)}
    flags = {k: v for k, v in params.items() if k in known}
    if params.get("allow_non_ascii") is not None:
        flags["require_ascii_start"] = not params["allow_non_ascii"]
    settings = load_config(config_cls, params["config"], flags)
    seeds_path = Path(params["seeds"])
    needs_instances = getattr(settings, "instance_demos", "seeds") == "seeds"  # as `datagen self-instruct` checks them
    bootstrap.check_seeds(read_seeds(seeds_path), str(seeds_path), needs_instances)


def check_timezone(name: str) -> str:
    """An IANA time zone name, as DBOS's scheduler reads the cron in it (zoneinfo)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadInput(f"--timezone: '{name}' is not an IANA time zone (e.g. UTC, Europe/Paris, America/New_York)") from None
    return name
