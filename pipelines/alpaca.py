"""Stanford Alpaca's data generation (Taori et al. 2023; tatsu-lab/stanford_alpaca: generate_instruction.py).

    datagen alpaca --seeds examples/seed_tasks.jsonl --num-instructions 50 --run alpaca-demo

Alpaca's variant of Self-Instruct: each request shows 3 seed tasks (seeds only, no machine tasks) and asks
for 20 complete tasks at once, each with an instruction, an input (or <noinput>) and an output, so one call
yields instructions and their instances together. There is no classification step. The heuristic filters
(with Alpaca's larger blacklist) and the ROUGE-L 0.7 rule against seeds and pool are Self-Instruct's, and
so are the store layout, resume and progress (pipelines/self_instruct.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlmodel import Session, func, select

from datagen.backends import Backend, Request, SamplingParams
from datagen.dedup import RougeIndex
from pipelines.seeds import SeedTask
from pipelines.self_instruct import BatchStats, SelfInstructConfig, instance_verdicts, load_pool, rejection_reason, uses_chat
from storage.store import add_generations, touch
from storage.tables import Generation, Instance, Run, Task


@dataclass
class AlpacaConfig(SelfInstructConfig):
    """Alpaca's defaults (generate_instruction.py) over Self-Instruct's."""

    num_prompt_instructions: int = 3
    """Seed tasks shown per request."""
    num_tasks_per_request: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    max_tokens: int = 3072
    request_batch_size: int = 8
    blacklist: tuple[str, ...] = SelfInstructConfig().blacklist + ("video", "videos", "audio", "music", "flowchart", "diagram")


PROMPT = """You are asked to come up with a set of {n} diverse task instructions. These task instructions will be given to a language model and we will evaluate the model for completing the instructions.

Requirements:
1. Do not repeat the same verb for each instruction, to maximize diversity.
2. Use varied language: questions and imperative instructions both work.
3. The tasks should be of different types: open-ended generation, classification, editing, rewriting, question answering, brainstorming and more.
4. A language model must be able to complete the instruction: no images, audio or actions in the world.
5. Write in English, one or two sentences per instruction.
6. Where a task needs an input, give a realistic one of at most 100 words; otherwise write "<noinput>".
7. The output must be an appropriate response to the instruction and input, in at most 100 words.

List of {n} tasks:
"""


def task_block(number: int, instruction: str, given: str, output: str) -> str:
    return f"###\n{number}. Instruction: {instruction}\n{number}. Input:\n{given or '<noinput>'}\n{number}. Output:\n{output}\n"


def alpaca_request(examples: Sequence[SeedTask], config: AlpacaConfig, chat: bool, seed: int) -> Request:
    body = PROMPT.format(n=config.num_tasks_per_request)
    for number, task in enumerate(examples, start=1):
        instance = task.instances[0]
        body += task_block(number, task.instruction, instance.input, instance.output)
    body += f"###\n{len(examples) + 1}. Instruction:"
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                            presence_penalty=config.presence_penalty, seed=seed,
                            stop=(f"\n{config.num_tasks_per_request + 1}", f"{config.num_tasks_per_request + 1}.", f"{config.num_tasks_per_request + 1}. Instruction"))
    if chat:
        return Request(messages=({"role": "user", "content": body.rsplit("###\n", 1)[0] + "###\nContinue the list in the same format, starting with the next number."},), params=params)
    return Request(prompt=body, params=params)


_FIELD = re.compile(r"^\s*\d+\s*\.\s*(Instruction|Input|Output)\s*:\s*", re.M)


def parse_tasks(text: str, chat: bool, truncated: bool, first_number: int) -> list[tuple[str, str, str]]:
    """(instruction, input, output) records from "N. Instruction: / N. Input: / N. Output:" blocks split by ###."""
    if not chat:
        text = f"{first_number}. Instruction:" + text
    blocks = re.split(r"^\s*###\s*$", text, flags=re.M)
    if truncated:
        blocks = blocks[:-1]  # the block max_tokens cut may be incomplete
    records = []
    for block in blocks:
        parts = _FIELD.split(block)
        fields = {name: value.strip() for name, value in zip(parts[1::2], parts[2::2])}
        if "Instruction" not in fields or "Output" not in fields:
            continue
        given = fields.get("Input", "")
        records.append((re.sub(r"\s+", " ", fields["Instruction"]), "" if given.lower().strip("<> ") == "noinput" else given, fields["Output"]))
    return records


