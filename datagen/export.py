"""Export the accepted rows of runs as a Hugging Face dataset that trainers read without conversion.

    datagen export --run example --format alpaca --out data/example

writes one folder: `DatasetDict.save_to_disk` output (train and test splits, `datasets.load_from_disk(DIR)`),
the same splits as data/{split}.parquet and data/{split}.jsonl, the dataset card README.md (datagen/card.py) and
datagen.json ({"format", "runs", "columns", "counts", "datagen_version"}) for `datagen train`.

The flow, top to bottom: select the accepted instances of accepted generated tasks → drop rows that overlap an
evaluation set (decontamination) → split by instruction text (all rows of one normalized instruction on one side,
across runs too, so the held-out loss is not flattered by copies of training rows) → one record per row in the
chosen format → a DatasetDict with explicit Features → write everything into a temporary folder beside DIR, fsync
it and rename it into place, so a failure (or kill -9) never leaves a partial export at DIR.

`--overwrite` replaces only a folder datagen exported (its datagen.json, the marker, names a format and a datagen
version) and holding nothing but what an export writes: a user's folder, or a file dropped into an export, is never
deleted. Temporary folders of a killed export (`.DIR.partial-PID`, `.DIR.old-PID`) are cleaned up by the next one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, true
from sqlmodel import Session, select

from datagen import __version__
from datagen.errors import BadInput, DatagenError
from datagen.jsonl import read_records
from datagen.export_config import CONTAMINATION_NGRAM, DECONTAMINATION_THRESHOLD, ExportConfig, ExportResult, Format, RunFacts
from datagen.shards import runs_named
from storage.queries import hand_rejected_ids, run_counts
from storage.tables import ApiCall, Curation, CurationVerdict, Generation, Instance, Run, Task, ToolformerText

if TYPE_CHECKING:
    from datasets import DatasetDict, Features


# Stanford Alpaca's prompt template, verbatim (tatsu-lab/stanford_alpaca: train.py, PROMPT_DICT).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

EVAL_TEXT_FIELDS = ("instruction", "question", "text")
"""Evaluation-set fields compared by ROUGE-L with a row's instruction: the first one present."""
EVAL_EXTRA_FIELDS = ("input", "output", "answer")
"""Further evaluation-set fields whose n-grams also count (an answer copied into an output is contamination too)."""


@dataclass(frozen=True)
class Example:
    """One accepted instance of an accepted generated task, or one Toolformer text with kept calls, with its origin."""

    run: str
    model: str
    task_id: int
    """The task (or Toolformer text) id."""
    instruction: str
    """For Toolformer: the plain corpus text (what decontamination compares)."""
    input: str
    output: str
    generation_id: int | None
    similarity: float | None
    text: str | None = None
    """For Toolformer: the text with its kept API calls inserted."""


# --- Selecting rows --------------------------------------------------------------------------------------------------


def curated_out_ids(run_id: int):
    """The instance ids the run's curation (`datagen curate`, pipelines/curate.py) dropped, as a subquery."""
    return (
        select(CurationVerdict.instance_id)
        .join(Curation, Curation.id == CurationVerdict.curation_id)
        .where(Curation.run_id == run_id, CurationVerdict.kept == False)  # noqa: E712
    )


def select_examples(session: Session, run: Run, ignore_curation: bool = False) -> tuple[list[Example], int]:
    """The run's exportable rows, in task then instance order, and the number of accepted tasks with no accepted instance.

    Seeds are not exported: like Self-Instruct's and Alpaca's released data, the dataset is the generated part; nor are
    tasks rejected by hand in `datagen ui --allow-edits`, nor instances the run's curation dropped (unless ignore_curation).
    """
    not_rejected_by_hand = Task.id.not_in(hand_rejected_ids())  # the latest manual verdict is in force (undo restores)
    not_curated_out = true() if ignore_curation else Instance.id.not_in(curated_out_ids(run.id))
    rows = session.exec(
        select(Task, Instance, Generation.model)
        .join(Instance, Instance.task_id == Task.id)
        .join(Generation, Generation.id == Instance.generation_id, isouter=True)
        .where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted", Instance.status == "accepted", not_rejected_by_hand,
               not_curated_out)  # fmt: skip
        .order_by(Task.id, Instance.id)
    ).all()
    examples = [
        Example(
            run=run.name,
            model=model or run.model,
            task_id=task.id,
            instruction=task.instruction,
            input=instance.input,
            output=instance.output,
            generation_id=instance.generation_id if instance.generation_id is not None else task.generation_id,
            similarity=task.similarity,
        )
        for task, instance, model in rows
    ]
    accepted_tasks = session.exec(
        select(func.count()).select_from(Task).where(Task.run_id == run.id, Task.source == "generated", Task.status == "accepted", not_rejected_by_hand)
    ).one()
    return examples, accepted_tasks - len({e.task_id for e in examples})


