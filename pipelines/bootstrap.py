"""The bootstrap loop Self-Instruct and Alpaca share: batches until the target is reached, with the store as the
only state, so a resumed run makes the decisions of an uninterrupted one.

Each pipeline gives the loop one function, `one_batch(batch_number, requests, rng)`, that builds its prompts,
generates, parses, filters and stores one batch in one transaction (pipelines/self_instruct.py, pipelines/alpaca.py).
This module holds what is the same for both: seeds and pool in the store, the request budget and stall guard, the
prompt's raw or chat rendering, and the end-of-batch accounting.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sqlalchemy import true
from sqlmodel import Session, func, select

from datagen import cost, sigterm
from datagen.backends import Backend, Request, Result
from datagen.errors import BadInput
from datagen.jsonl import read_config_file
from pipelines.seeds import SeedInstance, SeedTask
from storage.store import touch
from storage.tables import Generation, Instance, Run, StageTime, Task


class BootstrapConfig(BaseModel):
    """The knobs Self-Instruct and Alpaca share: the target, the batches, the sampling, the filters, the stop rules.
    Each pipeline's config (pipelines/self_instruct.py SelfInstructConfig, pipelines/alpaca.py AlpacaConfig) adds its
    own and redeclares those whose default or source differs; every default's citation is on its field.

    Strict types: a YAML `temperature: hot` or `max_requests: 2.5` is an error naming the option, not a coercion."""

    model_config = ConfigDict(strict=True, extra="forbid", use_attribute_docstrings=True)

    batch_sizes: ClassVar[tuple[int, int]]
    """Default max_request_batch_size on transformers (a padded batch) and on vllm/openai (continuous batching)."""

    num_instructions: int = 100
    """Accepted generated instructions to reach (both references' default is 100)."""
    num_prompt_instructions: int
    request_batch_size: int | None = None
    """Requests per batch, one backend call. None: the ramp (ramp_size) from the references' 5, up to
    max_request_batch_size. A number: that many every batch."""
    max_request_batch_size: int | None = None
    """The ramp's ceiling. None: the pipeline's batch_sizes, the first on transformers, the second on vllm/openai."""
    temperature: float
    top_p: float
    max_tokens: int
    rouge_threshold: float = 0.7
    """Reject when ROUGE-L F-measure > 0.7 against any seed or kept instruction (Self-Instruct section 2.3; both
    references: `if max(rouge_scores) > 0.7`)."""
    tokenizer: str = "rouge"
    """ROUGE tokenizer: rouge (rouge-score's own, the references') or unicode (words of any script, for non-English
    data: rouge-score drops every non-[a-z0-9] character)."""
    blacklist: tuple[str, ...] = Field(strict=False)
    """Whole words, any case (a YAML list is read as a tuple)."""
    require_ascii_start: bool = True
    """Reject instructions whose first character is not ASCII (references); turn off for non-English data."""
    prompt_style: str = "auto"
    """raw (the paper's completion prompt), chat (the same request through the chat template), or auto (chat when
    the model has a chat template)."""
    length_cut: str
    max_requests: int | None = None
    """Stop (status 'stopped') after this many instruction requests in the run; None: no limit."""
    max_stalled_batches: int = 5
    """Stop with a message after this many batches in a row accept nothing (ours: a guard the references lack)."""
    seed: int = 0
    """Seeds the sampling of in-context examples and the backend's sampling."""

    positive: ClassVar[tuple[str, ...]] = ()
    """Further fields of the pipeline that must be >= 1."""

    @model_validator(mode="after")
    def _check_ranges(self) -> BootstrapConfig:
        check_bootstrap_config(self, self.positive)
        return self


def check_bootstrap_config(config: BootstrapConfig, positive: Sequence[str] = ()) -> None:
    """The range checks Self-Instruct's and Alpaca's configs share, as BadInput naming the option's flag."""
    if config.num_instructions < 1:
        raise BadInput(f"--num-instructions must be at least 1, got {config.num_instructions}")
    if not config.temperature >= 0 or math.isinf(config.temperature):  # "not >=" also catches NaN
        raise BadInput(f"--temperature must be a number >= 0, got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise BadInput(f"--top-p must be in (0, 1], got {config.top_p}")
    if not 0 <= config.rouge_threshold <= 1:
        raise BadInput(f"--rouge-threshold must be in [0, 1], got {config.rouge_threshold}")
    if config.prompt_style not in ("auto", "raw", "chat"):
        raise BadInput(f"--prompt-style must be raw, chat or auto, got {config.prompt_style}")
    if config.length_cut not in ("drop_response", "drop_last"):
        raise BadInput(f"length_cut must be drop_response or drop_last, got {config.length_cut}")
    if config.tokenizer not in ("rouge", "unicode"):
        raise BadInput(f"--tokenizer must be rouge or unicode, got {config.tokenizer}")
    sizes = ("max_tokens", "num_prompt_instructions", "max_stalled_batches", *positive)
    for name in sizes:
        if getattr(config, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**SEED_BITS:
        raise BadInput(f"--seed must be in [0, 2^{SEED_BITS}), got {config.seed}")
    for name in ("request_batch_size", "max_request_batch_size"):
        value = getattr(config, name)
        if value is not None and not 1 <= value <= 2**INDEX_BITS:
            raise BadInput(f"--{name.replace('_', '-')} must be in [1, {2**INDEX_BITS}], got {value}")
    if config.max_requests is not None and config.max_requests < 1:
        raise BadInput(f"--max-requests must be at least 1, got {config.max_requests}")


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "tuple": "a list of strings"}
"""pydantic's error type prefixes (int_type, float_parsing, ...) as the words of a one-line BadInput."""


def load_config(cls: type[BootstrapConfig], path: Path | None = None, flags: dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> BootstrapConfig:  # fmt: skip
    """The config from, in increasing priority: `base` (a resumed run's stored config), the YAML file, `flags` (those
    not None; enums by value). Every check runs here, before any store is opened or model loaded: an unknown or
    mistyped option is BadInput naming the file and the key, a value out of range names the option."""
    known = set(cls.model_fields)
    values = {k: v for k, v in (base or {}).items() if k in known}
    source = "options"
    if path is not None:
        source = str(path)
        loaded = read_config_file(path)
        for key in loaded:
            if str(key).replace("-", "_") not in known:
                raise BadInput(f"{path}: unknown option '{key}' (known: {', '.join(sorted(known))})")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v.value if isinstance(v, enum.Enum) else v for k, v in (flags or {}).items() if v is not None})
    return validate_config(cls, values, source)


def validate_config(cls: type[BootstrapConfig], values: dict[str, Any], source: str = "options") -> BootstrapConfig:
    """`cls(**values)` with pydantic's errors as one BadInput line: "{source}: option 'temperature' must be a number,
    got 'hot'"."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "config"
        if first["type"] == "extra_forbidden":
            raise BadInput(f"{source}: unknown option '{key}' (known: {', '.join(sorted(cls.model_fields))})") from None
        kind = _KINDS.get(first["type"].split("_")[0])
        if kind is None:
            raise BadInput(f"{source}: option '{key}': {first['msg']}") from None
        raise BadInput(f"{source}: option '{key}' must be {kind}, got {first['input']!r}") from None


def config_values(params: dict[str, Any], cls: type[BootstrapConfig]) -> dict[str, Any]:
    """A command's parameters (or a job's parsed options) as config field values: the one flag->config mapping of
    `datagen self-instruct`, `datagen alpaca` and their jobs. `allow_non_ascii` is the inverse of
    require_ascii_start; parameters that are not config fields (seeds, run, model, db) are left out."""
    values = {k: v for k, v in params.items() if k in cls.model_fields}
    if params.get("allow_non_ascii") is not None:
        values["require_ascii_start"] = not params["allow_non_ascii"]
    return values


SEED_BITS, BATCH_BITS, INDEX_BITS = 31, 20, 12
"""A request's sampling seed packs (run seed, batch, request index) into 63 bits: distinct for distinct triples, and
within the signed 64-bit range vLLM, its OpenAI server and torch accept."""


def request_seed(seed: int, batch: int, index: int) -> int:
    """The sampling seed of request `index` of batch `batch`: its own, so no two requests of a run draw the same
    random numbers (one seed per batch made every request of a batch sample alike on vLLM and OpenAI servers)."""
    if not (0 <= seed < 2**SEED_BITS and 0 <= batch < 2**BATCH_BITS and 0 <= index < 2**INDEX_BITS):
        raise ValueError(f"seed {seed}, batch {batch}, request {index} do not fit a 63-bit sampling seed")
    return (seed << (BATCH_BITS + INDEX_BITS)) | (batch << INDEX_BITS) | index


CONTINUOUS_BATCHING = ("vllm", "openai")
"""Backends whose engine schedules any number of requests together (vLLM in process, or any OpenAI-compatible server
such as `vllm serve`), so larger batches and requests of two batches in one call keep it busy. The transformers
backend pads a batch to its longest request and runs it to its longest completion, so it keeps the small batch."""


def for_backend(config, backend: str):
    """The config with the defaults that depend on the backend filled in: `max_request_batch_size` (None: the config's
    `batch_sizes`, the first on transformers, the second on continuous-batching engines) and, where the pipeline has
    it, `pipelined` (None: on for those engines). The CLI stores the filled config, so a resumed run keeps them."""
    engine = backend in CONTINUOUS_BATCHING
    padded, continuous = type(config).batch_sizes
    filled = {"max_request_batch_size": config.max_request_batch_size or (continuous if engine else padded)}
    if getattr(config, "pipelined", False) is None:
        filled["pipelined"] = engine
    return config.model_copy(update=filled)


RAMP_START = 5
"""The ramp's first batch size: the reference's `--request_batch_size` 5 (bootstrap_instructions.py)."""
RAMP_POOL_SHARE = 0.10
"""The ramp grows a batch while it adds at most this share of the machine pool, as the run's rate so far predicts:
prompts then sample their machine instructions from a pool at most about 10% staler than the reference's."""


