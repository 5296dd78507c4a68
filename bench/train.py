"""Training throughput and memory of `datagen train`'s methods on the same data and steps, in one run.

    python bench/train.py                         # embedded model, 8 steps of 4 x 256 tokens, one torch thread
    python bench/train.py --steps 20 --threads 2 --save bench/results/train.txt

Data: an export-shaped folder (alpaca format, the Alpaca template of datagen/export.py) of the 175 Self-Instruct
seed tasks' real instances, so example lengths vary as generated data does. Each configuration trains in its own
process (so the peak memory is its own) with the same seed, batches, steps and max_length:

    full        every weight, fp32
    lora        r=16 on all linear layers, fp32 base
    lora-bf16   the same with a bf16 base and bf16 autocast (the 16-bit LoRA baseline for QLoRA's memory)
    qlora       4-bit NF4 base with double quantization
    dora        LoRA with the magnitude vector
    lora-packed lora with bfd packing (padding-free rows of max_length tokens; no attention across examples)

Figures: effective tokens/s (non-padding tokens trained per second of step time, TRL's count), the padding share
of the unpacked batches (measured on the same dataloader), peak memory (CPU: max RSS of the process; GPU: max
allocated) and the weights' footprint (`get_memory_footprint`). Targets (issue 7): packing raises effective
tokens/s by the padding share it removes, i.e. by about 1 / (1 - padding share); QLoRA's weights take at most 35%
of a 16-bit LoRA base's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the `train` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "examples" / "seed_tasks.jsonl"

CONFIGS = {
    "full": {"method": "full"},
    "lora": {"method": "lora"},
    "lora-bf16": {"method": "lora", "precision": "bf16"},
    "qlora": {"method": "qlora"},
    "dora": {"method": "dora"},
    "lora-packed": {"method": "lora", "packing": True},
}


def write_seed_export(out: Path) -> Path:
    """The seed tasks' instances as a `datagen export` folder in alpaca format (train split only)."""
    from datagen.export import Format, alpaca_prompt, build_dataset, features_for, write_export

    records = []
    for line in SEEDS.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        for instance in task["instances"]:
            prompt = alpaca_prompt(task["instruction"], instance["input"])
            records.append({"instruction": task["instruction"], "input": instance["input"], "output": instance["output"],
                            "text": prompt + instance["output"]})  # fmt: skip
    dataset = build_dataset({"train": records}, features_for(Format.alpaca, with_provenance=False))
    meta = {"format": "alpaca", "runs": [], "columns": list(dataset["train"].column_names), "counts": {"train": len(records)}}
    write_export(dataset, "# Self-Instruct seed tasks (benchmark data)\n", meta, out, overwrite=True)
    return out


def padding_share(trainer, steps: int) -> tuple[int, int]:
    """(non-padding, padded) input tokens over the first `steps` batches of the trainer's own dataloader."""
    real = padded = 0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i == steps:
            break
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return real, padded


def child(spec: dict) -> None:
    """Train one configuration and print its figures as one JSON line."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from train.config import load_config
    from train.sft import SFTRecipe

    options = dict(
        data=spec["data"], out=spec["out"], model=spec["model"], max_steps=spec["steps"], batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_length=spec["max_length"], gradient_checkpointing=False, eval_split="none",
        save_steps=10_000, overwrite=True, seed=0, **CONFIGS[spec["name"]],
    )  # fmt: skip
    recipe = SFTRecipe(load_config(None, options), db_url=spec["db"])
    recipe.setup()
    real, padded = padding_share(recipe.trainer, spec["steps"])
    weights = weight_bytes(recipe.trainer.model)
    summary = recipe.train()
    print("RESULT " + json.dumps({"name": spec["name"], "real_tokens": real, "padded_tokens": padded, **weights, **summary}), flush=True)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of 4-bit weights (packed, two per byte), how many weights they hold, and bytes of all other parameters."""
    import math

    four_bit = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    return {
        "four_bit_bytes": sum(p.numel() * p.element_size() for p in four_bit),
        "four_bit_weights": sum(math.prod(p.quant_state.shape) for p in four_bit),
        "other_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if type(p).__name__ != "Params4bit"),
    }


