"""Held-out evaluation of tuned models against their base, the question of Self-Instruct's ablation (Wang et al. 2023,
section 4: GPT-3 tuned on its own generated data against GPT-3 and against tuning on other data): does the
generated data add anything?

Every model is scored in the format it is tuned in (`PromptFormat`): a model with a chat template under that
template (the training rows are `messages`), one without under Stanford Alpaca's prompt. Per item:

- loss: the mean negative log-likelihood per token of the reference answer *and* the token that ends it (the chat
  template's end-of-turn token, or EOS after the Alpaca prompt), given the prompt: the tokens the trainer's
  completion-only loss covers, so learning to stop is measured. Reported per item (the mean of item means, the
  unit of every comparison) and per token (all items' tokens pooled);
- the greedy answer (stopping at end-of-turn, or at Alpaca's section markers), its ROUGE-L F-measure to the
  reference (datagen.dedup.rouge_l, rouge-score's); an answer that runs into the token limit scores 0, as it never
  answered; exact match of the answer's first line only where the reference is a short label;
- degeneration: the answer repeats a word n-gram many times or hits the token limit.

Comparisons pair items: each model's per-item score is averaged over its training replicates, and the mean of the
per-item differences gets a t-interval (it covers at n = 10-20, where the percentile bootstrap under-covers) whose
variance adds each model's training noise (the spread of its replicate means) to the item term, since a training
run shifts every item at once; the p-value and the minimum detectable difference at 80% power come with it. One
comparison is primary; the others are secondary and Holm-corrected. "Better" needs the interval on the better side
of 0, at least MIN_ITEMS items, and no more degenerate answers than the baseline (DEGENERATION_MARGIN).

Everything here is a pure function except `score_model`, which runs a backend.
"""

from __future__ import annotations

import functools
import math
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from datagen.backends import Backend, Request, SamplingParams
from datagen.dedup import rouge_l
from datagen.degeneration import repeats
from datagen.export import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, user_message
from pipelines.seeds import SeedTask

CONFIDENCE = 0.95
POWER = 0.8
"""Power of the minimum detectable difference (the usual 80%)."""
MIN_ITEMS = 10
"""Fewer paired items than this never make a verdict "better" (a 3-item split cannot claim a win)."""
DEGENERATION_MARGIN = 0.05
"""A model whose degeneration rate exceeds its baseline's by more than 5 points is never called better."""
SHORT_LABEL_WORDS = 3
"""A reference of one line and at most 3 words is a label, scored by exact match; longer ones are not."""
ALPACA_STOP = ("### Instruction:", "### Input:", "### Response:", "\n### ")
"""Where a greedy answer under Alpaca's prompt ends when the model does not emit EOS: its next section marker."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out instance: the prompt's parts and the reference answer."""

    task_id: str
    instruction: str
    input: str
    output: str
    is_classification: bool
    id: str = ""
    """Unique per item: the task id, with `:k` for the k-th instance of a task that has several."""

    @property
    def key(self) -> str:
        return self.id or self.task_id


@dataclass(frozen=True)
class ItemScore:
    loss: float
    """Mean negative log-likelihood per token (nats) of the reference and its end token."""
    rouge_l: float
    """ROUGE-L F of the greedy answer to the reference; 0 when the answer hit the token limit."""
    exact_match: float | None
    """1.0 or 0.0 where the reference is a short label; None elsewhere."""
    answer: str
    """The greedy answer, for the sample table."""
    tokens: int = 0
    """Scored reference tokens (the end token included)."""
    repeated: bool = False
    """The answer repeats a word 3-gram REPEAT_COUNT or more times."""
    hit_limit: bool = False
    """The answer was cut at the token limit."""

    @property
    def degenerate(self) -> bool:
        return self.repeated or self.hit_limit


METRICS = {"loss": True, "rouge_l": False, "exact_match": False}
"""Metric name → lower is better. `loss` is the per-item loss (mean over the item's tokens)."""
METRIC_NAMES = {"loss": "loss per item", "rouge_l": "ROUGE-L", "exact_match": "exact match"}


# ---- items ------------------------------------------------------------------------------------------------------------


def split_seeds(seeds: Sequence[SeedTask], eval_size: int, seed: int) -> tuple[list[SeedTask], list[SeedTask]]:
    """A seeded held-out part of the seed tasks (only tasks with an instance can be scored) and the rest, both in
    file order. The rest is all the generator ever sees."""
    candidates = [s.id for s in seeds if s.instances]
    held = set(random.Random(seed).sample(candidates, min(eval_size, len(candidates))))
    return [s for s in seeds if s.id not in held], [s for s in seeds if s.id in held]


