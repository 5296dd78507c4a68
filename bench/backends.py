"""Generation throughput of the transformers and vLLM backends on the same work, in one run.

    python bench/backends.py                      # 64 prompts x 64 new tokens, embedded model
    python bench/backends.py --prompts 16 --max-tokens 32

Both backends get the same 64 chat prompts, decode greedily, and produce exactly --max-tokens new
tokens per prompt (EOS ignored: vLLM's `ignore_eos`, transformers' `min_new_tokens`), so tokens/s
compare like with like. Each backend runs with its defaults (transformers: float32, batches of 16;
vLLM: the whole batch in one call, float32 and eager mode on CPU) after one warm-up call, and the
timed runs alternate between them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from datagen.backends import Request, SamplingParams

TOPICS = ["the sea", "a lost key", "a robot chef", "winter in a city", "a chess match", "an old library",
          "a first job", "a thunderstorm", "a garden", "a train journey", "a lighthouse", "a school play",
          "a mountain climb", "a bakery", "a broken clock", "a new neighbour"]  # fmt: skip
TASKS = ["Write a short story about {}.", "Describe {} in five sentences.", "Write a poem about {}.",
         "Give three facts a child might ask about {}."]  # fmt: skip


def bench_requests(count: int, max_tokens: int) -> list[Request]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    prompts = [task.format(topic) for task in TASKS for topic in TOPICS]
    return [Request(messages=({"role": "user", "content": prompts[i % len(prompts)]},), params=params) for i in range(count)]


def timed_generate(generate, requests: list[Request], max_tokens: int) -> float:
    """Tokens per second of one generate call; checks every completion has exactly max_tokens tokens."""
    started = time.perf_counter()
    results = generate(requests)
    elapsed = time.perf_counter() - started
    counts = {c.completion_tokens for r in results for c in r.completions}
    assert counts == {max_tokens}, f"completion lengths {sorted(counts)}, expected all {max_tokens}"
    return len(requests) * max_tokens / elapsed


def machine() -> str:
    import torch
    import transformers
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend, alternating; the best counts")
    args = parser.parse_args()
    print(machine())
    requests = bench_requests(args.prompts, args.max_tokens)

    from datagen.backends.transformers_backend import TransformersBackend
    from datagen.backends.vllm_backend import VLLMBackend

    started = time.perf_counter()
    hf = TransformersBackend(args.model)
    print(f"transformers: load {time.perf_counter() - started:.1f} s")
    # Suppress EOS until max_tokens, like vLLM's ignore_eos; the backend's own generate path is measured.
    hf.hf_model.generation_config.min_new_tokens = args.max_tokens
    started = time.perf_counter()
    engine = VLLMBackend(args.model)
    print(f"vllm: start-up {time.perf_counter() - started:.1f} s")
    runs = {
        "transformers": hf.generate,
        "vllm": lambda batch: engine.generate(batch, ignore_eos=True),
    }
    best = dict.fromkeys(runs, 0.0)
    for generate in runs.values():
        generate(bench_requests(1, args.max_tokens))  # warm-up
    # Alternating runs share out the machine's other load (it is shared) between the backends.
    for repeat in range(args.repeats):
        for name, generate in runs.items():
            rate = timed_generate(generate, requests, args.max_tokens)
            best[name] = max(best[name], rate)
            print(f"run {repeat + 1} {name:>12}: {rate:6.1f} tokens/s (load average {os.getloadavg()[0]:.2f})")
    engine.close()
    hf.close()
    shape = f"{args.prompts} prompts x {args.max_tokens} new tokens, greedy, best of {args.repeats}"
    for name, rate in best.items():
        print(f"{name:>12}: {rate:6.1f} tokens/s ({shape})")
    print(f"vllm / transformers: {best['vllm'] / best['transformers']:.2f}x")


if __name__ == "__main__":
    main()
