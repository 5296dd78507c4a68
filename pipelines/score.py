"""Scoring generated instances with the student model: instruction-following difficulty (IFD).

Cherry LLM (Li et al., "From Quantity to Quality: Boosting LLM Performance with Self-Guided Data Selection for
Instruction Tuning", NAACL 2024, arXiv 2308.12032), section 3, eq. 4:

    IFD_theta(Q, A) = s_theta(A | Q) / s_theta(A),   s_theta(A | Q) = -1/N sum_i log P(w_i^A | Q, w_1^A .. w_{i-1}^A)

s(A | Q) is the mean cross-entropy of the answer's N tokens given the instruction (the "conditioned answer score"),
s(A) the same without it (the "direct answer score"), both under one model and tokenizer. IFD near or above 1 means
the instruction does not help the model produce the answer (the answer ignores the instruction, or it is generic);
low IFD means the answer follows from the instruction with little left to learn.

    datagen score --run demo                   # IFD of every accepted instance under the embedded student
    datagen curate --run demo --keep "ifd < 0.9 and not degenerate"

The texts follow the reference code (MingLiiii/Cherry_LLM, cherry_seletion/data_analysis.py, --prompt alpaca --mod
cherry): the conditioned text is Cherry's Alpaca prompt + output, the direct text "### Response:" + output, each
tokenized with the tokenizer's special tokens (a BOS where it adds one), and the loss covers the output's tokens only
(the tokens after the prompt). Deviations, each named in README's Curation section:
- The output's first token is where prompt and prompt + output tokenizations diverge (as datagen.evaluate does, TRL's
  rule), not len(encode(prompt)); they differ only where a tokenizer merges a token across the boundary.
- Truncation: Cherry cuts the conditioned text at max_length and the direct one at max_length - len(prompt) + 4, and its
  selection skips an item whose output did not fit. Here both losses cover exactly the output tokens that fit after the
  prompt in max_length, and the item is scored with `truncated` set (the curation rule decides); a prompt that fills
  max_length leaves no output token: score None, reason "prompt fills max_length".
- Cherry's selection also drops items with IFD > 1; scoring stores them as they are (a rule `ifd <= 1` does that).

The degeneration flag is the loop's (datagen.evaluate): a word 3-gram repeated 4 times, or an output cut at the
generation's token limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlmodel import Session, select

from datagen.backends import Backend
from datagen.errors import BadInput
from datagen.degeneration import repeats
from storage.store import get_run
from storage.tables import Generation, Instance, InstanceScore, Run, Task

IFD_METHOD = "ifd"
IFD_VERSION = 1
"""Bump when the computation changes (prompt, token range), so stored numbers of two versions never mix."""
CHERRY_MAX_LENGTH = 512
"""Cherry LLM's --max_length in its README and scripts (scripts/cherry_analysis.sh)."""

# Cherry_LLM's PROMPT_DICT (cherry_seletion/data_analysis.py): Stanford Alpaca's prompt without the newline after
# "### Response:" (datagen.export's training prompt has one).
CHERRY_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
CHERRY_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
CHERRY_DIRECT_PREFIX = "### Response:"
"""The direct answer text is this + output (Cherry's direct_answer_text)."""


@dataclass(frozen=True)
class ScoreConfig:
    """How `score_run` scores a run with a student model."""

    model: str
    """The scoring (student) model as given; stored with every score."""
    max_length: int = CHERRY_MAX_LENGTH
    """Most tokens of prompt + output scored (Cherry: 512); the output's tokens beyond it are not scored."""
    batch_size: int = 64
    """Instances per store transaction (and per backend.score call: the backend batches its forward passes itself)."""
    rescore: bool = False
    """Replace the run's stored scores of this model and method version instead of skipping scored instances."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise BadInput(f"--max-length must be an integer of at least 2, got {self.max_length!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BadInput(f"--batch-size must be an integer of at least 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class Pair:
    """An instruction (+ input) and the output to score."""

    instruction: str
    input: str
    output: str
    cut: bool = False
    """The output ended at its generation's token limit (part of the degeneration flag)."""


