"""Best-of-k answers: draw k answers per instruction, keep one by a named rule (issue 23, "Best-of-k instances").

    datagen self-instruct --seeds examples/seed_tasks.jsonl -n 20 --instance-samples 4 --instance-pick consistent

Neither paper does this: Self-Instruct and Stanford Alpaca keep the one answer they drew (k = 1, the default, is their
behaviour exactly). With k > 1 each answer is its own request with its own sampling seed (`sample_seed`), and one is
kept by a rule:

- consistent: the highest mean ROUGE-L F-measure to the other candidates (self-consistency: the answer most
  samples agree with; ROUGE-L as the similarity filter computes it, datagen/dedup.py);
- ifd: the lowest instruction-following difficulty under the student model (Li et al., NAACL 2024, arXiv
  2308.12032, eq. 3-4: IFD = loss of the answer given the instruction / loss of the answer alone, mean per-token
  losses under one tokenizer): the answer the instruction explains best.

A candidate is a sample with at least one instance that passed the instance filters; ties go to the lower sample
number. Every sample is stored (storage/tables.py, InstanceSample) with its score and verdict; the instances of a
sample not chosen are rejected as `not_chosen_<rule>`, so exports and training data hold the chosen one only.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from datagen.backends import Backend
from datagen.dedup import rouge_l
from datagen.errors import BadInput
from pipelines.bootstrap import BatchStats
from storage.tables import Instance, InstanceSample, Task

RULES = ("consistent", "ifd")
MAX_SAMPLES = 64
"""Sample numbers take the low 6 bits of a seed (`sample_seed`)."""


def check_samples(samples: int, rule: str) -> None:
    """The checks both pipelines' configs share."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise BadInput(f"--instance-samples must be from 1 to {MAX_SAMPLES}, got {samples}")
    if rule not in RULES:
        raise BadInput(f"--instance-pick must be consistent or ifd, got {rule}")


def sample_seed(seed: int, batch: int, position: int, sample: int) -> int:
    """The sampling seed of answer `sample` to instruction `position` of batch `batch`, in 63 bits like
    pipelines/bootstrap.py's `request_seed` (whose 63 bits are all spent on instruction requests): a hash of
    (run seed, batch, position) in the high 57 bits and the sample number in the low 6, so the k answers to one
    instruction always have distinct seeds, and answers to distinct instructions share one with probability 2^-57."""
    if not 0 <= sample < MAX_SAMPLES:
        raise ValueError(f"sample {sample} is not below {MAX_SAMPLES}")
    digest = hashlib.blake2b(f"{seed}/{batch}/{position}".encode(), digest_size=8).digest()
    return ((int.from_bytes(digest, "big") >> 7) << 6) | sample


@dataclass(frozen=True)
class Candidate:
    """A sample the rule may choose: its number and its valid instances as (instruction, input, output)."""

    sample: int
    instances: tuple[tuple[str, str, str], ...]


@dataclass(frozen=True)
class Pick:
    chosen: int | None
    """The sample kept; None when no sample had a valid instance."""
    scores: dict[int, float]
    """The rule's score of every candidate."""


def pick_consistent(candidates: Sequence[Candidate], tokenizer: str = "rouge") -> Pick:
    """The candidate with the highest mean ROUGE-L F to the other candidates (its instances' inputs and outputs,
    one per line); one candidate alone scores 1."""
    if not candidates:
        return Pick(None, {})
    texts = ["\n".join(f"{given}\n{output}".strip() for _, given, output in c.instances) for c in candidates]
    scores = {}
    for i, candidate in enumerate(candidates):
        others = [rouge_l(texts[j], texts[i], tokenizer) for j in range(len(texts)) if j != i]
        scores[candidate.sample] = sum(others) / len(others) if others else 1.0
    best = max(candidates, key=lambda c: (scores[c.sample], -c.sample))
    return Pick(best.sample, scores)


def pick_ifd(candidates: Sequence[Candidate], backend: Backend) -> Pick:
    """The candidate with the lowest mean IFD of its instances under `backend`'s model (the student); an instance
    with no IFD (an empty output, a prompt that fills the context) counts as the worst, infinity."""
    if not candidates:
        return Pick(None, {})
    values = iter(ifd_values(backend, [i for c in candidates for i in c.instances]))
    scores = {}
    for candidate in candidates:
        own = [next(values) for _ in candidate.instances]
        scores[candidate.sample] = sum(own) / len(own)
    best = min(candidates, key=lambda c: (scores[c.sample], c.sample))
    return Pick(best.sample, scores)


def pick(rule: str, candidates: Sequence[Candidate], backend: Backend, tokenizer: str = "rouge") -> Pick:
    return pick_ifd(candidates, backend) if rule == "ifd" else pick_consistent(candidates, tokenizer)


def ifd_values(backend: Backend, instances: Sequence[tuple[str, str, str]]) -> list[float]:
    """IFD of each (instruction, input, output) under the backend's model, by `datagen score`'s function
    (pipelines/score.py, Cherry LLM's definition); an unscorable one (empty output) ranks last."""
    from pipelines.score import Pair, ifd_scores

    scored = ifd_scores(backend, [Pair(instruction, given, output) for instruction, given, output in instances])
    return [math.inf if s.ifd is None else s.ifd for s in scored]


@dataclass
class Sample:
    """One of the k answers to a task, parsed: its instances as (input, output) with the instance filters' verdicts."""

    number: int
    generation_id: int | None
    seed: int | None
    pairs: list[tuple[str, str]]
    verdicts: list[str | None]


def choose(task: Task, samples: Sequence[Sample], rule: str, backend: Backend, stats: BatchStats,
           tokenizer: str = "rouge") -> tuple[list[Instance], list[InstanceSample]]:  # fmt: skip
    """Pick one sample by `rule`; every sample's instances and its verdict as rows (the caller adds them). The chosen
    sample's valid instances are accepted; every other sample's are rejected as not_chosen_<rule>."""
    candidates = [Candidate(s.number, tuple((task.instruction, given, output) for (given, output), v in zip(s.pairs, s.verdicts)
                                            if v is None)) for s in samples if None in s.verdicts]  # fmt: skip
    started = time.perf_counter()
    result = pick(rule, candidates, backend, tokenizer)
    if rule == "ifd":
        stats.score_seconds += time.perf_counter() - started
    not_chosen = f"not_chosen_{rule}"
    instances, rows = [], []
    for s in samples:
        chosen = s.number == result.chosen
        for (given, output), verdict in zip(s.pairs, s.verdicts):
            reason = verdict or (None if chosen else not_chosen)
            instances.append(Instance(task_id=task.id, generation_id=s.generation_id, input=given, output=output,
                                      status="rejected" if reason else "accepted", reason=reason))  # fmt: skip
        rows.append(InstanceSample(task_id=task.id, generation_id=s.generation_id, sample=s.number, seed=s.seed, rule=rule,
                                   score=result.scores.get(s.number), chosen=chosen,
                                   reason=None if chosen else not_chosen if s.number in result.scores else "no_valid_instances"))  # fmt: skip
    return instances, rows
