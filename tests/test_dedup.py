"""datagen.dedup against rouge-score itself: the same F-measure floats, the same filter decisions as the sequential
reference loop on the real seed tasks, plus the Unicode tokenizer, exact, fuzzy and MinHash, and `datagen dedup`."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz import fuzz
from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer, scoring
from typer.testing import CliRunner

from datagen import dedup
from datagen.dedup import (
    Decision,
    ExactIndex,
    FuzzyIndex,
    Match,
    MinHashIndex,
    RougeIndex,
    exact_key,
    make_index,
    normalize,
    rouge_l,
    rouge_l_fmeasure,
    tokenize_unicode,
)
from datagen.cli.commands.dedup import dedup as dedup_command
from datagen.errors import BadInput

SEEDS = Path(__file__).resolve().parents[1] / "examples" / "seed_tasks.jsonl"
SEED_INSTRUCTIONS = [json.loads(line)["instruction"] for line in SEEDS.read_text().splitlines()]
SCORERS = {stem: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem) for stem in (False, True)}


def reference_score(target: str, prediction: str, use_stemmer: bool = False) -> float:
    return SCORERS[use_stemmer].score(target, prediction)["rougeL"].fmeasure


def reference_filter(pool: list[str], candidates: list[str], threshold: float = 0.7, use_stemmer: bool = False):
    """Stanford Alpaca's loop: pre-tokenized, `_score_lcs` against everything kept so far, drop if max F > threshold.

    Returns (kept, max score, index of the first text reaching it or None) per candidate.
    """
    tokenize = SCORERS[use_stemmer]._tokenizer.tokenize
    pool_tokens = [tokenize(text) for text in pool]
    results = []
    for text in candidates:
        tokens = tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in pool_tokens]
        best = max(scores, default=0.0)
        results.append((best <= threshold, best, scores.index(best) if best > 0 else None))
        if best <= threshold:
            pool_tokens.append(tokens)
    return results


def perturbed(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Real sentences with word drops, swaps and substitutions from their own vocabulary: near and far duplicates."""
    rng = random.Random(seed)
    vocabulary = sorted({w for t in texts for w in t.split()})
    out = []
    for _ in range(n):
        words = rng.choice(texts).split()
        for _ in range(rng.choice([0, 1, 2, 4, 8])):
            at = rng.randrange(len(words))
            op = rng.random()
            if op < 0.3 and len(words) > 2:
                del words[at]
            elif op < 0.6 and at + 1 < len(words):
                words[at], words[at + 1] = words[at + 1], words[at]
            else:
                words[at] = rng.choice(vocabulary)
        text = " ".join(words)
        out.append(text.upper() if rng.random() < 0.1 else text)
    return out


# --- ROUGE-L: identical floats ---------------------------------------------------------------------------------------

WORDS = ["the", "The", "THE", "a", "cat", "cats", "running", "runs", "run", "generalization", "generalize",
         "1", "42", "3.14", "x2", "don't", "e-mail", "café", "naïve", "中文", "文", "مرحبا", "ß", "İ"]
