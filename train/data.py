"""Reading a `datagen export` folder and turning its rows into what TRL's SFTTrainer trains on.

An export folder (datagen/export.py) holds a `DatasetDict.save_to_disk` dataset with train and test splits and
datagen.json = {"format", "runs", "columns", ...}. Each format becomes one of TRL's dataset types:

    alpaca             prompt/completion: the Alpaca prompt the export rendered (`text` minus the output) → output
    prompt-completion  prompt/completion, as exported
    messages           conversational prompt/completion: the turns before the last assistant turn → that turn;
                       TRL renders both with the model's chat template
    toolformer         text: language modelling on the whole text (Toolformer fine-tunes on the full augmented text)

TRL masks the prompt tokens with -100 when completion-only loss is on, appends the EOS token to completions, and
packs (when asked) after tokenization. Every row is checked here, before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen.errors import BadInput

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

FORMAT_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "text"),
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "toolformer": ("text",),
}
"""The columns each export format must carry (datagen/export.py: features_for)."""


@dataclass(frozen=True)
class Export:
    """An opened export folder: its splits and what datagen.json says about them."""

    path: Path
    format: str
    runs: list[Any]
    """datagen.json "runs": the names of the generation runs the rows came from."""
    splits: DatasetDict
    seed: int | None = None
    """datagen.json "seed": the seed of the export's train/test split."""


def open_export(path: Path) -> Export:
    """Check that `path` is a datagen export with the columns its format needs; load its splits (memory-mapped)."""
    if not path.is_dir():
        raise BadInput(f"{path}: no such folder (make one with `datagen export --run RUN --format alpaca --out {path}`)")
    meta_path = path / "datagen.json"
    if not meta_path.is_file():
        raise BadInput(f"{path} is not a datagen export (no datagen.json): make one with `datagen export --run RUN --out {path}`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{meta_path}: invalid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BadInput(f"{meta_path}: expected a JSON object")
    format = meta.get("format")
    if format not in FORMAT_COLUMNS:
        raise BadInput(f"{meta_path}: unknown format {format!r} (expected one of {', '.join(FORMAT_COLUMNS)}); re-export the data")

    import datasets

    datasets.disable_progress_bars()
    try:
        splits = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise BadInput(f"{path}: not a saved datasets folder ({err}); re-export with `datagen export`") from None
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({"train": splits})
    if "train" not in splits or len(splits["train"]) == 0:
        raise BadInput(f"{path}: the export has no training rows")
    for name, split in splits.items():
        missing = [c for c in FORMAT_COLUMNS[format] if c not in split.column_names]
        if missing:
            raise BadInput(
                f"{path}: split '{name}' lacks the column(s) {', '.join(missing)} that format '{format}' needs "
                f"(it has {', '.join(split.column_names)}); re-export with `datagen export --format {format}`"
            )
    runs = meta.get("runs") or []
    seed = meta.get("seed") if isinstance(meta.get("seed"), int) else None
    return Export(path=path, format=format, runs=list(runs) if isinstance(runs, list) else [runs], splits=splits, seed=seed)


# --- One exported row → one training record (pure functions) -----------------------------------------------------------


def alpaca_record(row: dict[str, Any], where: str) -> dict[str, str]:
    """The prompt is the exported `text` up to the output, so training sees exactly the template the export wrote."""
    text, output = _string(row, "text", where), _string(row, "output", where)
    if not text.endswith(output):
        raise BadInput(f"{where}: 'text' does not end with 'output', so the prompt cannot be separated; re-export the data")
    return {"prompt": text[: len(text) - len(output)], "completion": output}


def prompt_completion_record(row: dict[str, Any], where: str) -> dict[str, str]:
    return {"prompt": _string(row, "prompt", where), "completion": _string(row, "completion", where)}


def messages_record(row: dict[str, Any], where: str) -> dict[str, list[dict[str, str]]]:
    """Turns before the last assistant turn are the prompt; the loss falls on that last turn (datagen exports
    one user turn and one assistant turn, after an optional system turn)."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadInput(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise BadInput(f"{where}: every message needs string 'role' and 'content'")
    if turns[-1]["role"] != "assistant":
        raise BadInput(f"{where}: the last message must be the assistant's (got '{turns[-1]['role']}')")
    if len(turns) < 2:
        raise BadInput(f"{where}: an assistant message needs a prompt turn before it")
    clean = [{"role": t["role"], "content": t["content"]} for t in turns]
    return {"prompt": clean[:-1], "completion": clean[-1:]}


def text_record(row: dict[str, Any], where: str) -> dict[str, str]:
    return {"text": _string(row, "text", where)}


RECORD_BUILDERS = {
    "alpaca": alpaca_record,
    "prompt-completion": prompt_completion_record,
    "messages": messages_record,
    "toolformer": text_record,
}


def _string(row: dict[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise BadInput(f"{where}: column '{column}' must be a string, got {type(value).__name__}")
    return value


def has_prompt(format: str) -> bool:
    """Whether the format separates a prompt from a completion (so completion-only loss can apply)."""
    return format != "toolformer"


def training_split(export: Export, split: str, limit: int | None = None) -> Dataset | None:
    """The split as TRL records, every row checked; None when the split is missing or empty."""
    from datasets import Dataset

    if split not in export.splits or len(export.splits[split]) == 0:
        return None
    rows = export.splits[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    build = RECORD_BUILDERS[export.format]
    records = [build(row, f"{export.path}: {split} row {i}") for i, row in enumerate(rows)]
    return Dataset.from_list(records)