def eval_items(tasks: Sequence[SeedTask]) -> list[EvalItem]:
    """One item per instance."""
    return [
        EvalItem(t.id, t.instruction, i.input, i.output, bool(t.is_classification), t.id if len(t.instances) == 1 else f"{t.id}:{k}")
        for t in tasks
        for k, i in enumerate(t.instances)
    ]  # fmt: skip


def sample_items(items: Sequence[EvalItem], limit: int | None, seed: int) -> list[EvalItem]:
    """A seeded sample of `limit` items, in file order (all of them when limit is None or not smaller)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for k, item in enumerate(items) if k in keep]


def prompt(item: EvalItem) -> str:
    """Stanford Alpaca's prompt, the one prompt-completion rows train on (datagen/export.py)."""
    if item.input:
        return ALPACA_PROMPT_INPUT.format(instruction=item.instruction, input=item.input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=item.instruction)


# ---- the model's own format -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a model is tuned and scored: its chat template, or Alpaca's prompt."""

    chat: bool
    end: str
    """The token string that ends a reference: end-of-turn under a chat template, else EOS."""

    @property
    def name(self) -> str:
        return "the model's chat template" if self.chat else "Stanford Alpaca's prompt"


def prompt_format(tokenizer) -> PromptFormat:
    """A tokenizer with a chat template trains and scores under it; without one, under Alpaca's prompt + EOS."""
    return PromptFormat(chat=bool(getattr(tokenizer, "chat_template", None)), end=tokenizer.eos_token or "")


def training_row(instruction: str, input: str, output: str, fmt: PromptFormat) -> dict:
    """One training row as train/data.py reads it: `messages` (TRL renders them with the chat template, end-of-turn
    included) or `prompt`/`completion` (TRL appends EOS to the completion)."""
    if fmt.chat:
        return {"messages": [{"role": "user", "content": user_message(instruction, input)}, {"role": "assistant", "content": output}]}
    return {"prompt": prompt(EvalItem("", instruction, input, output, False)), "completion": output}