SEPARATORS = [" ", "  ", "\n", "\t", ", ", ". ", "!", "?", "-", "'", '"', "(", ")", ":", ";", "/", ""]
text_strategy = st.one_of(
    st.lists(st.one_of(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=40).map("".join),
    st.text(max_size=60),
    st.just(""),
)


@settings(max_examples=400, deadline=None)
@given(target=text_strategy, prediction=text_strategy, use_stemmer=st.booleans())
def test_rouge_l_is_rouge_score(target, prediction, use_stemmer):
    assert rouge_l(target, prediction, use_stemmer=use_stemmer) == reference_score(target, prediction, use_stemmer)


@settings(max_examples=150, deadline=None)
@given(pool=st.lists(text_strategy, max_size=12), query=text_strategy, use_stemmer=st.booleans())
def test_index_nearest_is_rouge_score(pool, query, use_stemmer):
    index = RougeIndex(use_stemmer=use_stemmer)
    index.add(pool)
    scores = [reference_score(query, text, use_stemmer) for text in pool]
    best = max(scores, default=0.0)
    match = index.nearest(query)
    if best == 0:
        assert match is None
    else:
        assert match == Match(scores.index(best), pool[scores.index(best)], best)


def test_fmeasure_formula_is_rouge_scores_for_every_small_length():
    """The table path (numpy) and the scalar path give rouge-score's floats for every LCS and pair of lengths."""
    for len_target in range(0, 48):
        for len_prediction in range(0, 48):
            lcs = np.arange(min(len_target, len_prediction) + 1)
            vectorized = rouge_l_fmeasure(lcs, len_target, np.array(len_prediction))
            for value in lcs.tolist():
                if len_target and len_prediction:
                    expected = scoring.fmeasure(value / len_prediction, value / len_target)
                else:
                    expected = 0
                assert rouge_l_fmeasure(value, len_target, len_prediction) == expected
                assert vectorized[value] == expected


def test_rouge_l_edge_cases():
    assert rouge_l("", "") == 0.0
    assert rouge_l("the cat", "") == 0.0
    assert rouge_l("!!!", "...") == 0.0  # no tokens: rouge-score scores 0, not 1
    assert rouge_l("Write a poem.", "write A POEM!") == 1.0
    assert rouge_l("running cats", "run cat") == 0.0
    assert rouge_l("running cats", "run cat", use_stemmer=True) == 1.0


# --- The sequential filter equals the reference loop -----------------------------------------------------------------

CANDIDATES = SEED_INSTRUCTIONS[100:] + perturbed(SEED_INSTRUCTIONS, 260)
POOL = SEED_INSTRUCTIONS[:100]


@pytest.fixture(scope="module")
def reference_decisions():
    return reference_filter(POOL, CANDIDATES)


@pytest.mark.parametrize("block_size", [1024, 37, 1])
def test_filter_equals_reference_loop_on_seed_tasks(reference_decisions, block_size, monkeypatch):
    monkeypatch.setattr(dedup, "BLOCK_SIZE", block_size)
    index = RougeIndex(0.7)
    index.add(POOL)
    decisions = index.filter(CANDIDATES)
    assert [d.kept for d in decisions] == [kept for kept, _, _ in reference_decisions]
    assert 0 < sum(d.kept for d in decisions) < len(CANDIDATES)  # the test data has both outcomes
    for d, (kept, score, at) in zip(decisions, reference_decisions):
        if not kept:  # a drop's score and nearest text are exact
            assert (d.score, d.nearest_index) == (score, at)
            assert d.nearest_text == index.texts[at]
        else:  # a kept one's are the best among texts long enough to matter
            assert d.score <= score
    assert index.texts == POOL + [c for c, d in zip(CANDIDATES, decisions) if d.kept]


def test_exact_nearest_gives_kept_candidates_their_exact_nearest_text(reference_decisions):
    """What the pipelines store for an accepted instruction: its true nearest earlier text and ROUGE-L."""
    index = RougeIndex(0.7)
    index.add(POOL)
    decisions = index.filter(CANDIDATES, exact_nearest=True)
    assert [d.kept for d in decisions] == [kept for kept, _, _ in reference_decisions]
    assert sum(d.kept and d.score > 0 for d in decisions) > 10  # kept ones with a nearest text exist
    for d, (kept, score, at) in zip(decisions, reference_decisions):
        assert (d.kept, d.score, d.nearest_index) == (kept, score, at)
        assert d.nearest_text == (index.texts[at] if at is not None else None)


def test_filter_in_batches_equals_one_batch(reference_decisions):
    index = RougeIndex()
    index.add(POOL)
    decisions = []
    for start in range(0, len(CANDIDATES), 50):
        decisions += index.filter(CANDIDATES[start : start + 50])
    assert [d.kept for d in decisions] == [kept for kept, _, _ in reference_decisions]


def test_filter_with_stemmer_and_other_threshold_equals_reference_loop():
    candidates = CANDIDATES[:150]
    expected = reference_filter(POOL[:40], candidates, threshold=0.5, use_stemmer=True)
    index = RougeIndex(0.5, use_stemmer=True)
    index.add(POOL[:40])
    assert [d.kept for d in index.filter(candidates)] == [kept for kept, _, _ in expected]


def test_filter_checks_candidates_against_earlier_ones_of_the_same_batch():
    index = RougeIndex()
    decisions = index.filter(["Write a poem about the sea.", "Write a poem about the sea!", "Name three rivers in Asia."])
    assert [d.kept for d in decisions] == [True, False, True]
    assert decisions[1] == Decision(False, 1.0, 0, "Write a poem about the sea.")
    assert decisions[0] == Decision(True, 0.0, None, None)
    assert len(index) == 2


def test_threshold_bounds():
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(BadInput, match="threshold must be between 0 and 1"):
            RougeIndex(bad)
    index = RougeIndex(1.0)  # nothing scores above 1: everything is kept
    assert all(d.kept for d in index.filter(["same text", "same text"]))
    index = RougeIndex(0.0)  # anything sharing a token is dropped
    assert [d.kept for d in index.filter(["one two", "two three", "four"])] == [True, False, True]


# --- The prefix-filtered index: exact against brute force ------------------------------------------------------------


def brute_force_filter(pool: list[str], candidates: list[str], threshold: float, tokenizer: str = "rouge", use_stemmer: bool = False):
    """Every pair scored: the reference loop's decisions, with the documented score and nearest text of each Decision.

    Dropped: the best F-measure over everything kept before, the earliest text reaching it. Kept: the best over the
    texts sharing at least alpha(n, m) tokens (multiset overlap), the smallest LCS that could exceed the threshold.
    """
    tokenize = dedup.make_tokenizer(tokenizer, use_stemmer)
    kept = [tokenize(text) for text in pool]
    texts = list(pool)
    decisions = []
    for text in candidates:
        tokens = tokenize(text)
        scores = [rouge_l_fmeasure(LCSseq.similarity(tokens, other), len(tokens), len(other)) for other in kept]
        best = max(scores, default=0.0)
        if best > threshold:
            at = scores.index(best)
            decisions.append(Decision(False, best, at, texts[at]))
            continue
        alpha = [min((lcs for lcs in range(1, min(len(tokens), len(other)) + 1)
                      if rouge_l_fmeasure(lcs, len(tokens), len(other)) > threshold), default=None) for other in kept]  # fmt: skip
        reachable = [(score, -at) for at, (score, other, a) in enumerate(zip(scores, kept, alpha))
                     if a is not None and sum((Counter(tokens) & Counter(other)).values()) >= a]  # fmt: skip
        score, at = max(reachable, default=(0.0, None))
        decisions.append(Decision(True, score, -at if at is not None else None, texts[-at] if at is not None else None))
        kept.append(tokens)
        texts.append(text)
    return decisions


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0,
                                       math.nextafter(0.7, 0), math.nextafter(0.7, 1)])  # fmt: skip
