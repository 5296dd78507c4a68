"""Throughput of IFD scoring (pipelines/score.py `ifd_scores`) against the trainer's own forward pass on the same rows,
and the agreement of batched and one-at-a-time scoring.

    python bench/score.py                       # 200 instances of Self-Instruct tasks, embedded model
    python bench/score.py --items 50 --repeats 1

Items: the first --items instances (instruction, input, output) of Self-Instruct's 175 seed tasks, then of its
user-oriented tasks (examples/user_oriented_dev.jsonl): real text.

Scoring: `ifd_scores(backend, pairs)` on all items at once, timed from the call to its return (Cherry's two texts per
item, tokenization, the transformers backend's batched `score`, the losses). Items/s = items / time.

Reference: the trainer's loss computation (train/sft.py `token_eval_loss`: `model(input_ids, attention_mask).logits`,
then `F.cross_entropy` with labels -100 outside the learned tokens) on the very token rows ifd_scores scores (both texts
of every item, the output tokens as labels), batched as the backend batches them (length-sorted, at most 8192 padded
tokens per forward pass): the per-item losses a training step's forward pass gives, the ceiling. Timed runs alternate
reference and scoring after one warm-up of each; the best of --repeats is reported for each. Target: scoring at >= 80%
of the reference's items/s.

Agreement: the same items scored one at a time (a forward pass per text, no padding); the largest |IFD difference|
against the batched scores must be <= 1e-4. The reference's IFDs are checked against the batched ones too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datagen.backends.transformers_backend import TransformersBackend
from pipelines.score import CHERRY_DIRECT_PREFIX, CHERRY_MAX_LENGTH, Pair, _plan, cherry_prompt, ifd_scores

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SOURCES = (EXAMPLES / "seed_tasks.jsonl", EXAMPLES / "user_oriented_dev.jsonl")
"""Self-Instruct's 175 seed tasks, then its user-oriented tasks (same format) to reach 200 items."""
TOLERANCE = 1e-4


def seed_pairs(limit: int) -> list[Pair]:
    pairs = []
    for source in SOURCES:
        for line in source.read_text(encoding="utf-8").splitlines():
            task = json.loads(line)
            pairs += [Pair(task["instruction"], i["input"], i["output"]) for i in task["instances"]]
    return pairs[:limit]


def reference_losses(backend: TransformersBackend, pairs: list[Pair]) -> list[tuple[float, float]]:
    """(s(A|Q), s(A)) per item from the trainer's forward + cross-entropy on the rows ifd_scores builds."""
    plans = [_plan(backend, pair, CHERRY_MAX_LENGTH) for pair in pairs]
    rows = [(plan.conditioned, plan.conditioned_start) for plan in plans] + [(plan.direct, plan.direct_start) for plan in plans]
    losses = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    model, pad, budget = backend.hf_model, backend.tokenizer.pad_token_id, backend.score_token_budget
    batch: list[int] = []
    with torch.no_grad():
        for index in order + [None]:
            if index is not None and (not batch or (len(batch) + 1) * len(rows[index][0]) <= budget):
                batch.append(index)
                continue
            width = max(len(rows[i][0]) for i in batch)
            input_ids = torch.tensor([rows[i][0] + [pad] * (width - len(rows[i][0])) for i in batch])
            attention = torch.tensor([[1] * len(rows[i][0]) + [0] * (width - len(rows[i][0])) for i in batch])
            labels = torch.full_like(input_ids, -100)
            for r, i in enumerate(batch):
                labels[r, rows[i][1] : len(rows[i][0])] = input_ids[r, rows[i][1] : len(rows[i][0])]
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            shifted = labels[:, 1:]
            token_losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none")
            per_row = token_losses.view(shifted.shape).sum(1) / (shifted != -100).sum(1)
            for r, i in enumerate(batch):
                losses[i] = per_row[r].item()
            batch = [index] if index is not None else []
    return [(losses[k], losses[len(plans) + k]) for k in range(len(plans))]


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    backend = TransformersBackend("smollm2-135m")
    pairs = seed_pairs(args.items)
    tokens = sum(len(backend.tokenize(cherry_prompt(p.instruction, p.input) + p.output)) + len(backend.tokenize(CHERRY_DIRECT_PREFIX + p.output))
                 for p in pairs)  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"command: python bench/score.py --items {args.items} --repeats {args.repeats}")
    print(f"commit: {commit}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"items: {len(pairs)} instances of Self-Instruct's seed and user-oriented tasks; {2 * len(pairs)} texts, {tokens:,} tokens")

    ifd_scores(backend, pairs[:8])  # warm-up
    reference_losses(backend, pairs[:8])
    reference_times, scoring_times = [], []
    for _ in range(args.repeats):
        seconds, reference = timed(lambda: reference_losses(backend, pairs))
        reference_times.append(seconds)
        seconds, batched = timed(lambda: ifd_scores(backend, pairs))
        scoring_times.append(seconds)
    reference_rate, scoring_rate = len(pairs) / min(reference_times), len(pairs) / min(scoring_times)
    print(f"reference (trainer's forward + cross-entropy): {reference_rate:.2f} items/s (best of {args.repeats}; "
          f"times {', '.join(f'{t:.1f}' for t in reference_times)} s)")  # fmt: skip
    print(f"scoring (ifd_scores, batched):                {scoring_rate:.2f} items/s (best of {args.repeats}; "
          f"times {', '.join(f'{t:.1f}' for t in scoring_times)} s)")  # fmt: skip
    print(f"ratio: {scoring_rate / reference_rate:.0%} of the reference (target >= 80%)")

    reference_ifd = [c / d for c, d in reference]
    worst_reference = max(abs(r - s.ifd) for r, s in zip(reference_ifd, batched) if s.ifd is not None)
    seconds, alone = timed(lambda: [ifd_scores(backend, [pair])[0] for pair in pairs])
    differences = [abs(a.ifd - b.ifd) for a, b in zip(batched, alone) if a.ifd is not None and b.ifd is not None]
    both_none = sum(a.ifd is None and b.ifd is None for a, b in zip(batched, alone))
    print(f"agreement, batched vs one at a time ({len(pairs) / seconds:.2f} items/s): max |IFD difference| {max(differences):.2e} "
          f"over {len(differences)} items ({both_none} without a score either way); "
          f"{'within' if max(differences) <= TOLERANCE else 'OUTSIDE'} {TOLERANCE:g}")  # fmt: skip
    print(f"agreement, batched vs reference: max |IFD difference| {worst_reference:.2e}")
    print(f"IFD over the items: mean {sum(s.ifd for s in batched if s.ifd is not None) / len(differences):.3f}, "
          f"above 1: {sum(s.ifd is not None and s.ifd > 1 for s in batched)}, degenerate: {sum(s.degenerate for s in batched)}")  # fmt: skip


if __name__ == "__main__":
    main()