def scoring_ids(tokenizer, item: EvalItem, fmt: PromptFormat) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of prompt + reference + end token, tokenized as TRL tokenizes training rows."""
    if fmt.chat:
        user = [{"role": "user", "content": user_message(item.instruction, item.input)}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": item.output}], tokenize=False)
        end = full.find(fmt.end, len(prompt_text)) if fmt.end else -1
        full = full[: end + len(fmt.end)] if end >= 0 else full  # what follows end-of-turn (a newline) is not the answer's
        return tokenizer(prompt_text, add_special_tokens=False)["input_ids"], tokenizer(full, add_special_tokens=False)["input_ids"]
    text = prompt(item)
    return tokenizer(text)["input_ids"], tokenizer(text + item.output + fmt.end)["input_ids"]


def answer_request(item: EvalItem, fmt: PromptFormat, max_tokens: int) -> Request:
    """A greedy answer: under the chat template it ends at end-of-turn (the backend's EOS); under Alpaca's prompt at
    EOS or the next section marker."""
    if fmt.chat:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        return Request(messages=({"role": "user", "content": user_message(item.instruction, item.input)},), params=params)
    return Request(prompt=prompt(item), params=SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=ALPACA_STOP))


# ---- metrics (pure) ---------------------------------------------------------------------------------------------------


def completion_nll(logprobs: Sequence[float | None], start: int) -> tuple[float, int]:
    """Summed -log p of the tokens from `start` on, and how many there are."""
    values = [lp for lp in logprobs[start:] if lp is not None]
    if not values:
        raise ValueError("the reference has no tokens after the prompt")
    return -sum(values), len(values)


_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Case, surrounding whitespace and punctuation, and inner runs of whitespace do not count."""
    return _SPACE.sub(" ", text.strip().strip(".!?\"'").strip().lower())


def is_short_label(reference: str) -> bool:
    text = reference.strip()
    return bool(text) and "\n" not in text and len(text.split()) <= SHORT_LABEL_WORDS


def exact_match(answer: str, reference: str) -> float:
    """The answer's first line against the reference, both normalised."""
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    return float(normalize(first) == normalize(reference))


def item_score(item: EvalItem, nll: float, tokens: int, answer: str, hit_limit: bool) -> ItemScore:
    return ItemScore(
        loss=nll / tokens, rouge_l=0.0 if hit_limit else rouge_l(item.output, answer),
        exact_match=exact_match(answer, item.output) if is_short_label(item.output) else None, answer=answer,
        tokens=tokens, repeated=repeats(answer), hit_limit=hit_limit,
    )  # fmt: skip


def metric_values(scores: Sequence[ItemScore], metric: str) -> list[float | None]:
    return [getattr(s, metric) for s in scores]


def mean_metric(scores: Sequence[ItemScore], metric: str) -> float | None:
    values = [v for v in metric_values(scores, metric) if v is not None]
    return statistics.fmean(values) if values else None


def item_means(replicates: Sequence[Sequence[ItemScore]], metric: str) -> list[float | None]:
    """Per item, the metric averaged over a model's replicates (None where the item has no such metric)."""
    sizes = {len(r) for r in replicates}
    if len(sizes) != 1:
        raise ValueError(f"replicates scored different numbers of items: {sorted(sizes)}")
    out = []
    for values in zip(*(metric_values(r, metric) for r in replicates)):
        present = [v for v in values if v is not None]
        out.append(statistics.fmean(present) if present else None)
    return out


def summarize(replicates: Sequence[Sequence[ItemScore]]) -> dict[str, float | int | None]:
    """A model's figures over all its replicates: loss per item and per token, the answer metrics, degeneration."""
    every = [s for r in replicates for s in r]
    tokens = sum(s.tokens for s in every)
    return {
        "loss_per_item": mean_metric(every, "loss"),
        "loss_per_token": sum(s.loss * s.tokens for s in every) / tokens if tokens else None,
        "rouge_l": mean_metric(every, "rouge_l"),
        "exact_match": mean_metric(every, "exact_match"),
        "exact_match_items": sum(s.exact_match is not None for s in replicates[0]),
        "degeneration_rate": statistics.fmean(s.degenerate for s in every),
        "repetition_rate": statistics.fmean(s.repeated for s in every),
        "length_limit_rate": statistics.fmean(s.hit_limit for s in every),
        "items": len(replicates[0]),
        "replicates": len(replicates),
    }


# ---- Student's t, without scipy -----------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, 6.4, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (bisection on t_cdf, to 1e-10)."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-10:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class PairedT:
    mean: float
    low: float
    high: float
    p_value: float
    """Two-sided, of a zero mean difference."""
    mdd: float
    """Minimum detectable difference: the true mean difference a two-sided test at 1 - CONFIDENCE finds with
    probability POWER, (t_{1-a/2} + t_{power}) x sd / sqrt(n) (normal approximation to the noncentral t)."""
    n: int


def paired_t(differences: Sequence[float], between: Sequence[tuple[float, int]] = (), confidence: float = CONFIDENCE,
             power: float = POWER) -> PairedT:  # fmt: skip
    """t-interval of the mean of per-item differences. `between`: (variance, degrees of freedom) of further
    independent terms of the mean, here each model's training noise (the variance of its replicate means over its
    replicates, divided by their number): a shift that training gives every item at once, which item-level
    resampling never sees. Degrees of freedom by Welch-Satterthwaite. With one item the interval is unbounded."""
    n = len(differences)
    if n == 0:
        raise ValueError("no items to compare")
    mean = statistics.fmean(differences)
    if n == 1:
        return PairedT(mean, -math.inf, math.inf, 1.0, math.inf, 1)
    terms = [(statistics.variance(differences) / n, n - 1), *((v, df) for v, df in between if df > 0)]
    variance = sum(v for v, _ in terms)
    se = math.sqrt(variance)
    if se == 0:
        return PairedT(mean, mean, mean, 0.0 if mean else 1.0, 0.0, n)
    df = variance**2 / sum(v**2 / d for v, d in terms if v > 0)
    t_crit = t_quantile(1 - (1 - confidence) / 2, df)
    mdd = (t_crit + t_quantile(power, df)) * se
    p = 2 * (1 - t_cdf(abs(mean) / se, df))
    return PairedT(mean, mean - t_crit * se, mean + t_crit * se, p, mdd, n)


def training_noise(replicates: Sequence[Sequence[ItemScore]], metric: str, keep: Sequence[bool]) -> tuple[float, int]:
    """(variance of the mean over replicates, degrees of freedom) of a model's replicate means on the kept items."""
    means = [statistics.fmean(v for v, k in zip(metric_values(r, metric), keep) if k) for r in replicates]
    if len(means) < 2:
        return 0.0, 0
    return statistics.variance(means) / len(means), len(means) - 1


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ---- comparisons ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    metric: str
    model: str
    baseline: str
    difference: float
    """mean over items of (model - baseline), each averaged over its replicates."""
    low: float
    high: float
    items: int
    lower_is_better: bool
    p_value: float
    mdd: float
    degeneration: tuple[float, float] = (0.0, 0.0)
    """Degeneration rates of the model and the baseline."""
    noise_floor: float = 0.0
    """The largest replicate-to-replicate mean difference of either model on this metric, shown beside the result;
    the interval already carries the training noise (paired_t's `between`)."""
    role: str = "primary"
    """primary, or secondary (Holm-corrected over all secondaries)."""
    p_holm: float | None = None

    @property
    def p_decisive(self) -> float:
        return self.p_value if self.p_holm is None else self.p_holm

    @property
    def blocked(self) -> str | None:
        """Why a difference on the better side is still not "better"."""
        if self.items < MIN_ITEMS:
            return f"too few items: {self.items} < {MIN_ITEMS}"
        model_rate, base_rate = self.degeneration
        if model_rate > base_rate + DEGENERATION_MARGIN:
            return f"degenerate answers: {model_rate:.0%} vs {base_rate:.0%}"
        return None

    @property
    def significant(self) -> bool:
        on_side = self.high < 0 if self.lower_is_better else self.low > 0
        return on_side and self.p_decisive < 1 - CONFIDENCE

    @property
    def better(self) -> bool:
        return self.significant and self.blocked is None


def compare(model: str, replicates: Sequence[Sequence[ItemScore]], baseline: str, base_replicates: Sequence[Sequence[ItemScore]],
            metric: str, noise_floor: float = 0.0) -> Comparison | None:  # fmt: skip
    """Paired comparison on the items where both have the metric, averaged over each one's replicates; None when
    no item has the metric."""
    a, b = item_means(replicates, metric), item_means(base_replicates, metric)
    if len(a) != len(b):
        raise ValueError(f"{model} has {len(a)} item scores, {baseline} has {len(b)}: not the same items")
    keep = [x is not None and y is not None for x, y in zip(a, b)]
    differences = [x - y for x, y, k in zip(a, b, keep) if k]
    if not differences:
        return None
    t = paired_t(differences, [training_noise(replicates, metric, keep), training_noise(base_replicates, metric, keep)])
    rates = (summarize(replicates)["degeneration_rate"], summarize(base_replicates)["degeneration_rate"])
    return Comparison(metric, model, baseline, t.mean, t.low, t.high, t.n, METRICS[metric], t.p_value, t.mdd, rates, noise_floor)


def with_holm(primary: Comparison, secondaries: Sequence[Comparison]) -> list[Comparison]:
    """The primary as it is, then the secondaries with Holm-adjusted p-values."""
    adjusted = holm([c.p_value for c in secondaries])
    return [replace(primary, role="primary", p_holm=None)] + [replace(c, role="secondary", p_holm=p) for c, p in zip(secondaries, adjusted)]


def replicate_spread(replicates: Sequence[Sequence[ItemScore]], metric: str) -> list[tuple[int, int, float]]:
    """(a, b, mean over items of replicate a - replicate b) for every pair of replicates: the noise floor."""
    means = [[v for v in metric_values(r, metric)] for r in replicates]
    out = []
    for i in range(len(replicates)):
        for j in range(i + 1, len(replicates)):
            diffs = [x - y for x, y in zip(means[i], means[j]) if x is not None and y is not None]
            if diffs:
                out.append((i, j, statistics.fmean(diffs)))
    return out


def verdict(c: Comparison) -> str:
    """One line with the numbers and the minimum detectable difference at this size (every verdict, "better" too: a
    reader sees the power of the comparison beside its result)."""
    if c.better:
        word = "better"
    else:
        reason = c.blocked if c.significant else None
        word = f"not better ({reason})" if reason else "not better"
        if c.items < MIN_ITEMS and not reason:
            word = f"not better (too few items: {c.items} < {MIN_ITEMS})"
    direction = "lower is better" if c.lower_is_better else "higher is better"
    p = f"p {c.p_value:.3g}" if c.p_holm is None else f"p {c.p_value:.3g}, Holm {c.p_holm:.3g}"
    line = (f"{c.model} vs {c.baseline}, {METRIC_NAMES[c.metric]} ({direction}): {word}: difference {c.difference:+.4f}, "
            f"{CONFIDENCE:.0%} paired t-interval {c.low:+.4f}..{c.high:+.4f} over {c.items} items, {p}")  # fmt: skip
    return line + f"; minimum detectable difference {c.mdd:.4f} ({POWER:.0%} power)"


# ---- the one I/O function -----------------------------------------------------------------------------------------


def score_model(backend: Backend, tokenizer, items: Sequence[EvalItem], fmt: PromptFormat, max_tokens: int) -> list[ItemScore]:
    """Loss of each reference (with its end token) and a greedy answer to each prompt, in item order."""
    ids = [scoring_ids(tokenizer, item, fmt) for item in items]
    # The completion starts where prompt and prompt + reference diverge (TRL's common_prefix_length), in case a
    # tokenizer merges across the boundary.
    starts = [next((k for k, (a, b) in enumerate(zip(p, f)) if a != b), min(len(p), len(f))) for p, f in ids]
    scored = backend.score([f for _, f in ids])
    results = backend.generate([answer_request(item, fmt, max_tokens) for item in items])
    out = []
    for item, s, start, result in zip(items, scored, starts, results):
        completion = result.completions[0]
        nll, tokens = completion_nll(s.logprobs, start)
        out.append(item_score(item, nll, tokens, completion.text.strip(), completion.finish_reason == "length"))
    return out
