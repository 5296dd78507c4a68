"""Peak memory and speed at long contexts, causal sdpa (full attention) vs S²-Attn, in one run.

    python bench/long_context.py --call --save bench/results/long_context_call.txt   # one attention call, 4k/16k/32k
    python bench/long_context.py                                   # tiny Llama training steps, 1k/2k/4k tokens, CPU
    python bench/long_context.py --model smollm2-135m --lengths 4096,8192,16384    # the real model (a GPU)

--call: one attention call, forward and backward, through the function transformers calls (the registered
"s2_attn" function in training mode vs transformers' sdpa function with no mask, i.e. torch's fused causal
kernel): query, key and value of (1, --heads, length, 64) with gradients, LongLoRA's group of a quarter of the
length. Peak memory: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs after
the inputs are made) minus its resident size then, on CPU, with glibc told to map every allocation of 64 KiB or
more on its own (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set; max allocated minus
allocated on a GPU. Tokens/s:
length / the median call time of --steps calls after one warm-up.

Each (length, attention) point trains in its own process (so the peak memory is its own): one batch of one
sequence of random tokens, forward + backward + AdamW step of every weight, gradient checkpointing off; the median
of --steps timed steps after one warm-up step. Full attention is transformers' sdpa (causal, no mask tensor);
S²-Attn is train/s2_attn.py with LongLoRA's group size of a quarter of the sequence. Peak memory: max RSS of the
process on CPU, max allocated on a GPU.

The default model is a 4-layer Llama built here from a config (hidden 256, 8 heads of 32, 4 KV heads, a 512-token
vocabulary, random weights): small enough for 4k-token steps on a shared 2-core CPU, and a model whose step
time is mostly attention, which is what S²-Attn changes. Attention arithmetic: full attention costs ~N² per
head; S²-Attn with groups of G costs ~N·G. With LongLoRA's G = N/4 that is N²/4 at every length (quadratic, a
quarter of full), so the step-time gain grows only with attention's share of the step; with a fixed G
(--group-size) it is linear in N and the gain grows with N/G.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/ first on sys.path would not shadow anything, but keep the repo root first

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny"


def build_model(name: str, length: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from datagen import models

    torch.manual_seed(0)
    if name == TINY:
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=max(length, 4096))  # fmt: skip
        return AutoModelForCausalLM.from_config(config), 512
    models.configure_offline()
    path = models.resolve(name)
    config = AutoConfig.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config.vocab_size


def measure(name: str, length: int, attention: str, steps: int, group_size: int | None) -> dict:
    """One point, in this process."""
    import torch

    from train.s2_attn import register

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    model, vocab = build_model(name, length)
    model.to(device).train()
    ratio = min(1.0, group_size / length) if group_size else 0.25
    model.set_attn_implementation(register(ratio) if attention == "s2" else "sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab, (1, length), device=device)
    times = []
    for step in range(steps + 1):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - started)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"length": length, "attention": attention, "step_s": statistics.median(times), "peak_bytes": int(peak)}


def measure_call(length: int, attention: str, steps: int, heads: int) -> dict:
    """One attention call's forward + backward, in this process."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from train.s2_attn import register

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    module = torch.nn.Module().train()
    module.is_causal = True
    if attention == "s2":
        from transformers import AttentionInterface

        function = AttentionInterface()[register(0.25)]
    else:
        function = sdpa_attention_forward
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 64, device=device, requires_grad=True) for _ in range(3))
    times = []
    peak = 0
    for step in range(steps + 1):
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            base = _status_kb("VmRSS")
        started = time.perf_counter()
        out, _ = function(module, q, k, v, None, scaling=None)
        out.sum().backward()
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        used = torch.cuda.max_memory_allocated() - base if on_gpu else (_status_kb("VmHWM") - base) * 1024
        q.grad = k.grad = v.grad = None
        del out
        if step:
            times.append(elapsed)
            peak = max(peak, used)
    return {"length": length, "attention": attention, "call_s": statistics.median(times), "peak_bytes": int(peak)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def call_report(args, points: list[dict]) -> list[str]:
    lines = [f"{'length':>6} {'sdpa s/call':>12} {'S2 s/call':>10} {'tokens/s S2/sdpa':>17} {'sdpa peak MB':>13} {'S2 peak MB':>11} {'memory S2/sdpa':>15}"]
    by = {(p["length"], p["attention"]): p for p in points}
    for length in sorted({p["length"] for p in points}):
        full, s2 = by[length, "full"], by[length, "s2"]
        lines.append(
            f"{length:>6} {full['call_s']:>12.3f} {s2['call_s']:>10.3f} {full['call_s'] / s2['call_s']:>16.2f}x "
            f"{full['peak_bytes'] / 1e6:>13.1f} {s2['peak_bytes'] / 1e6:>11.1f} {s2['peak_bytes'] / max(full['peak_bytes'], 1):>15.2f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY, help="'tiny' (built here) or a datagen model name / folder")
    parser.add_argument("--lengths", help="default: 4096,16384,32768 with --call, else 1024,2048,4096")
    parser.add_argument("--call", action="store_true", help="one attention call (forward + backward) instead of a model's training step")
    parser.add_argument("--heads", type=int, default=2, help="--call: attention heads (head_dim 64)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group-size", type=int, help="a fixed S²-Attn group size in tokens (default: a quarter of the length)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--save", type=Path, help="also write the report to this file")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: LENGTH,ATTENTION in a child process
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.point:
        length, attention = args.point.split(",")
        if args.call:
            print(json.dumps(measure_call(int(length), attention, args.steps, args.heads)))
        else:
            print(json.dumps(measure(args.model, int(length), attention, args.steps, args.group_size)))
        return
    args.lengths = args.lengths or ("4096,16384,32768" if args.call else "1024,2048,4096")

    started = time.perf_counter()
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.call:
        # glibc: every allocation of 64 KiB or more is its own mapping, unmapped when freed, so the resident size
        # follows the tensors alive (otherwise freed heap memory is reused unseen and the high-water mark lags)
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    points = []
    for length in [int(n) for n in args.lengths.split(",")]:
        for attention in ("full", "s2"):
            command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads),
                       "--point", f"{length},{attention}", *(["--group-size", str(args.group_size)] if args.group_size else []),
                       *(["--call", "--heads", str(args.heads)] if args.call else [])]  # fmt: skip
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            points.append(json.loads(output.strip().splitlines()[-1]))
            print(f"  {length} {attention}: {points[-1]['call_s' if args.call else 'step_s']:.2f} s", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    what = (f"one attention call (forward + backward), {args.heads} heads of 64, S²-Attn groups of a quarter of the length"
            if args.call else f"model {args.model}; S²-Attn groups: {f'{args.group_size} tokens' if args.group_size else 'a quarter of the length'}")
    lines = [
        f"$ python bench/long_context.py {' '.join(sys.argv[1:])}",
        f"commit {commit}; {device}, load average {load:.2f} at start; torch {torch.__version__}; "
        f"{args.threads} torch thread(s); {what}; {args.steps} timed {'calls' if args.call else 'steps'} per point; "
        f"{time.perf_counter() - started:.0f} s in all",
        "",
    ]
    if args.call:
        lines += call_report(args, points)
    else:
        lines.append(f"{'length':>6} {'full s/step':>12} {'S2 s/step':>10} {'speed-up':>9} {'full peak GB':>13} {'S2 peak GB':>11} {'memory ratio':>13}")
        by = {(p["length"], p["attention"]): p for p in points}
        for length in sorted({p["length"] for p in points}):
            full, s2 = by[length, "full"], by[length, "s2"]
            lines.append(
                f"{length:>6} {full['step_s']:>12.3f} {s2['step_s']:>10.3f} {full['step_s'] / s2['step_s']:>8.2f}x "
                f"{full['peak_bytes'] / 1e9:>13.3f} {s2['peak_bytes'] / 1e9:>11.3f} {s2['peak_bytes'] / full['peak_bytes']:>13.2f}"
            )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.save:
        args.save.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
