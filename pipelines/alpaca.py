"""Stanford Alpaca's data generation (Taori et al. 2023, "Alpaca: A Strong, Replicable Instruction-Following Model";
code: github.com/tatsu-lab/stanford_alpaca, generate_instruction.py and prompt.txt).

    datagen alpaca --seeds examples/seed_tasks.jsonl --num-instructions 50 --run alpaca-demo

Alpaca's variant of Self-Instruct: each request shows 3 seed tasks (seeds only, never machine-generated ones) as
complete records and asks for 20 diverse tasks, each with an instruction, an input (or <noinput>) and an output, so one
call yields instructions and their instances together. No classification step. A batch runs:

1. prompt: the requirements, 3 numbered seed records separated by "###", and "4. Instruction:";
2. generate, and parse the "N. Instruction / N. Input / N. Output" records;
3. filter: Self-Instruct's heuristic filters with Alpaca's larger blacklist, then ROUGE-L F > 0.7 against every seed and
   every instruction kept so far (the dedup engine), then the instance filters on the record's input and output;
4. store: every call, every parsed record with its verdict, in one transaction.

Seeds, store layout, resume, stall guard and progress are the loop Self-Instruct and Alpaca share (pipelines/bootstrap.py);
the heuristic filters are Self-Instruct's (pipelines/self_instruct.py), as in the reference.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from pydantic import Field, model_validator
from sqlmodel import Session, select

from datagen.backends import Backend, Request, Result, SamplingParams
from datagen.dedup import RougeIndex
from datagen.errors import BadInput
from pipelines.bootstrap import (
    BatchStats,
    BootstrapConfig,
    Prompt,
    bootstrap,
    filtering_time,
    finish_batch,
    for_backend,
    load_pool,
    load_seeds,
    request_seed,
    timed_generate,
    uses_chat,
)
from pipelines import best_of_k
from pipelines.seeds import SeedTask
from pipelines.self_instruct import BLACKLIST, ParsedInstance, instance_verdicts, one_line, rejection_reason
from storage.store import add_generations
from storage.tables import Generation, Instance, Run, Task

ALPACA_BLACKLIST = BLACKLIST + ("video", "audio", "music", "flowchart", "diagram")
"""generate_instruction.py's blacklist: Self-Instruct's plus tasks needing sound or pictures."""


class AlpacaConfig(BootstrapConfig):
    """Every knob of an Alpaca run; defaults are generate_instruction.py's unless the comment says otherwise. The
    knobs shared with Self-Instruct are documented once, in pipelines/bootstrap.py BootstrapConfig, where their
    default is the same."""

    num_instructions: int = 100
    """Accepted instructions to reach (reference `num_instructions_to_generate` 100). Ours: the reference counts
    records that passed the similarity filter and keeps its whole last batch; here a record counts once its
    instance passes Self-Instruct's instance filters, and those past the target are stored as target_reached."""
    num_prompt_instructions: int = 3
    """Seed records shown per request (reference 3)."""
    num_tasks: int = 20
    """Tasks the prompt asks for; generation stops at number 20, so at most 16 new records come per request
    (reference: prompt.txt "a set of 20", stop=["\\n20", "20.", "20."])."""
    batch_sizes: ClassVar[tuple[int, int]] = (8, 32)
    """Default max_request_batch_size on transformers and on vllm/openai (continuous batching keeps a larger batch's
    engine full; each request asks for up to 16 long records; bench/saturation.py)."""

    request_batch_size: int | None = None
    """Requests per batch, one backend call. None: the ramp Self-Instruct uses (pipelines/bootstrap.py, ramp_size),
    from the reference's 5 per call, growing while a batch adds at most 10% of the pool, up to
    max_request_batch_size. Alpaca's prompts show seed records only, so the batch size changes no prompt; the ramp
    keeps the run from generating a large batch past the target. A number: that many every batch."""
    max_request_batch_size: int | None = None
    """The ramp's ceiling. None: 8 on transformers, 32 on vllm and openai (batch_sizes)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 3072
    """Per request (reference: "hard-code to maximize the length")."""
    loop_ngram: int = 20
    """transformers only: end a response once the 20 tokens just written occur for the 4th time in it, a loop
    (`SamplingParams.loop_ngram`); it counts as cut by max_tokens, so its last record is dropped (length_cut). Ours:
    the reference's API has no such stop; without it one runaway response holds the whole padded batch for
    max_tokens steps (issue 19, item 8a). 0: off."""
    block_eos: bool = True
    """Forbid the model's end-of-sequence token, so it writes records until "20." or max_tokens (reference:
    `logit_bias={"50256": -100}`, GPT-3's <|endoftext|>). Every backend blocks it, the openai backend only with a
    local tokenizer (`SamplingParams.block_eos`)."""
    blacklist: tuple[str, ...] = Field(ALPACA_BLACKLIST, strict=False)
    """Whole words, any case: generate_instruction.py's blacklist (Self-Instruct's and five more)."""
    prompt_style: str = "auto"
    """raw, chat (the requirements as the user's turn, the records as the start of the answer) or auto."""
    requirements: str = "reference"
    """The prompt's task description: reference, Stanford Alpaca's prompt.txt verbatim (REFERENCE_REQUIREMENTS), or
    concise, ours: the same rules renumbered and shortened, without the "substantial content" line and the
    "highest peak" example (CONCISE_REQUIREMENTS)."""
    record_format: str = "reference"
    """Which blocks of a response are records. reference: generate_instruction.py's rule, split at "###" and exactly
    the fields Instruction, Input, Output once each (else malformed_record). lenient, ours: also a new record at an
    "N. Instruction:" line that follows an Output field (a record whose "###" the model left out), and Instruction then
    Output is a record with no input.
    examples/alpaca_cpu.yaml sets lenient. Measured on the embedded 135M model, completions re-parsed both ways: its
    -n 8 run (16 completions of up to 320 tokens at temperature 0.7) gives 28 records under lenient, 9 under the
    reference's rule; at 1,024 tokens and 1.0 (8 completions) 2 and 0, most blocks there being no record at all."""
    length_cut: str = "drop_last"
    """What to do with a response that max_tokens cut: drop_last, only its last, possibly unfinished, record (the
    reference: generate_instruction.py), or drop_response, every record in it (Self-Instruct's rule)."""
    instance_samples: int = 1
    """Answers per accepted instruction: best-of-k (pipelines/best_of_k.py). 1: the record's own output, the
    reference's behaviour exactly. Ours when k > 1: the record's output is sample 0 and k - 1 more answers are drawn,
    each its own request with its own seed, from the record's request prompt continued with the record's instruction
    and input (`answer_prompt`); one is kept by instance_pick, every sample is stored with its verdict. Which records
    are accepted is decided as with k = 1, so the instructions are the same; only answers differ."""
    instance_pick: str = "consistent"
    """How best-of-k keeps one answer: consistent, the highest mean ROUGE-L F to the other answers; or ifd, the lowest
    instruction-following difficulty (Cherry LLM) under the generating model (the student when it generates)."""
    seed: int = 0
    """Seeds the sampling of seed records and the backend's sampling."""

    @model_validator(mode="after")
    def _check_alpaca(self) -> AlpacaConfig:
        best_of_k.check_samples(self.instance_samples, self.instance_pick)
        if self.requirements not in REQUIREMENTS:
            raise BadInput(f"requirements must be reference or concise, got {self.requirements}")
        if self.record_format not in RECORD_FORMATS:
            raise BadInput(f"record_format must be reference or lenient, got {self.record_format}")
        if self.num_tasks <= self.num_prompt_instructions + 1:
            raise BadInput("--num-tasks must exceed --num-prompt-instructions + 1")
        alpaca_params(self, 0)  # loop_ngram and block_eos are checked as the backends take them
        return self


# ---- prompt (pure) --------------------------------------------------------------------------------------------

REFERENCE_REQUIREMENTS = """You are asked to come up with a set of {n} diverse task instructions. These task instructions will be given to a GPT model and we will evaluate the GPT model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with imperative instructions.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended generation, classification, editing, etc.
2. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder because it cannot perform any action.
3. The instructions should be in English.
4. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.
5. You should generate an appropriate input to the instruction. The input field should contain a specific example provided for the instruction. It should involve realistic data and should not contain simple placeholders. The input should provide substantial content to make the instruction challenging but should ideally not exceed 100 words.
6. Not all instructions require input. For example, when a instruction asks about some general information, "what is the highest peak in the world", it is not necessary to provide a specific context. In this case, we simply put "<noinput>" in the input field.
7. The output should be an appropriate response to the instruction and the input. Make sure the output is less than 100 words.

List of {n} tasks:
"""
"""prompt.txt of Stanford Alpaca, verbatim (github.com/tatsu-lab/stanford_alpaca, prompt.txt at commit 015c226;
Copyright Stanford Alpaca authors, Apache License 2.0), its misnumbered rules and "GPT model" included; only the
count, 20 there, is `num_tasks`. With the raw style the prompt is the reference's encode_prompt exactly: this text,
a newline, then the records."""

CONCISE_REQUIREMENTS = """You are asked to come up with a set of {n} diverse task instructions. These task instructions will be given to a language model and we will evaluate the model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instructions should also be diverse: combine questions with imperative instructions.
3. The types of instructions should be diverse: open-ended generation, classification, editing, rewriting, question answering, brainstorming and more.
4. A language model must be able to complete the instruction: do not ask for visual or audio output, or for actions in the world such as setting a reminder.
5. The instructions should be in English, 1 to 2 sentences long, either imperative sentences or questions.
6. Write an appropriate input for the instruction: a specific, realistic example of at most about 100 words, not a placeholder. When no input is needed, as for a general knowledge question, write "<noinput>".
7. The output should be an appropriate response to the instruction and the input, in less than 100 words.

List of {n} tasks:"""
"""Ours (`requirements: concise`), after prompt.txt: its rules numbered 1 to 7, "GPT" replaced by "language model",
shorter; it drops "The input should provide substantial content to make the instruction challenging" and the
"highest peak in the world" example."""

REQUIREMENTS = {"reference": REFERENCE_REQUIREMENTS, "concise": CONCISE_REQUIREMENTS}


def record(number: int, instruction: str, given: str, output: str) -> str:
    """One task in Alpaca's record format (encode_prompt)."""
    return f"###\n{number}. Instruction: {one_line(instruction)}\n{number}. Input:\n{given or '<noinput>'}\n{number}. Output:\n{output}\n"


def alpaca_prompt(examples: Sequence[SeedTask], num_tasks: int, requirements: str = "reference") -> Prompt:
    records = "".join(record(n, t.instruction, t.instances[0].input, t.instances[0].output) for n, t in enumerate(examples, 1))
    return Prompt(REQUIREMENTS[requirements].format(n=num_tasks), f"{records}###\n{len(examples) + 1}. Instruction:")


def alpaca_params(config: AlpacaConfig, seed: int) -> SamplingParams:
    return SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens, seed=seed,
                          stop=(f"\n{config.num_tasks}", f"{config.num_tasks}."), block_eos=config.block_eos,
                          loop_ngram=config.loop_ngram)  # fmt: skip