def run(
    session: Session,
    run_row: Run,
    backend: Backend,
    seeds: Sequence[SeedTask],
    config: AlpacaConfig,
    on_batch: Callable[[Run, BatchStats], None] = lambda run, stats: None,
) -> BatchStats:
    chat = uses_chat(backend, config)
    seed_instructions, pool = load_pool(session, run_row)
    index = RougeIndex(threshold=config.rouge_threshold, tokenizer=config.tokenizer)
    index.add(seed_instructions + pool)
    batch_number = (session.exec(select(func.max(Generation.batch)).where(Generation.run_id == run_row.id)).one() or 0) + 1
    rng = random.Random(config.seed * 1_000_003 + batch_number)
    examples_pool = [s for s in seeds if s.instances]
    totals, stalled = BatchStats(), 0
    while run_row.accepted < config.num_instructions:
        if config.max_requests is not None and run_row.requests >= config.max_requests:
            touch(run_row, status="stopped", error=f"--max-requests {config.max_requests} reached")
            break
        if stalled >= config.max_stalled_batches:
            touch(run_row, status="stopped", error=f"{stalled} batches in a row accepted nothing")
            break
        requests = [alpaca_request(rng.sample(examples_pool, min(config.num_prompt_instructions, len(examples_pool))), config, chat,
                                   seed=config.seed * 1000 + batch_number) for _ in range(config.request_batch_size)]
        stats = _process_batch(session, run_row, backend, config, chat, requests, index, batch_number)
        totals.generated += stats.generated
        totals.accepted += stats.accepted
        totals.generate_seconds += stats.generate_seconds
        for reason, count in stats.rejected.items():
            totals.rejected[reason] = totals.rejected.get(reason, 0) + count
        stalled = 0 if stats.accepted else stalled + 1
        batch_number += 1
        on_batch(run_row, stats)
    else:
        touch(run_row, status="completed", error=None)
    session.add(run_row)
    session.commit()
    return totals


def _process_batch(session, run_row, backend, config, chat, requests, index, batch_number) -> BatchStats:
    import time

    stats = BatchStats()
    started = time.perf_counter()
    results = backend.generate(requests)
    stats.generate_seconds = time.perf_counter() - started
    generations = add_generations(session, run_row, backend, "instructions", batch_number, requests, results)
    candidates = []  # (generation id, instruction, input, output)
    for rows, result in zip(generations, results):
        for row, completion in zip(rows, result.completions):
            for record in parse_tasks(completion.text, chat, completion.finish_reason == "length", config.num_prompt_instructions + 1):
                candidates.append((row.id, *record))
    stats.generated = len(candidates)
    tasks, survivors = [], []
    for generation_id, instruction, given, output in candidates:
        reason = rejection_reason(instruction, config) or instance_verdicts([(given, output)], 1)[0]
        task = Task(run_id=run_row.id, generation_id=generation_id, instruction=instruction, status="rejected", reason=reason,
                    is_classification=None)
        tasks.append((task, given, output))
        if reason is None:
            survivors.append(task)
    decisions = index.filter([t.instruction for t in survivors])
    need = config.num_instructions - run_row.accepted
    for task, decision in zip(survivors, decisions):
        task.nearest, task.similarity = decision.nearest_text, decision.score
        if not decision.kept:
            task.reason = "rouge_similarity"
        elif stats.accepted >= need:
            task.reason = "target_reached"
        else:
            task.status, task.reason = "accepted", None
            stats.accepted += 1
    session.add_all(task for task, _, _ in tasks)
    session.flush()
    for task, given, output in tasks:
        if task.status == "accepted":
            session.add(Instance(task_id=task.id, generation_id=task.generation_id, input=given, output=output))
            run_row.instances += 1
        else:
            stats.rejected[task.reason] = stats.rejected.get(task.reason, 0) + 1
    run_row.accepted += stats.accepted
    run_row.rejected += sum(stats.rejected.values())
    touch(run_row)
    session.add(run_row)
    session.commit()
    return stats