def select_toolformer_examples(session: Session, run: Run) -> tuple[list[Example], int]:
    """Texts of a Toolformer run with at least one kept call inserted (the paper's C*), and the number without any.

    generation_id is the sampling generation of the text's first inserted call.
    """
    texts = session.exec(select(ToolformerText).where(ToolformerText.run_id == run.id).order_by(ToolformerText.line)).all()
    first_call = dict(
        session.exec(
            select(ApiCall.text_id, func.min(ApiCall.generation_id)).where(ApiCall.run_id == run.id, ApiCall.inserted).group_by(ApiCall.text_id)
        ).all()
    )
    examples = [
        Example(run.name, run.model, t.id, t.text, "", "", first_call.get(t.id), None, text=t.annotated)
        for t in texts
        if t.calls_inserted > 0
    ]
    return examples, len(texts) - len(examples)


def curation_facts(session: Session, run: Run, ignored: bool) -> dict[str, Any] | None:
    curation = session.exec(select(Curation).where(Curation.run_id == run.id)).first()
    if curation is None:
        return None
    return {"rule": curation.rule, "scores": list(curation.scores), "kept": curation.kept, "dropped": curation.dropped,
            "applied": not ignored, "created_at": f"{curation.created_at:%Y-%m-%d %H:%M}"}  # fmt: skip


def run_facts(session: Session, run: Run, tasks_without_instances: int, ignore_curation: bool = False) -> RunFacts:
    def count(statement) -> int:
        return session.exec(statement).one()

    first_ids = session.exec(select(func.min(Generation.id)).where(Generation.run_id == run.id).group_by(Generation.purpose)).all()
    sampling = {g.purpose: g.sampling for g in session.exec(select(Generation).where(Generation.id.in_(first_ids)))}
    api_calls: dict[str, dict[str, int]] = {}
    for tool, status, inserted, n in session.exec(
        select(ApiCall.tool, ApiCall.status, ApiCall.inserted, func.count())
        .where(ApiCall.run_id == run.id)
        .group_by(ApiCall.tool, ApiCall.status, ApiCall.inserted)
    ).all():
        counts = api_calls.setdefault(tool, {})
        counts[status] = counts.get(status, 0) + n
        if inserted:
            counts["inserted"] = counts.get("inserted", 0) + n
    return RunFacts(
        **run_counts(session, run),
        created_at=f"{run.created_at:%Y-%m-%d}",
        config=dict(run.config),
        seed_tasks=count(select(func.count()).select_from(Task).where(Task.run_id == run.id, Task.source == "seed")),
        tasks_without_instances=tasks_without_instances,
        sampling=dict(sorted(sampling.items())),
        texts=count(select(func.count()).select_from(ToolformerText).where(ToolformerText.run_id == run.id)),
        api_calls=dict(sorted(api_calls.items())),
        curation=curation_facts(session, run, ignore_curation),
    )


# --- Decontamination ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    text: str
    """The instruction, question or text: compared by ROUGE-L with each row's instruction."""
    ngrams: frozenset[tuple[str, ...]]
    """Word n-grams of all its text fields."""


_WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lowercased word n-grams (any script); texts shorter than n words have none."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def read_eval_set(path: Path, n: int) -> list[EvalItem]:
    items = []
    for line, record in read_records(path):
        name = next((f for f in EVAL_TEXT_FIELDS if isinstance(record.get(f), str) and record[f].strip()), None)
        if name is None:
            raise BadInput(f"{path}:{line}: needs a non-empty string field 'instruction', 'question' or 'text'")
        texts = [record[name]] + [record[f] for f in EVAL_EXTRA_FIELDS if isinstance(record.get(f), str)]
        items.append(EvalItem(record[name], frozenset(g for t in texts for g in word_ngrams(t, n))))
    return items


