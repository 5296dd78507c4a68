"""What an export is asked for and what it reports: `ExportConfig`, the formats, and the facts about each run that
the dataset card states (`RunFacts`, `ExportResult`). Below both datagen/export.py, which makes them, and
datagen/card.py, which renders them, so neither imports the other's types."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen.errors import BadInput
from storage.queries import RunCounts

if TYPE_CHECKING:
    from datasets import DatasetDict


class Format(str, enum.Enum):
    alpaca = "alpaca"
    """instruction, input, output, and `text`: the Alpaca prompt template with the response appended."""
    messages = "messages"
    """`messages`: [system (optional), user, assistant] turns for a chat template."""
    prompt_completion = "prompt-completion"
    """`prompt` (the Alpaca prompt without the response) and `completion` (the output): completion-only loss in TRL."""
    toolformer = "toolformer"
    """`text`: Toolformer texts with their kept API calls inline."""


DECONTAMINATION_THRESHOLD = 0.7
"""ROUGE-L F above which a row's instruction counts as a copy of an evaluation item (Self-Instruct's duplicate cut-off)."""
CONTAMINATION_NGRAM = 13
"""Shared word n-gram length that marks contamination (GPT-3, Brown et al. 2020, appendix C: 13-gram overlap)."""

@dataclass(frozen=True)
class ExportConfig:
    runs: tuple[str, ...]
    """Run names or ids; their rows are concatenated in this order. The name of a sharded Toolformer job, where no run
    has that name, stands for its shard runs in corpus line order (datagen/shards.py)."""
    format: Format
    out: Path
    test_size: float = 0.05
    """Share of instructions held out as the test split (at least one task); 0 writes a train split only."""
    seed: int = 0
    """Seed of the instruction shuffle that makes the split (0 or more); the same seed gives the same split."""
    with_provenance: bool = False
    """Add run, model, generation_id (the generation that wrote the output) and similarity (the instruction's
    ROUGE-L F to its nearest kept neighbour when the filter accepted it) columns."""
    decontaminate: Path | None = None
    """JSONL evaluation set; rows overlapping any of its items are dropped and counted."""
    decontamination_threshold: float = DECONTAMINATION_THRESHOLD
    ngram: int = CONTAMINATION_NGRAM
    system: str | None = None
    """System turn for --format messages (none by default)."""
    license: str = "other"
    """License in the card's front matter (a Hub license id); it depends on the seeds and the model's terms."""
    license_name: str | None = None
    """With license "other", the card's license_name (an id, e.g. my-license-1.0), which the Hub requires;
    None: synthetic-seed-and-model-terms."""
    language: str = "en"
    """Language code in the card's front matter."""
    overwrite: bool = False
    ignore_curation: bool = False
    """Export the instances a run's curation (`datagen curate`) dropped too; by default they are left out."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise BadInput("give at least one --run")
        if not 0.0 <= self.test_size < 1.0:
            raise BadInput(f"--test-size must be in [0, 1), got {self.test_size}")
        if self.seed < 0:
            raise BadInput(f"--seed must be 0 or more (numpy's generator seeds), got {self.seed}")
        if not 0.0 <= self.decontamination_threshold <= 1.0:
            raise BadInput(f"--decontamination-threshold must be in [0, 1], got {self.decontamination_threshold}")
        if self.ngram < 1:
            raise BadInput(f"--ngram must be at least 1, got {self.ngram}")
        if self.license_name is not None and self.license != "other":
            raise BadInput(f"--license-name applies to --license other only (got --license {self.license})")
        if self.system is not None and self.format is not Format.messages:
            raise BadInput("--system applies to --format messages only")


@dataclass
class RunFacts(RunCounts):
    """What the card says about one run: how it was made (its counts are the report's, storage.queries.RunCounts)."""

    created_at: str
    config: dict[str, Any]
    seed_tasks: int
    tasks_without_instances: int
    """Accepted instructions with no accepted instance; for Toolformer, texts with no kept call."""
    sampling: dict[str, dict[str, Any]]
    """The sampling settings of the first generation of each purpose (instructions, classification, instances...)."""
    texts: int = 0
    """Toolformer: corpus texts processed."""
    api_calls: dict[str, dict[str, int]] = field(default_factory=dict)
    """Toolformer: per tool, sampled calls by status (kept, rejected, unparsed, ...) and how many were inserted."""
    curation: dict[str, Any] | None = None
    """The run's curation (`datagen curate`): rule, scores, kept, dropped, and whether this export applied it."""


@dataclass
class ExportResult:
    out: Path
    format: Format
    columns: list[str]
    counts: dict[str, Any]
    runs: list[RunFacts] = field(default_factory=list)
    dataset: DatasetDict | None = None
    """What was written, for --push-to-hub."""