def ramp_size(pool: int, added: int, requests: int, cap: int) -> int:
    """Requests for the next batch under the ramp: RAMP_START until the pool is large enough, then as many as add
    RAMP_POOL_SHARE of the pool at the run's rate so far (`added` pool instructions from `requests` instruction
    requests), at most `cap` (where the engine is full: bench/saturation.py)."""
    size = RAMP_START if not added else max(RAMP_START, math.floor(RAMP_POOL_SHARE * pool * requests / added))
    return max(1, min(cap, size))


def config_dict(config: BootstrapConfig) -> dict:
    """The config as the run row stores it (JSON: tuples as lists)."""
    return config.model_dump(mode="json")


# ---- prompts: raw or through the chat template -------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A request in two parts: what is asked (`ask`) and the start of the answer (`answer`), which the model continues.

    Raw style joins them with a newline: the reference's completion prompt. Chat style makes `ask` the user's turn of
    the model's chat template and `answer` the beginning of the assistant's turn.
    """

    ask: str
    answer: str

    def render(self, chat_template: Callable[[list[dict[str, str]]], str] | None) -> str:
        if chat_template is None:
            return f"{self.ask}\n{self.answer}"
        return chat_template([{"role": "user", "content": self.ask}]) + self.answer.lstrip("\n")


def uses_chat(backend: Backend, prompt_style: str) -> bool:
    """auto: chat when the backend can render the model's chat template."""
    if prompt_style != "auto":
        return prompt_style == "chat"
    try:
        backend.render_chat([{"role": "user", "content": "Hi"}])
    except Exception:  # no template, or a remote model without a local tokenizer
        return False
    return True


