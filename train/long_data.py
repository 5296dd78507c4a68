"""Long training data for a context extension: a `datagen export` folder (prompt-completion) that `datagen train`
reads like any other.

    datagen long-data --out data/long --length 4096 --corpus docs.jsonl --passkeys 200 --runs si-run \
        --short data/example --short-share 0.25
    datagen train --data data/long --context-length 4096 --s2-attn --trainable embed,norm --out runs/long

Three kinds of long rows, each exactly or at most `--length` tokens of the model's tokenizer:
- document: a user corpus (JSONL with "text", or .txt files) tokenized, joined with the EOS token and cut into
  rows of the target length, as LongLoRA extends on packed RedPajama text (dvlab-research/LongLoRA fine-tune.py:
  pre-tokenized rows of the context length). The prompt is empty, so the loss covers every token.
- passkey: a random number hidden at a chosen depth in filler text, the prompt of LongLoRA's passkey_retrieval.py
  (from epfml/landmark-attention run_test.py: task description, "The grass is green. ..." filler, "The pass key is
  N. Remember it. N is the pass key.", "What is the pass key? The pass key is"); the completion is the number.
  The depth asked for and the token position of the key are recorded on the row.
- instruction: several tasks of datagen's own runs (instruction and input) numbered one after another up to the
  length, then a question about one of them; the completion is that task's stored output (LongAlpaca-style long
  QA built from our data, LongLoRA section 4: LongAlpaca-12k).
Short rows (an existing export) are mixed in so short-context quality holds: LongAlpaca mixed ~9k long with ~3k
short (a short share of 0.25, the default). 10% of rows are held out as the test split (eval loss).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from datagen.errors import BadInput

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_RANGE = (1, 50000)
"""LongLoRA passkey_retrieval.py: pass_key = random.randint(1, 50000)."""


@dataclass(frozen=True)
class LongSample:
    prompt: str
    completion: str
    kind: str
    """document, passkey, instruction or short."""
    tokens: int
    """Tokens of prompt + completion under the model's tokenizer."""
    depth: float | None = None
    """passkey: where the key sits, as a share of the filler before it (0 = start, 1 = end)."""
    key_position: int | None = None
    """passkey: the token index at which the key's sentence starts in the prompt."""


# --- Passkey retrieval (pure) ---------------------------------------------------------------------------------------------


def passkey_prompt(passkey: int, prefix: int, suffix: int) -> tuple[str, str]:
    """The prompt with `prefix` filler sentences-groups before the key and `suffix` after; also the text before the
    key's sentence (to locate it)."""
    before = "\n".join([TASK_DESCRIPTION, " ".join([FILLER] * prefix)])
    information = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return "\n".join([before, information, " ".join([FILLER] * suffix), QUESTION]), before