# ---- parsing (pure) -------------------------------------------------------------------------------------------

_FIELD = re.compile(r"^\s*\d+\s*\.\s*(Instruction|Input|Output)\s*:", re.M)
_INSTRUCTION = re.compile(r"^\s*\d+\s*\.\s*Instruction\s*:", re.M)
FIELDS = ["Instruction", "Input", "Output"]
RECORD_FORMATS = ("reference", "lenient")


@dataclass(frozen=True)
class Record:
    """One "###" block of a completion: its three fields, or why it is not a record (`reason`)."""

    instruction: str
    input: str
    output: str
    raw: str
    """The block as the model wrote it."""
    reason: str | None = None
    """malformed_record (the fields are not Instruction, Input, Output once each, in that order) or cut_by_length."""


def parse_records(completion: str, first_number: int, cut_by_length: bool = False, record_format: str = "reference") -> list[Record]:
    """The blocks of a completion that continues after "N. Instruction:", split at "###" wherever it stands
    (generate_instruction.py, post_process_gpt3_response).

    A block is a record when it holds the fields Instruction, Input and Output once each and in that order
    (the reference: exactly 7 parts); anything else is kept as malformed_record with its raw text. When max_tokens
    cut the completion, its last block is dropped as cut_by_length (the reference), blank or not. Ours: any number
    is accepted before a field name (the reference insists on the expected one, so one misnumbered record drops);
    "<noinput>" in any case means an empty input. record_format lenient (ours, AlpacaConfig.record_format): a block
    is also split before each "N. Instruction:" line that follows an Output field, and Instruction then Output is a
    record with no input.
    """
    if not completion.strip():
        return []  # an empty response, counted as such; its (empty) text is in the generation table
    blocks = f"{first_number}. Instruction:{completion}".split("###")
    lenient = record_format == "lenient"
    if lenient:
        blocks = [piece for block in blocks for piece in _split_at_instructions(block)]
    records = []
    for position, block in enumerate(blocks):
        raw = block.strip()
        if not raw:
            continue
        parts = _FIELD.split(block)
        names, texts = parts[1::2], [p.strip() for p in parts[2::2]]
        if cut_by_length and position == len(blocks) - 1:
            reason = "cut_by_length"
        elif lenient and names == ["Instruction", "Output"] and texts[0]:
            texts.insert(1, "")
            reason = None
        elif names != FIELDS or not texts[0]:
            reason = "malformed_record"
        else:
            reason = None
        if reason:
            records.append(Record(raw, "", "", raw, reason))
            continue
        instruction, given, output = texts
        given = "" if given.lower() == "<noinput>" else given
        records.append(Record(re.sub(r"\s+", " ", instruction), given, output, raw))
    return records