def test_min_overlaps_is_the_first_lcs_whose_float_score_is_above_the_threshold(threshold):
    size = 120
    alpha = dedup.min_overlaps(size, threshold)
    n, m = np.indices((size, size))
    expected = np.full((size, size), dedup.UNREACHABLE)
    for lcs in range(size - 1, 0, -1):  # every LCS, not only the ones around the algebraic crossing
        expected = np.where((lcs <= np.minimum(n, m)) & (rouge_l_fmeasure(np.full((size, size), lcs), n, m) > threshold), lcs, expected)
    assert (alpha == expected).all()
    # prefix_lengths relies on the smallest alpha of a length lying at a partner no longer than it
    within = np.where(m <= n, alpha, dedup.UNREACHABLE).min(axis=1)
    assert (within == alpha.min(axis=1)).all()
    lo, hi = dedup.partner_lengths(alpha)
    for length in range(size):
        for budget in range(size):
            partners = np.flatnonzero(alpha[length] <= budget)
            assert (lo[length, budget], hi[length, budget]) == ((partners.min(), partners.max()) if len(partners) else (size, -1))


def test_borderline_ties_are_decided_by_rouge_scores_floats():
    """F = 0.7 exactly in real numbers: rouge-score's float is 0.7000000000000001 for LCS 7 of 8 + 12 tokens, and of
    7 + 13 (where the algebra, F > 0.7 iff LCS > 7, would prune the pair), so those pairs are dropped; for LCS 7 of
    10 + 10 it is 0.7, kept. A kept one's score only counts texts sharing alpha(10, 10) = 8 tokens: none here."""
    words = [f"w{i}" for i in range(40)]
    seven, eight = " ".join(words[:7]), " ".join(words[:8])
    for pool, candidate, score in [
        (eight, " ".join(words[:7] + words[20:25]), 0.7000000000000001),
        (seven, " ".join(words[:7] + words[30:36]), 0.7000000000000001),
        (" ".join(words[:7] + words[30:36]), seven, 0.7000000000000001),
        (" ".join(words[:7] + words[10:13]), " ".join(words[:7] + words[13:16]), 0.7),
    ]:
        assert reference_score(pool, candidate) == score
        kept = score <= 0.7
        assert [k for k, _, _ in reference_filter([pool], [candidate])] == [kept]
        index = RougeIndex(0.7)
        index.add([pool])
        assert index.filter([candidate]) == [Decision(True, 0.0, None, None) if kept else Decision(False, score, 0, pool)]