# ---- the store: seeds, pool and index, rebuilt on resume ----------------------------------------------------------

POOL_REASONS = ("no_valid_instances", "target_reached")
"""Rejected after passing the similarity filter: such instructions stay in the similarity index and the machine pool,
as they did in the uninterrupted run (the reference's pool is everything that passed ROUGE-L)."""


def store_seeds(session: Session, run: Run, seeds: Sequence[SeedTask]) -> None:
    """Seeds are tasks of the run (source='seed') with their instances, so a resumed run needs only the store."""
    for seed in seeds:
        task = Task(run_id=run.id, source="seed", seed_id=seed.id, instruction=seed.instruction,
                    is_classification=seed.is_classification, status="accepted")  # fmt: skip
        session.add(task)
        session.flush()
        session.add_all(Instance(task_id=task.id, input=i.input, output=i.output) for i in seed.instances)


def load_seeds(session: Session, run: Run) -> list[SeedTask]:
    tasks = session.exec(select(Task).where(Task.run_id == run.id, Task.source == "seed").order_by(Task.id)).all()
    instances: dict[int, list[SeedInstance]] = {}
    rows = session.exec(select(Instance).where(Instance.task_id.in_([t.id for t in tasks])).order_by(Instance.id)).all()
    for row in rows:
        instances.setdefault(row.task_id, []).append(SeedInstance(row.input, row.output))
    return [SeedTask(t.seed_id or str(t.id), t.instruction, tuple(instances.get(t.id, ())), t.is_classification) for t in tasks]


