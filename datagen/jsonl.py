"""Reading JSONL input files with errors that name the file, the line and the field.

Every input file (prompts, seeds, corpora) goes through `read_records`, so a bad line always
fails the same way: one line of text, exit code 2, and nothing written to the store because
the whole file is read and checked before a run starts.
"""

from __future__ import annotations

import json
import sys
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
    # Lines end at "\n" only (JSON Lines, jsonlines.org): str.splitlines() would also split at U+2028,
    # U+0085 and other characters that are valid, unescaped, inside a JSON string.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise BadInput(f"{path}:{number}: empty line")
        record = _loads(line, path, number)
        if not isinstance(record, dict):
            raise BadInput(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _array_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    records = _loads(text, path, None)
    if not isinstance(records, list):
        raise BadInput(f"{path}:1: expected a JSON array of objects")
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise BadInput(f"{path}: item {index}: expected a JSON object, got {type(record).__name__}")
        yield index, record


def _loads(text: str, path: Path, line: int | None) -> Any:
    """json.loads with every way it can fail as BadInput naming file and line (`line` None: a whole JSON file,
    where the decoder's line is used): malformed JSON; an integer longer than Python's int/str conversion limit
    (a ValueError, not a JSONDecodeError); nesting deeper than the recursion limit (a RecursionError)."""
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = where if line is not None else f"{path}:{err.lineno}"
        raise BadInput(f"{where}: invalid JSON ({err.msg})") from None
    except RecursionError:
        raise BadInput(f"{where}: invalid JSON (arrays or objects nested too deeply)") from None
    except ValueError:
        raise BadInput(f"{where}: invalid JSON (an integer with more than {sys.get_int_max_str_digits()} digits)") from None


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


def check_output_file(path: Path, option: str) -> None:
    """BadInput unless `path` can be written as a file: not a folder, in a folder that exists. Commands call this
    before any work, so a wrong --out costs nothing."""
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise BadInput(f"{option} {path}: the folder {path.parent} does not exist")


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records as JSONL atomically (a temporary file renamed into place; removed if writing fails)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_config_file(path: Path) -> dict[str, Any]:
    """A config YAML file (--config) as a mapping of option names to values; a missing, invalid or non-mapping file is BadInput."""
    import yaml

    if not path.is_file():
        raise BadInput(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BadInput(f"{path}: invalid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BadInput(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded
