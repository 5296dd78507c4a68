"""Reading JSONL input files with errors that name the file, the line and the field.

Every input file (prompts, seeds, corpora) goes through `read_records`, so a bad line always
fails the same way: one line of text, exit code 2, and nothing written to the store because
the whole file is read and checked before a run starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datagen.errors import BadInput


def read_records(path: str | Path, allow_array: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for every record of a JSONL file (or a JSON array if allowed).

    Blank lines are errors: they usually mean a truncated or hand-edited file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise BadInput(f"{path}: the file is empty")
    if b"\x00" in raw:
        raise BadInput(f"{path}: this is a binary file, not JSONL")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not valid UTF-8") from None
    if allow_array and text.lstrip().startswith("["):
        return list(_array_records(path, text))
    return list(_jsonl_records(path, text))


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise BadInput(f"{path}:{number}: empty line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise BadInput(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _array_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise BadInput(f"{path}:1: expected a JSON array of objects")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise BadInput(f"{path}: item {index}: expected a JSON object, got {type(record).__name__}")
        yield index, record


def require_str(path: str | Path, line: int, record: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    """The string value of `field`, or a BadInput naming file, line and field."""
    if field not in record:
        raise BadInput(f"{path}:{line}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, str):
        raise BadInput(f"{path}:{line}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadInput(f"{path}:{line}: field '{field}' is empty")
    return value


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSONL atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
