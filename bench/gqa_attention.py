"""Padded-batch generation on the CPU: transformers' sdpa (KV heads copied by repeat_kv under a mask) against datagen's
grouped-query SDPA (datagen/backends/gqa_attention.py), same model, same prompts, same tokens.

    python bench/gqa_attention.py --batch 5 --prompt-tokens 1500 --new-tokens 128

Prints each one's seconds and tokens/s and the ratio (reference: transformers' sdpa, measured in the same run), and
checks that both generate the same tokens (greedy)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from datagen.backends.gqa_attention import GQA_SDPA  # noqa: E402
from datagen.backends.transformers_backend import TransformersBackend  # noqa: E402

SEEDS = Path(__file__).resolve().parents[1] / "examples" / "seed_tasks.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    backend = TransformersBackend("smollm2-135m")
    model, tokenizer = backend._loaded.model, backend._loaded.tokenizer
    tasks = [json.loads(line)["instruction"] for line in SEEDS.read_text().splitlines()]
    prompts = []
    for b in range(args.batch):  # different lengths, so the batch is padded
        text, i = "", b
        while len(tokenizer(text).input_ids) < args.prompt_tokens - 40 * b:
            text += f"{i}. {tasks[i % len(tasks)]}\n"
            i += 1
        prompts.append(text)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    timings, outputs = {}, {}
    for name in ("sdpa", GQA_SDPA):
        model.set_attn_implementation(name)
        with torch.no_grad():
            started = time.perf_counter()
            out = model.generate(**batch, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            timings[name] = time.perf_counter() - started
        outputs[name] = out
    model.set_attn_implementation(GQA_SDPA)
    tokens = args.batch * args.new_tokens
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}; {platform.machine()} CPU, {torch.get_num_threads()} torch threads; batch {args.batch}, "
          f"prompts {batch['input_ids'].shape[1]} tokens padded, {args.new_tokens} new tokens each")
    for name, seconds in timings.items():
        print(f"{name:>18}: {seconds:8.1f} s  {tokens / seconds:7.1f} tokens/s")
    print(f"same tokens: {torch.equal(outputs['sdpa'], outputs[GQA_SDPA])}")
    print(f"ratio (datagen / transformers sdpa, tokens/s): {timings['sdpa'] / timings[GQA_SDPA]:.2f}")


if __name__ == "__main__":
    main()
