"""datagen/evaluate.py: the held-out split, the model's own format, the metrics, the paired t-interval, Holm and the
verdicts (pure functions), degeneration on a scripted degenerate model, pure noise never called better, and
score_model on the real embedded model under its chat template and under Alpaca's prompt."""

from __future__ import annotations

import math
import random

import pytest

from datagen.backends import Completion, Result, ScoredSequence
from datagen.evaluate import (
    EvalItem,
    ItemScore,
    PromptFormat,
    compare,
    completion_nll,
    eval_items,
    exact_match,
    holm,
    is_short_label,
    item_means,
    paired_t,
    prompt,
    repeats,
    sample_items,
    score_model,
    split_seeds,
    summarize,
    t_quantile,
    verdict,
    with_holm,
)
from pipelines.seeds import SeedInstance, SeedTask


def seed(i: int, instances: int = 1, classification: bool | None = False) -> SeedTask:
    return SeedTask(f"s{i}", f"Task {i}", tuple(SeedInstance(f"in {i}.{k}", f"out {i}.{k}") for k in range(instances)), classification)


def scores(losses, rouges=None, exact=None, repeated=None) -> list[ItemScore]:
    rouges = rouges or [0.0] * len(losses)
    exact = exact or [None] * len(losses)
    repeated = repeated or [False] * len(losses)
    return [ItemScore(loss=l, rouge_l=r, exact_match=e, answer="", tokens=10, repeated=d) for l, r, e, d in zip(losses, rouges, exact, repeated)]


def test_split_is_seeded_disjoint_and_skips_tasks_without_instances():
    seeds = [seed(i) for i in range(10)] + [seed(10, instances=0)]
    train, held = split_seeds(seeds, 3, seed=0)
    assert len(held) == 3 and len(train) == 8
    assert {s.id for s in train}.isdisjoint({s.id for s in held})
    assert "s10" in {s.id for s in train}  # nothing to score in it
    assert split_seeds(seeds, 3, seed=0) == (train, held)
    assert split_seeds(seeds, 3, seed=1)[1] != held


def test_items_one_per_instance_with_unique_ids_and_a_seeded_sample():
    items = eval_items([seed(1, instances=2, classification=True), SeedTask("x", "Say hi.", (SeedInstance("", "Hi"),), None)])
    assert [(i.key, i.output) for i in items] == [("s1:0", "out 1.0"), ("s1:1", "out 1.1"), ("x", "Hi")]
    assert prompt(items[2]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    many = eval_items([seed(i) for i in range(20)])
    picked = sample_items(many, 5, seed=0)
    assert len(picked) == 5 and picked == sample_items(many, 5, seed=0) and picked == sorted(picked, key=many.index)
    assert sample_items(many, None, 0) == many and sample_items(many, 50, 0) == many


def test_completion_nll_counts_only_tokens_after_the_prompt():
    assert completion_nll((None, -5.0, -1.0, -3.0), 2) == (4.0, 2)
    assert completion_nll((None, -5.0, -1.0, -3.0), 1) == (9.0, 3)
    with pytest.raises(ValueError):
        completion_nll((None, -1.0), 2)


def test_exact_match_only_on_short_labels_and_on_the_answers_first_line():
    assert is_short_label("Positive") and is_short_label("not a fruit.") and not is_short_label("a b c d")
    assert not is_short_label("Yes\nbecause") and not is_short_label("  ")
    assert exact_match("  Positive. \nThe review praises it.", "positive") == 1.0
    assert exact_match("Not  positive", "not positive") == 1.0
    assert exact_match("Negative", "Positive") == 0.0 and exact_match("", "Positive") == 0.0


def test_repeats_marks_a_word_trigram_said_four_times():
    assert repeats("long, long, long, long, long, long")  # the round-1 answer
    assert repeats("1. the best way\n2. the best way\n3. the best way\n4. the best way")
    assert repeats("1. Music theory 2. Music theory 3. Music theory 4. Music theory 5. Music theory")  # the tiny loop's answer, longer
    assert not repeats("1. Music theory 2. Music theory 3. Music theory")
    assert not repeats("Play chess, go hiking, bake bread, or read a long book together.")


def test_t_quantiles_and_the_paired_interval_match_the_textbook():
    assert t_quantile(0.975, 19) == pytest.approx(2.093024, abs=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(0.8, 125) == pytest.approx(0.844506, abs=1e-6)
    t = paired_t([1.0, 2.0, 3.0, 4.0])  # mean 2.5, sd 1.2910, se 0.6455, t_0.975,3 = 3.182446
    assert (t.mean, t.n) == (2.5, 4)
    assert t.low == pytest.approx(2.5 - 3.182446 * 0.645497, abs=1e-5) and t.high == pytest.approx(2.5 + 3.182446 * 0.645497, abs=1e-5)
    assert t.p_value == pytest.approx(0.030466, abs=1e-6)  # t = 3.873, 3 df (scipy.stats.ttest_1samp)
    assert t.mdd == pytest.approx((3.182446 + t_quantile(0.8, 3)) * 0.645497, abs=1e-5)
    assert paired_t([0.5] * 7).low == paired_t([0.5] * 7).high == 0.5


def test_the_paired_t_interval_covers_at_small_n():
    """The issue measured 92% coverage for the percentile bootstrap at n = 10-20; the t-interval keeps 95%."""
    rng = random.Random(1)
    hits = sum(t.low <= 0.3 <= t.high for t in (paired_t([rng.gauss(0.3, 1.0) for _ in range(10)]) for _ in range(2000)))
    assert 0.935 <= hits / 2000 <= 0.965


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.6]) == [1.0, 1.0]


