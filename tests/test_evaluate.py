"""datagen/evaluate.py: the held-out split, the metrics, the bootstrap interval and the verdicts (pure functions),
and score_model on the real embedded model."""

from __future__ import annotations

import math

import pytest

from datagen.backends import ScoredSequence
from datagen.evaluate import (
    EvalItem,
    ItemScore,
    bootstrap_interval,
    compare,
    completion_loss,
    eval_items,
    exact_match,
    mean_metric,
    prompt,
    split_seeds,
    verdict,
)
from pipelines.seeds import SeedInstance, SeedTask


def seed(i: int, instances: int = 1, classification: bool | None = False) -> SeedTask:
    return SeedTask(f"s{i}", f"Task {i}", tuple(SeedInstance(f"in {i}.{k}", f"out {i}.{k}") for k in range(instances)), classification)


def scores(losses, rouges=None, exact=None) -> list[ItemScore]:
    rouges = rouges or [0.0] * len(losses)
    exact = exact or [None] * len(losses)
    return [ItemScore(loss=l, rouge_l=r, exact_match=e, answer="") for l, r, e in zip(losses, rouges, exact)]


def test_split_is_seeded_disjoint_and_skips_tasks_without_instances():
    seeds = [seed(i) for i in range(10)] + [seed(10, instances=0)]
    train, held = split_seeds(seeds, 3, seed=0)
    assert len(held) == 3 and len(train) == 8
    assert {s.id for s in train}.isdisjoint({s.id for s in held})
    assert "s10" in {s.id for s in train}  # nothing to score in it
    assert split_seeds(seeds, 3, seed=0) == (train, held)
    assert split_seeds(seeds, 3, seed=1)[1] != held
    assert [s.id for s in train] == sorted((s.id for s in train), key=lambda x: int(x[1:]))  # file order kept


def test_items_one_per_instance_with_the_alpaca_prompt():
    items = eval_items([seed(1, instances=2, classification=True), SeedTask("x", "Say hi.", (SeedInstance("", "Hi"),), None)])
    assert [(i.task_id, i.output, i.is_classification) for i in items] == [("s1", "out 1.0", True), ("s1", "out 1.1", True), ("x", "Hi", False)]
    assert prompt(items[2]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert "### Input:\nin 1.0\n\n### Response:\n" in prompt(items[0])


def test_completion_loss_counts_only_tokens_after_the_prompt():
    scored = ScoredSequence(token_ids=(1, 2, 3, 4), logprobs=(None, -5.0, -1.0, -3.0))
    assert completion_loss(scored, 2) == pytest.approx(2.0)
    assert completion_loss(scored, 1) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        completion_loss(scored, 4)


def test_exact_match_ignores_case_space_and_end_punctuation():
    assert exact_match("  Positive. ", "positive") == 1.0
    assert exact_match("Not  positive", "not positive") == 1.0
    assert exact_match("Negative", "Positive") == 0.0


def test_bootstrap_interval_brackets_the_mean_and_is_a_point_for_constant_differences():
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)
    low, high = bootstrap_interval([-1.0, 0.0, 1.0, 2.0, 3.0], resamples=2000)
    assert low < 1.0 < high and -1.0 <= low and high <= 3.0
    assert bootstrap_interval([1.0, -1.0, 2.0], seed=3) == bootstrap_interval([1.0, -1.0, 2.0], seed=3)


def test_three_items_cannot_claim_a_win_but_a_consistent_gain_over_many_can():
    # lower loss on 2 of 3 items, higher on the third: the interval includes 0
    noisy = compare("tuned", scores([1.0, 1.0, 3.0]), "base", scores([2.0, 2.0, 2.0]), "loss")
    assert noisy.difference == pytest.approx(-1 / 3) and noisy.low < 0 < noisy.high and not noisy.better
    assert verdict(noisy).startswith("tuned vs base, loss (lower is better): not better (too few items: 3 < 10): difference -0.3333, 95% CI ")
    assert verdict(noisy).endswith("over 3 items")
    # enough items, but the interval includes 0
    mixed = compare("tuned", scores([1.0, 3.0] * 6), "base", scores([2.0] * 12), "loss")
    assert mixed.low < 0 < mixed.high and ": not better: difference +0.0000" in verdict(mixed)
    # three items that all agree: the interval excludes 0, yet three items are too few to claim a win
    agreeing = compare("tuned", scores([1.0, 1.1, 1.2]), "base", scores([1.5] * 3), "loss")
    assert agreeing.high < 0 and not agreeing.better
    assert ": not better (too few items: 3 < 10): difference -0.4000" in verdict(agreeing)
    steady = compare("tuned", scores([1.0 + 0.01 * k for k in range(30)]), "base", scores([1.5] * 30), "loss")
    assert steady.high < 0 and steady.better and ": better:" in verdict(steady)
    # higher is better for ROUGE-L: a lower ROUGE-L everywhere is not better
    worse = compare("tuned", scores([0] * 20, rouges=[0.1] * 20), "base", scores([0] * 20, rouges=[0.5] * 20), "rouge_l")
    assert worse.difference == pytest.approx(-0.4) and not worse.better


def test_exact_match_compares_classification_items_only():
    a = scores([0, 0, 0], exact=[1.0, None, 0.0])
    b = scores([0, 0, 0], exact=[0.0, None, 0.0])
    c = compare("a", a, "b", b, "exact_match")
    assert c.items == 2 and c.difference == pytest.approx(0.5)
    assert mean_metric(a, "exact_match") == 0.5
    assert compare("a", scores([0]), "b", scores([0]), "exact_match") is None
    with pytest.raises(ValueError):
        compare("a", scores([0, 0]), "b", scores([0]), "loss")


def test_score_model_on_the_embedded_model():
    from datagen.backends import load_backend
    from datagen.evaluate import score_model

    items = [EvalItem("t", "Is this sentence positive or negative?", "I love it.", "Positive", True),
             EvalItem("u", "Name a primary color.", "", "Red", False)]  # fmt: skip
    backend = load_backend("transformers", "smollm2-135m")
    try:
        result = score_model(backend, items, max_tokens=8)
        prompt_ids = backend.tokenize(prompt(items[1]))
        full = backend.score([prompt(items[1]) + "Red"])[0]
    finally:
        backend.close()
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in result)
    assert result[1].loss == pytest.approx(completion_loss(full, len(prompt_ids)))
    assert result[0].exact_match in (0.0, 1.0) and result[1].exact_match is None
    assert all(0.0 <= s.rouge_l <= 1.0 and isinstance(s.answer, str) for s in result)
