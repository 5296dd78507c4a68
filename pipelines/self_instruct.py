"""Self-Instruct bootstrapping (Wang et al. 2023, "Self-Instruct: Aligning Language Models with
Self-Generated Instructions"; reference code: yizhongw/self-instruct).

    datagen self-instruct --seeds examples/seed_tasks.jsonl --num-instructions 50 --run demo

From a few human seed tasks, the model writes new instructions; each is kept only if it passes the
heuristic filters and its ROUGE-L F-measure with every instruction kept so far (seeds included) is at
most 0.7; the model then says whether the task is a classification task and writes instances for it
(input first, or label first for classification). The pool grows until `num_instructions` are accepted.

Every call, candidate and verdict goes to the store in one transaction per batch, so a crash loses at
most the batch in flight and `--run NAME` resumes from the store with no duplicates.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from sqlmodel import Session, func, select

from datagen.backends import Backend, Request, Result, SamplingParams
from datagen.dedup import RougeIndex
from datagen.errors import BadInput, DatagenError
from pipelines.seeds import SeedTask
from storage.store import add_generations, touch
from storage.tables import Generation, Instance, Run, Task


@dataclass
class SelfInstructConfig:
    """Defaults are the reference implementation's (self_instruct/bootstrap_instructions.py and
    generate_instances.py) unless a comment says otherwise."""

    num_instructions: int = 100
    """Accepted generated instructions to reach."""
    num_prompt_instructions: int = 8
    """In-context instructions per request: 8 in the reference."""
    num_machine_instructions: int = 2
    """Of those, taken from the machine-generated pool (6 from the human seeds); fewer while the pool is small."""
    max_new_instructions: int = 7
    """The prompt ends at number 9 and generation stops at "16": at most 7 new instructions per request."""
    request_batch_size: int = 16
    """Requests per backend call (the reference sent 5 per API call); the transformers backend batches 16."""
    temperature: float = 0.7
    top_p: float = 0.5
    presence_penalty: float = 2.0
    """Reference: presence_penalty=2 (vllm and openai apply it; transformers has none)."""
    max_tokens: int = 1024
    rouge_threshold: float = 0.7
    """Reject when ROUGE-L F > 0.7 against any seed or accepted instruction (paper, section 2.3)."""
    min_words: int = 4
    """Reject 3 words or fewer (reference: `len(inst.split()) <= 3`)."""
    max_words: int = 150
    blacklist: tuple[str, ...] = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                                  "map", "maps", "draw", "plot", "go to")
    """Tasks a language model cannot do (reference filter)."""
    require_ascii_start: bool = True
    """Reject instructions whose first character is not ASCII; turn off for non-English data."""
    tokenizer: str = "rouge"
    """ROUGE tokenizer: rouge (rouge-score's, faithful) or unicode (any script)."""
    prompt_style: str = "auto"
    """raw (the paper's completion prompt), chat (the same request as a chat turn), auto (chat if the model has a chat template)."""
    max_instances: int = 5
    """Instances per task, at most (reference: "up to 5")."""
    instance_max_tokens: int = 300
    """Token budget for a task's instances (our choice: enough for 2-5 short examples)."""
    generate_classification: bool = False
    """Generate classification tasks only, with the classification header (reference `--use_clf_seed_tasks_only`)."""
    max_requests: int | None = None
    """Stop after this many instruction requests (a budget guard)."""
    max_stalled_batches: int = 5
    """Stop with a message after this many batches in a row accept nothing."""
    seed: int = 0
    """Sampling of in-context examples and the backend's seeds."""

    def __post_init__(self) -> None:
        if self.num_instructions < 1:
            raise BadInput(f"--num-instructions must be at least 1, got {self.num_instructions}")
        if not 0 <= self.rouge_threshold <= 1:
            raise BadInput(f"--rouge-threshold must be in [0, 1], got {self.rouge_threshold}")
        if self.prompt_style not in ("auto", "raw", "chat"):
            raise BadInput(f"--prompt-style must be raw, chat or auto, got {self.prompt_style}")
        if self.tokenizer not in ("rouge", "unicode"):
            raise BadInput(f"--tokenizer must be rouge or unicode, got {self.tokenizer}")
        if self.request_batch_size < 1 or self.max_instances < 1:
            raise BadInput("--request-batch-size and --max-instances must be at least 1")
        self.blacklist = tuple(self.blacklist)


# ---- prompts (pure) ---------------------------------------------------------------------------------

HEADER = "Come up with a series of tasks:"
CLASSIFICATION_HEADER = "Come up with a series of classification tasks. Try to specify the possible output labels when possible."
CHAT_ASK = ("Continue the list with new tasks numbered {first} to {last}. Each task is one instruction a person "
            "could ask an AI assistant, different from the ones above. Write only the numbered list.")


def instruction_prompt(examples: Sequence[str], classification: bool) -> str:
    """The paper's prompt: a header, the numbered in-context instructions, and the next number."""
    header = CLASSIFICATION_HEADER if classification else HEADER
    lines = [f"{i}. {text}" for i, text in enumerate(examples, start=1)]
    return header + "\n" + "\n".join(lines) + f"\n{len(examples) + 1}."


def instruction_request(examples: Sequence[str], config: SelfInstructConfig, chat: bool, seed: int) -> Request:
    first = len(examples) + 1
    last = len(examples) + config.max_new_instructions
    params = SamplingParams(
        temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
        presence_penalty=config.presence_penalty, seed=seed,
        stop=(f"\n{last + 1}.", f"{last + 1}.", f"{last + 1} .") + (() if chat else ("\n\n",)),
    )
    if not chat:
        return Request(prompt=instruction_prompt(examples, config.generate_classification), params=params)
    body = instruction_prompt(examples, config.generate_classification).rsplit("\n", 1)[0]
    return Request(messages=({"role": "user", "content": body + "\n\n" + CHAT_ASK.format(first=first, last=last)},), params=params)


# ---- parsing and filters (pure) ---------------------------------------------------------------------

_NUMBERED = re.compile(r"^\s*(?:\d+\s*[.)]|[-*•])\s*(.*\S)\s*$")


def parse_instructions(text: str, chat: bool, truncated: bool) -> list[str]:
    """Numbered items of a completion. A raw completion continues after "9."; a chat answer is a list.
    A completion cut by max_tokens loses its last item, which may be cut mid-sentence (reference)."""
    if not chat:
        text = "9." + text
    items: list[str] = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match:
            items.append(match.group(1))
        elif items and line.strip():
            items[-1] += " " + line.strip()  # an item continued on the next line
    items = [re.sub(r"\s+", " ", item).strip().strip('"').strip() for item in items]
    if truncated and items:
        items.pop()
    return [item for item in items if item]


def rejection_reason(instruction: str, config: SelfInstructConfig) -> str | None:
    """The first heuristic filter an instruction fails, or None (reference order)."""
    words = instruction.split()
    if len(words) < config.min_words:
        return "too_short"
    if len(words) > config.max_words:
        return "too_long"
    lowered = instruction.lower()
    for word in config.blacklist:
        if re.search(rf"\b{re.escape(word)}\b", lowered):
            return f"blacklist:{word}"
    if lowered.startswith("write a program"):
        return "write_a_program"
    if instruction[0] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
        return "starts_with_punctuation"
    if config.require_ascii_start and not instruction[0].isascii():
        return "non_ascii_start"
    return None


# ---- classification and instances (pure prompt builders and parsers) --------------------------------

def classification_prompt(instruction: str, shots: Sequence[SeedTask]) -> str:
    """Few-shot yes/no: is this a classification task with a small set of output labels?"""
    lines = ["Can the following task be regarded as a classification task with finite output labels?", ""]
    for shot in shots:
        lines += [f"Task: {shot.instruction}", f"Is it classification? {'Yes' if shot.is_classification else 'No'}", ""]
    lines += [f"Task: {instruction}", "Is it classification?"]
    return "\n".join(lines)


def parse_yes_no(text: str) -> bool:
    return text.strip().lower().startswith("yes")


INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. Try to generate multiple examples when possible. "
                      "If the task doesn't require additional input, you can generate the output directly.")