def machine() -> str:
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see train/sft.py
    import peft
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}, load average {os.getloadavg()[0]:.2f} at start; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}"
    )


def report(results: dict[str, dict], args) -> str:
    lines = [
        f"{'config':<12} {'tokens/s':>9} {'steps/s':>8} {'pad share':>9} {'peak mem GB':>11} {'weights MB':>10} {'trainable':>11} {'loss':>6}",
    ]
    for name, r in results.items():
        pad = 1 - r["real_tokens"] / r["padded_tokens"]
        lines.append(
            f"{name:<12} {r['tokens_per_s']:>9.1f} {r['steps'] / r['train_seconds']:>8.3f} {pad:>9.1%} "
            f"{r['peak_memory_bytes'] / 1e9:>11.2f} {r['model_memory_bytes'] / 1e6:>10.0f} {r['trainable_parameters']:>11,} "
            f"{r['final_train_loss']:>6.3f}"
        )
    get = results.get
    lines.append("")
    if get("lora") and get("full"):
        lines.append(f"lora / full tokens/s: {results['lora']['tokens_per_s'] / results['full']['tokens_per_s']:.2f}x; "
                     f"peak memory lora / full: {results['lora']['peak_memory_bytes'] / results['full']['peak_memory_bytes']:.2f}")  # fmt: skip
    if get("qlora") and get("lora"):
        lines.append(f"qlora / lora tokens/s: {results['qlora']['tokens_per_s'] / results['lora']['tokens_per_s']:.2f}x; "
                     f"peak memory qlora / lora: {results['qlora']['peak_memory_bytes'] / results['lora']['peak_memory_bytes']:.2f}")  # fmt: skip
    if get("qlora") and get("lora-bf16"):
        ratio = results["qlora"]["model_memory_bytes"] / results["lora-bf16"]["model_memory_bytes"]
        q = results["qlora"]
        lines.append(f"qlora weights / 16-bit lora weights: {ratio:.0%} (target <= 35%); of qlora's "
                     f"{q['model_memory_bytes'] / 1e6:.0f} MB, the 4-bit linear layers take {q['four_bit_bytes'] / 1e6:.0f} MB "
                     f"({q['four_bit_bytes'] / (2 * q['four_bit_weights']):.0%} of their 16-bit size) and the parameters left "
                     f"un-quantized (embeddings, norms, adapters; fp32 after prepare_model_for_kbit_training) "
                     f"{q['other_bytes'] / 1e6:.0f} MB")  # fmt: skip
    if get("lora-packed") and get("lora"):
        unpacked = results["lora"]
        pad = 1 - unpacked["real_tokens"] / unpacked["padded_tokens"]
        gain = results["lora-packed"]["tokens_per_s"] / unpacked["tokens_per_s"]
        lines.append(f"packed / unpacked effective tokens/s: {gain:.2f}x; unpacked padding share {pad:.1%}, "
                     f"so removing it predicts {1 / (1 - pad):.2f}x")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run; 0 = torch's default")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--save", type=Path, help="Also write the command, machine and results here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    header = f"$ python bench/train.py {' '.join(sys.argv[1:])}\n{machine()}\n"
    print(header, flush=True)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = write_seed_export(Path(tmp) / "seeds")
        for name in args.configs:
            spec = dict(name=name, data=str(data), out=str(Path(tmp) / name), db=f"sqlite:///{tmp}/bench.db", model=args.model,
                        steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, threads=args.threads)  # fmt: skip
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO)  # fmt: skip
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(line.removeprefix("RESULT "))
            print(f"{name}: {results[name]['tokens_per_s']} tokens/s", flush=True)
    text = header + (
        f"\n{args.steps} steps x batch {args.batch_size} x max_length {args.max_length}, {len(results)} configs, "
        f"{args.threads or 'default'} torch thread(s), {time.perf_counter() - started:.0f} s in all\n\n" + report(results, args)
    )
    print("\n" + report(results, args))
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