def load_pool(session: Session, run: Run) -> list[str]:
    """Generated instructions that passed the similarity filter, in the order they were decided."""
    passed = (Task.status == "accepted") | Task.reason.in_(POOL_REASONS)
    query = select(Task.instruction).where(Task.run_id == run.id, Task.source == "generated", passed).order_by(Task.id)
    return list(session.exec(query).all())


def check_seeds(seeds: Sequence[SeedTask], path: str, needs_instances: bool) -> None:
    """Checks the pipeline needs beyond the file's format; file and field are named."""
    if needs_instances and not any(s.instances for s in seeds):
        raise BadInput(f"{path}: no seed task has instances (field 'instances', or 'output'): they are the worked examples")


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    """What one batch (or a whole session of batches) did; the store holds the same figures per row."""

    requests: int = 0
    generated: int = 0
    """Instructions parsed out of the completions."""
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    empty_responses: int = 0
    """Completions with no instruction in them (their raw text is in the generation table)."""
    generate_seconds: float = 0.0
    """Wall time inside the backend's generate calls."""
    score_seconds: float = 0.0
    """Wall time scoring answers under the student (best-of-k's ifd rule)."""
    filter_seconds: float = 0.0
    """Wall time parsing, filtering and storing, the rest of the batch (`filtering_time`)."""

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def add(self, other: BatchStats) -> None:
        self.requests += other.requests
        self.generated += other.generated
        self.accepted += other.accepted
        self.empty_responses += other.empty_responses
        self.generate_seconds += other.generate_seconds
        self.score_seconds += other.score_seconds
        self.filter_seconds += other.filter_seconds
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count


class LoopSettings(Protocol):
    num_instructions: int
    request_batch_size: int | None
    max_request_batch_size: int
    max_requests: int | None
    max_stalled_batches: int
    seed: int