@dataclass(frozen=True)
class Score:
    """IFD and its parts for one pair; ifd is None when there was nothing to score (see reason)."""

    ifd: float | None
    """conditioned_loss / direct_loss."""
    conditioned_loss: float | None
    """s(A|Q): mean cross-entropy (nats per token) of the output's tokens given Cherry's Alpaca prompt."""
    direct_loss: float | None
    """s(A): mean cross-entropy of the same tokens after "### Response:" alone."""
    perplexity: float | None
    """exp(conditioned_loss): the output's perplexity given the instruction."""
    output_tokens: int
    """Tokens of the output after the prompt (all of them, also those past max_length)."""
    truncated: bool
    repeated: bool
    cut: bool
    reason: str | None = None

    @property
    def degenerate(self) -> bool:
        return self.repeated or self.cut


def cherry_prompt(instruction: str, input: str) -> str:
    """Cherry's prompt: with the input section when the input is not empty (Cherry tests input != '')."""
    if input != "":
        return CHERRY_PROMPT_INPUT.format_map({"instruction": instruction, "input": input})
    return CHERRY_PROMPT_NO_INPUT.format_map({"instruction": instruction})


def output_start(prefix_ids: Sequence[int], full_ids: Sequence[int]) -> int:
    """Index of the output's first token in full_ids: where the prefix's and the full text's tokens diverge."""
    return next((k for k, (a, b) in enumerate(zip(prefix_ids, full_ids)) if a != b), min(len(prefix_ids), len(full_ids)))


@dataclass(frozen=True)
class _Plan:
    """The token ids to score for one pair and the range of output tokens in each."""

    conditioned: list[int]
    conditioned_start: int
    direct: list[int]
    direct_start: int
    scored: int
    """Output tokens scored in both (those that fit in max_length after the prompt)."""
    output_tokens: int


def _plan(backend: Backend, pair: Pair, max_length: int) -> _Plan:
    prompt = cherry_prompt(pair.instruction, pair.input)
    full = backend.tokenize(prompt + pair.output)
    start = output_start(backend.tokenize(prompt), full)
    direct = backend.tokenize(CHERRY_DIRECT_PREFIX + pair.output)
    direct_start = output_start(backend.tokenize(CHERRY_DIRECT_PREFIX), direct)
    # Score the same tokens both ways: the output tokens that fit after the prompt, and at most those of the direct
    # text (a merge at the boundary can leave the two tokenizations one token apart).
    scored = max(0, min(len(full), max_length) - start)
    scored = min(scored, len(direct) - direct_start)
    return _Plan(full[: start + scored], start, direct[: direct_start + scored], direct_start, scored, len(full) - start)


def _mean_loss(logprobs: Sequence[float | None], start: int) -> float:
    values = logprobs[start:]
    if any(v is None for v in values):
        raise ValueError("the backend returned no log-probability for an output token")
    return -math.fsum(values) / len(values)  # type: ignore[arg-type]


def ifd_scores(backend: Backend, pairs: Sequence[Pair], max_length: int = CHERRY_MAX_LENGTH) -> list[Score]:
    """IFD of each pair under the backend's model, in input order: one `backend.score` call for all of them (the
    backend batches its forward passes). Any backend that scores tokens: transformers, vllm (prompt_logprobs),
    openai (echo + logprobs)."""
    plans = [_plan(backend, pair, max_length) for pair in pairs]
    todo = [k for k, plan in enumerate(plans) if plan.scored > 0]
    sequences = [seq for k in todo for seq in (plans[k].conditioned, plans[k].direct)]
    scored = backend.score(sequences) if sequences else []
    if len(scored) != len(sequences):
        raise ValueError(f"backend.score returned {len(scored)} sequences for {len(sequences)}")
    losses = {k: (scored[2 * j].logprobs, scored[2 * j + 1].logprobs) for j, k in enumerate(todo)}
    out = []
    for k, (pair, plan) in enumerate(zip(pairs, plans)):
        repeated = repeats(pair.output)
        truncated = plan.scored < plan.output_tokens
        if k not in losses:
            reason = "empty output" if plan.output_tokens == 0 else "prompt fills max_length"
            out.append(Score(None, None, None, None, plan.output_tokens, truncated, repeated, pair.cut, reason))
            continue
        conditioned = _mean_loss(losses[k][0], plan.conditioned_start)
        direct = _mean_loss(losses[k][1], plan.direct_start)
        ifd = conditioned / direct if direct > 0 else None
        reason = None if ifd is not None else "direct loss is 0"
        out.append(Score(ifd, conditioned, direct, math.exp(conditioned), plan.output_tokens, truncated, repeated, pair.cut, reason))
    return out