def _split_at_instructions(block: str) -> list[str]:
    """A block cut before each "N. Instruction:" line that follows an Output field (a record the model ended without
    "###"); an Instruction line after anything else stays in its block, which stays malformed."""
    pieces, start = [], 0
    for match in _INSTRUCTION.finditer(block):
        names = _FIELD.findall(block[start : match.start()])
        if names and names[-1] == "Output":
            pieces.append(block[start : match.start()])
            start = match.start()
    return [*pieces, block[start:]]


# ---- the run --------------------------------------------------------------------------------------------------


def run(
    session: Session,
    run_row: Run,
    backend: Backend,
    config: AlpacaConfig,
    on_batch: Callable[[Run, BatchStats], None] = lambda run, stats: None,
) -> BatchStats:
    """Generate until config.num_instructions records are accepted; seeds and pool come from the store."""
    config = for_backend(config, backend.name)
    chat_template = backend.render_chat if uses_chat(backend, config.prompt_style) else None
    seeds = load_seeds(session, run_row)
    examples = [s for s in seeds if s.instances]
    index = RougeIndex(threshold=config.rouge_threshold, tokenizer=config.tokenizer)
    index.add([s.instruction for s in seeds] + load_pool(session, run_row))

    def one_batch(batch_number: int, n_requests: int, rng: random.Random) -> BatchStats:
        requests = []
        for number in range(n_requests):
            shown = rng.sample(examples, min(config.num_prompt_instructions, len(examples)))
            requests.append(Request(prompt=alpaca_prompt(shown, config.num_tasks, config.requirements).render(chat_template),
                                    params=alpaca_params(config, request_seed(config.seed, batch_number, number))))  # fmt: skip
        return process_batch(session, run_row, backend, config, requests, index, batch_number)

    return bootstrap(session, run_row, config, one_batch, on_batch, backend)


