"""Throughput of Toolformer's loss filter (step 4) against the model's raw forward pass, on the same model and texts.

    python bench/toolformer.py                 # the 32 texts of examples/toolformer_corpus.jsonl, embedded model
    python bench/toolformer.py --texts 8 --repeats 2

Candidates: step 1 runs for real (the pipeline's `sample_positions`, calculator prompt, tau_s 0, k 5: the five
most likely positions of each text). Step 2 is replaced by fixed calls so that the bench does not time sampling:
at every position, Calculator calls over pairs of the text's numbers (+ - * /, up to 4 calls) and Calendar();
step 3 executes them with the real tools, so results and prefix lengths are real.

Filter: `filter_calls` on all candidates of all texts at once, timed from the call to its return (tokenization,
grouping, the backend's batched `score`, the losses). Scored tokens/s = tokens of the scored sequences / time.

Raw: `hf_model(input_ids)` with no padding, on the same texts' tokens cut into rows as long as the filter's mean
sequence, in batches of the backend's score_token_budget (8192 tokens): the forward pass alone, the ceiling.
Timed runs alternate raw and filter, after one warm-up of each; the best of --repeats is reported for each.
Target: the filter at >= 50% of raw tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from datagen.backends.transformers_backend import TransformersBackend
from pipelines import toolformer as tf
from pipelines.tools import build_tools

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "toolformer_corpus.jsonl"


def candidates_for(backend, texts, config) -> tf.Batch:
    """Step 1 for real, fixed calls at the chosen positions, step 3 with the real tools."""
    batch = tf.make_batch(backend.tokenize, texts, ["calculator", "calendar"], None, config)
    positions = tf.sample_positions(backend, "calculator", texts, tf.api_token_id(backend.tokenize, config), config)
    for j, (text, selected) in enumerate(zip(texts, positions)):
        numbers = re.findall(r"\d+(?:\.\d+)?", text.text)[:3]
        calls = [f"Calculator({a} {op} {b})" for (a, b), op in zip(itertools.combinations(numbers, 2), "+-*/")]
        for word, p in selected:
            for call in calls:
                batch.candidates.append(tf.Candidate(j, "calculator", word, p, call, status="parsed", call=call, argument=call[11:-1]))
            batch.candidates.append(tf.Candidate(j, "calendar", word, p, "Calendar()", status="parsed", call="Calendar()", argument=""))
    tools = build_tools(["calculator", "calendar"])
    for name in ("calculator", "calendar"):
        tf.execute_calls(name, tools[name], batch, batch.candidates, config)
    return batch


def fresh(batch: tf.Batch) -> tf.Batch:
    """The same candidates before filtering, so every timed run does the same work."""
    copies = [tf.Candidate(c.text, c.tool, c.word, c.p_api, c.completion, status=c.status, call=c.call,
                           argument=c.argument, result=c.result) for c in batch.candidates]  # fmt: skip
    return dataclasses.replace(batch, candidates=copies)


def time_filter(backend, batch, config) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = tf.filter_calls(backend, batch, config)
    return tokens, time.perf_counter() - started


@torch.inference_mode()
def time_raw(backend, stream: list[int], row: int, total: int) -> tuple[int, float]:
    """Forward passes over `total` tokens of the stream in unpadded rows of `row` tokens."""
    rows_per_batch = max(1, backend.score_token_budget // row)
    rows = [stream[(k * row) % (len(stream) - row) :][:row] for k in range(max(1, total // row))]
    started = time.perf_counter()
    for start in range(0, len(rows), rows_per_batch):
        backend.hf_model(input_ids=torch.tensor(rows[start : start + rows_per_batch])).logits
    return len(rows) * row, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=32, help="First N texts of the example corpus.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each side (best reported).")
    args = parser.parse_args()

    backend = TransformersBackend("smollm2-135m")
    config = tf.ToolformerConfig(settings={"calculator": {"tau_s": 0.0, "k": 5}})
    texts = tf.read_corpus(CORPUS)[: args.texts]
    print("command: python bench/toolformer.py" + (f" --texts {args.texts}" if args.texts != 32 else "")
          + (f" --repeats {args.repeats}" if args.repeats != 3 else ""))  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({_cpu()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip

    started = time.perf_counter()
    batch = candidates_for(backend, texts, config)
    step1 = time.perf_counter() - started
    executed = sum(c.status == "executed" for c in batch.candidates)
    print(f"texts: {len(texts)}; step 1 (one pass per text) + fixed calls + execution: {step1:.1f} s; "
          f"candidates: {len(batch.candidates)}, executed: {executed}")  # fmt: skip

    stream = [t for tokens in batch.tokens for t in tokens.ids]
    tokens, _ = time_filter(backend, fresh(batch), config)  # warm-up; also fixes the work size
    sequences = len({(c.text, z) for c in batch.candidates if c.status == "executed"
                     for z in (None, tf.linearize(c.call, "", config), tf.linearize(c.call, c.result, config))})  # fmt: skip
    row = max(8, round(tokens / max(1, sequences)))
    time_raw(backend, stream, row, tokens)
    raw_runs, filter_runs = [], []
    for _ in range(args.repeats):
        raw_tokens, seconds = time_raw(backend, stream, row, tokens)
        raw_runs.append(raw_tokens / seconds)
        filtered_batch = fresh(batch)
        scored, seconds = time_filter(backend, filtered_batch, config)
        filter_runs.append(scored / seconds)
    raw, filtered = max(raw_runs), max(filter_runs)
    print(f"filter (step 4): {scored:,} scored tokens in {sequences} sequences (mean {row} tokens), one score call")
    print(f"raw forward:     {raw:,.0f} tokens/s (best of {args.repeats}; median {statistics.median(raw_runs):,.0f})")
    print(f"filter:          {filtered:,.0f} scored tokens/s (best of {args.repeats}; median {statistics.median(filter_runs):,.0f})")
    print(f"ratio:           {filtered / raw:.0%} of raw (target >= 50%)")
    kept = sum(c.kept for c in filtered_batch.candidates)
    print(f"kept at the tools' tau_f: {kept} of {executed} executed calls")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
