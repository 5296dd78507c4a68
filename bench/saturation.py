"""How busy a pipeline keeps the engine: a run's wall time against replaying its requests in one call.

    python bench/saturation.py                             # vllm in process, embedded model
    python bench/saturation.py --instructions 30 --alpaca-requests 32 [--only self-instruct|alpaca]

Each case runs a real Self-Instruct (or Alpaca) run on the vllm backend into a fresh store, records every request
the pipeline sent (prompt, sampling settings, max tokens, seed), then sends the same requests through the same
engine, in the same process, in one `generate` call: the engine then schedules everything at once, as busy as it
can be with this work. The ratio run wall / replay wall is what the pipeline's phases and batch edges cost (1.0:
none). Cases, each measured in this run:
  - Self-Instruct sequential, 16 requests a batch: the loop before issue 16 (1.26 measured then);
  - Self-Instruct pipelined (batch k's instruction requests with batch k-1's instance requests), 16 a batch;
  - Self-Instruct pipelined at a fixed 64 a batch (the default before issue 19) and at the defaults now: the ramp
    from the reference's 5 (pipelines/bootstrap.py, ramp_size), which reaches 64 only once the pool is ~10x a
    batch's additions, i.e. on large runs;
  - Alpaca at 8 and at a fixed 32 a batch (the default before issue 19), and at the defaults (the ramp), by a
    request budget (--alpaca-requests).
Each row also prints the instruction requests per batch and, for Self-Instruct, the share of accepted instructions
whose prompt showed a machine-generated instruction (the point of the ramp).
Target (issue 16): <= 1.10 here for Self-Instruct and Alpaca at the defaults.

vLLM V1 caches prefixes by default (the CPU build too, in this version; the script prints it), so the shared few-shot
prefixes of the classification and instance prompts are prefilled once; the cache is reset before each replay, so
the replay does not reuse what the run prefilled.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import Session, select  # noqa: E402

from pipelines import alpaca, bootstrap  # noqa: E402
from pipelines import self_instruct as si  # noqa: E402
from pipelines.seeds import read_seeds  # noqa: E402
from storage.store import open_engine  # noqa: E402
from storage.tables import Generation, Run, Task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Recording:
    """The real backend; every request it is sent is kept, in order."""

    def __init__(self, backend):
        self.backend, self.name, self.model = backend, backend.name, backend.model
        self.requests, self.calls = [], 0

    def generate(self, requests):
        self.requests += requests
        self.calls += 1
        return self.backend.generate(requests)

    def render_chat(self, messages):
        return self.backend.render_chat(messages)


def one_case(backend, tmp: str, label: str, module, config) -> dict:
    engine = open_engine(f"sqlite:///{tmp}/{label.replace(' ', '-')}.db")
    pipeline = "self-instruct" if module is si else "alpaca"
    with Session(engine) as session:
        run = Run(name=label, pipeline=pipeline, config=bootstrap.config_dict(config), model=backend.model, backend=backend.name)
        session.add(run)
        session.flush()
        bootstrap.store_seeds(session, run, read_seeds(REPO / "examples" / "seed_tasks.jsonl"))
        session.commit()
        recording = Recording(backend)
        started = time.perf_counter()
        module.run(session, run, recording, config)
        run_wall = time.perf_counter() - started
        accepted, status = run.accepted, run.status
        sizes, share = batch_sizes_and_machine_share(session, run)
    if backend.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
        backend.llm.reset_prefix_cache()  # the replay must not reuse what the run prefilled
    started = time.perf_counter()
    replayed = backend.generate(recording.requests)
    replay_wall = time.perf_counter() - started
    tokens = sum(c.completion_tokens for r in replayed for c in r.completions)
    return dict(label=label, run=run_wall, replay=replay_wall, requests=len(recording.requests), calls=recording.calls,
                accepted=accepted, status=status, tokens=tokens, sizes=sizes, share=share)  # fmt: skip


def batch_sizes_and_machine_share(session: Session, run: Run) -> tuple[list[int], float | None]:
    """Instruction requests per batch, and the share of accepted instructions whose prompt showed a machine
    instruction (a pool instruction inside the prompt's numbered list; Self-Instruct only)."""
    batches = session.exec(select(Generation.batch).where(Generation.run_id == run.id, Generation.purpose == "instructions")).all()
    sizes = [batches.count(b) for b in sorted(set(batches))]
    if run.pipeline != "self-instruct":
        return sizes, None
    pool = bootstrap.load_pool(session, run)
    prompts = session.exec(
        select(Generation.prompt).join(Task, Task.generation_id == Generation.id).where(Task.run_id == run.id, Task.status == "accepted")
    ).all()  # fmt: skip
    shown = sum(any(f". {si.one_line(p)}\n" in prompt for p in pool) for prompt in prompts)
    return sizes, shown / len(prompts) if prompts else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", type=int, default=30, help="Self-Instruct: accepted instructions per run.")
    parser.add_argument("--alpaca-requests", type=int, default=32, help="Alpaca: requests per run (--max-requests).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", choices=["self-instruct", "alpaca"], help="Run only that pipeline's cases.")
    parser.add_argument("--cases", help="Comma-separated case labels to run (default: all).")
    args = parser.parse_args()

    from datagen.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(args.model)
    prefix_caching = backend.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    # Self-Instruct as examples/self_instruct.yaml runs it on a small model; Alpaca with a CPU-sized max_tokens.
    si_common = dict(num_instructions=args.instructions, prompt_style="chat", max_tokens=256, instance_max_tokens=200)
    # Alpaca by a request budget: the embedded model writes few records the strict parser keeps, so a target in
    # accepted records takes tens of minutes on a CPU; both batch sizes send the same number of requests.
    al_common = dict(num_instructions=10_000, max_requests=args.alpaca_requests, prompt_style="chat", max_tokens=512)
    cases = [
        ("self-instruct sequential 16", si, si.SelfInstructConfig(**si_common, request_batch_size=16, pipelined=False)),
        ("self-instruct pipelined 16", si, si.SelfInstructConfig(**si_common, request_batch_size=16, pipelined=True)),
        ("self-instruct fixed 64", si, si.SelfInstructConfig(**si_common, request_batch_size=64)),
        ("self-instruct defaults", si, si.SelfInstructConfig(**si_common)),
        ("alpaca 8", alpaca, alpaca.AlpacaConfig(**al_common, request_batch_size=8)),
        ("alpaca fixed 32", alpaca, alpaca.AlpacaConfig(**al_common, request_batch_size=32)),
        ("alpaca defaults", alpaca, alpaca.AlpacaConfig(**al_common)),
    ]
    cases = [case for case in cases if args.only is None or case[0].startswith(args.only)]
    cases = [case for case in cases if not args.cases or case[0] in args.cases.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, module, config in cases:
            rows.append(one_case(backend, tmp, label, module, bootstrap.for_backend(config, backend.name)))
            row = rows[-1]
            print(f"  {label}: run {row['run']:.1f} s, replay {row['replay']:.1f} s", flush=True)
    backend.close()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    only = f" --only {args.only}" if args.only else ""
    only += f" --cases {args.cases}" if args.cases else ""
    print(f"command: python bench/saturation.py --instructions {args.instructions} --alpaca-requests {args.alpaca_requests}{only}")
    print(f"commit {commit}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}; load average {os.getloadavg()[0]:.1f}; vllm backend, prefix caching {'on' if prefix_caching else 'off'}")  # fmt: skip
    print(f"{'case':30} {'calls':>5} {'requests':>8} {'accepted':>8} {'tokens':>7} {'run s':>7} {'replay s':>8} {'ratio':>6}"
          f" {'machine':>7}  batches (instruction requests)")  # fmt: skip
    for row in rows:
        share = "-" if row["share"] is None else f"{row['share']:.0%}"
        print(f"{row['label']:30} {row['calls']:5} {row['requests']:8} {row['accepted']:8} {row['tokens']:7} "
              f"{row['run']:7.1f} {row['replay']:8.1f} {row['run'] / row['replay']:6.2f} {share:>7}  {row['sizes']}")  # fmt: skip
    print("machine: share of accepted instructions whose prompt showed a machine-generated instruction")
    for row in rows:
        label = row["label"]
        if not label.endswith("defaults"):
            continue
        ratio = row["run"] / row["replay"]
        print(f"target <= 1.10 ({label}): {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.2f})")


if __name__ == "__main__":
    main()
