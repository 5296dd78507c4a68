"""Benchmark: datagen's ROUGE-L filter against rouge-score's reference loop, on the same sequential 0.7 filter.

    python bench/dedup.py                      # full run: ~10 minutes on 2 cores, most of it the 1M series entry
    python bench/dedup.py --n 5000 --reference-seconds 10 --scale 10000,50000   # a quick look

Corpus: the 175 Self-Instruct seed instructions are the starting pool (as in Self-Instruct); candidates are real
sentences (seed instructions, and sentences of the seed instances' inputs and outputs) perturbed by word drops,
adjacent swaps, substitutions and insertions from the seed vocabulary, and splices of two sentences, at random
strengths, so that some candidates are near duplicates and most are new enough to grow the pool.

Reference: Stanford Alpaca's loop (tatsu-lab/stanford_alpaca: generate_instruction.py): each candidate is tokenized
once and scored with `rouge_scorer._score_lcs` against every pre-tokenized instruction kept so far, one core; drop
if the max F-measure > 0.7. (Self-Instruct's original calls `scorer.score`, which re-tokenizes both texts per pair
and is slower, so the ratio against it would be larger.) It runs on the first candidates until a time budget is
spent; ours runs on exactly those candidates too, and the decisions and scores are compared.

Printed: (a) decision mismatches on the common subset (must be 0), (b) pair throughput of both and the ratio
(pairs = candidate x every text kept before it, the work the reference does, whether or not we prune it),
(c) our sequential filter over all candidates, on all cores and on one, (d) the scale series: the same filter over
10k, 50k, 200k and 1M candidates, each in a fresh process (wall and CPU seconds, peak memory), with the growth
exponent fitted from it. Its corpus adds near-duplicates: a share of candidates are light edits (one word changed,
dropped or swapped, or case and punctuation) of an earlier candidate, as a generator repeating itself produces.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import multiprocessing
import random
import re
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datagen.dedup import RougeIndex, make_tokenizer, rouge_l_fmeasure  # noqa: E402

SEEDS = Path(__file__).resolve().parents[1] / "examples" / "seed_tasks.jsonl"
THRESHOLD = 0.7
NEAR_DUPLICATES = 0.1
"""Share of the scale series' candidates that are light edits of an earlier candidate."""


def real_sentences(seed_tasks: list[dict]) -> list[str]:
    """Seed instructions plus the 4-40 word sentences of their instances."""
    sentences = {task["instruction"] for task in seed_tasks}
    for task in seed_tasks:
        for instance in task["instances"]:
            for text in (instance["input"], instance["output"]):
                for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
                    if 4 <= len(sentence.split()) <= 40:
                        sentences.add(sentence.strip())
    return sorted(sentences)