def process_batch(session: Session, run_row: Run, backend: Backend, config: AlpacaConfig, requests: list[Request],
                  index: RougeIndex, batch_number: int) -> BatchStats:  # fmt: skip
    """generate → parse → filter → (best-of-k: more answers, pick one) → store, one transaction."""
    stats = BatchStats(requests=len(requests))
    results = timed_generate(backend, requests, stats)
    with filtering_time(stats):
        generations = add_generations(session, run_row, backend, "instructions", batch_number, requests, results)
        rows: list[tuple[Task, Record, Result]] = []
        for generation, result in zip(generations, results):
            completion = result.completions[0]
            cut = completion.finish_reason == "length"
            records = parse_records(completion.text, config.num_prompt_instructions + 1, cut, config.record_format)
            stats.empty_responses += not records
            for rec in records:
                if cut and config.length_cut == "drop_response":
                    reason = "cut_by_length"
                else:
                    reason = rec.reason or rejection_reason(rec.instruction, config.blacklist, config.require_ascii_start, config.tokenizer)
                task = Task(run_id=run_row.id, generation_id=generation[0].id, instruction=rec.instruction, status="rejected", reason=reason)
                rows.append((task, rec, result))
        stats.generated = len(rows)

        survivors = [(task, rec) for task, rec, _ in rows if task.reason is None]
        # exact_nearest: an accepted record stores its true nearest earlier instruction too (shown in datagen ui, exported)
        decisions = index.filter([task.instruction for task, _ in survivors], exact_nearest=True)
        need = config.num_instructions - run_row.accepted
        session.add_all(task for task, _, _ in rows)
        session.flush()
        accepted: list[Task] = []
        for (task, rec), decision in zip(survivors, decisions):
            task.nearest, task.similarity = decision.nearest_text, decision.score
            if not decision.kept:
                task.reason = "rouge_similarity"
                continue
            # One instance per instruction: the record's own input and output, through Self-Instruct's instance filters.
            verdict = instance_verdicts([ParsedInstance(rec.input, rec.output)], 1, cut_by_length=False)[0]
            if verdict:
                task.reason = "no_valid_instances"
            elif stats.accepted >= need:
                task.reason = verdict = "target_reached"  # its instance is kept, as rejected: not part of the data
            else:
                task.status, task.reason = "accepted", None
                stats.accepted += 1
                run_row.instances += 1
                if config.instance_samples > 1:
                    accepted.append(task)  # its answers are drawn below, its record's own among them
                    continue
            session.add(Instance(task_id=task.id, generation_id=task.generation_id, input=rec.input, output=rec.output,
                                 status="rejected" if verdict else "accepted", reason=verdict))  # fmt: skip
        if accepted:
            best_of_answers(session, run_row, backend, config, batch_number, rows, accepted, stats)
        return finish_batch(session, run_row, [task for task, _, _ in rows], stats)


