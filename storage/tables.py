"""SQLModel tables: every run, every model call, every instruction and instance, with provenance.

Data flows run → generation → task → instance: each accepted or rejected row points at the
generation (exact prompt, raw completion, sampling settings) that produced it. Seeds are tasks
too (source='seed', no generation), so a run's pool can be rebuilt from the store alone.
Table models do not validate on plain construction (sqlmodel #225, #453): build rows with
`Model.model_validate({...})` where the input is not already typed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 3
"""Bump when a table changes shape; `storage.store.open_engine` refuses a database newer than this.
2: job.shard_size (sharded Toolformer jobs). 3: job.timezone (cron in a time zone)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SchemaInfo(SQLModel, table=True):
    __tablename__ = "schema_info"
    key: str = Field(primary_key=True)
    value: str


class Run(SQLModel, table=True):
    """One pipeline run: its full configuration, what it ran on, where it stands, and its counters."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    pipeline: str = Field(index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model: str
    backend: str
    status: str = "running"
    """running, completed, failed or stopped (a stall guard or request limit ended it early)."""
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    requests: int = 0
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    instances: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation(SQLModel, table=True):
    """One completion from a backend: the exact prompt, the raw text, and how it was sampled."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    purpose: str = Field(index=True)
    """What the call was for: instructions, classification, instances, generate, api_calls, ..."""
    batch: int = 0
    """The run's batch number, for keep-rate-over-time reports."""
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    completion: str = Field(sa_column=Column(Text, nullable=False))
    finish_reason: str
    sampling: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    created_at: datetime = Field(default_factory=utcnow)


class Task(SQLModel, table=True):
    """An instruction: a seed, or one parsed out of a generation, with the filter's verdict."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    source: str = "generated"
    """seed or generated."""
    seed_id: str | None = None
    instruction: str = Field(sa_column=Column(Text, nullable=False))
    is_classification: bool | None = None
    status: str = Field(default="accepted", index=True)
    """accepted or rejected."""
    reason: str | None = None
    """Why a rejected instruction was dropped (the first filter that failed)."""
    nearest: str | None = Field(default=None, sa_column=Column(Text))
    """The most similar instruction already kept (seeds included), and its ROUGE-L F."""
    similarity: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Instance(SQLModel, table=True):
    """An input/output pair of a task, with the instance filters' verdict."""

    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    input: str = Field(default="", sa_column=Column(Text, nullable=False))
    output: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="accepted", index=True)
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class InstanceSample(SQLModel, table=True):
    """One of the k answers drawn for an instruction under best-of-k (`instance_samples` > 1), with its verdict: the
    rule's score and whether it was the one kept. Its instances are rows of `instance` pointing at the same
    generation; those of a sample not chosen are rejected with reason `not_chosen_<rule>`."""

    __tablename__ = "instance_sample"
    __table_args__ = (UniqueConstraint("task_id", "sample"),)
    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    """The completion this answer came from (Alpaca's sample 0: the record's own instruction response)."""
    sample: int
    """0 .. k-1."""
    seed: int | None = None
    """The sampling seed of its request (pipelines/best_of_k.py, sample_seed)."""
    rule: str
    """consistent or ifd."""
    score: float | None = None
    """consistent: mean ROUGE-L F to the other candidate samples; ifd: mean IFD of its valid instances under the
    student. None: the sample had no valid instance, so it was not a candidate."""
    chosen: bool = Field(default=False, index=True)
    reason: str | None = None
    """Why it was not chosen: not_chosen_<rule>, or no_valid_instances."""
    created_at: datetime = Field(default_factory=utcnow)


class StageTime(SQLModel, table=True):
    """Seconds a stage of a run held its device, for cost accounting (datagen/cost.py prices them at display time).
    One row per stage per committed batch or step; a run's total for a stage is the sum. Tokens are the run's
    prompt_tokens and completion_tokens."""

    __tablename__ = "stage_time"
    id: int | None = Field(default=None, primary_key=True)
    run_id: int | None = Field(default=None, foreign_key="run.id", index=True)
    training_run_id: int | None = Field(default=None, foreign_key="training_run.id", index=True)
    loop_id: int | None = Field(default=None, foreign_key="loop.id", index=True)
    stage: str
    """generation, filtering, scoring, dedup, training or eval."""
    device: str
    """cuda, cpu, or remote (an API server: priced by tokens, not by the hour)."""
    model: str | None = None
    seconds: float = 0.0
    """Wall-clock seconds the stage held the device."""
    created_at: datetime = Field(default_factory=utcnow)