def perturb(words: list[str], other: list[str], vocabulary: list[str], rng: random.Random) -> list[str]:
    """A few word-level edits; the strength (edits per word) is drawn per sentence, from near-copy to rewrite."""
    words = list(words)
    if rng.random() < 0.25:  # splice: the head of one sentence with the tail of another
        cut, other_cut = rng.randint(1, len(words)), rng.randint(0, len(other) - 1)
        words = words[:cut] + other[other_cut:]
    edits = round(len(words) * rng.choice([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    for _ in range(edits):
        op, at = rng.random(), rng.randrange(len(words))
        if op < 0.3 and len(words) > 2:
            del words[at]
        elif op < 0.5 and at + 1 < len(words):
            words[at], words[at + 1] = words[at + 1], words[at]
        elif op < 0.8:
            words[at] = rng.choice(vocabulary)
        else:
            words.insert(at, rng.choice(vocabulary))
    return words


def near_copy(words: list[str], vocabulary: list[str], rng: random.Random) -> list[str]:
    """One light edit: a word substituted, dropped or swapped with its neighbour, or case and punctuation changed."""
    words, op, at = list(words), rng.random(), rng.randrange(len(words))
    if op < 0.25:
        words[at] = rng.choice(vocabulary)
    elif op < 0.5 and len(words) > 2:
        del words[at]
    elif op < 0.75 and at + 1 < len(words):
        words[at], words[at + 1] = words[at + 1], words[at]
    else:
        words = [w.upper() for w in words] if rng.random() < 0.5 else words[:-1] + [words[-1] + rng.choice("!?.")]
    return words


def make_corpus(seed_tasks: list[dict], n: int, seed: int = 0, near_duplicates: float = 0.0) -> list[str]:
    rng = random.Random(seed)
    sentences = [s.split() for s in real_sentences(seed_tasks)]
    vocabulary = sorted({w for s in sentences for w in s})
    corpus: list[list[str]] = []
    for _ in range(n):
        if near_duplicates and corpus and rng.random() < near_duplicates:  # (no draw at 0: the corpus of (a)-(c) is unchanged)
            corpus.append(near_copy(rng.choice(corpus), vocabulary, rng))
        else:
            corpus.append(perturb(rng.choice(sentences), rng.choice(sentences), vocabulary, rng))
    return [" ".join(words) for words in corpus]


def reference_filter(seeds: list[str], candidates: list[str], budget_s: float) -> tuple[list[tuple[bool, float]], int, float, float]:
    """Alpaca's loop until the time budget is spent: (kept, max F) per candidate scored, pairs scored, wall and CPU seconds."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = [scorer._tokenizer.tokenize(text) for text in seeds]
    decisions, pairs = [], 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for text in candidates:
        tokens = scorer._tokenizer.tokenize(text)
        scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in pool]
        pairs += len(pool)
        best = max(scores, default=0.0)
        decisions.append((best <= THRESHOLD, best))
        if best <= THRESHOLD:
            pool.append(tokens)
        if time.perf_counter() - started > budget_s:
            break
    return decisions, pairs, time.perf_counter() - started, time.process_time() - cpu_started


def score_pair_rate(texts: list[str], budget_s: float) -> float:
    """Self-Instruct's original call, `scorer.score(new, old)` (tokenizes both texts for every pair): pairs/s on one core."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        for old in texts[:200]:
            scorer.score(texts[pairs % len(texts)], old)["rougeL"].fmeasure
        pairs += 200
    return pairs / (time.perf_counter() - started)


def ours(seeds: list[str], candidates: list[str], workers: int) -> tuple[list, int, float, float]:
    """Our filter: decisions, the reference's pair count for the same work, wall and CPU seconds (tokenizing included)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    index = RougeIndex(THRESHOLD, workers=workers)
    index.add(seeds)
    decisions = index.filter(candidates)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    pairs, pool = 0, len(seeds)
    for decision in decisions:
        pairs += pool
        pool += decision.kept
    return decisions, pairs, seconds, cpu_seconds


def pairs_within_length_bound(seeds: list[str], candidates: list[str], decisions: list) -> int:
    """Of the reference's pairs, those the length bound cannot rule out: the pairs our pool phase really scores."""
    tokenize = make_tokenizer("rouge")
    seed_lengths = [len(tokenize(t)) for t in seeds]
    lengths = [len(tokenize(t)) for t in candidates]
    top = max(seed_lengths + lengths) + 1
    a, b = np.arange(top)[:, None], np.arange(top)[None, :]
    reachable = (rouge_l_fmeasure(np.minimum(a, b), a, b) > THRESHOLD).astype(np.int64)
    pool = np.bincount(seed_lengths, minlength=top)
    total = 0
    for length, decision in zip(lengths, decisions):
        total += int(reachable[length] @ pool)
        pool[length] += decision.kept
    return total


def scale_run(n: int) -> dict:
    """The sequential filter over n candidates of the near-duplicate corpus, in this (fresh) process."""
    seed_tasks = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    seeds = [task["instruction"] for task in seed_tasks]
    corpus = make_corpus(seed_tasks, n, near_duplicates=NEAR_DUPLICATES)
    corpus_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu_started = time.perf_counter(), time.process_time()
    index = RougeIndex(THRESHOLD)
    index.add(seeds)
    decisions = index.filter(corpus)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    kept = sum(d.kept for d in decisions)
    pairs, pool = 0, len(seeds)
    for decision in decisions:
        pairs += pool
        pool += decision.kept
    return {"n": n, "kept": kept, "wall": wall, "cpu": cpu, "pairs": pairs,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "corpus_mib": corpus_kib / 1024}  # fmt: skip


def scale_series(sizes: list[int], reference_rate: float) -> None:
    print(f"\n(d) scale series: sequential {THRESHOLD} filter, {len(SEEDS.read_text().splitlines())} seeds + n candidates "
          f"({NEAR_DUPLICATES:.0%} of them near copies of an earlier one), a fresh process per size, workers=-1")
    print(f"    {'n':>10} {'kept':>9} {'dropped':>9} {'wall s':>8} {'CPU s':>8} {'peak MiB':>9} {'before filter':>13}"
          f" {'rouge-score pairs':>18} {'at its rate':>12}")
    results = []
    for n in sizes:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            r = pool.apply(scale_run, (n,))
        results.append(r)
        print(f"    {r['n']:>10,} {r['kept']:>9,} {r['n'] - r['kept']:>9,} {r['wall']:>8.1f} {r['cpu']:>8.1f} {r['peak_mib']:>9,.0f}"
              f" {r['corpus_mib']:>13,.0f} {r['pairs']:>18,} {r['pairs'] / reference_rate / 3600:>10,.1f} h", flush=True)
    if len(results) > 1:
        n = np.log([r["n"] for r in results])
        fits = {key: np.polyfit(n, np.log([r[key] for r in results]), 1)[0] for key in ("wall", "cpu")}
        steps = ", ".join(f"{a['n']:,}->{b['n']:,}: {np.log(b['cpu'] / a['cpu']) / np.log(b['n'] / a['n']):.2f}"
                          for a, b in zip(results, results[1:]))  # fmt: skip
        print(f"    growth exponent (least squares of log time on log n): wall {fits['wall']:.2f}, CPU {fits['cpu']:.2f};"
              f" CPU between sizes: {steps}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="candidates in the full run")
    parser.add_argument("--reference-seconds", type=float, default=45.0, help="time budget of rouge-score's loop")
    parser.add_argument("--single-core", action=argparse.BooleanOptionalAction, default=True, help="also time workers=1")
    parser.add_argument("--scale", default="10000,50000,200000,1000000", help="sizes of the scale series ('' to skip)")
    args = parser.parse_args()

    seed_tasks = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    seeds = [task["instruction"] for task in seed_tasks]
    corpus = make_corpus(seed_tasks, args.n)
    print(f"command: python bench/dedup.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
          f"load average at start {os.getloadavg()[0]:.1f} (other work on the machine slows both sides)")
    print(f"corpus: {len(seeds)} seed instructions (the starting pool) + {len(corpus)} perturbed real sentences")

    reference, reference_pairs, reference_s, reference_cpu = reference_filter(seeds, corpus, args.reference_seconds)
    common = len(reference)
    mine, *_ = ours(seeds, corpus[:common], workers=-1)
    mismatches = sum(kept != d.kept for (kept, _), d in zip(reference, mine))
    score_mismatches = sum(score != d.score for (kept, score), d in zip(reference, mine) if not kept)
    print(f"\n(a) common subset: {common} candidates, {reference_pairs:,} pairs, reference kept {sum(k for k, _ in reference)}")
    print(f"    decision mismatches: {mismatches}; score mismatches on dropped candidates: {score_mismatches}")

    full, pairs, seconds, cpu_seconds = ours(seeds, corpus, workers=-1)
    reference_rate = reference_pairs / reference_s
    print(f"\n(b) rouge-score reference loop, 1 core: {reference_pairs:,} pairs in {reference_s:.1f} s (CPU {reference_cpu:.1f} s)"
          f" = {reference_rate:,.0f} pairs/s")
    print(f"    datagen, workers=-1: {pairs:,} pairs in {seconds:.1f} s (CPU {cpu_seconds:.1f} s) = {pairs / seconds:,.0f} pairs/s"
          f" = {pairs / seconds / reference_rate:,.0f}x")
    scored = pairs_within_length_bound(seeds, corpus, full)
    print(f"    of those, {scored:,} ({scored / pairs:.0%}) are within the length bound (all that length-only pruning,"
          f" before the prefix index, left to score)")
    print(f"    (Self-Instruct's scorer.score, re-tokenizing each pair: {score_pair_rate(seeds + corpus, 5.0):,.0f} pairs/s on 1 core)")
    if args.single_core:
        _, pairs_1, seconds_1, cpu_1 = ours(seeds, corpus, workers=1)
        print(f"    datagen, workers=1:  {pairs_1:,} pairs in {seconds_1:.1f} s (CPU {cpu_1:.1f} s) = {pairs_1 / seconds_1:,.0f} pairs/s"
              f" = {pairs_1 / seconds_1 / reference_rate:,.0f}x")
    # CPU time does not count the time other processes hold the cores, so this ratio holds on a busy machine too.
    print(f"    per CPU-second: reference {reference_pairs / reference_cpu:,.0f} pairs, datagen {pairs / cpu_seconds:,.0f} pairs"
          f" = {pairs / cpu_seconds / (reference_pairs / reference_cpu):,.0f}x")
    kept = sum(d.kept for d in full)
    print(f"\n(c) sequential {THRESHOLD} filter over {len(corpus):,} candidates (+{len(seeds)} seeds), {os.cpu_count()} cores:"
          f" {seconds:.1f} s; kept {kept:,}, dropped {len(corpus) - kept:,}")
    if args.scale:
        scale_series([int(size) for size in args.scale.split(",")], reference_rate)
    if mismatches or score_mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
