"""`datagen generate`: prompts in, completions out, every call recorded. The smoke test of every backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from datagen import sigterm
from datagen.backends import MAX_COUNT, Backend, Request, Result, SamplingParams, check_int
from datagen.errors import BadInput
from datagen.jsonl import read_records, require_str
from storage.store import add_generations
from storage.tables import Run


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `datagen generate` runs with, checked on construction (before a model loads or a run is stored)."""

    sampling: SamplingParams
    batch_size: int = 16
    """Prompts per backend call, 1 to MAX_COUNT; each batch is committed in one transaction."""

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1, MAX_COUNT)


def read_requests(path: Path, params: SamplingParams) -> list[Request]:
    """One `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}` per line; all lines checked before any work."""
    requests = []
    for line, record in read_records(path):
        if "prompt" in record:
            requests.append(Request(prompt=require_str(path, line, record, "prompt"), params=params))
        elif "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                raise BadInput(f"{path}:{line}: field 'messages' must be a non-empty list")
            for turn in messages:
                if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                    raise BadInput(f"{path}:{line}: field 'messages' must hold objects with string 'role' and 'content'")
            requests.append(Request(messages=tuple({"role": t["role"], "content": t["content"]} for t in messages), params=params))
        else:
            raise BadInput(f"{path}:{line}: missing field 'prompt' (or 'messages')")
    return requests


def run_generate(
    session: Session,
    run: Run,
    backend: Backend,
    requests: Sequence[Request],
    batch_size: int,
    on_batch: Callable[[list[Request], list[Result]], None],
) -> None:
    """Generate in batches; each batch's generations are committed in one transaction. SIGTERM stops between batches."""
    for batch_number, start in enumerate(range(0, len(requests), batch_size)):
        sigterm.check(batch_number, then="the completions so far are stored")
        batch = list(requests[start : start + batch_size])
        results = backend.generate(batch)
        add_generations(session, run, backend, "generate", batch_number, batch, results)
        session.commit()
        on_batch(batch, results)