small_text = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "running", "runs", "中", "文", "!"]), max_size=14).map(" ".join)


@settings(max_examples=120, deadline=None)
@given(
    pool=st.lists(small_text, max_size=8),
    candidates=st.lists(small_text, max_size=24),
    threshold=st.sampled_from([0.3, 0.5, 0.6, 0.7, 0.75, 0.8, math.nextafter(0.7, 0)]),
    options=st.sampled_from([("rouge", False), ("rouge", True), ("unicode", False)]),
    block_size=st.sampled_from([1, 3, 1024]),
)
def test_prefix_filter_equals_brute_force(pool, candidates, threshold, options, block_size):
    """Few distinct tokens, many repeats, empty texts, ties: every Decision field equals scoring every pair."""
    tokenizer, use_stemmer = options
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedup, "BLOCK_SIZE", block_size)
        index = RougeIndex(threshold, tokenizer=tokenizer, use_stemmer=use_stemmer)
        index.add(pool)
        decisions = index.filter(candidates)
    assert decisions == brute_force_filter(pool, candidates, threshold, tokenizer, use_stemmer)
    if tokenizer == "rouge":
        assert [d.kept for d in decisions] == [k for k, _, _ in reference_filter(pool, candidates, threshold, use_stemmer)]


def test_prefix_filter_prunes_and_stays_exact_on_seed_tasks(reference_decisions, monkeypatch):
    """On real instructions the index verifies a small share of the pairs, with every Decision as brute force gives."""
    verified = []
    verify = RougeIndex._verify
    monkeypatch.setattr(RougeIndex, "_verify", lambda self, rows, *rest: verified.append(len(rows)) or verify(self, rows, *rest))
    index = RougeIndex(0.7)
    index.add(POOL)
    decisions = index.filter(CANDIDATES)
    assert decisions == brute_force_filter(POOL, CANDIDATES, 0.7)
    assert [d.kept for d in decisions] == [kept for kept, _, _ in reference_decisions]
    all_pairs = sum(len(POOL) + sum(d.kept for d in decisions[:i]) for i in range(len(decisions)))
    assert sum(verified) < all_pairs / 10


def test_filter_in_small_batches_gives_the_same_decisions_as_one_call():
    """Batches re-fit the global token order and rebuild the index as it doubles; no field of any Decision changes."""
    one = RougeIndex()
    one.add(POOL[:10])
    expected = one.filter(CANDIDATES)
    batched = RougeIndex()
    batched.add(POOL[:10])
    decisions = []
    for start in range(0, len(CANDIDATES), 7):
        decisions += batched.filter(CANDIDATES[start : start + 7])
    assert decisions == expected
    assert batched.texts == one.texts


def test_filter_at_another_threshold_than_the_index_was_built_for():
    index = RougeIndex(0.9)
    index.add(POOL[:40])
    candidates = CANDIDATES[:120]
    assert index.filter(candidates, threshold=0.5) == brute_force_filter(POOL[:40], candidates, 0.5)


def test_empty_and_tokenless_texts_are_kept_with_nothing_near():
    index = RougeIndex()
    index.add(["", "!!!", "Write a poem."])
    assert index.filter(["", "...", "write a poem"]) == [
        Decision(True, 0.0, None, None), Decision(True, 0.0, None, None), Decision(False, 1.0, 2, "Write a poem.")]  # fmt: skip
    assert index.nearest("") is None


# --- Unicode ---------------------------------------------------------------------------------------------------------