# ---- a stored run -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredPair:
    instance_id: int
    pair: Pair


def run_pairs(session: Session, run: Run) -> list[StoredPair]:
    """The run's accepted instances of accepted generated instructions (what export reads), in task then instance
    order, each with whether its generation was cut at the token limit with this output last."""
    if run.pipeline == "toolformer":
        raise BadInput(
            f"run '{run.name}' is a Toolformer run: its rows are annotated texts, not instruction/output pairs, so IFD does not apply"
        )
    rows = session.exec(
        select(Task.instruction, Instance, Generation.finish_reason, Generation.completion)
        .join(Instance, Instance.task_id == Task.id)
        .join(Generation, Generation.id == Instance.generation_id, isouter=True)
        .where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted", Instance.status == "accepted")
        .order_by(Task.id, Instance.id)
    ).all()
    return [
        StoredPair(instance.id, Pair(instruction, instance.input, instance.output, is_cut(instance.output, finish, completion)))
        for instruction, instance, finish, completion in rows
    ]


def is_cut(output: str, finish_reason: str | None, completion: str | None) -> bool:
    """A generation that hit its token limit cut the output it ends with (Self-Instruct writes several instances per
    generation; only the last can be cut)."""
    if finish_reason != "length" or completion is None or not output.strip():
        return False
    return completion.rstrip().endswith(output.strip())


@dataclass(frozen=True)
class ScoreRunResult:
    run: str
    model: str
    method: str
    method_version: int
    instances: int
    """Accepted instances of the run."""
    scored: int
    """Scored now."""
    skipped: int
    """Already scored by this model and method version (a rerun stores nothing twice)."""
    no_score: int
    """Scored now with score None (empty output, prompt fills max_length)."""
    degenerate: int
    truncated: int
    mean_ifd: float | None
    seconds: float


def score_run(
    session: Session,
    backend: Backend,
    run_name: str,
    config: ScoreConfig,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreRunResult:
    """IFD of every accepted instance of a run under `backend` (the student), stored in instance_score one batch per
    transaction; instances this model already scored with this method version are skipped (or replaced with
    config.rescore). progress(done, total) after each batch."""
    started = time.perf_counter()
    run = get_run(session, run_name)
    pairs = run_pairs(session, run)
    of_model = (InstanceScore.run_id == run.id, InstanceScore.model == config.model, InstanceScore.method == IFD_METHOD,
                InstanceScore.method_version == IFD_VERSION)  # fmt: skip
    if config.rescore:
        for row in session.exec(select(InstanceScore).where(*of_model)).all():
            session.delete(row)
        session.commit()
    done = set(session.exec(select(InstanceScore.instance_id).where(*of_model)).all())
    todo = [p for p in pairs if p.instance_id not in done]
    settings = {"template": "cherry-alpaca", "max_length": config.max_length, "backend": backend.name}
    scores: list[Score] = []
    for start in range(0, len(todo), config.batch_size):
        batch = todo[start : start + config.batch_size]
        batch_scores = ifd_scores(backend, [p.pair for p in batch], config.max_length)
        for stored, s in zip(batch, batch_scores):
            session.add(
                InstanceScore(
                    run_id=run.id, instance_id=stored.instance_id, model=config.model, method=IFD_METHOD, method_version=IFD_VERSION,
                    score=s.ifd, conditioned_loss=s.conditioned_loss, direct_loss=s.direct_loss, perplexity=s.perplexity,
                    output_tokens=s.output_tokens, truncated=s.truncated, repeated=s.repeated, cut=s.cut,
                    degenerate=s.degenerate, reason=s.reason, settings=settings,
                )  # fmt: skip
            )
        session.commit()
        scores += batch_scores
        if progress is not None:
            progress(start + len(batch), len(todo))
    ifds = [s.ifd for s in scores if s.ifd is not None]
    return ScoreRunResult(
        run=run.name, model=config.model, method=IFD_METHOD, method_version=IFD_VERSION, instances=len(pairs),
        scored=len(scores), skipped=len(pairs) - len(todo), no_score=sum(s.ifd is None for s in scores),
        degenerate=sum(s.degenerate for s in scores), truncated=sum(s.truncated for s in scores),
        mean_ifd=sum(ifds) / len(ifds) if ifds else None, seconds=time.perf_counter() - started,
    )  # fmt: skip