def max_rouge_l(texts: Sequence[str], references: Sequence[str]) -> list[float]:
    """For each text, the highest ROUGE-L F-measure against any reference (0 when there are none).

    Scored with datagen.dedup's RougeIndex: rouge-score's tokenizer and F-measure, exactly, at rapidfuzz speed.
    """
    from datagen.dedup import RougeIndex

    index = RougeIndex()
    index.add(list(references))
    return [match.score if (match := index.nearest(text)) else 0.0 for text in texts]


def decontaminate(
    examples: list[Example], eval_set: list[EvalItem], threshold: float, n: int
) -> tuple[list[Example], dict[str, int]]:
    """Drop rows whose instruction scores ROUGE-L > threshold with an evaluation item, or that share a word n-gram with one.

    Returns the kept rows and the dropped counts by reason (a row is counted under the first test it fails).
    """
    instructions = sorted({e.instruction for e in examples})
    scores = dict(zip(instructions, max_rouge_l(instructions, [item.text for item in eval_set])))
    eval_ngrams = set().union(*(item.ngrams for item in eval_set))
    kept, dropped = [], Counter()
    for example in examples:
        if scores[example.instruction] > threshold:
            dropped["rougeL"] += 1
        elif any(word_ngrams(text, n) & eval_ngrams for text in (example.instruction, example.input, example.output)):
            dropped[f"{n}-gram"] += 1
        else:
            kept.append(example)
    return kept, {"rougeL": dropped["rougeL"], f"{n}-gram": dropped[f"{n}-gram"]}


# --- Splitting and formatting -------------------------------------------------------------------------------------------


def split_key(instruction: str) -> str:
    """What the split keeps on one side: the instruction, case-folded, with whitespace runs collapsed. Two runs (or
    two tasks of one run) that hold the same instruction put all its rows on the same side."""
    return " ".join(instruction.casefold().split())


def split_by_instruction(examples: list[Example], test_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle the distinct normalized instructions with the seed; the first ceil(test_size × instructions) form the
    test split (at least one, never all).

    Rows come out in the shuffled instruction order, so a trainer that does not shuffle still sees mixed tasks.
    """
    keys = sorted({split_key(e.instruction) for e in examples})
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n_test = 0
    if test_size > 0:
        if len(keys) < 2:
            raise BadInput(f"only {len(keys)} distinct instruction to export: a test split needs at least 2 (or pass --test-size 0)")
        n_test = min(max(1, math.ceil(test_size * len(keys))), len(keys) - 1)
    rank = {key: i for i, key in enumerate(order)}
    ordered = sorted(examples, key=lambda e: rank[split_key(e.instruction)])
    test = [e for e in ordered if rank[split_key(e.instruction)] < n_test]
    train = [e for e in ordered if rank[split_key(e.instruction)] >= n_test]
    return train, test


def alpaca_prompt(instruction: str, input: str) -> str:
    if input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def user_message(instruction: str, input: str) -> str:
    """The instruction, then the input after a blank line when there is one."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def to_record(example: Example, format: Format, system: str | None = None, with_provenance: bool = False) -> dict[str, Any]:
    if format is Format.alpaca:
        prompt = alpaca_prompt(example.instruction, example.input)
        record = {"instruction": example.instruction, "input": example.input, "output": example.output, "text": prompt + example.output}
    elif format is Format.messages:
        turns = [{"role": "system", "content": system}] if system else []
        turns += [
            {"role": "user", "content": user_message(example.instruction, example.input)},
            {"role": "assistant", "content": example.output},
        ]
        record = {"messages": turns}
    elif format is Format.prompt_completion:
        record = {"prompt": alpaca_prompt(example.instruction, example.input), "completion": example.output}
    else:
        record = {"text": example.text}
    if with_provenance:
        record |= {"run": example.run, "model": example.model, "generation_id": example.generation_id, "similarity": example.similarity}
    return record


def features_for(format: Format, with_provenance: bool) -> Features:
    from datasets import Features, List, Value

    string = Value("string")
    columns = {
        Format.alpaca: {"instruction": string, "input": string, "output": string, "text": string},
        Format.messages: {"messages": List({"role": string, "content": string})},
        Format.prompt_completion: {"prompt": string, "completion": string},
        Format.toolformer: {"text": string},
    }[format]
    if with_provenance:
        columns |= {"run": string, "model": string, "generation_id": Value("int64"), "similarity": Value("float64")}
    return Features(columns)


def build_dataset(splits: dict[str, list[dict[str, Any]]], features: Features) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(records, features=features) for name, records in splits.items()})