def test_unicode_tokenizer():
    assert tokenize_unicode("我爱北京 Hello, WORLD! Straße ＡＢＣ naïve 42") == ["我", "爱", "北", "京", "hello", "world", "strasse", "abc", "naïve", "42"]
    assert tokenize_unicode("مرحبا بالعالم") == ["مرحبا", "بالعالم"]
    assert tokenize_unicode("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay inside their word


@pytest.mark.parametrize("text", ["请写一首关于大海的诗。", "اكتب قصيدة عن البحر.", "바다에 관한 시를 써 주세요.", "Напишите стихотворение о море."])
def test_unicode_tokenizer_catches_identical_non_english_instructions(text):
    assert rouge_l(text, text) == reference_score(text, text) == 0.0  # rouge-score: the 0.7 filter keeps every copy
    assert rouge_l(text, text, tokenizer="unicode") == 1.0
    index = RougeIndex(tokenizer="unicode")
    assert [d.kept for d in index.filter([text, text, "Name three rivers."])] == [True, False, True]


def test_stemmer_is_for_the_rouge_tokenizer_only():
    with pytest.raises(BadInput, match="stemmer"):
        RougeIndex(tokenizer="unicode", use_stemmer=True)


# --- Exact, fuzzy, MinHash -------------------------------------------------------------------------------------------


def test_exact():
    assert normalize("  Write a POEM!  about\tcats. ") == "write a poem about cats"
    assert exact_key("Write a poem.") == exact_key("write   a poem") != exact_key("write a poems")
    index = ExactIndex()
    index.add(["Write a poem."])
    decisions = index.filter(["WRITE A POEM!", "Write a poem about cats.", "write a poem about cats"])
    assert decisions == [
        Decision(False, 1.0, 0, "Write a poem."),
        Decision(True, 0.0, None, None),
        Decision(False, 1.0, 1, "Write a poem about cats."),
    ]


def test_fuzzy_ratio_and_token_set_ratio():
    index = FuzzyIndex(0.9)
    decisions = index.filter(["Write a poem about cats.", "write a poem about cat", "Cats: write a poem about them."])
    assert [d.kept for d in decisions] == [True, False, True]
    assert decisions[1].score == fuzz.ratio("write a poem about cats", "write a poem about cat") / 100
    reordered = FuzzyIndex(0.9, scorer="token_set_ratio")
    assert [d.kept for d in reordered.filter(["write a poem about cats", "about cats, write a poem"])] == [True, False]


def test_fuzzy_filter_equals_its_sequential_loop(monkeypatch):
    monkeypatch.setattr(dedup, "BLOCK_SIZE", 16)
    texts = perturbed(SEED_INSTRUCTIONS, 120, seed=1)
    kept: list[str] = []
    expected = []
    for text in texts:
        best = max((fuzz.ratio(normalize(text), normalize(k)) / 100 for k in kept), default=0.0)
        expected.append(best <= 0.8)
        if best <= 0.8:
            kept.append(text)
    assert [d.kept for d in FuzzyIndex(0.8).filter(texts)] == expected


def test_minhash():
    index = MinHashIndex(0.5)
    index.add(["Write a short poem about the ocean and its waves."])
    decisions = index.filter(
        ["Write a short poem about the ocean and its waves!", "Write a short poem about the ocean and the waves.",
         "List three prime numbers greater than one hundred."]
    )
    assert [d.kept for d in decisions] == [False, False, True]
    assert decisions[0].score == 1.0 and decisions[0].nearest_index == 0
    assert index.nearest("List three prime numbers greater than one hundred").index == 1
    with pytest.raises(BadInput, match="built for threshold 0.5"):
        index.filter(["x"], threshold=0.7)
    with pytest.raises(BadInput, match="strictly between 0 and 1"):
        MinHashIndex(1.0)


def test_make_index_rejects_options_of_other_methods():
    assert isinstance(make_index("exact"), ExactIndex)
    with pytest.raises(BadInput, match="--tokenizer and --stemmer apply to --method rougeL"):
        make_index("fuzzy", tokenizer="unicode")
    with pytest.raises(BadInput, match="--fuzzy-scorer applies to --method fuzzy"):
        make_index("rougeL", fuzzy_scorer="token_set_ratio")


# --- datagen dedup ---------------------------------------------------------------------------------------------------

runner = CliRunner()
app = typer.Typer()
app.command()(dedup_command)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_cli_rouge_l_with_against_out_pairs_and_json(tmp_path):
    data = write_jsonl(tmp_path / "machine.jsonl", [
        {"instruction": SEED_INSTRUCTIONS[1], "id": 1},  # a seed: dropped against --against
        {"instruction": "Write a poem about the sea.", "id": 2},
        {"instruction": "write a poem about the sea!", "id": 3},
        {"instruction": "Name three rivers in Asia.", "id": 4},
    ])
    out, pairs = tmp_path / "kept.jsonl", tmp_path / "pairs.jsonl"
    result = runner.invoke(app, [str(data), "--against", str(SEEDS), "--out", str(out), "--pairs", str(pairs), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["against"], summary["records"], summary["kept"], summary["dropped"]) == (175, 4, 2, 2)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [2, 4]
    dropped = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert dropped[0] == {"source": f"{data}:1", "text": SEED_INSTRUCTIONS[1], "score": 1.0,
                          "nearest": SEED_INSTRUCTIONS[1], "nearest_source": f"{SEEDS}:2"}
    assert dropped[1]["nearest_source"] == f"{data}:2" and dropped[1]["score"] == 1.0


def test_cli_writes_kept_records_to_stdout_without_out(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"q": "请写一首诗"}, {"q": "请写一首诗。"}, {"q": "Hello"}])
    result = runner.invoke(app, [str(data), "--field", "q", "--tokenizer", "unicode"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")] == [{"q": "请写一首诗"}, {"q": "Hello"}]


@pytest.mark.parametrize("method", ["exact", "fuzzy", "minhash"])
def test_cli_other_methods(tmp_path, method):
    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Write a short poem about the ocean waves."},
                                               {"instruction": "write a short poem about the ocean waves"},
                                               {"instruction": "List three prime numbers."}])
    result = runner.invoke(app, [str(data), "--method", method, "--threshold", "0.8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept"] == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "ok"}, {"text": "no field"}], ":2: missing field 'instruction'"),
        ([{"instruction": "ok"}, {"instruction": 3}], ":2: field 'instruction' must be a string, got int"),
        ([{"instruction": "ok"}, "", {"instruction": "after a blank line"}], ":2: empty line"),
        ([{"instruction": "  "}], ":1: field 'instruction' is empty"),
        (["{not json"], ":1: invalid JSON"),
    ],
)
def test_cli_bad_input_names_file_and_line(tmp_path, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = runner.invoke(app, [str(data)])
    assert result.exit_code == 2
    assert f"{data}{message}" in " ".join(result.stderr.split())


def test_cli_bad_against_file_and_threshold(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "ok"}])
    against = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "ok"}, {"name": "x"}])
    result = runner.invoke(app, [str(data), "--against", str(against)])
    assert result.exit_code == 2 and f"{against}:2: missing field 'instruction'" in " ".join(result.stderr.split())
    for threshold in ("1.5", "-0.2"):
        result = runner.invoke(app, [str(data), "--threshold", threshold])
        assert result.exit_code == 2 and "threshold must be between 0 and 1" in result.stderr
    result = runner.invoke(app, [str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_datagen_dedup_is_a_command_of_the_main_cli(tmp_path):
    from datagen.cli import app as main_app

    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Write a poem."}, {"instruction": "write a poem"}])
    result = runner.invoke(main_app, ["dedup", str(data), "--out", str(tmp_path / "kept.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropped"] == 1
    result = runner.invoke(main_app, ["dedup", str(data), "--field", "text"])
    assert result.exit_code == 2 and f"{data}:1: missing field 'text'" in " ".join(result.stderr.split())


# --- Across runs: the store ------------------------------------------------------------------------------------------

SEED_RECORDS = [json.loads(line) for line in SEEDS.read_text().splitlines()]
NEAR_SEED_3 = "Describe a situation in which the given stereotype can harm people."  # ROUGE-L 0.9 with seed 3
RUN_A = [r["instruction"] for r in SEED_RECORDS[100:110]] + [NEAR_SEED_3, "Turn down a job offer by sending an email to the recruiter."]
RUN_B = [SEED_RECORDS[102]["instruction"], "Tell me why this joke is not funny.", SEED_RECORDS[110]["instruction"],
         SEED_RECORDS[100]["instruction"], SEED_RECORDS[111]["instruction"], "How would you explain colours to someone born blind?"]


def store_run(session, name: str, generated: list[str], status: str = "completed"):
    """A pipeline-shaped run: 20 seed tasks, accepted generated instructions with one accepted and one rejected instance
    each, and one rejected instruction; counters as the pipelines keep them."""
    from storage.tables import Instance, Run, Task

    run = Run(name=name, pipeline="self-instruct", config={"rouge_threshold": 0.7}, model="smollm2-135m",
              backend="transformers", status=status, accepted=len(generated), rejected=1, instances=len(generated))
    session.add(run)
    session.flush()
    session.add_all(Task(run_id=run.id, source="seed", seed_id=r["id"], instruction=r["instruction"],
                         is_classification=r["is_classification"]) for r in SEED_RECORDS[:20])
    session.add(Task(run_id=run.id, instruction="Write.", status="rejected", reason="too_short"))
    tasks = [Task(run_id=run.id, instruction=text, is_classification=False) for text in generated]
    session.add_all(tasks)
    session.flush()
    for task, record in zip(tasks, SEED_RECORDS[100:]):
        session.add(Instance(task_id=task.id, input=record["instances"][0]["input"], output=record["instances"][0]["output"]))
        session.add(Instance(task_id=task.id, output="", status="rejected", reason="empty_output"))
    session.commit()
    return run.id


@pytest.fixture
def store(db_url):
    from sqlmodel import Session

    from storage.store import open_engine

    engine = open_engine(db_url)
    with Session(engine) as session:
        store_run(session, "si-a", RUN_A)
        store_run(session, "si-b", RUN_B)
    return db_url, engine


def tasks_of(engine, name: str):
    from sqlmodel import Session, select

    from storage.tables import Run, Task

    with Session(engine) as session:
        run = session.exec(select(Run).where(Run.name == name)).one()
        session.expunge(run)
        return run, session.exec(select(Task).where(Task.run_id == run.id, Task.source == "generated").order_by(Task.id)).all()


def test_load_store_texts(store):
    from sqlmodel import Session

    from datagen import dedup_store as dedup  # the store's texts: datagen/dedup_store.py, above the engine

    _, engine = store
    seeds = [r["instruction"] for r in SEED_RECORDS[:20]]
    with Session(engine) as session:
        everything = dedup.load_store_texts(session)
        assert everything == seeds + RUN_A + [t for t in RUN_B if t not in RUN_A]  # each distinct text once, oldest first
        assert dedup.load_store_texts(session, "run:si-b") == seeds + RUN_B
        assert dedup.load_store_texts(session, "run:2") == seeds + RUN_B
        assert dedup.load_store_texts(session, "store", exclude_run_id=1) == seeds + RUN_B
        assert "Write." not in everything  # rejected rows are not kept texts
        rows = dedup.stored_instructions(session, "run:si-a")
        assert (rows[0].run, rows[0].source, rows[20].source, rows[20].instruction) == ("si-a", "seed", "generated", RUN_A[0])
        with pytest.raises(BadInput, match="no run named or numbered 'nope'"):
            dedup.load_store_texts(session, "run:nope")
        with pytest.raises(BadInput, match="neither 'store' nor 'run:NAME'"):
            dedup.load_store_texts(session, "stor")


def test_pipeline_seeds_its_index_from_the_store(store):
    from sqlmodel import Session

    from datagen import dedup_store as dedup  # the store's texts: datagen/dedup_store.py, above the engine

    _, engine = store
    new = [RUN_A[4], "Design a chess puzzle in FEN notation!", "Name three rivers in Asia.", "Name 3 rivers in Asia."]
    with Session(engine) as session:
        pool = dedup.load_store_texts(session, "store")
    index = RougeIndex()
    index.add(pool)
    kept = [d.kept for d in index.filter(new)]
    assert kept == [ok for ok, _, _ in reference_filter(pool, new)] == [False, False, True, False]


def test_cli_run_reports_against_store_and_leaves_the_store_alone(store, tmp_path):
    db_url, engine = store
    before_run, before = tasks_of(engine, "si-b")
    out, pairs = tmp_path / "kept.jsonl", tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["--run", "si-b", "--against", "store", "--db", db_url, "--out", str(out), "--pairs", str(pairs), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # si-b's own 20 seeds, then si-a's accepted instructions (the shared seeds are stored once)
    assert (summary["run"], summary["against"], summary["records"], summary["applied"]) == ("si-b", 20 + len(RUN_A), len(RUN_B), False)
    seeds = [r["instruction"] for r in SEED_RECORDS[:20]]
    expected = reference_filter(seeds + RUN_A, RUN_B)
    assert [r["instruction"] for r in map(json.loads, out.read_text().splitlines())] == [t for t, (ok, _, _) in zip(RUN_B, expected) if ok]
    dropped = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert [d["text"] for d in dropped] == [t for t, (ok, _, _) in zip(RUN_B, expected) if not ok]
    assert [d["score"] for d in dropped] == [score for ok, score, _ in expected if not ok]
    first = dropped[0]  # an exact copy of si-a's third instruction
    b_id = next(t.id for t in before if t.instruction == RUN_B[0])
    a_id = next(t.id for t in tasks_of(engine, "si-a")[1] if t.instruction == RUN_A[2])
    assert (first["score"], first["source"], first["nearest"], first["nearest_source"]) == (
        1.0, f"run:si-b/task:{b_id}", RUN_A[2], f"run:si-a/task:{a_id}")  # fmt: skip
    after_run, after = tasks_of(engine, "si-b")
    assert [(t.status, t.reason) for t in after] == [(t.status, t.reason) for t in before]
    assert (after_run.accepted, after_run.rejected, after_run.instances) == (before_run.accepted, before_run.rejected, before_run.instances)


def test_cli_run_apply_marks_duplicates_rejected_and_keeps_counters(store):
    from sqlmodel import Session, func, select

    from storage.tables import Instance

    db_url, engine = store
    result = runner.invoke(app, ["--run", "si-b", "--against", "run:si-a", "--db", db_url, "--apply", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["applied"] and summary["dropped"] == 4
    run, tasks = tasks_of(engine, "si-b")
    marked = [t for t in tasks if t.reason == "duplicate_rougeL"]
    assert [t.instruction for t in marked] == [RUN_B[0], RUN_B[1], RUN_B[3], RUN_B[5]]
    assert all(t.status == "rejected" and t.similarity > 0.7 for t in marked)
    assert [t.nearest for t in marked] == [RUN_A[2], RUN_A[4], RUN_A[0], RUN_B[4]]  # the last: si-b's own kept one
    with Session(engine) as session:  # the counters still equal the rows, as after a pipeline batch
        accepted = [t.id for t in tasks if t.status == "accepted"]
        instances = session.exec(select(func.count()).select_from(Instance).where(
            Instance.task_id.in_(accepted), Instance.status == "accepted")).one()  # fmt: skip
    assert (run.accepted, run.rejected, run.instances) == (len(accepted), 1 + 4, instances) == (2, 5, 2)
    _, a_tasks = tasks_of(engine, "si-a")
    assert all(t.status == "accepted" for t in a_tasks if t.instruction != "Write.")  # --against runs are never touched
    again = runner.invoke(app, ["--run", "si-b", "--against", "run:si-a", "--db", db_url, "--apply", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["dropped"] == 0  # idempotent


def test_cli_run_against_its_own_seeds_only(store):
    db_url, engine = store
    result = runner.invoke(app, ["--run", "si-a", "--db", db_url, "--apply", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dropped"] == 2  # the near copy of seed 3, and of its own first instruction
    _, tasks = tasks_of(engine, "si-a")
    near_seed, near_first = (t for t in tasks if t.reason == "duplicate_rougeL")
    assert (near_seed.instruction, near_seed.nearest) == (NEAR_SEED_3, SEED_RECORDS[3]["instruction"])
    assert near_first.nearest == RUN_A[0]


def test_cli_file_against_store_and_a_run(store, tmp_path):
    db_url, _ = store
    data = write_jsonl(tmp_path / "new.jsonl", [{"instruction": RUN_B[4]}, {"instruction": RUN_A[0]},
                                                {"instruction": "List three prime numbers."}])  # fmt: skip
    result = runner.invoke(app, [str(data), "--against", "run:si-a", "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["against"], json.loads(result.stdout)["kept"]) == (20 + len(RUN_A), 2)
    result = runner.invoke(app, [str(data), "--against", "store", "--against", str(SEEDS), "--db", db_url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept"] == 1


def test_cli_run_bad_usage(store, tmp_path):
    from sqlmodel import Session

    db_url, engine = store
    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "ok"}])
    for args, message in [
        (["--run", "nope"], "no run named or numbered 'nope'"),
        (["--run", "si-a", "--against", "run:nope"], "no run named or numbered 'nope'"),
        ([str(data), "--run", "si-a"], "not both"),
        ([], "give a JSONL FILE or --run NAME"),
        ([str(data), "--apply"], "use it with --run NAME"),
    ]:
        result = runner.invoke(app, [*args, "--db", db_url])
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (args, result.output)
    with Session(engine) as session:
        store_run(session, "si-live", ["Write a haiku about autumn leaves."], status="running")
    result = runner.invoke(app, ["--run", "si-live", "--db", db_url, "--apply"])
    assert result.exit_code == 2 and "is running" in result.stderr
    assert runner.invoke(app, ["--run", "si-live", "--db", db_url]).exit_code == 0  # a report is fine


def test_datagen_dedup_run_through_the_main_cli(store):
    from datagen.cli import app as main_app

    db_url, _ = store
    result = runner.invoke(main_app, ["dedup", "--run", "si-b", "--against", "store", "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "store unchanged" in result.stderr and result.stdout == ""
    result = runner.invoke(main_app, ["dedup", "--run", "missing", "--db", db_url])
    assert result.exit_code == 2