def test_items_are_averaged_over_replicates_and_paired():
    reps = [scores([1.0, 2.0]), scores([3.0, 2.0])]
    assert item_means(reps, "loss") == [2.0, 2.0]
    c = compare("tuned", reps, "base", [scores([2.5, 2.5])], "loss")
    assert c.difference == pytest.approx(-0.5) and c.items == 2
    with pytest.raises(ValueError):
        compare("a", [scores([0, 0])], "b", [scores([0])], "loss")
    assert compare("a", [scores([0])], "b", [scores([0])], "exact_match") is None


def test_verdicts_need_items_a_side_a_margin_over_the_noise_and_fluent_answers():
    few = compare("tuned", [scores([1.0, 1.1, 1.2])], "base", [scores([1.5] * 3)], "loss")
    assert few.high < 0 and not few.better
    assert ": not better (too few items: 3 < 10): difference -0.4000, 95% paired t-interval " in verdict(few)
    assert "minimum detectable difference" in verdict(few)
    mixed = compare("tuned", [scores([1.0, 3.0] * 6)], "base", [scores([2.0] * 12)], "loss")
    assert mixed.low < 0 < mixed.high and ": not better: difference +0.0000" in verdict(mixed)
    assert verdict(mixed).endswith(f"minimum detectable difference {mixed.mdd:.4f} (80% power)")
    steady = compare("tuned", [scores([1.0 + 0.01 * k for k in range(30)])], "base", [scores([1.5] * 30)], "loss")
    assert steady.better and ": better:" in verdict(steady) and verdict(steady).endswith(f"minimum detectable difference {steady.mdd:.4f} (80% power)")
    # the same items, but the tuned model's two replicates disagree by 0.6 everywhere: training noise, not a gain
    noisy = compare("tuned", [scores([0.7 + 0.01 * k for k in range(30)]), scores([1.3 + 0.01 * k for k in range(30)])], "base",
                    [scores([1.5] * 30)], "loss")  # fmt: skip
    assert noisy.difference == pytest.approx(steady.difference) and noisy.low < 0 < noisy.high and not noisy.better
    worse = compare("tuned", [scores([0] * 20, rouges=[0.1] * 20)], "base", [scores([0] * 20, rouges=[0.5] * 20)], "rouge_l")
    assert worse.difference == pytest.approx(-0.4) and not worse.better
    # a lower loss from a model whose answers degenerate is never "better"
    babbling = compare("tuned", [scores([1.0 + 0.01 * k for k in range(30)], repeated=[True] * 10 + [False] * 20)], "base",
                       [scores([1.5] * 30)], "loss")  # fmt: skip
    assert babbling.significant and not babbling.better and "not better (degenerate answers: 33% vs 0%)" in verdict(babbling)


def test_primary_keeps_its_p_value_and_secondaries_are_holm_corrected():
    a = compare("r1", [scores([1.0 + 0.01 * k for k in range(30)])], "seeds-only", [scores([1.5] * 30)], "loss")
    b = compare("r1", [scores([1.0, 1.2] * 15)], "base", [scores([1.15, 1.1] * 15)], "loss")
    c = compare("r1", [scores([0.9, 1.3] * 15)], "base", [scores([1.1, 1.1] * 15)], "loss")
    primary, *secondary = with_holm(a, [b, c])
    assert primary.role == "primary" and primary.p_holm is None and primary.better
    assert [s.role for s in secondary] == ["secondary"] * 2 and [s.p_holm for s in secondary] == pytest.approx(holm([b.p_value, c.p_value]))
    assert "Holm" in verdict(secondary[0]) and "Holm" not in verdict(primary)