OUTPUT_FIRST_HEADER = ("Given the classification task definition and the class labels, generate an input that "
                       "corresponds to each of the class labels. If the task doesn't require input, just generate the "
                       "correct class label.")


def demo(task: SeedTask, classification: bool) -> str:
    lines = [f"Task: {task.instruction}"]
    for number, instance in enumerate(task.instances[:2], start=1):
        if classification:
            lines += [f"Class label: {instance.output}", f"Input: {instance.input}" if instance.input else "Input: (none)"]
        else:
            lines.append(f"Example {number}")
            if instance.input:
                lines.append(f"Input: {instance.input}")
            lines.append(f"Output: {instance.output}")
    return "\n".join(lines)


def instance_prompt(instruction: str, demos: Sequence[SeedTask], classification: bool) -> str:
    """Input-first for ordinary tasks, output-first (label first) for classification (paper, section 2.2)."""
    header = OUTPUT_FIRST_HEADER if classification else INPUT_FIRST_HEADER
    body = "\n\n".join(demo(task, classification) for task in demos)
    start = "Class label:" if classification else "Example 1\n"
    return f"{header}\n\n{body}\n\nTask: {instruction}\n{start}"


def parse_instances(text: str, classification: bool, truncated: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from an instance completion; a cut-off last instance is dropped."""
    if classification:
        blocks = re.split(r"\n?\s*Class label\s*:", "Class label:" + text)
        pairs = []
        for block in blocks:
            if not block.strip():
                continue
            label, _, rest = block.partition("Input:")
            label = label.strip()
            given = rest.strip()
            pairs.append(("" if given in ("(none)", "") else given, label))
    else:
        blocks = re.split(r"\n?\s*Example\s*\d+\s*:?\s*\n", "Example 1\n" + text)
        pairs = []
        for block in blocks:
            if not block.strip():
                continue
            if re.search(r"Output\s*\d*\s*:", block):
                given, output = re.split(r"Output\s*\d*\s*:", block, maxsplit=1)
                given = re.sub(r"^\s*Input\s*\d*\s*:", "", given).strip()
            else:
                given, output = "", block
            pairs.append((given.strip(), output.strip()))
    if truncated and pairs:
        pairs.pop()
    return pairs


def instance_verdicts(pairs: Sequence[tuple[str, str]], max_instances: int) -> list[str | None]:
    """A rejection reason (or None) per pair: empty output, input equal to output, input or output ending in ':',
    exact duplicates; when one input has two different outputs, all of the task's instances go (reference)."""
    outputs_by_input: dict[str, set[str]] = {}
    for given, output in pairs:
        outputs_by_input.setdefault(given, set()).add(output)
    conflicting = any(len(outputs) > 1 for outputs in outputs_by_input.values())
    seen: set[tuple[str, str]] = set()
    verdicts: list[str | None] = []
    kept = 0
    for given, output in pairs:
        if conflicting:
            reason = "conflicting_outputs"
        elif not output:
            reason = "empty_output"
        elif given == output:
            reason = "input_equals_output"
        elif given.endswith(":") or output.endswith(":"):
            reason = "ends_with_colon"
        elif (given, output) in seen:
            reason = "duplicate"
        elif kept >= max_instances:
            reason = "over_max_instances"
        else:
            reason = None
            kept += 1
        seen.add((given, output))
        verdicts.append(reason)
    return verdicts


# ---- the run ----------------------------------------------------------------------------------------

@dataclass
class BatchStats:
    generated: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    generate_seconds: float = 0.0


def uses_chat(backend: Backend, config: SelfInstructConfig) -> bool:
    if config.prompt_style != "auto":
        return config.prompt_style == "chat"
    tokenizer = getattr(backend, "tokenizer", None)
    return bool(getattr(tokenizer, "chat_template", None))


def store_seeds(session: Session, run: Run, seeds: Sequence[SeedTask]) -> None:
    """Seeds are tasks of the run (source='seed'), so the pool can be rebuilt from the store alone."""
    for seed in seeds:
        session.add(Task(run_id=run.id, source="seed", seed_id=seed.id, instruction=seed.instruction,
                         is_classification=seed.is_classification, status="accepted"))


def load_pool(session: Session, run: Run) -> tuple[list[str], list[str]]:
    """(seed instructions, generated instructions that passed the similarity filter) in insertion order.

    A generated instruction that passed every filter but got no valid instance is not accepted, yet it stays
    in the similarity pool, as it did when it was decided: resuming repeats the uninterrupted run's decisions."""
    rows = session.exec(select(Task).where(Task.run_id == run.id).order_by(Task.id)).all()
    seeds = [t.instruction for t in rows if t.source == "seed"]
    pool = [t.instruction for t in rows if t.source == "generated" and (t.status == "accepted" or t.reason == "no_valid_instances")]
    return seeds, pool


def run(
    session: Session,
    run_row: Run,
    backend: Backend,
    seeds: Sequence[SeedTask],
    config: SelfInstructConfig,
    on_batch: Callable[[Run, BatchStats], None] = lambda run, stats: None,
) -> BatchStats:
    """Bootstrap until config.num_instructions generated instructions are accepted; returns the totals."""
    chat = uses_chat(backend, config)
    seed_instructions, pool = load_pool(session, run_row)
    index = RougeIndex(threshold=config.rouge_threshold, tokenizer=config.tokenizer)
    index.add(seed_instructions + pool)
    batch_number = (session.exec(select(func.max(Generation.batch)).where(Generation.run_id == run_row.id)).one() or 0) + 1
    rng = random.Random(config.seed * 1_000_003 + batch_number)
    prompt_seeds = [s for s in seeds if s.is_classification] if config.generate_classification else list(seeds)
    if not prompt_seeds:
        raise BadInput("--generate-classification needs seed tasks marked is_classification")
    shots = _classification_shots(seeds)
    demo_pool = [s for s in seeds if s.instances]
    totals = BatchStats()
    stalled = 0
    while run_row.accepted < config.num_instructions:
        if config.max_requests is not None and run_row.requests >= config.max_requests:
            touch(run_row, status="stopped", error=f"--max-requests {config.max_requests} reached")
            break
        if stalled >= config.max_stalled_batches:
            touch(run_row, status="stopped", error=f"{stalled} batches in a row accepted nothing; the model may be "
                  "repeating itself: try another --seed, a higher --temperature, or --prompt-style raw|chat")
            break
        requests = []
        for _ in range(config.request_batch_size):
            machine = rng.sample(pool, min(config.num_machine_instructions, len(pool)))
            human = rng.sample([s.instruction for s in prompt_seeds], min(config.num_prompt_instructions - len(machine), len(prompt_seeds)))
            examples = machine + human
            rng.shuffle(examples)
            # One seed for the whole batch: requests with equal settings share one batched backend call.
            requests.append(instruction_request(examples, config, chat, seed=config.seed * 1000 + batch_number))
        stats = process_batch(session, run_row, backend, config, chat, requests, index, pool, shots, demo_pool, rng, batch_number)
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


def _classification_shots(seeds: Sequence[SeedTask]) -> list[SeedTask]:
    """Up to 4 classification and 4 other seeds, alternating, as the yes/no prompt's examples."""
    yes = [s for s in seeds if s.is_classification][:4]
    no = [s for s in seeds if s.is_classification is False][:4]
    return [s for pair in zip(no, yes) for s in pair]


def _timed_generate(backend: Backend, requests: list[Request], stats: BatchStats) -> list[Result]:
    started = time.perf_counter()
    results = backend.generate(requests) if requests else []
    stats.generate_seconds += time.perf_counter() - started
    return results


def process_batch(session, run_row, backend, config, chat, requests, index, pool, shots, demo_pool, rng, batch_number) -> BatchStats:
    """One batch, in the paper's order: generate → parse → filter → classify → instances → store (one transaction)."""
    stats = BatchStats()
    results = _timed_generate(backend, requests, stats)
    generations = add_generations(session, run_row, backend, "instructions", batch_number, requests, results)
    candidates: list[tuple[int, str]] = []  # (generation id, instruction)
    for rows, result in zip(generations, results):
        for row, completion in zip(rows, result.completions):
            for text in parse_instructions(completion.text, chat, completion.finish_reason == "length"):
                candidates.append((row.id, text))
    stats.generated = len(candidates)

    tasks: list[Task] = []
    survivors: list[Task] = []
    seen_in_batch: set[str] = set()
    for generation_id, text in candidates:
        reason = rejection_reason(text, config)
        task = Task(run_id=run_row.id, generation_id=generation_id, instruction=text, status="rejected", reason=reason)
        tasks.append(task)
        if reason is None:
            survivors.append(task)
    decisions = index.filter([t.instruction for t in survivors])
    need = config.num_instructions - run_row.accepted
    passed: list[Task] = []
    for task, decision in zip(survivors, decisions):
        task.nearest, task.similarity = decision.nearest_text, decision.score
        if not decision.kept:
            task.reason = "rouge_similarity"
        elif len(passed) >= need:
            task.reason = "target_reached"
        else:
            passed.append(task)
        seen_in_batch.add(task.instruction)

    # Classification identification (paper 2.2): temperature 0, at most 3 tokens.
    if config.generate_classification:
        for task in passed:
            task.is_classification = True
    else:
        clf_params = SamplingParams(temperature=0, max_tokens=3)
        clf_requests = [Request(prompt=classification_prompt(t.instruction, shots), params=clf_params) for t in passed]
        clf_results = _timed_generate(backend, clf_requests, stats)
        add_generations(session, run_row, backend, "classification", batch_number, clf_requests, clf_results)
        for task, result in zip(passed, clf_results):
            task.is_classification = parse_yes_no(result.completions[0].text)

    # Instances: input-first, or output-first for classification (paper 2.2).
    inst_requests = []
    for task in passed:
        demos = rng.sample(demo_pool, min(3, len(demo_pool)))
        inst_requests.append(Request(
            prompt=instance_prompt(task.instruction, demos, bool(task.is_classification)),
            params=SamplingParams(temperature=0, max_tokens=config.instance_max_tokens, stop=("\nTask:", "Task:")),
        ))
    inst_results = _timed_generate(backend, inst_requests, stats)
    inst_generations = add_generations(session, run_row, backend, "instances", batch_number, inst_requests, inst_results)
    session.add_all(tasks)
    session.flush()
    for task, rows, result in zip(passed, inst_generations, inst_results):
        completion = result.completions[0]
        pairs = parse_instances(completion.text, bool(task.is_classification), completion.finish_reason == "length")
        verdicts = instance_verdicts(pairs, config.max_instances)
        for (given, output), reason in zip(pairs, verdicts):
            session.add(Instance(task_id=task.id, generation_id=rows[0].id, input=given, output=output,
                                 status="rejected" if reason else "accepted", reason=reason))
        kept = sum(reason is None for reason in verdicts)
        pool.append(task.instruction)
        if kept:
            task.status, task.reason = "accepted", None
            run_row.instances += kept
            stats.accepted += 1
        else:
            task.reason = "no_valid_instances"
    for task in tasks:
        if task.status == "rejected":
            stats.rejected[task.reason] = stats.rejected.get(task.reason, 0) + 1
    run_row.accepted += stats.accepted
    run_row.rejected += sum(stats.rejected.values())
    touch(run_row)
    session.add_all(tasks)
    session.add(run_row)
    session.commit()
    return stats


def config_dict(config: SelfInstructConfig) -> dict:
    return asdict(config) | {"blacklist": list(config.blacklist)}


def check_seeds(seeds: Sequence[SeedTask]) -> None:
    if not any(s.instances for s in seeds):
        raise BadInput("the seeds have no instances to show as examples for instance generation")
    if len(seeds) < 2:
        raise DatagenError("Self-Instruct needs at least 2 seed tasks")


def label_seeds(backend: Backend, seeds: Sequence[SeedTask]) -> list[SeedTask]:
    """Seeds whose file does not say whether they are classification tasks get the classification step's answer."""
    from dataclasses import replace

    unknown = [s for s in seeds if s.is_classification is None]
    if not unknown:
        return list(seeds)
    shots = _classification_shots(seeds)
    params = SamplingParams(temperature=0, max_tokens=3)
    results = backend.generate([Request(prompt=classification_prompt(s.instruction, shots), params=params) for s in unknown])
    answers = {s.id: parse_yes_no(r.completions[0].text) for s, r in zip(unknown, results)}
    return [replace(s, is_classification=answers[s.id]) if s.id in answers else s for s in seeds]
