"""Held-out evaluation of tuned models against their base, the question of Self-Instruct's ablation (Wang et al. 2023,
section 4: GPT-3 tuned on its own generated data against GPT-3 and against tuning on other data): does the
generated data add anything?

Per model, on the same items: the mean per-token loss of the reference output given the training prompt (completion
tokens only, the tokens the trainer's completion-only loss covers), the ROUGE-L F-measure of the greedy answer to the
reference (datagen.dedup.rouge_l, rouge-score's), and exact match on classification items. Two models are compared
by the per-item difference with a percentile bootstrap confidence interval over items, so a handful of items cannot
claim a win: the verdict is "better" only when the whole interval is on the better side of 0 and there are at least
MIN_ITEMS items.

Everything here is a pure function except `score_model`, which runs a backend.
"""

from __future__ import annotations

import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from datagen.backends import Backend, Request, SamplingParams, ScoredSequence
from datagen.dedup import rouge_l
from datagen.export import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT
from pipelines.seeds import SeedTask

BOOTSTRAP_RESAMPLES = 1000
"""Resamples of the eval items per confidence interval (Efron & Tibshirani's usual count for percentile intervals)."""
CONFIDENCE = 0.95
MIN_ITEMS = 10
"""Fewer paired items than this never make a verdict "better": with 3 items a percentile bootstrap has 10 distinct
resample means, and three differences of one sign give an interval that excludes 0 however small they are (ours:
the issue's rule that a 3-item split cannot claim a win)."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out instance: the training prompt's parts and the reference answer."""

    task_id: str
    instruction: str
    input: str
    output: str
    is_classification: bool


@dataclass(frozen=True)
class ItemScore:
    loss: float
    """Mean negative log-likelihood per reference token (nats)."""
    rouge_l: float
    exact_match: float | None
    """1.0 or 0.0 on classification items; None elsewhere."""
    answer: str
    """The greedy answer, for the sample table."""


@dataclass(frozen=True)
class Comparison:
    metric: str
    model: str
    baseline: str
    difference: float
    """mean(model) - mean(baseline) over the items both were scored on."""
    low: float
    high: float
    items: int
    lower_is_better: bool

    @property
    def better(self) -> bool:
        if self.items < MIN_ITEMS:
            return False
        return self.high < 0 if self.lower_is_better else self.low > 0


METRICS = {"loss": True, "rouge_l": False, "exact_match": False}
"""Metric name → lower is better."""


# ---- items ------------------------------------------------------------------------------------------------------------


def split_seeds(seeds: Sequence[SeedTask], eval_size: int, seed: int) -> tuple[list[SeedTask], list[SeedTask]]:
    """A seeded held-out part of the seed tasks (only tasks with an instance can be scored) and the rest, both in
    file order. The rest is all the generator ever sees."""
    candidates = [s.id for s in seeds if s.instances]
    held = set(random.Random(seed).sample(candidates, min(eval_size, len(candidates))))
    return [s for s in seeds if s.id not in held], [s for s in seeds if s.id in held]


def eval_items(tasks: Sequence[SeedTask]) -> list[EvalItem]:
    """One item per instance; a task whose classification flag is unknown is scored without exact match."""
    return [
        EvalItem(t.id, t.instruction, i.input, i.output, bool(t.is_classification))
        for t in tasks
        for i in t.instances
    ]  # fmt: skip


def prompt(item: EvalItem) -> str:
    """Stanford Alpaca's prompt, the one the exported prompt-completion rows train on (datagen/export.py)."""
    if item.input:
        return ALPACA_PROMPT_INPUT.format(instruction=item.instruction, input=item.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=item.instruction)


# ---- metrics (pure) ---------------------------------------------------------------------------------------------------


def completion_loss(scored: ScoredSequence, prompt_tokens: int) -> float:
    """Mean -log p over the tokens after the prompt."""
    logprobs = [lp for lp in scored.logprobs[prompt_tokens:] if lp is not None]
    if not logprobs:
        raise ValueError("the reference has no tokens after the prompt")
    return -sum(logprobs) / len(logprobs)


_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case, surrounding whitespace and punctuation, and inner runs of whitespace do not count."""
    return _SPACE.sub(" ", text.strip().strip(".!?\"'").strip().lower())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def bootstrap_interval(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean of paired per-item differences."""
    if not differences:
        raise ValueError("no items to resample")
    rng = random.Random(seed)
    n = len(differences)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    return means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1) + 0.5)]


def metric_values(scores: Sequence[ItemScore], metric: str) -> list[float | None]:
    return [getattr(s, metric) for s in scores]


def mean_metric(scores: Sequence[ItemScore], metric: str) -> float | None:
    values = [v for v in metric_values(scores, metric) if v is not None]
    return statistics.fmean(values) if values else None


def compare(model: str, scores: Sequence[ItemScore], baseline: str, base_scores: Sequence[ItemScore], metric: str,
            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Comparison | None:  # fmt: skip
    """Paired comparison on the items where both have the metric; None when there are none."""
    if len(scores) != len(base_scores):
        raise ValueError(f"{model} has {len(scores)} item scores, {baseline} has {len(base_scores)}: not the same items")
    pairs = [(a, b) for a, b in zip(metric_values(scores, metric), metric_values(base_scores, metric)) if a is not None and b is not None]
    if not pairs:
        return None
    differences = [a - b for a, b in pairs]
    low, high = bootstrap_interval(differences, resamples, seed)
    return Comparison(metric, model, baseline, statistics.fmean(differences), low, high, len(pairs), METRICS[metric])


def verdict(c: Comparison) -> str:
    """One line with the numbers: better only when the interval excludes 0 on the better side."""
    word = "better" if c.better else "not better" if c.items >= MIN_ITEMS else f"not better (too few items: {c.items} < {MIN_ITEMS})"
    direction = "lower is better" if c.lower_is_better else "higher is better"
    return (f"{c.model} vs {c.baseline}, {c.metric} ({direction}): {word}: difference {c.difference:+.4f}, "
            f"{CONFIDENCE:.0%} CI {c.low:+.4f}..{c.high:+.4f} over {c.items} items")  # fmt: skip


# ---- the one I/O function -----------------------------------------------------------------------------------------


def score_model(backend: Backend, items: Sequence[EvalItem], max_tokens: int) -> list[ItemScore]:
    """Loss of each reference and a greedy answer to each prompt, in item order."""
    prompts = [prompt(item) for item in items]
    prompt_ids = [backend.tokenize(p) for p in prompts]
    full_ids = [backend.tokenize(p + item.output) for p, item in zip(prompts, items)]
    # The Alpaca prompt ends in a newline, so the reference's tokens start after the prompt's; count the shared prefix
    # anyway, in case a tokenizer merges across the boundary.
    starts = [next((k for k, (a, b) in enumerate(zip(p, f)) if a != b), min(len(p), len(f))) for p, f in zip(prompt_ids, full_ids)]
    scored = backend.score(full_ids)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = backend.generate([Request(prompt=p, params=params) for p in prompts])
    out = []
    for item, s, start, result in zip(items, scored, starts, results):
        answer = result.completions[0].text.strip()
        out.append(ItemScore(
            loss=completion_loss(s, start), rouge_l=rouge_l(item.output, answer),
            exact_match=exact_match(answer, item.output) if item.is_classification else None, answer=answer,
        ))  # fmt: skip
    return out