def bootstrap(
    session: Session,
    run: Run,
    config: LoopSettings,
    one_batch: Callable[[int, int, random.Random], BatchStats],
    on_batch: Callable[[Run, BatchStats], None],
    backend: Backend,
) -> BatchStats:
    """Batches until `num_instructions` are accepted, a request budget is spent, or the run stalls.

    `one_batch(batch_number, requests, rng)` generates, filters and adds one batch to the session; the loop commits
    it, one transaction a batch. Each batch gets its own random generator seeded by the string "seed/batch"
    (collision-free, unlike seed * k + batch), so a resumed run does not repeat earlier prompts. SIGTERM stops the
    loop before its next batch (datagen/sigterm.py).
    """
    batch_number = next_batch_number(session, run)
    totals = BatchStats()
    while run.accepted < config.num_instructions:
        sigterm.check(batch_number - 1)
        requests = batch_requests(session, run, config, decided_through=batch_number - 1, pending=0)
        if requests == 0:
            break
        stats = one_batch(batch_number, requests, batch_rng(config, batch_number))
        add_stage_times(session, run, stats, backend)
        session.commit()
        totals.add(stats)
        batch_number += 1
        on_batch(run, stats)
    else:
        touch(run, status="completed", error=None)
    session.add(run)
    session.commit()
    return totals


@dataclass
class Drafted:
    """A batch whose instruction phase is decided (generated, filtered, classified), waiting for its last requests
    (the instance prompts): `finish(results)` parses them and adds the whole batch to the session."""

    requests: list[Request]
    finish: Callable[[list[Result]], BatchStats]
    stats: BatchStats
    reaches_target: bool = False
    """Enough of its instructions passed the filter to reach the target if their instances are valid: the pipelined
    loop then sends no next batch with it, which would be generated only to be discarded."""


class TwoPhases(Protocol):
    """A pipeline whose batch is instruction requests, then requests that depend on their answers (Self-Instruct)."""

    def instruction_requests(self, batch_number: int, n_requests: int, rng: random.Random) -> list[Request]: ...

    def draft(self, batch_number: int, requests: list[Request], results: list[Result], rng: random.Random,
              stats: BatchStats) -> Drafted: ...  # fmt: skip


def bootstrap_pipelined(
    session: Session, run: Run, config: LoopSettings, phases: TwoPhases, backend: Backend, on_batch: Callable[[Run, BatchStats], None]
) -> BatchStats:
    """The loop with two batches in flight: batch k's instruction requests go to the backend in the same call as
    batch k-1's instance requests, so a continuous-batching engine never waits for one phase's longest completion
    with nothing else to run (issue 16, bench/saturation.py).

    Batch k's prompts see the pool after batch k-1's similarity filter, as in the sequential loop, and batch k's
    filter and target cap come after batch k-1 is stored. Batch k is held back while batch k-1 can still reach the
    target (enough of its instructions passed the filter): batch k-1's instances then go alone, and batch k goes
    out only if they fall short, so no batch is generated only to be discarded. Every decision is the sequential
    loop's except how many requests batch k sends and when the stall guard stops: both are decided from the batches
    before k-1 (the last ones stored when batch k goes out). They come from the store, so a resumed run makes the
    uninterrupted run's decisions where the engine's output for a request does not depend on which requests share
    its call (vLLM and OpenAI-compatible servers with a per-request seed: up to batch-invariance of their kernels).
    """
    batch_number = next_batch_number(session, run)
    totals = BatchStats()
    pending: Drafted | None = None
    pending_requests = 0  # instruction requests of the pending batch, not yet in the store
    finished: list[BatchStats] = []

    def commit() -> None:
        for stats in finished:
            add_stage_times(session, run, stats, backend)
        session.commit()
        for stats in finished:
            totals.add(stats)
            on_batch(run, stats)
        finished.clear()

    def finish_alone(drafted: Drafted) -> None:
        """The batch in flight, when no next batch goes out with it (the run stops): its requests alone, stored."""
        finished.append(drafted.finish(timed_generate(backend, drafted.requests, drafted.stats)))
        commit()

    while run.accepted < config.num_instructions:
        # SIGTERM: the batch in flight is finished and stored first; and a batch that can reach the target goes
        # alone: the next batch goes out only if it falls short (an instance step that fails).
        if pending is not None and (sigterm.requested() or pending.reaches_target):
            finish_alone(pending)
            pending, pending_requests = None, 0
            continue  # it may have reached the target
        sigterm.check(batch_number - 1)
        requests = batch_requests(session, run, config, decided_through=batch_number - 2, pending=pending_requests)
        if requests == 0:
            if pending is not None:  # a stopped run still stores the batch in flight
                finish_alone(pending)
            break
        rng = batch_rng(config, batch_number)
        stats = BatchStats(requests=requests)
        first = phases.instruction_requests(batch_number, requests, rng)
        carried = pending.requests if pending is not None else []
        results = timed_generate(backend, first + carried, stats)
        if pending is not None:
            finished.append(pending.finish(results[len(first) :]))
        drafted = phases.draft(batch_number, first, results[: len(first)], rng, stats)
        if drafted.requests:
            pending, pending_requests = drafted, requests
        else:  # nothing passed, or batch k-1 reached the target: stored in its transaction
            finished.append(drafted.finish([]))
            pending, pending_requests = None, 0
        commit()
        batch_number += 1
    if run.accepted >= config.num_instructions:
        touch(run, status="completed", error=None)
    session.add(run)
    session.commit()
    return totals


