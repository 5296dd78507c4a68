"""Self-Instruct bootstrapping (Wang et al. 2023, "Self-Instruct: Aligning Language Models with Self-Generated
Instructions", ACL; reference implementation: github.com/yizhongw/self-instruct, `self_instruct/`).

    datagen self-instruct --seeds examples/seed_tasks.jsonl --num-instructions 50 --run demo

From a few human-written seed tasks the model writes new instructions. Each batch runs the paper's steps in order:

1. prompt: 8 instructions (6 human seeds, 2 from the machine pool), numbered, ending with "9."  (bootstrap_instructions.py)
2. generate, and parse the numbered list the model continues;
3. filter: a response cut by max_tokens, length, keyword blacklist, "Write a program", leading punctuation or
   non-ASCII character, then ROUGE-L F > 0.7 against every seed and every instruction kept so far (the dedup
   engine's exact rouge-score decisions);
4. classify: a few-shot "Is it classification?" prompt, temperature 0, 3 tokens, yes or no  (identify_clf_or_not.py)
5. instances: input first for ordinary tasks, label first for classification, shown worked examples with several
   instances (pipelines/demonstrations.py); up to 5, markers required, then the reference's instance filters
                                                                  (generate_instances.py, prepare_for_finetuning.py)
6. store: every call, every parsed instruction with its verdict, every instance, in one transaction.

The loop (pipelines/bootstrap.py) repeats until `num_instructions` are accepted (an instruction counts once it has at
least one valid instance). A crash loses at most the batch in flight; `--run NAME` rebuilds seeds, pool and similarity
index from the store and carries on, so the decisions of a resumed run are those of an uninterrupted one.

Prompt styles: `raw` is the paper's completion prompt. `chat` renders the same request through the model's chat
template: the request's header (e.g. "Come up with a series of tasks:") is the user's turn and the numbered list is
the start of the assistant's answer, which the model continues. Small chat models (the embedded SmolLM2-135M) copy
the list far less and keep to its format far better this way than when the whole list is in the user's turn.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from pydantic import Field, model_validator
from sqlmodel import Session

from datagen.backends import Backend, Request, Result, SamplingParams
from datagen.dedup import RougeIndex, tokenize_unicode
from datagen.errors import BadInput
from pipelines.bootstrap import (
    BatchStats,
    BootstrapConfig,
    Drafted,
    Prompt,
    bootstrap,
    bootstrap_pipelined,
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
from pipelines.demonstrations import DEMONSTRATIONS
from pipelines.seeds import SeedTask
from storage.store import add_generations
from storage.tables import Generation, Instance, Run, Task

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot", "go to")
"""Words of tasks a language model cannot do (bootstrap_instructions.py, post_process_gpt3_response)."""


class SelfInstructConfig(BootstrapConfig):
    """Every knob of a Self-Instruct run. Defaults are the reference implementation's (yizhongw/self-instruct,
    self_instruct/*.py) unless the comment says otherwise; the knobs shared with Alpaca are documented once, in
    pipelines/bootstrap.py BootstrapConfig, where their default is the same."""

    batch_sizes: ClassVar[tuple[int, int]] = (16, 64)
    """Default max_request_batch_size on transformers (a padded batch runs to its longest completion) and on
    vllm/openai (continuous batching: 64 keeps the engine full; bench/saturation.py measures it)."""

    num_instructions: int = 100
    """Accepted generated instructions to reach (reference `--num_instructions_to_generate`, default 100). Ours: the
    reference counts instructions that passed the similarity filter and keeps the whole last batch; here an
    instruction counts once it has a valid instance, and those past the target are stored as target_reached."""
    num_prompt_instructions: int = 8
    """In-context instructions per request (reference `--num_prompt_instructions` 8)."""
    num_machine_instructions: int = 2
    """Of those, sampled from the machine-generated pool, the rest from the seeds (reference: n=2; fewer while the
    pool is small)."""
    max_new_instructions: int = 7
    """Stop sequences end a completion before item 8 + 7 + 1 = 16 (reference: stop at "\\n16", "16.", "16 .")."""
    request_batch_size: int | None = None
    """Instruction requests per batch, sent in one backend call. None: a ramp (pipelines/bootstrap.py, ramp_size)
    that starts at the reference's 5 (`--request_batch_size` 5) and grows once a batch adds at most 10% of the
    machine pool at the run's rate so far, up to max_request_batch_size. Each prompt samples its 2 machine
    instructions from the pool as it was when its batch went out, so a fixed large batch (64) would prompt a whole
    -n 100 run with no machine instruction at all; the ramp (ours) keeps the pool nearly as fresh as the reference's
    while the engine gets large batches once the pool is large. A number: that many every batch (5: the reference's).
    Near the target, a batch asks only for about as many requests as the keep rate so far needs."""
    max_request_batch_size: int | None = None
    """The ramp's ceiling. None: 16 on transformers (its padded batch), 64 on vllm and openai, whose engines
    schedule any number together (batch_sizes; bench/saturation.py)."""
    pipelined: bool | None = None
    """Send each batch's instruction requests in the same backend call as the previous batch's instance requests
    (pipelines/bootstrap.py, bootstrap_pipelined), so the engine is not left with one phase's stragglers. None: on
    for vllm and openai, off for transformers. Ours: the reference runs its phases one after another (and its whole
    instruction phase before any instance). Decisions differ from the sequential loop only in how many requests a
    batch sends (the ramp and the near-target cut are decided from the batches before the previous one) and when the
    stall guard stops (one batch later). A batch that can reach the target goes alone, so none is generated only to
    be discarded."""
    temperature: float = 0.7
    top_p: float = 0.5
    presence_penalty: float = 2.0
    """Reference: presence_penalty=2. Applied on every backend: vllm and openai natively, transformers by the same
    rule (datagen/backends/transformers_backend.py, OutputPenalties)."""
    max_tokens: int = 1024
    """Per instruction request (reference 1024). On the transformers backend a batch runs until its longest
    completion ends, so one rambling completion costs the whole batch this many steps: 256 is plenty for 7
    instructions of a small model (examples/self_instruct.yaml)."""
    blacklist: tuple[str, ...] = Field(BLACKLIST, strict=False)
    """Whole words, any case (reference bootstrap_instructions.py)."""
    generate_classification: bool = False
    """Prompt with classification seeds only and the classification header (reference `--use_clf_seed_tasks_only`);
    every generated task is then a classification task."""
    max_instances: int = 5
    """Instances kept per task, at most (reference prepare_for_finetuning.py: "max 5 instances per task"; generation
    stops at "Example 6")."""
    instance_max_tokens: int | None = None
    """Per instance request. None: 300 for a classification task, 350 for any other (reference generate_instances.py:
    300 when its API batch of 5 tasks holds a classification task, else 350; here decided per task, since a batch
    here holds far more than 5 tasks and would nearly always hold one)."""
    instance_demonstrations: int = 3
    """Tasks shown as worked examples in each instance prompt. Ours: the reference's fixed templates hold 12 to
    17 tasks (about 3,000 tokens), too long a prompt for a small model on a CPU; 3 tasks of the same kind, sampled
    per request, keep the prompt near 300 tokens."""
    instance_demos: str = "builtin"
    """Where those tasks come from: builtin, datagen's own set of tasks with 2 to 4 instances each and classification
    tasks with all their labels (pipelines/demonstrations.py; the reference's templates are of that kind), or seeds,
    the run's seed tasks (one instance each in Self-Instruct's seed file)."""
    instance_trim: bool = False
    """Drop text before an instance's "Input:" marker (a preamble, "Here you go.") and text after a blank line in
    its output (a trailer, "Hope this helps."). Off: kept, as the reference's prepare_for_finetuning.py keeps them;
    the report counts the accepted instances that hold either (datagen report)."""
    instance_samples: int = 1
    """Answers drawn per instruction: best-of-k (pipelines/best_of_k.py). 1: the reference's one greedy instance
    request per task, exactly. Ours when k > 1: k instance requests per task with the same prompt, each with its own
    seed (best_of_k.sample_seed) and sampled at the instruction step's temperature and top_p (k greedy answers
    would be one answer k times); one sample is kept by instance_pick, every sample is stored with its verdict, and
    a task counts as accepted when any sample has a valid instance."""
    instance_pick: str = "consistent"
    """How best-of-k keeps one sample: consistent, the highest mean ROUGE-L F to the other samples; or ifd, the
    lowest instruction-following difficulty (Cherry LLM) under the generating model, which is the student when the
    model that generates is the one that will be trained (the e2e loop's first round)."""
    length_cut: str = "drop_response"
    """What to do with an instruction response that max_tokens cut: drop_response, every instruction in it (the
    reference: bootstrap_instructions.py returns [] when finish_reason is "length"), or drop_last, only its last,
    possibly unfinished, instruction (Stanford Alpaca's rule). Dropped instructions are stored as cut_by_length."""
    seed: int = 0
    """Seeds the sampling of in-context examples and the backend's sampling (reference: random.seed(42))."""

    positive: ClassVar[tuple[str, ...]] = ("max_instances", "max_new_instructions", "instance_demonstrations")

    @model_validator(mode="after")
    def _check_self_instruct(self) -> SelfInstructConfig:
        if self.instance_max_tokens is not None and self.instance_max_tokens < 1:
            raise BadInput(f"--instance-max-tokens must be at least 1, got {self.instance_max_tokens}")
        if not -2 <= self.presence_penalty <= 2:
            raise BadInput(f"presence_penalty must be in [-2, 2] (vLLM's and OpenAI's range), got {self.presence_penalty}")
        if self.instance_demos not in ("builtin", "seeds"):
            raise BadInput(f"--instance-demos must be builtin or seeds, got {self.instance_demos}")
        best_of_k.check_samples(self.instance_samples, self.instance_pick)
        if not 0 <= self.num_machine_instructions <= self.num_prompt_instructions:
            raise BadInput("--num-machine-instructions must be between 0 and --num-prompt-instructions")
        return self


# ---- prompts (pure) -------------------------------------------------------------------------------------------


HEADER = "Come up with a series of tasks:"
CLASSIFICATION_HEADER = "Come up with a series of classification tasks. Try to specify the possible output labels when possible."


def one_line(text: str) -> str:
    """The reference's cleanup of an in-context instruction: whitespace collapsed, a trailing colon removed."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(examples: Sequence[str], classification: bool = False) -> Prompt:
    """The reference's encode_prompt: a header, the numbered in-context instructions, and the next number."""
    numbered = "".join(f"{i}. {one_line(text)}\n" for i, text in enumerate(examples, start=1))
    return Prompt(CLASSIFICATION_HEADER if classification else HEADER, f"{numbered}{len(examples) + 1}.")


def instruction_params(config: SelfInstructConfig, seed: int) -> SamplingParams:
    last = config.num_prompt_instructions + config.max_new_instructions + 1
    return SamplingParams(
        temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
        presence_penalty=config.presence_penalty, seed=seed, stop=("\n\n", f"\n{last}", f"{last}.", f"{last} ."),
    )  # fmt: skip


CLASSIFICATION_QUESTION = "Can the following task be regarded as a classification task with finite output labels?"
CLASSIFICATION_EXAMPLES = (
    ("Decide whether the review below is positive or negative.", True),
    ("Write a short poem about the sea at night.", False),
    ("Tell me if the sentence is grammatical. Answer yes or no.", True),
    ("Summarize the article in three sentences.", False),
    ("Which of the four options is the capital of Peru? Answer A, B, C or D.", True),
    ("Suggest a name for a bakery that sells vegan cakes.", False),
    ("Label the email as spam or not spam.", True),
    ("Explain how a refrigerator keeps food cold.", False),
    ("Given a news headline, say which topic it belongs to: sports, politics, business or science.", True),
    ("Translate the sentence into German.", False),
)
"""Ours, in the manner of the reference's template_1 (templates/clf_task_template.py, 31 examples): shorter, so the
prompt costs a small model little, with yes and no alternating so neither answer is merely the last one seen."""


def classification_prompt(instruction: str) -> Prompt:
    shots = "".join(f"Task: {task}\nIs it classification? {'Yes' if label else 'No'}\n\n" for task, label in CLASSIFICATION_EXAMPLES)
    return Prompt(CLASSIFICATION_QUESTION, f"\n{shots}Task: {one_line(instruction)}\nIs it classification?")


CLASSIFICATION_PARAMS = SamplingParams(temperature=0, max_tokens=3, stop=("\n", "Task"))
"""Reference identify_clf_or_not.py: temperature 0, max_tokens 3, stop at a newline or "Task"."""

INPUT_FIRST_HEADER = (
    "Come up with examples for the following tasks. Try to generate multiple examples when possible. "
    "If the task doesn't require additional input, you can generate the output directly."
)
OUTPUT_FIRST_HEADER = (
    "Given the classification task definition and the class labels, generate an input that corresponds to each of "
    "the class labels. If the task doesn't require input, just generate possible class labels."
)
"""The reference's headers (templates/instance_gen_template.py), verbatim: the model is asked exactly what the paper asked."""


MAX_SHOWN = 4
"""Instances shown per demonstration task, at most (the built-in tasks have 2 to 4)."""


def demonstration(task: SeedTask, classification: bool) -> str:
    """A task with its instances, input first ("Example N / Input / Output") or label first ("Class label / Input")."""
    lines = [f"Task: {one_line(task.instruction)}"]
    for number, instance in enumerate(task.instances[:MAX_SHOWN], start=1):
        if classification:
            lines.append(f"Class label: {instance.output}")
            if instance.input:
                lines.append(f"Input: {instance.input}")
        else:
            lines.append(f"Example {number}")
            if instance.input:
                lines.append(f"Input: {instance.input}")
            lines.append(f"Output: {instance.output}")
    return "\n".join(lines)


def instance_prompt(instruction: str, demos: Sequence[SeedTask], classification: bool) -> Prompt:
    """Input-first for ordinary tasks, output-first for classification, so labels come out balanced (paper 2.2)."""
    header = OUTPUT_FIRST_HEADER if classification else INPUT_FIRST_HEADER
    shown = "".join(demonstration(task, classification) + "\n\n" for task in demos)
    start = "Class label:" if classification else "Example 1\n"
    return Prompt(header, f"\n{shown}Task: {one_line(instruction)}\n{start}")


def instance_params(config: SelfInstructConfig, classification: bool, seed: int | None = None) -> SamplingParams:
    """Reference generate_instances.py: temperature 0, presence penalty 1.5, stop at "Example 6" or "Task:", and
    300 tokens for a classification task, 350 for any other (unless instance_max_tokens is set). A best-of-k sample
    (`seed` given) samples at the instruction step's temperature and top_p instead (instance_samples)."""
    max_tokens = config.instance_max_tokens or (300 if classification else 350)
    sampled = dict(temperature=config.temperature, top_p=config.top_p, seed=seed) if seed is not None else dict(temperature=0)
    return SamplingParams(max_tokens=max_tokens, presence_penalty=1.5, stop=(f"Example {config.max_instances + 1}", "Task:"),
                          **sampled)  # fmt: skip


# ---- parsing and filters (pure) -------------------------------------------------------------------------------

_ITEM_START = re.compile(r"\n\d+\s?\. ")
"""Where a new item begins: a newline, a number, at most one space, a dot and a space (bootstrap_instructions.py,
post_process_gpt3_response). A line that begins "3.5, 4.2" or "1)" stays inside its item."""


def parse_instructions(completion: str) -> list[str]:
    """The numbered items of a completion that continues a list after its "N.", split as the reference splits them.

    As in the reference, whitespace (newlines included) is collapsed and empty items are dropped. Ours: the first
    letter is upper-cased (the reference's str.capitalize() also lower-cases the rest, which breaks names).
    """
    items = [re.sub(r"\s+", " ", item).strip() for item in _ITEM_START.split(completion)]
    return [item[0].upper() + item[1:] for item in items if item]


def word_count(text: str, tokenizer: str = "rouge") -> int:
    """Words as the chosen tokenizer sees them: whitespace-separated (the reference's `split()`), or, with unicode,
    the similarity filter's own words, so CJK text, written without spaces, is not one long "word"."""
    return len(tokenize_unicode(text)) if tokenizer == "unicode" else len(text.split())


def rejection_reason(
    instruction: str, blacklist: Sequence[str] = BLACKLIST, require_ascii_start: bool = True, tokenizer: str = "rouge"
) -> str | None:
    """The first of the reference's heuristic filters an instruction fails (in the reference's order), or None."""
    words = word_count(instruction, tokenizer)
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    for word in blacklist:
        if re.search(rf"\b{re.escape(word)}\b", instruction, flags=re.IGNORECASE):
            return f"blacklist:{word}"
    # The reference tests startswith("Write a program") after str.capitalize(), which lower-cases all but the first
    # letter: "write A Program" is caught too.
    if instruction.lower().startswith("write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if require_ascii_start and not instruction[0].isascii():
        return "non_ascii_start"
    return None


def parse_yes_no(completion: str) -> bool | None:
    """The classification step's answer: exactly yes or no, stripped, any case; None for anything else (stored so).

    The reference's `answer.strip() in ["Yes", "yes", "YES"]` (prepare_for_finetuning.py) counts every other answer
    as no; the instance step does the same with None, and the store keeps that the answer did not parse.
    """
    return {"yes": True, "no": False}.get(completion.strip().lower())


@dataclass(frozen=True)
class ParsedInstance:
    input: str
    output: str
    reason: str | None = None
    """Set when the block lacks the format's markers (missing_marker); the block is then the output, raw."""


_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"^\s*Input\s*\d*\s*:")
_LATER_INPUT = re.compile(r"\n\s*Input\s*\d*\s*:")
_MARKER = re.compile(r"^\s*(Output|Input|Class label)\s*\d*\s*:")


def has_preamble(given: str) -> bool:
    """An input that holds text before its "Input:" marker ("Here you go.\\nInput: 3 1 2")."""
    return bool(_LATER_INPUT.search(given.strip()))


def has_trailer(output: str) -> bool:
    """An output that goes on past a blank line ("5\\n\\nHope this helps.")."""
    return "\n\n" in output.strip()


def clean_input(given: str, trim: bool) -> str:
    """The text before "Output:" without its leading "Input:" marker; a preamble before the marker is kept (the
    reference: prepare_for_finetuning.py removes "Input:" only at the start), or dropped with `trim`."""
    given = given.strip()
    if trim and has_preamble(given):
        given = _LATER_INPUT.split(given, maxsplit=1)[1]
    return _INPUT.sub("", given).strip()


def clean_output(output: str, trim: bool) -> str:
    """The output, whole (the reference), or with `trim` only up to its first blank line."""
    output = output.strip()
    return output.split("\n\n", 1)[0].strip() if trim else output


def parse_instances(completion: str, classification: bool, trim: bool = False) -> list[ParsedInstance]:
    """(input, output) pairs, the way the reference's prepare_for_finetuning.py reads them, markers required.

    Input-first: the completion continues after "Example 1"; examples are split at "Example N", each at "Output:"
    (the output runs to the next "Output:" or "Input:", as the reference's parse_input_output).
    Label-first: the completion continues after "Class label:"; each block's first line is the label, the rest the
    input after "Input:". The prompt writes the first marker itself, so a reply with no marker of its own would still
    parse ("Sure, here you go..." as an output); ours: an example without "Output:", a labelled block whose input has
    no "Input:", and a label without input where other labels have one are kept as missing_marker, the block as
    written (the reference reads such a block as an output without input, or an input without marker).
    Text before the "Input:" marker (a preamble) and text after a blank line in the output (a trailer) are kept,
    as the reference keeps them; `trim` (instance_trim) drops both. The report counts kept instances with either.
    """
    if classification:
        blocks = [b.strip() for b in re.split(r"Class label\s*:", "Class label:" + completion)[1:]]
        split = [block.partition("\n")[::2] for block in blocks]
        any_input = any(rest.strip() for _, rest in split)
        pairs = []
        for block, (label, rest) in zip(blocks, split):
            if _INPUT.match(rest) or has_preamble(rest) or (not any_input and len(blocks) > 1):
                pairs.append(ParsedInstance(clean_input(rest, trim), label.strip()))
            else:
                pairs.append(ParsedInstance("", block, "missing_marker"))
        return pairs
    pairs = []
    for block in re.split(r"Example\s?\d*\.?", "Example 1\n" + completion):
        if not block.strip():
            continue
        if not _OUTPUT.search(block):
            pairs.append(ParsedInstance("", block.strip(), "missing_marker"))
            continue
        given, output = _OUTPUT.split(block)[:2]
        output = re.split(r"Input\s*\d*\s*:", output)[0]  # one pair per example
        pairs.append(ParsedInstance(clean_input(given, trim), clean_output(output, trim)))
    return pairs


def instance_verdicts(pairs: Sequence[ParsedInstance], max_instances: int, cut_by_length: bool) -> list[str | None]:
    """A rejection reason (None: kept) per pair, in the reference's order (prepare_for_finetuning.py):

    the last pair of a completion cut by max_tokens; a block without the format's markers; input equal to output,
    empty output, input or output ending in ":" (usually unfinished); ours: an input that begins with a field marker
    ("Output: 5", the model writing the format into the input); then, among the valid ones, every pair of the task
    when one non-empty input has two different outputs; exact duplicates; and pairs beyond max_instances.
    """
    verdicts: list[str | None] = [pair.reason for pair in pairs]
    if cut_by_length and pairs:
        verdicts[-1] = "cut_by_length"
    for i, pair in enumerate(pairs):
        if verdicts[i]:
            continue
        if pair.input == pair.output:
            verdicts[i] = "input_equals_output"
        elif not pair.output:
            verdicts[i] = "empty_output"
        elif pair.input.endswith(":") or pair.output.endswith(":"):
            verdicts[i] = "ends_with_colon"
        elif _MARKER.match(pair.input):
            verdicts[i] = "input_starts_with_marker"
    valid = [i for i, v in enumerate(verdicts) if v is None]
    outputs_by_input: dict[str, set[str]] = {}
    for i in valid:
        if pairs[i].input:
            outputs_by_input.setdefault(pairs[i].input, set()).add(pairs[i].output)
    if any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        for i in valid:
            verdicts[i] = "conflicting_outputs"
        return verdicts
    seen: set[ParsedInstance] = set()
    kept = 0
    for i in valid:
        if pairs[i] in seen:
            verdicts[i] = "duplicate"
        elif kept >= max_instances:
            verdicts[i] = "over_max_instances"
        else:
            kept += 1
        seen.add(pairs[i])
    return verdicts


# ---- seeds without a label --------------------------------------------------------------------------------


def label_seeds(backend: Backend, seeds: Sequence[SeedTask], chat: bool) -> tuple[list[SeedTask], list[Request], list[Result]]:
    """Seeds whose file does not say whether they are classification tasks get the classification step's answer."""
    unknown = [s for s in seeds if s.is_classification is None]
    template = backend.render_chat if chat else None
    requests = [Request(prompt=classification_prompt(s.instruction).render(template), params=CLASSIFICATION_PARAMS) for s in unknown]
    results = backend.generate(requests) if requests else []
    answers = {id(s): parse_yes_no(r.completions[0].text) for s, r in zip(unknown, results)}
    return [replace(s, is_classification=answers[id(s)]) if id(s) in answers else s for s in seeds], requests, results


# ---- Self-Instruct --------------------------------------------------------------------------------------------


def run(
    session: Session,
    run_row: Run,
    backend: Backend,
    config: SelfInstructConfig,
    on_batch: Callable[[Run, BatchStats], None] = lambda run, stats: None,
) -> BatchStats:
    """Bootstrap the run's pool until config.num_instructions generated instructions are accepted.

    Seeds, pool and similarity index come from the store (the run's seed tasks and the instructions that passed
    the filter so far), so a fresh run and a resumed one go through the same code. On continuous-batching engines
    (`pipelined`) a batch's instruction requests go out with the previous batch's instance requests
    (pipelines/bootstrap.py, bootstrap_pipelined).
    """
    config = for_backend(config, backend.name)
    phases = Phases(session, run_row, backend, config)
    if config.pipelined:
        return bootstrap_pipelined(session, run_row, config, phases, backend, on_batch)
    return bootstrap(session, run_row, config, phases.one_batch, on_batch, backend)


class Phases:
    """One batch of Self-Instruct in its two phases: the instruction requests, then (`draft`) parse, filter,
    classify and the instance requests, and (`Drafted.finish`) the instances and the store."""

    def __init__(self, session: Session, run_row: Run, backend: Backend, config: SelfInstructConfig):
        self.session, self.run_row, self.backend, self.config = session, run_row, backend, config
        self.chat_template = backend.render_chat if uses_chat(backend, config.prompt_style) else None
        seeds = load_seeds(session, run_row)
        self.pool = load_pool(session, run_row)
        self.human = [s.instruction for s in seeds if s.is_classification or not config.generate_classification]
        if not self.human:
            raise BadInput("--generate-classification needs seed tasks with is_classification true")
        # The seeds the prompts show are those the similarity filter compares against: with --generate-classification
        # the classification seeds only (bootstrap_instructions.py filters seed_tasks before both).
        self.index = RougeIndex(threshold=config.rouge_threshold, tokenizer=config.tokenizer)
        self.index.add(self.human + self.pool)
        demo_tasks = DEMONSTRATIONS if config.instance_demos == "builtin" else seeds
        self.demos = {kind: demonstration_pool(demo_tasks, kind) for kind in (True, False)}

    def instruction_requests(self, batch_number: int, n_requests: int, rng: random.Random) -> list[Request]:
        config, requests = self.config, []
        for number in range(n_requests):
            machine = rng.sample(self.pool, min(config.num_machine_instructions, len(self.pool)))
            examples = machine + rng.sample(self.human, min(config.num_prompt_instructions - len(machine), len(self.human)))
            rng.shuffle(examples)
            prompt = instruction_prompt(examples, config.generate_classification).render(self.chat_template)
            requests.append(Request(prompt=prompt, params=instruction_params(config, request_seed(config.seed, batch_number, number))))
        return requests

    def one_batch(self, batch_number: int, n_requests: int, rng: random.Random) -> BatchStats:
        """The batch's phases one after the other (the sequential loop)."""
        stats = BatchStats(requests=n_requests)
        requests = self.instruction_requests(batch_number, n_requests, rng)
        drafted = self.draft(batch_number, requests, timed_generate(self.backend, requests, stats), rng, stats)
        return drafted.finish(timed_generate(self.backend, drafted.requests, stats))

    def draft(self, batch_number: int, requests: list[Request], results: list[Result], rng: random.Random, stats: BatchStats) -> Drafted:
        with filtering_time(stats):
            return self._draft(batch_number, requests, results, rng, stats)

    def _draft(self, batch_number: int, requests: list[Request], results: list[Result], rng: random.Random, stats: BatchStats) -> Drafted:
        """The paper's order: parse → filter → classify → the instance requests; `finish` stores the batch."""
        session, run_row, config = self.session, self.run_row, self.config
        tasks: list[Task] = []
        origin: list[int] = []  # the request each task came from
        for number, result in enumerate(results):
            completion = result.completions[0]
            items = parse_instructions(completion.text)
            stats.empty_responses += not items
            cut = completion.finish_reason == "length"
            for position, text in enumerate(items):
                if cut and (config.length_cut == "drop_response" or position == len(items) - 1):
                    reason = "cut_by_length"
                else:
                    reason = rejection_reason(text, config.blacklist, config.require_ascii_start, config.tokenizer)
                tasks.append(Task(run_id=run_row.id, instruction=text, status="rejected", reason=reason))
                origin.append(number)
        stats.generated = len(tasks)
        position = {id(task): i for i, task in enumerate(tasks)}  # a task's place in its batch: its samples' seeds

        # ROUGE-L against seeds and everything kept so far, in order, the batch included (the dedup engine).
        survivors = [t for t in tasks if t.reason is None]
        passed: list[Task] = []
        # exact_nearest: an accepted instruction stores its true nearest earlier one too, as the reference records its
        # most similar instructions (bootstrap_instructions.py: most_similar_instructions)
        for task, decision in zip(survivors, self.index.filter([t.instruction for t in survivors], exact_nearest=True)):
            task.nearest, task.similarity = decision.nearest_text, decision.score
            if not decision.kept:
                task.reason = "rouge_similarity"
                continue
            self.pool.append(task.instruction)
            passed.append(task)

        # Classification and instances for as many as the target still needs, in order; `finish` admits the next
        # ones when some of these get no valid instance, and only then labels the rest target_reached.
        need = config.num_instructions - run_row.accepted
        first = passed[:need]
        clf_requests, clf_results = self.classify(first, stats)
        inst_requests = self.instance_requests(first, rng, batch_number, position)

        def finish(inst_results: list[Result]) -> BatchStats:
            with filtering_time(stats):
                return store(inst_results)

        def store(inst_results: list[Result]) -> BatchStats:
            """Store everything in one transaction: generations, every parsed instruction with its verdict, every instance."""
            generations = add_generations(session, run_row, self.backend, "instructions", batch_number, requests, results)
            for task, number in zip(tasks, origin):
                task.generation_id = generations[number][0].id
            session.add_all(tasks)
            session.flush()
            self.store_instances(batch_number, first, clf_requests, clf_results, inst_requests, inst_results, stats)
            waiting = passed[need:]
            while waiting and stats.accepted < need:  # re-admit in order, as many as are still missing
                more, waiting = waiting[: need - stats.accepted], waiting[need - stats.accepted :]
                more_clf = self.classify(more, stats)
                more_requests = self.instance_requests(more, rng, batch_number, position)
                more_results = timed_generate(self.backend, more_requests, stats)
                self.store_instances(batch_number, more, *more_clf, more_requests, more_results, stats)
            for task in waiting:
                task.reason = "target_reached"  # passed the filter, not needed: no calls spent on it
            return finish_batch(session, run_row, tasks, stats)

        return Drafted(inst_requests, finish, stats, reaches_target=len(passed) >= need)

    def classify(self, tasks: list[Task], stats: BatchStats) -> tuple[list[Request], list[Result]]:
        """Classification identification: few-shot, temperature 0, 3 tokens (every task is one with
        --generate-classification)."""
        if self.config.generate_classification:
            for task in tasks:
                task.is_classification = True
            return [], []
        template = self.chat_template
        requests = [Request(prompt=classification_prompt(t.instruction).render(template), params=CLASSIFICATION_PARAMS) for t in tasks]
        results = timed_generate(self.backend, requests, stats)
        for task, result in zip(tasks, results):
            task.is_classification = parse_yes_no(result.completions[0].text)
        return requests, results

    def instance_requests(self, tasks: list[Task], rng: random.Random, batch_number: int, position: dict[int, int]) -> list[Request]:
        """Input first, or label first for classification tasks, with demonstrations of the same kind; under
        best-of-k, instance_samples requests per task, one prompt with a seed each."""
        config, requests = self.config, []
        for task in tasks:
            kind = bool(task.is_classification)
            shown = rng.sample(self.demos[kind], min(config.instance_demonstrations, len(self.demos[kind])))
            prompt = instance_prompt(task.instruction, shown, kind).render(self.chat_template)
            if config.instance_samples == 1:
                requests.append(Request(prompt=prompt, params=instance_params(config, kind)))
                continue
            seeds = [best_of_k.sample_seed(config.seed, batch_number, position[id(task)], j) for j in range(config.instance_samples)]
            requests += [Request(prompt=prompt, params=instance_params(config, kind, seed)) for seed in seeds]
        return requests

    def store_instances(self, batch_number: int, tasks: list[Task], clf_requests: list[Request], clf_results: list[Result],
                        inst_requests: list[Request], inst_results: list[Result], stats: BatchStats) -> None:  # fmt: skip
        """The tasks' classification and instance calls, their instances with verdicts, and each task's verdict."""
        session, run_row, config = self.session, self.run_row, self.config
        add_generations(session, run_row, self.backend, "classification", batch_number, clf_requests, clf_results)
        inst_generations = add_generations(session, run_row, self.backend, "instances", batch_number, inst_requests, inst_results)
        k = config.instance_samples
        for number, task in enumerate(tasks):
            samples = [self.parse_sample(task, j, inst_generations[k * number + j][0], inst_results[k * number + j]) for j in range(k)]
            if k == 1:
                sample = samples[0]
                instances = [Instance(task_id=task.id, generation_id=sample.generation_id, input=given, output=output,
                                      status="rejected" if reason else "accepted", reason=reason)
                             for (given, output), reason in zip(sample.pairs, sample.verdicts)]  # fmt: skip
                session.add_all(instances)
            else:
                instances, sample_rows = best_of_k.choose(task, samples, config.instance_pick, self.backend, stats, config.tokenizer)
                session.add_all(instances + sample_rows)
            kept = sum(i.status == "accepted" for i in instances)
            if kept:
                task.status, task.reason = "accepted", None
                run_row.instances += kept
                stats.accepted += 1
            else:
                task.reason = "no_valid_instances"

    def parse_sample(self, task: Task, number: int, generation: Generation, result: Result) -> best_of_k.Sample:
        """One instance completion of a task: its instances and their verdicts (the reference's filters)."""
        completion = result.completions[0]
        pairs = parse_instances(completion.text, bool(task.is_classification), self.config.instance_trim)
        verdicts = instance_verdicts(pairs, self.config.max_instances, completion.finish_reason == "length")
        return best_of_k.Sample(number, generation.id, generation.sampling.get("seed"), [(p.input, p.output) for p in pairs], verdicts)


def demonstration_pool(tasks: Sequence[SeedTask], classification: bool) -> list[SeedTask]:
    """Tasks of one kind with instances, shortest first, so instance prompts stay short; any task if none fits."""
    with_instances = [s for s in tasks if s.instances]
    same_kind = [s for s in with_instances if bool(s.is_classification) == classification] or with_instances
    size = lambda s: sum(len(i.input) + len(i.output) for i in s.instances[:MAX_SHOWN])  # noqa: E731
    return sorted(same_kind, key=size)[: max(8, len(same_kind) // 2)]