class ToolformerText(SQLModel, table=True):
    """A corpus text after Toolformer annotation (Schick et al. 2023): the text with its kept API calls
    inserted. One row per processed text, so a rerun of the run skips it. The fine-tuning data C* is
    `annotated` where `calls_inserted > 0` (the paper drops texts whose calls were all filtered out)."""

    __table_args__ = (UniqueConstraint("run_id", "line"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    line: int
    """Line of the text in the corpus file (1-based)."""
    source_id: str | None = None
    """The record's `id` field, if it has one."""
    text: str = Field(sa_column=Column(Text, nullable=False))
    date: str | None = None
    """The date the Calendar tool used (ISO), from the record or the configuration."""
    tools: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """Tools whose pre-filter this text passed (the calculator needs three numbers, the calendar a date)."""
    annotated: str = Field(sa_column=Column(Text, nullable=False))
    """The text with kept calls inserted, e.g. "... 400 (or [Calculator(400 / 1400) -> 0.29] 29%) passed ..."."""
    calls_inserted: int = Field(default=0, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class ApiCall(SQLModel, table=True):
    """One sampled API call of a Toolformer run, with every number the filter used (paper, section 2)."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    text_id: int = Field(foreign_key="toolformertext.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    """The sampling generation (exact prompt P(x), x_1..x_{i-1}, <API>) this call came from."""
    tool: str = Field(index=True)
    """calculator, calendar, wikisearch or qa."""
    position: int
    """Character offset in the text where the call goes (before the whitespace that starts word i)."""
    token_position: int
    """i: index of the first token after the call, in the text's tokens."""
    p_api: float | None = None
    """p_i = p_M(<API> | P(x), x_1..x_{i-1}); None where a top-K backend did not see it."""
    completion: str = Field(sa_column=Column(Text, nullable=False))
    """The raw sampled text after <API>, up to </API>."""
    call: str | None = Field(default=None, sa_column=Column(Text))
    """The parsed call as the model wrote it, e.g. "Calculator(400 / 1400)"."""
    argument: str | None = Field(default=None, sa_column=Column(Text))
    result: str | None = Field(default=None, sa_column=Column(Text))
    status: str = Field(index=True)
    """kept, rejected (by the loss filter), duplicate, unclosed, unparsed or failed (the tool raised)."""
    reason: str | None = Field(default=None, sa_column=Column(Text))
    loss_empty: float | None = None
    """L_i(empty): no call."""
    loss_call: float | None = None
    """L_i(e(c, empty)): the call without its result."""
    loss_plus: float | None = None
    """L+ = L_i(e(c, r))."""
    loss_minus: float | None = None
    """L- = min(loss_empty, loss_call); the call is kept if L- - L+ >= tau_f."""
    kept: bool = Field(default=False, index=True)
    inserted: bool = False
    """In the annotated text: the best kept call at its position, over all tools."""
    created_at: datetime = Field(default_factory=utcnow)


class TrainingRun(SQLModel, table=True):
    """One `datagen train` run: the dataset it read, the generation runs behind that data, where the result went,
    and the measured figures (also in OUT/train_summary.json)."""

    __tablename__ = "training_run"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    method: str
    """full, lora, qlora or dora."""
    model: str
    """The base model as given (embedded name, folder or hub id)."""
    dataset: str = Field(sa_column=Column(Text, nullable=False))
    """The export folder trained on (absolute path)."""
    dataset_format: str
    dataset_runs: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """datagen.json "runs" of the export, as written there (names); linked rows are in training_run_source."""
    out: str = Field(sa_column=Column(Text, nullable=False))
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "running"
    """running, completed or failed (a killed run stays running until --resume completes it)."""
    error: str | None = Field(default=None, sa_column=Column(Text))
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """train_summary.json: tokens/s, peak memory, losses, step and token counts."""
    steps: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class TrainingRunSource(SQLModel, table=True):
    """Links a training run to each generation run whose rows were in its dataset."""

    __tablename__ = "training_run_source"
    training_run_id: int = Field(foreign_key="training_run.id", primary_key=True)
    run_id: int = Field(foreign_key="run.id", primary_key=True)


class LongContextEval(SQLModel, table=True):
    """One `datagen eval-long`: perplexity by length and passkey accuracy by length and depth of a model (and of
    its baseline, before the extension), linked to the training run that made it when one was named."""

    __tablename__ = "long_context_eval"
    id: int | None = Field(default=None, primary_key=True)
    model: str
    baseline: str | None = None
    training_run_id: int | None = Field(default=None, foreign_key="training_run.id", index=True)
    out: str = Field(sa_column=Column(Text, nullable=False))
    """The folder holding eval_long.json and the plots."""
    results: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """eval_long.json: per model, perplexity by length and passkey accuracy by length and depth; the table."""


class ManualVerdict(SQLModel, table=True):
    """A verdict given by hand in `datagen ui --allow-edits`: who rejected which instruction, when and why. The pipeline's
    own verdict on the task stays as it was; export leaves out every task with a manual rejection."""

    __tablename__ = "manual_verdict"
    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    verdict: str = "rejected"
    reason: str = Field(sa_column=Column(Text, nullable=False))
    curator: str
    """Who gave the verdict (the name in the form; the server's user by default)."""
    created_at: datetime = Field(default_factory=utcnow)


class RunLock(SQLModel, table=True):
    """The process writing a run, while it writes (storage/run_lock.py): one writer per run."""

    __tablename__ = "run_lock"
    run_name: str = Field(primary_key=True)
    holder: str
    """Who holds it, as a second starter is told: "worker 3f2a... pid 4242 on gpu-1"."""
    host: str
    pid: int
    """A holder on this machine whose pid is gone died: its run is taken over at once, without the timeout."""
    token: str
    """Random per hold, so a holder that lost the row to a takeover cannot delete or refresh the new holder's."""
    acquired_at: float
    heartbeat_at: float
    """Unix seconds of the holder's last beat; older than the timeout means the holder died."""


class Job(SQLModel, table=True):
    """A recurring generation job (`datagen jobs add`); DBOS's scheduler fires it, a `datagen worker` runs it."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    """Also the name of the job's run, which each firing resumes, and of its DBOS schedule."""
    pipeline: str
    """self-instruct, alpaca or toolformer."""
    args: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """The pipeline command's options, as on its command line: ["--seeds", "seeds.jsonl", "--config", "si.yaml"]."""
    schedule: str
    """Six-field cron, seconds first (DBOS's scheduler): "0 0 */6 * * *" for --every 6h."""
    timezone: str = "UTC"
    """The IANA time zone the schedule is read in (DBOS's cron_timezone): "0 0 3 * * *" in Europe/Paris fires at
    03:00 Paris time, 02:00 UTC in winter and 01:00 UTC in summer."""
    every: str | None = None
    """The --every given, for display."""
    target: int | None = None
    """Per run: accepted instructions (or corpus texts) to add beyond what the run already has; None: the options' own."""
    shard_size: int | None = None
    """Toolformer: corpus texts per shard; each firing queues one run per shard (datagen/shards.py). None: one run."""
    queue: str = "datagen"
    enabled: bool = True
    created_at: datetime = Field(default_factory=utcnow)


class JobMissed(SQLModel, table=True):
    """A firing of a job that fell while no worker ran (datagen/jobs/worker.py backfill), whether the job's backfill
    policy ran it late or not."""

    __tablename__ = "job_missed"
    __table_args__ = (UniqueConstraint("job", "scheduled_at"),)
    id: int | None = Field(default=None, primary_key=True)
    job: str = Field(index=True)
    scheduled_at: datetime
    """When it was due (UTC)."""
    backfilled: bool
    """Run late (policy `all`, or the latest one under `latest`), or only recorded (`none`, the older ones under `latest`)."""
    recorded_at: datetime = Field(default_factory=utcnow)


class WorkerBeat(SQLModel, table=True):
    """A live `datagen worker`'s heartbeat; workflows of an executor whose beat is stale are recovered by another."""

    __tablename__ = "worker_beat"
    executor_id: str = Field(primary_key=True)
    """DBOS executor id of the worker process."""
    holder: str
    """host and pid, for `datagen jobs show`."""
    beat_at: float
    """Unix seconds."""


class Loop(SQLModel, table=True):
    """One `datagen e2e` loop: generate → dedup → export → train → evaluate, for some rounds (datagen/e2e.py)."""

    __tablename__ = "loop"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    out: str = Field(sa_column=Column(Text, nullable=False))
    """The folder holding report.md, metrics.json and each round's artifacts."""
    status: str = "running"
    """running, completed or failed (a killed loop stays running until a rerun completes it)."""
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class LoopStage(SQLModel, table=True):
    """One stage of a loop's round, linked to the row it made: a generation run, a training run, or a folder.
    A rerun skips a stage whose row is completed."""

    __tablename__ = "loop_stage"
    __table_args__ = (UniqueConstraint("loop_id", "round", "stage"),)
    id: int | None = Field(default=None, primary_key=True)
    loop_id: int = Field(foreign_key="loop.id", index=True)
    round: int
    """0: the seeds-only baseline and the base model; 1..R: the rounds."""
    stage: str
    """generate, dedup, export, data, train, evaluate."""
    status: str = "running"
    run_id: int | None = Field(default=None, foreign_key="run.id")
    training_run_id: int | None = Field(default=None, foreign_key="training_run.id")
    artifact: str | None = Field(default=None, sa_column=Column(Text))
    """A folder or a name: the export, the training data, the model, the evaluation file."""
    result: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """The stage's figures (counts, the training summary, per-item scores)."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class InstanceScore(SQLModel, table=True):
    """One score of one instance by one model and method (pipelines/score.py): IFD and its losses under a student
    model (method "ifd"), or an LLM judge's verdict (method "judge:<rubric>"). Scores of several models and methods sit
    side by side; the unique key makes a rerun skip what is already scored."""

    __tablename__ = "instance_score"
    __table_args__ = (UniqueConstraint("instance_id", "model", "method", "method_version"),)
    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    instance_id: int = Field(foreign_key="instance.id", index=True)
    model: str = Field(index=True)
    """The scoring model as given (embedded name, folder or hub id; the served name for openai)."""
    method: str = Field(index=True)
    """ifd, or judge:<rubric name>."""
    method_version: int = 1
    """Bumped when the method's computation changes, so old and new numbers never mix."""
    score: float | None = None
    """The headline number: IFD = conditioned_loss / direct_loss, or the judge's parsed score. None: see reason."""
    conditioned_loss: float | None = None
    """ifd: mean cross-entropy (nats/token) of the output given the instruction (+input), s(A|Q)."""
    direct_loss: float | None = None
    """ifd: mean cross-entropy of the output without the instruction, s(A)."""
    perplexity: float | None = None
    """ifd: exp(conditioned_loss)."""
    output_tokens: int | None = None
    """Tokens of the output under the scoring model's tokenizer (before any max_length cut)."""
    truncated: bool = False
    """ifd: the prompt and output exceeded max_length; the losses cover the output tokens that fit."""
    repeated: bool = False
    """The output repeats a word 3-gram 4 or more times (datagen.degeneration.repeats, the loop's degeneration test)."""
    cut: bool = False
    """The generation that wrote the output ended at its token limit with this output last: the output was cut."""
    degenerate: bool = False
    """repeated or cut."""
    raw: str | None = Field(default=None, sa_column=Column(Text))
    """judge: the judge's raw completion."""
    reason: str | None = Field(default=None, sa_column=Column(Text))
    """Why score is None: "empty output", "prompt fills max_length", "unparseable judge output", ..."""
    settings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """What else shaped the number: the prompt template and max_length, or the rubric file and its hash."""
    created_at: datetime = Field(default_factory=utcnow)


class Curation(SQLModel, table=True):
    """The curation of one run (`datagen curate`): the rule, and how many instances it kept and dropped. One per run:
    a rerun replaces it and its verdicts in one transaction. Export leaves out the instances it dropped."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", unique=True, index=True)
    rule: str = Field(sa_column=Column(Text, nullable=False))
    """The rule as written: "ifd < 0.9 and not degenerate", "top 0.1 by ifd", or both joined by "; then "."""
    scores: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """The scores it read, as "model/method v<version>"."""
    kept: int = 0
    dropped: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class CurationVerdict(SQLModel, table=True):
    """The curation's verdict on one accepted instance, with the reason it was dropped."""

    __tablename__ = "curation_verdict"
    __table_args__ = (UniqueConstraint("curation_id", "instance_id"),)
    id: int | None = Field(default=None, primary_key=True)
    curation_id: int = Field(foreign_key="curation.id", index=True)
    instance_id: int = Field(foreign_key="instance.id", index=True)
    kept: bool = Field(index=True)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    """Why it was dropped: "ifd = 0.97 fails ifd < 0.9", "below the top 10% by ifd (0.41)", "ifd is null: empty output"."""