def batch_rng(config: LoopSettings, batch_number: int) -> random.Random:
    return random.Random(f"{config.seed}/{batch_number}")


def batch_requests(session: Session, run: Run, config: LoopSettings, decided_through: int, pending: int) -> int:
    """How many instruction requests the next batch sends, from the batches up to `decided_through` in the store
    (the keep rate near the target, the stall guard), and the run's instruction requests so far (`pending`: those
    of a batch in flight, not yet stored) for the request budget; 0, with the run's status set, when it stops."""
    done = _instruction_requests(session, run) + pending
    if config.max_requests is not None and done >= config.max_requests:
        touch(run, status="stopped", error=f"--max-requests {config.max_requests} reached")
        return 0
    stalled = stalled_batches(session, run, decided_through)
    if stalled >= config.max_stalled_batches:
        touch(run, status="stopped", error=f"{stalled} batches in a row accepted nothing; the model may be repeating "
              "itself: try another --seed, a higher --temperature, or the other --prompt-style")  # fmt: skip
        return 0
    accepted = run.accepted - _accepted_after(session, run, decided_through)
    kept = _accepted_from_requests(session, run, decided_through)
    sent = _instruction_requests(session, run, decided_through)
    pool, added = _pool_size(session, run, decided_through), _pool_size(session, run, decided_through, from_requests=True)
    size = config.request_batch_size or ramp_size(pool, added, sent, config.max_request_batch_size)
    requests = requests_needed(config.num_instructions - accepted, kept, sent, size)
    if config.max_requests is not None:
        requests = min(requests, config.max_requests - done)
    return requests


def next_batch_number(session: Session, run: Run) -> int:
    return (session.exec(select(func.max(Generation.batch)).where(Generation.run_id == run.id)).one() or 0) + 1


def requests_needed(remaining: int, accepted: int, requests: int, batch_size: int) -> int:
    """A full batch, or near the target about 1.5 times the requests the run's keep rate says are needed.

    `accepted` and `requests` are the whole run's, from the store, so a resumed run asks what the uninterrupted
    one would have asked."""
    if not accepted or not requests:
        return batch_size
    return max(1, min(batch_size, math.ceil(1.5 * remaining * requests / accepted)))


def stalled_batches(session: Session, run: Run, through: int | None = None) -> int:
    """Instruction batches in a row, the latest ones (up to batch `through`), that accepted nothing: from the store,
    so the stall guard counts across a resume as in an uninterrupted run."""
    accepted_in = (
        select(func.max(Generation.batch))
        .join(Task, Task.generation_id == Generation.id)
        .where(Generation.run_id == run.id, Task.source == "generated", Task.status == "accepted", _upto(through))
    )
    last = session.exec(accepted_in).one() or 0
    query = select(func.count(func.distinct(Generation.batch))).where(
        Generation.run_id == run.id, Generation.purpose == "instructions", Generation.batch > last, _upto(through)
    )
    return session.exec(query).one()