# --- Writing ------------------------------------------------------------------------------------------------------------


EXPORT_ENTRIES = frozenset({"dataset_dict.json", "data", "README.md", "datagen.json"})
"""What an export folder holds besides one folder per split (datasets' save_to_disk and write_export)."""
MARKER = "datagen.json"


def is_export(folder: Path) -> bool:
    """Whether `folder` is one datagen exported: its datagen.json is a JSON object naming a format and a datagen version."""
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "datagen_version" in meta


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an export folder that no export writes (a split folder holds a dataset_info.json)."""
    return sorted(
        p.name for p in folder.iterdir()
        if p.name not in EXPORT_ENTRIES and not (p.is_dir() and (p / "dataset_info.json").is_file())
    )  # fmt: skip


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output datagen must not write: under a file, a file itself, or a folder that holds something,
    unless --overwrite and the folder is an export datagen wrote with nothing else in it. Checked before any work
    and again at the end."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadInput(f"--out {out}: {parent} is a file, not a folder")
            break
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise BadInput(f"--out {out} exists and is not empty: pass --overwrite to replace an earlier export")
    if not is_export(out):
        raise BadInput(f"--out {out} is not a datagen export (no {MARKER} written by datagen): --overwrite replaces only those")
    if foreign := foreign_entries(out):
        raise BadInput(f"--out {out} holds {', '.join(foreign)}, which no export writes: move it away, then rerun with --overwrite")


def clean_leftovers(out: Path) -> None:
    """Remove the temporary folders of exports to `out` that were killed: `.NAME.partial-PID` (a half-written export)
    and `.NAME.old-PID` (the previous export, moved aside just before the new one was renamed into place; put back
    when `out` is missing). Folders of a live process are left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match[2])):
            continue
        if match[1] == "old" and not out.exists() and is_export(path):
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so the rename that publishes it never exposes a folder
    whose files a power cut would lose."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_export(dataset: DatasetDict, card: str, meta: dict[str, Any], out: Path, overwrite: bool) -> None:
    """Write into a temporary folder beside `out`, fsync it, then rename it into place; on any failure nothing is left
    behind, and a kill -9 leaves only temporary folders that the next export cleans up."""
    import datasets

    datasets.disable_progress_bars()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dataset.save_to_disk(str(tmp))
        (tmp / "data").mkdir()
        for name, split in dataset.items():
            split.to_parquet(str(tmp / "data" / f"{name}.parquet"))
            split.to_json(str(tmp / "data" / f"{name}.jsonl"), lines=True, force_ascii=False)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        check_out(out, overwrite)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        _fsync(out.parent)  # the renames themselves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_repo_id(repo_id: str) -> str:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise BadInput(f"--push-to-hub needs OWNER/NAME, got '{repo_id}'")
    return repo_id


