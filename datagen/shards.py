"""A sharded Toolformer job: its corpus split into shards of `--shard-size` texts, each shard its own run, so that
many workers annotate one corpus at once while each run keeps one writer (storage/run_lock.py).

    datagen jobs add tf toolformer --every 1d --shard-size 1000 -- --corpus corpus.jsonl --tools calculator

Shard k (from 0) of job JOB is the run `JOB.shard-KKKK` (four digits, more past 9999) over the corpus lines of the
texts k*S+1 to (k+1)*S, run as `datagen toolformer ... --lines FIRST:LAST --run JOB.shard-KKKK`; its stored config
holds the lines, so a shard resumes only on its own. `datagen export --run JOB` merges the shard runs, in corpus
line order (shard order), when no run is named JOB itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlmodel import Session, select

from datagen.errors import BadInput
from storage.store import find_run, get_run
from storage.tables import Run

if TYPE_CHECKING:
    from pipelines.toolformer import CorpusText

SHARD = ".shard-"
"""Between a job's name and its shard number in a shard run's name."""


@dataclass(frozen=True)
class Shard:
    run: str
    lines: str
    """FIRST:LAST, the value of `datagen toolformer --lines`."""


def plan_shards(job: str, texts: Sequence[CorpusText], size: int) -> list[Shard]:
    """The corpus's texts, in order, `size` to a shard."""
    groups = [texts[start : start + size] for start in range(0, len(texts), size)]
    return [Shard(f"{job}{SHARD}{k:04d}", f"{group[0].line}:{group[-1].line}") for k, group in enumerate(groups)]


def shard_runs(session: Session, job: str) -> list[Run]:
    """The shard runs of a sharded job, in shard order (its corpus line order); BadInput if two hold the same lines
    or different corpora (a job re-added with another shard size or corpus under the same name)."""
    prefix = f"{job}{SHARD}"
    named = session.exec(select(Run).where(Run.name.startswith(prefix, autoescape=True), Run.pipeline == "toolformer"))
    runs = [r for r in named if r.name[len(prefix) :].isdigit() and r.config.get("lines")]
    runs.sort(key=lambda r: int(r.name[len(prefix) :]))
    for before, after in zip(runs, runs[1:]):
        if before.config.get("corpus_sha256") != after.config.get("corpus_sha256"):
            raise BadInput(f"runs '{before.name}' and '{after.name}' annotated different corpora: export them one by one")
        if int(before.config["lines"].split(":")[1]) >= int(after.config["lines"].split(":")[0]):
            raise BadInput(f"runs '{before.name}' ({before.config['lines']}) and '{after.name}' ({after.config['lines']}) "
                           "overlap: export them one by one")  # fmt: skip
    return runs


def runs_named(session: Session, name: str) -> list[Run]:
    """The run of that name or id, or else the shard runs of the sharded job of that name; BadInput if neither."""
    if find_run(session, name) is None and (shards := shard_runs(session, name)):
        return shards
    return [get_run(session, name)]
