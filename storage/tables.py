"""SQLModel tables: every run, every model call, every instruction and instance, with provenance.

Data flows run → generation → task → instance: each accepted or rejected row points at the
generation (exact prompt, raw completion, sampling settings) that produced it. Seeds are tasks
too (source='seed', no generation), so a run's pool can be rebuilt from the store alone.
Table models do not validate on plain construction (sqlmodel #225, #453): build rows with
`Model.model_validate({...})` where the input is not already typed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 1
"""Bump when a table changes shape; `storage.store.open_engine` refuses a database newer than this."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SchemaInfo(SQLModel, table=True):
    __tablename__ = "schema_info"
    key: str = Field(primary_key=True)
    value: str


class Run(SQLModel, table=True):
    """One pipeline run: its full configuration, what it ran on, where it stands, and its counters."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    pipeline: str = Field(index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model: str
    backend: str
    status: str = "running"
    """running, completed, failed or stopped (a stall guard or request limit ended it early)."""
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    requests: int = 0
    generated: int = 0
    accepted: int = 0
    rejected: int = 0
    instances: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation(SQLModel, table=True):
    """One completion from a backend: the exact prompt, the raw text, and how it was sampled."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    purpose: str = Field(index=True)
    """What the call was for: instructions, classification, instances, generate, api_calls, ..."""
    batch: int = 0
    """The run's batch number, for keep-rate-over-time reports."""
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    completion: str = Field(sa_column=Column(Text, nullable=False))
    finish_reason: str
    sampling: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    created_at: datetime = Field(default_factory=utcnow)


class Task(SQLModel, table=True):
    """An instruction: a seed, or one parsed out of a generation, with the filter's verdict."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="run.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    source: str = "generated"
    """seed or generated."""
    seed_id: str | None = None
    instruction: str = Field(sa_column=Column(Text, nullable=False))
    is_classification: bool | None = None
    status: str = Field(default="accepted", index=True)
    """accepted or rejected."""
    reason: str | None = None
    """Why a rejected instruction was dropped (the first filter that failed)."""
    nearest: str | None = Field(default=None, sa_column=Column(Text))
    """The most similar instruction already kept (seeds included), and its ROUGE-L F."""
    similarity: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Instance(SQLModel, table=True):
    """An input/output pair of a task, with the instance filters' verdict."""

    id: int | None = Field(default=None, primary_key=True)
    task_id: int = Field(foreign_key="task.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generation.id", index=True)
    input: str = Field(default="", sa_column=Column(Text, nullable=False))
    output: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="accepted", index=True)
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