def push_to_hub(dataset: DatasetDict, out: Path, repo_id: str, private: bool) -> str:
    """Create the repository, upload the card and datagen.json, then the splits with `DatasetDict.push_to_hub`.

    In this order the card survives whole: push_to_hub reads the README.md already in the repository and adds its
    `dataset_info` (features, split sizes) and `configs` to that card's metadata (datasets 5.2:
    arrow_dataset.py, _get_updated_dataset_card). Uploading the card after push_to_hub would replace the card it
    wrote and drop dataset_info. The card's configs point at data/{split}*.parquet, which matches both the local
    files and the Hub's shards.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            repo_type="dataset",
            allow_patterns=["README.md", MARKER],
            commit_message="datagen export: dataset card",
        )
        dataset.push_to_hub(repo_id, private=private, commit_message="datagen export: data")
    except Exception as err:  # network, auth and Hub errors all end the same way: the local export stands
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DatagenError(
            f"pushing to the Hub as {repo_id} failed ({type(err).__name__}: {first_line}); the export in {out} is complete. "
            "Log in with `hf auth login` (or set HF_TOKEN) and rerun with --overwrite"
        ) from None
    return f"https://huggingface.co/datasets/{repo_id}"


# --- The export -----------------------------------------------------------------------------------------------------------


def check_format(session: Session, runs: list[Run], format: Format) -> None:
    """Toolformer runs hold annotated texts, the others instructions: each exports only in its own formats."""
    for run in runs:
        if format is Format.toolformer and run.pipeline != "toolformer":
            if session.exec(select(Run.id).where(Run.pipeline == "toolformer")).first() is None:
                raise BadInput("--format toolformer: no Toolformer runs exist in the store (make one with `datagen toolformer`)")
            raise BadInput(f"run '{run.name}' is a {run.pipeline} run: --format toolformer exports Toolformer runs only")
        if format is not Format.toolformer and run.pipeline == "toolformer":
            raise BadInput(f"run '{run.name}' is a Toolformer run: export it with --format toolformer")


def export(session: Session, config: ExportConfig) -> ExportResult:
    """Select, decontaminate, split, format and write; returns what was written and the counts."""
    from datagen.card import render_card

    clean_leftovers(config.out)
    check_out(config.out, config.overwrite)
    eval_set = read_eval_set(config.decontaminate, config.ngram) if config.decontaminate else None
    named = {name: runs_named(session, name) for name in dict.fromkeys(config.runs)}
    check_format(session, [run for runs in named.values() for run in runs], config.format)
    examples: list[Example] = []
    facts = []
    for name, runs in named.items():
        found = 0
        for run in runs:  # one run, or a sharded job's shard runs in corpus line order
            if config.format is Format.toolformer:
                rows, without_instances = select_toolformer_examples(session, run)
                what = "no text with a kept API call"
            else:
                rows, without_instances = select_examples(session, run, config.ignore_curation)
                what = "no accepted generated instruction with an accepted instance"
            examples += rows
            found += len(rows)
            facts.append(run_facts(session, run, without_instances, config.ignore_curation))
        if not found:
            whose = f"run '{runs[0].name}' has" if len(runs) == 1 else f"the {len(runs)} shard runs of '{name}' have"
            raise BadInput(f"{whose} no accepted rows to export ({what})")

    decontaminated: dict[str, int] = {}
    if eval_set is not None:
        examples, decontaminated = decontaminate(examples, eval_set, config.decontamination_threshold, config.ngram)
        if not examples:
            raise BadInput(f"decontamination against {config.decontaminate} dropped every row: nothing left to export")
    train, test = split_by_instruction(examples, config.test_size, config.seed)
    splits = {"train": train, "test": test} if test else {"train": train}
    features = features_for(config.format, config.with_provenance)
    dataset = build_dataset(
        {name: [to_record(e, config.format, config.system, config.with_provenance) for e in rows] for name, rows in splits.items()},
        features,
    )
    counts = {
        "rows": len(examples),
        "tasks": len({split_key(e.instruction) for e in examples}),
        **{name: len(rows) for name, rows in splits.items()},
        "tasks_without_instances": sum(f.tasks_without_instances for f in facts),
        "decontaminated": decontaminated,
        "curated_out": sum(f.curation["dropped"] for f in facts if f.curation and f.curation["applied"]),
    }
    result = ExportResult(config.out, config.format, list(features), counts, facts, dataset)
    meta = {
        "format": config.format.value,
        "runs": [f.name for f in facts],
        "columns": result.columns,
        "counts": counts,
        "datagen_version": __version__,
        "test_size": config.test_size,
        "seed": config.seed,
        "with_provenance": config.with_provenance,
        "system": config.system,
        "decontaminate": str(config.decontaminate) if config.decontaminate else None,
        "curation": {f.name: f.curation for f in facts if f.curation},
    }
    card = render_card(config, result, list(splits))
    write_export(dataset, card, meta, config.out, config.overwrite)
    return result