ANSWER_MAX_TOKENS = 256
"""Per best-of-k answer request: Alpaca's prompt asks for outputs under 100 words (about 130 tokens); an answer cut
here fails the instance filters as cut_by_length."""


def answer_prompt(result: Result, rec: Record, config: AlpacaConfig) -> str:
    """The instruction request's own prompt, with the record as its first new task up to "Output:", so a further
    answer is drawn in the context the record's own answer was written in (ours: that context also held the records
    the model wrote before this one)."""
    number = config.num_prompt_instructions + 1
    return f"{result.prompt} {rec.instruction}\n{number}. Input:\n{rec.input or '<noinput>'}\n{number}. Output:\n"


def parse_answer(completion: str) -> str:
    """The answer up to the next record ("###" is a stop string; a record started without one ends it too)."""
    return _FIELD.split(completion.split("###")[0])[0].strip()


def best_of_answers(session: Session, run_row: Run, backend: Backend, config: AlpacaConfig, batch_number: int,
                    rows: list[tuple[Task, Record, Result]], accepted: list[Task], stats: BatchStats) -> None:  # fmt: skip
    """Best-of-k (instance_samples > 1) for the batch's accepted records: the record's own answer is sample 0, k - 1
    more are drawn with their own seeds; one is kept by instance_pick and every sample is stored with its verdict."""
    k, position = config.instance_samples, {id(task): i for i, (task, _, _) in enumerate(rows)}
    found = {id(task): (rec, result) for task, rec, result in rows}
    requests = []
    for task in accepted:
        rec, result = found[id(task)]
        for j in range(1, k):
            seed = best_of_k.sample_seed(config.seed, batch_number, position[id(task)], j)
            params = replace(alpaca_params(config, seed), max_tokens=ANSWER_MAX_TOKENS)
            requests.append(Request(prompt=answer_prompt(result, rec, config), params=params))
    results = timed_generate(backend, requests, stats)
    generations = add_generations(session, run_row, backend, "answers", batch_number, requests, results)
    own_seeds = {g.id: g.sampling.get("seed") for g in session.exec(select(Generation).where(
        Generation.id.in_([t.generation_id for t in accepted])))}  # fmt: skip
    for number, task in enumerate(accepted):
        rec, _ = found[id(task)]
        samples = [best_of_k.Sample(0, task.generation_id, own_seeds.get(task.generation_id), [(rec.input, rec.output)], [None])]
        for j in range(1, k):
            row, result = generations[(k - 1) * number + j - 1][0], results[(k - 1) * number + j - 1]
            completion = result.completions[0]
            answer = parse_answer(completion.text)
            verdict = instance_verdicts([ParsedInstance(rec.input, answer)], 1, completion.finish_reason == "length")[0]
            samples.append(best_of_k.Sample(j, row.id, row.sampling.get("seed"), [(rec.input, answer)], [verdict]))
        instances, sample_rows = best_of_k.choose(task, samples, config.instance_pick, backend, stats, config.tokenizer)
        session.add_all(instances + sample_rows)