def test_pure_noise_generated_data_is_not_called_better():
    """A loop whose generated rows are noise: the tuned model differs from seeds-only only by training noise (a shift
    per replicate, common to all items) and item noise. Over 400 such loops of 126 items and 3 replicates, the primary
    verdict says "better" in at most 5% of them (nominal: 2.5%, one side of a 95% interval). An interval over items
    alone calls 69 of these 400 loops better (17%): it never sees the shift; this interval, 9 (2.25%)."""
    rng = random.Random(7)
    better = 0
    for _ in range(400):
        difficulty = [rng.gauss(2.0, 0.5) for _ in range(126)]
        arms = [[scores([d + shift + rng.gauss(0, 0.1) for d in difficulty]) for shift in (rng.gauss(0, 0.02) for _ in range(3))]
                for _ in range(2)]  # fmt: skip
        better += compare("round 1", arms[1], "seeds-only", arms[0], "loss").better
    assert better / 400 <= 0.05, better


class DegenerateBackend:
    """Scripted: every answer repeats itself until the token limit; every reference token gets log p = -1."""

    def score(self, sequences):
        return [ScoredSequence(tuple(s), (None,) + (-1.0,) * (len(s) - 1)) for s in sequences]

    def generate(self, requests):
        return [Result(prompt="", prompt_tokens=1, completions=(Completion("long, " * 40, "length", r.params.max_tokens),), latency_s=0.0)
                for r in requests]  # fmt: skip


def test_a_degenerate_model_shows_its_degeneration_rate(hf_backend):
    items = [EvalItem("t", "Suggest some games for a party.", "", "Charades, Pictionary and trivia are popular.", False, "t"),
             EvalItem("u", "Is the review positive?", "Great food.", "Positive", True, "u")]  # fmt: skip
    fmt = PromptFormat(chat=True, end=hf_backend.tokenizer.eos_token)
    result = score_model(DegenerateBackend(), hf_backend.tokenizer, items, fmt, max_tokens=40)
    assert all(s.repeated and s.hit_limit and s.degenerate and s.rouge_l == 0.0 and s.loss == 1.0 for s in result)
    figures = summarize([result])
    assert figures["degeneration_rate"] == figures["repetition_rate"] == figures["length_limit_rate"] == 1.0
    assert figures["exact_match_items"] == 1 and figures["exact_match"] == 0.0


def test_score_model_on_the_embedded_model_in_its_chat_format_and_in_alpacas(hf_backend):
    """Under the chat template the reference is scored with its end-of-turn token and the greedy answer stops there;
    under Alpaca's prompt, with EOS."""
    tokenizer = hf_backend.tokenizer
    items = [EvalItem("u", "Name a primary color. Answer with one word.", "", "Red", False, "u")]
    chat = PromptFormat(chat=True, end=tokenizer.eos_token)
    assert tokenizer.eos_token == "<|im_end|>"
    [scored] = score_model(hf_backend, tokenizer, items, chat, max_tokens=24)
    full = tokenizer.apply_chat_template([{"role": "user", "content": items[0].instruction}, {"role": "assistant", "content": "Red"}], tokenize=False)
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": items[0].instruction}], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt_text) and full[len(prompt_text) :] == "Red<|im_end|>\n"
    assert scored.tokens == len(tokenizer("Red<|im_end|>", add_special_tokens=False)["input_ids"])
    assert math.isfinite(scored.loss) and scored.loss > 0 and not scored.hit_limit  # it stopped at end-of-turn
    assert "<|im_end|>" not in scored.answer and "### " not in scored.answer

    alpaca = PromptFormat(chat=False, end=tokenizer.eos_token)
    [plain] = score_model(hf_backend, tokenizer, items, alpaca, max_tokens=24)
    logprobs = hf_backend.score([prompt(items[0]) + "Red" + tokenizer.eos_token])[0].logprobs
    start = len(tokenizer(prompt(items[0]))["input_ids"])
    assert plain.tokens == len(logprobs) - start and plain.loss == pytest.approx(-sum(logprobs[start:]) / plain.tokens, rel=1e-5)
    assert "### " not in plain.answer  # stopped before the next section, if the model wrote one