def _upto(through: int | None):
    return Generation.batch <= through if through is not None else true()


def _accepted_from_requests(session: Session, run: Run, through: int | None = None) -> int:
    """Accepted instructions that came out of this run's requests (a pool imported into the store has none)."""
    query = (
        select(func.count())
        .select_from(Task)
        .join(Generation, Task.generation_id == Generation.id)
        .where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted", _upto(through))
    )
    return session.exec(query).one()


def _pool_size(session: Session, run: Run, through: int, from_requests: bool = False) -> int:
    """Generated instructions that passed the similarity filter in the batches up to `through`, and those imported
    into the store (no generation) unless `from_requests`: the machine pool the prompts sample from."""
    passed = (Task.status == "accepted") | Task.reason.in_(POOL_REASONS)
    in_batches = Generation.batch <= through
    query = (
        select(func.count())
        .select_from(Task)
        .outerjoin(Generation, Task.generation_id == Generation.id)
        .where(Task.run_id == run.id, Task.source == "generated", passed)
        .where(in_batches if from_requests else in_batches | Task.generation_id.is_(None))
    )
    return session.exec(query).one()


def _accepted_after(session: Session, run: Run, batch: int) -> int:
    """Accepted instructions of the batches after `batch` (already counted in run.accepted)."""
    query = (
        select(func.count())
        .select_from(Task)
        .join(Generation, Task.generation_id == Generation.id)
        .where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted", Generation.batch > batch)
    )
    return session.exec(query).one()


def _instruction_requests(session: Session, run: Run, through: int | None = None) -> int:
    query = select(func.count()).select_from(Generation).where(
        Generation.run_id == run.id, Generation.purpose == "instructions", _upto(through)
    )
    return session.exec(query).one()


def timed_generate(backend: Backend, requests: list[Request], stats: BatchStats) -> list[Result]:
    started = time.perf_counter()
    results = backend.generate(requests) if requests else []
    stats.generate_seconds += time.perf_counter() - started
    return results


@contextmanager
def filtering_time(stats: BatchStats) -> Iterator[None]:
    """Adds the block's wall time, less what it spent generating and scoring, to `stats.filter_seconds`."""
    started, generating, scoring = time.perf_counter(), stats.generate_seconds, stats.score_seconds
    try:
        yield
    finally:
        busy = stats.generate_seconds - generating + stats.score_seconds - scoring
        stats.filter_seconds += max(0.0, time.perf_counter() - started - busy)


def finish_batch(session: Session, run: Run, tasks: Sequence[Task], stats: BatchStats) -> BatchStats:
    """The end-of-batch accounting: rejections counted by reason, the run's counters; the loop commits the batch."""
    for task in tasks:
        if task.status == "rejected":
            stats.reject(task.reason)
    run.accepted += stats.accepted
    run.rejected += sum(stats.rejected.values())
    touch(run)
    session.add_all(tasks)
    session.add(run)
    session.flush()
    return stats


def add_stage_times(session: Session, run: Run, stats: BatchStats, backend: Backend) -> None:
    """The batch's seconds per stage, in the batch's transaction (datagen/cost.py prices them): generation and
    scoring on the backend's device, filtering on the machine the run holds."""
    device = cost.backend_device(backend)
    times = {"generation": (device, stats.generate_seconds), "scoring": (device, stats.score_seconds),
             "filtering": ("cpu" if device == "remote" else device, stats.filter_seconds)}  # the machine held  # fmt: skip
    session.add_all(StageTime(run_id=run.id, stage=stage, device=where, model=backend.model, seconds=seconds)
                    for stage, (where, seconds) in times.items() if seconds > 0)  # fmt: skip
