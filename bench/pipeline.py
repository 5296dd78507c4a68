"""How much of a Self-Instruct (or Alpaca) run's wall time is spent outside the backend's generate calls, with a large pool.

    python bench/pipeline.py                       # embedded model on transformers, pool of 10,000
    python bench/pipeline.py --pool 10000 --target 12 --backend vllm
    python bench/pipeline.py --pipeline alpaca --target 8   # examples/alpaca_cpu.yaml

Alpaca's run is the same loop (pipelines/bootstrap.py) with its own prompt, parser and filters; its prompts show seed
records only, but its ROUGE-L filter runs against seeds and pool alike, so the pool is loaded the same way.

A run is started with the 175 seed tasks and 10,000 accepted machine instructions already in the store (seed
instructions with words swapped, dropped and added, so they resemble real ones), then resumed for `--target` more
accepted instructions on a real model. Everything the pipeline does besides generating is timed: rebuilding the pool
and the ROUGE-L index from the store, building prompts, parsing, the filters against 10,175 instructions, the
classification and instance bookkeeping, and the store writes. Target: at most 5% of the wall time.

The per-batch overhead in milliseconds is printed too: with a faster backend (vLLM on a GPU) the share grows as
generation shrinks, and that figure tells by how much.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import Session  # noqa: E402

from datagen.backends import load_backend  # noqa: E402
from datagen.cli.commands.self_instruct import load_config  # noqa: E402
from pipelines import alpaca, bootstrap  # noqa: E402
from pipelines import self_instruct as si  # noqa: E402
from pipelines.seeds import read_seeds  # noqa: E402
from storage.store import open_engine  # noqa: E402
from storage.tables import Run, Task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILLERS = "quickly carefully briefly given following short simple new small clear each every list text two three".split()


def perturbed(instruction: str, rng: random.Random) -> str:
    """A seed instruction with a few words swapped, dropped or added."""
    words = instruction.split()
    for _ in range(rng.randint(2, 5)):
        op = rng.random()
        at = rng.randrange(len(words))
        if op < 0.4:
            words.insert(at, rng.choice(FILLERS))
        elif op < 0.7 and len(words) > 4:
            del words[at]
        else:
            other = rng.randrange(len(words))
            words[at], words[other] = words[other], words[at]
    return " ".join(words)


class TimedBackend:
    """The real backend, with the wall time spent inside generate summed."""

    def __init__(self, backend):
        self.backend, self.name, self.model = backend, backend.name, backend.model
        self.seconds, self.calls, self.first_call = 0.0, 0, None

    def generate(self, requests):
        started = time.perf_counter()
        self.first_call = self.first_call or started
        try:
            return self.backend.generate(requests)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def render_chat(self, messages):
        return self.backend.render_chat(messages)

    def close(self):
        self.backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=10_000, help="Accepted machine instructions preloaded.")
    parser.add_argument("--target", type=int, default=12, help="Accepted instructions to add on top of the pool.")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pipeline", choices=["self-instruct", "alpaca"], default="self-instruct")
    parser.add_argument("--config", type=Path, help="default: examples/self_instruct.yaml, or examples/alpaca_cpu.yaml")
    args = parser.parse_args()
    config_class, run_pipeline = (alpaca.AlpacaConfig, alpaca.run) if args.pipeline == "alpaca" else (si.SelfInstructConfig, si.run)
    args.config = args.config or REPO / "examples" / ("alpaca_cpu.yaml" if args.pipeline == "alpaca" else "self_instruct.yaml")

    seeds = read_seeds(REPO / "examples" / "seed_tasks.jsonl")
    config = load_config(config_class, args.config, {"num_instructions": args.pool + args.target})
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(f"sqlite:///{tmp}/bench.db")
        with Session(engine) as session:
            run = Run(name="bench", pipeline=args.pipeline, config=bootstrap.config_dict(config), model=args.model, backend=args.backend)
            session.add(run)
            session.flush()
            bootstrap.store_seeds(session, run, seeds)
            session.add_all(Task(run_id=run.id, instruction=perturbed(rng.choice(seeds).instruction, rng)) for _ in range(args.pool))
            run.accepted = args.pool
            session.commit()
        backend = TimedBackend(load_backend(args.backend, args.model))
        batches: list[float] = []
        with Session(engine) as session:
            run = session.get(Run, 1)
            started = time.perf_counter()
            last = [started, 0.0]

            def on_batch(run, stats):
                now = time.perf_counter()
                batches.append((now - last[0]) - (backend.seconds - last[1]))
                last[:] = [now, backend.seconds]

            totals = run_pipeline(session, run, backend, config, on_batch)
            wall = time.perf_counter() - started
            status = run.status
        backend.close()
        outside = wall - backend.seconds
        setup = backend.first_call - started  # loading seeds and pool, building the index, the first prompts
        batches[0] -= setup
        print(f"command: python bench/pipeline.py --pipeline {args.pipeline} --pool {args.pool} --target {args.target} --backend {args.backend} --config {args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; load average {os.getloadavg()[0]:.1f}")
        print(f"pool: {len(seeds)} seeds + {args.pool:,} accepted machine instructions; run status {status}, "
              f"{totals.accepted} accepted in {len(batches)} batches ({totals.requests} instruction requests, {totals.generated} parsed)")  # fmt: skip
        print(f"wall time:            {wall:8.2f} s")
        print(f"inside generate:      {backend.seconds:8.2f} s  ({backend.calls} calls)")
        print(f"outside generate:     {outside:8.2f} s  = {outside / wall:.2%} of the wall time")
        print(f"  of which, once: rebuilding seeds, pool and ROUGE-L index from the store: {setup * 1000:.0f} ms")
        print(f"  at the end: final commit {(outside - setup - sum(batches)) * 1000:.0f} ms")
        print(f"  per batch (prompts, parsing, filters vs {len(seeds) + args.pool:,}, store): "
              f"{', '.join(f'{b * 1000:.0f}' for b in batches)} ms")  # fmt: skip
        print(f"target <= 5%: {'met' if outside / wall <= 0.05 else 'NOT met'}")


if __name__ == "__main__":
    main()
