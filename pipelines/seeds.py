"""Seed tasks: Self-Instruct's format (id, name, instruction, instances, is_classification) or Alpaca-style
records (instruction, input, output), as JSONL or a JSON array, detected per record. Unknown fields are ignored.
Every record is checked before a run starts, so a bad file writes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datagen.errors import BadInput
from datagen.jsonl import read_records, require_str


@dataclass(frozen=True)
class SeedInstance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    instances: tuple[SeedInstance, ...]
    is_classification: bool | None
    """None when the file does not say; the pipeline's classification step decides."""


def read_seeds(path: str | Path) -> list[SeedTask]:
    seeds = []
    for line, record in read_records(path, allow_array=True):
        instruction = require_str(path, line, record, "instruction").strip()
        if "instances" in record:
            raw = record["instances"]
            if not isinstance(raw, list):
                raise BadInput(f"{path}:{line}: field 'instances' must be a list")
            instances = []
            for number, item in enumerate(raw):
                if not isinstance(item, dict):
                    raise BadInput(f"{path}:{line}: field 'instances' must hold objects with 'input' and 'output'")
                output = _output(path, line, item, f"instances[{number}].output")
                instances.append(SeedInstance(_text(path, line, item, "input"), output))
        elif "output" in record or "input" in record:  # an Alpaca record: an input needs its output
            instances = [SeedInstance(_text(path, line, record, "input"), _output(path, line, record, "output"))]
        else:
            instances = []
        flag = record.get("is_classification")
        if flag is not None and not isinstance(flag, bool):
            raise BadInput(f"{path}:{line}: field 'is_classification' must be true or false")
        seed_id = record.get("id", f"seed_{line}")
        seeds.append(SeedTask(str(seed_id), instruction, tuple(instances), flag))
    if not seeds:
        raise BadInput(f"{path}: no seed tasks")
    return seeds


def _text(path, line, record: dict, field: str) -> str:
    value = record.get(field, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInput(f"{path}:{line}: field '{field}' must be a string, got {type(value).__name__}")
    return value.strip()


def _output(path, line, record: dict, name: str) -> str:
    """An instance's output: required and not empty, since an instance is a worked example of its answer."""
    if record.get("output") is None:
        raise BadInput(f"{path}:{line}: missing field '{name}'")
    output = _text(path, line, record, "output")
    if not output:
        raise BadInput(f"{path}:{line}: field '{name}' is empty")
    return output