def passkey_sample(count_tokens: Callable[[str], int], length: int, depth: float, rng: random.Random,
                   exclude: Set[int] = frozenset()) -> LongSample:  # fmt: skip
    """A passkey sample of at most `length` tokens with the key at `depth` (0..1) of the filler; the key is drawn
    again while it is in `exclude` (the training keys, for an eval)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside 0..1")
    if len(exclude) >= PASSKEY_RANGE[1] - PASSKEY_RANGE[0]:
        raise ValueError("every passkey is excluded")
    passkey = rng.randint(*PASSKEY_RANGE)
    while passkey in exclude:
        passkey = rng.randint(*PASSKEY_RANGE)
    fixed = count_tokens(passkey_prompt(passkey, 0, 0)[0] + f" {passkey}")
    per_filler = count_tokens(" ".join([FILLER] * 8)) / 8
    fillers = max(0, int((length - fixed) / per_filler))
    while True:
        prefix = round(depth * fillers)
        prompt, before = passkey_prompt(passkey, prefix, fillers - prefix)
        tokens = count_tokens(prompt + f" {passkey}")
        if tokens <= length or fillers == 0:
            break
        fillers -= 1
    return LongSample(prompt, f" {passkey}", "passkey", tokens, depth, count_tokens(before))


def passkey_correct(output: str, passkey: str) -> bool:
    """Greedy output scored by exact match: the first number in the output is the passkey."""
    found = re.search(r"\d+", output)
    return found is not None and found.group() == passkey.strip()


# --- Documents and instructions (pure) ------------------------------------------------------------------------------------


def pack_documents(documents: Sequence[Sequence[int]], length: int, eos_id: int) -> list[list[int]]:
    """Token ids of the documents, each followed by EOS, concatenated and cut into rows of exactly `length`; the
    last, shorter remainder is dropped (LongLoRA's group_texts does the same)."""
    stream = [token for document in documents for token in (*document, eos_id)]
    return [stream[start : start + length] for start in range(0, len(stream) - length + 1, length)]


@dataclass(frozen=True)
class StoredTask:
    instruction: str
    input: str
    output: str


def instruction_sample(tasks: Sequence[StoredTask], count_tokens: Callable[[str], int], length: int,
                       rng: random.Random) -> LongSample | None:  # fmt: skip
    """Tasks in random order, numbered, as many as fit in `length`; the question asks for one of them and the
    completion is its stored output. None when not even two tasks fit."""
    order = rng.sample(range(len(tasks)), len(tasks))
    header = "Below are several tasks, each with its input. Read them all, then answer the task you are asked about.\n\n"
    blocks: list[str] = []
    chosen: list[StoredTask] = []
    budget = length - count_tokens(header) - 32  # room for the question
    for index in order:
        task = tasks[index]
        block = f"Task {len(blocks) + 1}: {task.instruction}\n" + (f"Input: {task.input}\n" if task.input else "") + "\n"
        cost = count_tokens(block)
        if cost + count_tokens(task.output) > budget:
            continue  # a task too long for what is left; a shorter one may still fit
        budget -= cost
        blocks.append(block)
        chosen.append(task)
    while len(chosen) >= 2:
        pick = rng.randrange(len(chosen))
        prompt = header + "".join(blocks) + f"Answer task {pick + 1}.\nAnswer: "
        completion = chosen[pick].output
        tokens = count_tokens(prompt + completion)
        if tokens <= length:
            return LongSample(prompt, completion, "instruction", tokens)
        blocks.pop()
        chosen.pop()
    return None


def mix(long: list[LongSample], short: list[LongSample], short_share: float, rng: random.Random) -> list[LongSample]:
    """All long rows plus short rows so that they make `short_share` of the result (as many as there are), shuffled."""
    wanted = round(len(long) * short_share / (1.0 - short_share)) if short_share < 1.0 else len(short)
    rows = long + rng.sample(short, min(wanted, len(short)))
    rng.shuffle(rows)
    return rows


# --- Reading the inputs, writing the export (I/O) -------------------------------------------------------------------------


def read_corpus(paths: Sequence[Path]) -> list[str]:
    """Documents of .jsonl files (a "text" string per line) and plain text files (one document per file)."""
    from datagen.jsonl import read_records

    documents = []
    for path in paths:
        if not path.is_file():
            raise BadInput(f"--corpus {path}: no such file")
        if path.suffix == ".jsonl":
            for line, record in read_records(path):
                text = record.get("text")
                if not isinstance(text, str):
                    raise BadInput(f"{path}:{line}: field 'text' must be a string")
                documents.append(text)
        else:
            documents.append(path.read_text(encoding="utf-8"))
    return documents


def read_short(path: Path) -> list[LongSample]:
    from train.data import open_export, training_split

    export = open_export(path)
    if export.format not in ("alpaca", "prompt-completion"):
        raise BadInput(f"--short {path}: format '{export.format}' has no plain prompt; export it as alpaca or prompt-completion")
    rows = training_split(export, "train")
    return [LongSample(r["prompt"], r["completion"], "short", 0) for r in rows]


def read_tasks(db_url: str | None, runs: Sequence[str]) -> list[StoredTask]:
    from sqlmodel import Session

    from datagen.export import select_examples
    from storage.store import get_run, open_engine

    tasks = []
    with Session(open_engine(db_url)) as session:
        for name in runs:
            examples, _ = select_examples(session, get_run(session, name))
            tasks += [StoredTask(e.instruction, e.input, e.output) for e in examples]
    return tasks


def write(rows: list[LongSample], out: Path, meta: dict, overwrite: bool, test_share: float = 0.1) -> dict[str, int]:
    """rows as a prompt-completion export (train/test) with kind, tokens, depth and key_position columns."""
    from datasets import Dataset, DatasetDict

    from datagen.export import write_export

    test = max(1, round(len(rows) * test_share)) if len(rows) > 1 else 0
    splits = {"train": rows[test:], "test": rows[:test]}
    dataset = DatasetDict({name: Dataset.from_list([asdict(r) for r in part]) for name, part in splits.items() if part})
    counts = {kind: sum(r.kind == kind for r in rows) for kind in ("document", "passkey", "instruction", "short")}
    meta = {**meta, "format": "prompt-completion", "columns": list(dataset["train"].column_names),
            "counts": {"train": len(splits["train"]), "test": len(splits["test"]), **counts}}  # fmt: skip
    card = f"# Long-context data\n\nBuilt by `datagen long-data`: {json.dumps(meta['counts'])}.\n"
    write_export(dataset, card, meta, out, overwrite)
    return meta["counts"]


@dataclass(frozen=True)
class LongDataConfig:
    out: Path
    length: int = 4096
    """Target tokens per long row (the --context-length you will train at)."""
    model: str = "smollm2-135m"
    """Whose tokenizer counts the tokens (the model you will extend)."""
    corpus: tuple[Path, ...] = ()
    passkeys: int = 0
    """Passkey rows, depths spread evenly from 0 to 1."""
    runs: tuple[str, ...] = ()
    """datagen runs whose accepted tasks make the long instruction rows."""
    instructions: int = 0
    """Long instruction rows to build from the runs' tasks."""
    short: Path | None = None
    """An alpaca or prompt-completion export whose train rows are mixed in."""
    short_share: float = 0.25
    """Share of short rows in the result (LongAlpaca: ~3k short of ~12k)."""
    seed: int = 0
    overwrite: bool = False


def check(config: LongDataConfig) -> None:
    from datagen.export import check_out

    if config.length < 16:
        raise BadInput(f"--length {config.length}: must be at least 16 tokens")
    if not 0.0 <= config.short_share < 1.0:
        raise BadInput(f"--short-share {config.short_share}: must be in [0, 1)")
    if config.instructions and not config.runs:
        raise BadInput("--instructions needs --runs (the runs whose tasks to combine)")
    if not (config.corpus or config.passkeys or config.instructions):
        raise BadInput("nothing to build: pass --corpus FILE, --passkeys N or --runs RUN --instructions N")
    check_out(config.out, config.overwrite)


def build(config: LongDataConfig, db_url: str | None = None) -> dict[str, int]:
    """Read and check every input, then tokenize, build, mix and write the export. Returns the row counts."""
    from transformers import AutoTokenizer

    from datagen import models

    check(config)
    documents = read_corpus(config.corpus)
    tasks = read_tasks(db_url, config.runs) if config.runs else []
    short = read_short(config.short) if config.short else []
    models.configure_offline()
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(config.model))

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(config.seed)
    rows: list[LongSample] = []
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents]
    for row in pack_documents(ids, config.length, tokenizer.eos_token_id):
        rows.append(LongSample("", tokenizer.decode(row), "document", len(row)))
    for i in range(config.passkeys):
        rows.append(passkey_sample(count_tokens, config.length, i / max(1, config.passkeys - 1), rng))
    for _ in range(config.instructions):
        sample = instruction_sample(tasks, count_tokens, config.length, rng)
        if sample is None:
            raise BadInput(f"--runs: fewer than two of the runs' tasks fit in {config.length} tokens; raise --length")
        rows.append(sample)
    if not rows:
        raise BadInput(f"--corpus: the documents hold fewer than {config.length} tokens, not one full row")
    rows = mix(rows, short, config.short_share, rng)
    rows = [replace(r, tokens=count_tokens(r.prompt + r.completion)) if r.kind == "short" else r for r in rows]
    meta = {"runs": list(config.runs), "length": config.length, "model": config.model, "seed": config.seed}
    return write(rows, config.out.expanduser().resolve(), meta, config.overwrite)
