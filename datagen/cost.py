"""What a run cost: its tokens and the seconds each stage held its device, priced by a table the user edits.

The store keeps raw figures only: a generation run's prompt and completion tokens (run table) and the wall-clock
seconds of each stage on each device (stage_time: generation, filtering, scoring; a training run's training; a loop's
eval). Money is computed when it is shown, from the price table, so editing the table changes every figure shown,
past runs included:

    datagen runs show demo --prices examples/prices.yaml      # or DATAGEN_PRICES=examples/prices.yaml

A model listed under `models` is priced by its tokens ($ per 1M input and output tokens: an API) for the stages it
ran remotely; a stage on a local device is priced by the hour of that device (`devices`: $ per GPU-hour for cuda,
per machine-hour for cpu). A figure the table has no price for makes the total "n/a", with what is missing named.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlmodel import Session, func, select

from datagen.errors import BadInput
from storage.tables import Run, StageTime, TrainingRun

PRICES_ENV = "DATAGEN_PRICES"
DEVICES = ("cuda", "cpu", "remote")


def backend_device(backend) -> str:
    """cuda or cpu for a model in this process, remote for an API server (the openai backend)."""
    if backend.name == "vllm":
        return "cuda"
    hf_model = getattr(backend, "hf_model", None)
    if hf_model is not None:
        return next(hf_model.parameters()).device.type
    return "remote" if backend.name == "openai" else "cpu"


class StageClock:
    """Wall time of a batch's stages, for a loop that is not the bootstrap loop's (Toolformer's): `with clock("scoring"):`
    around a stage; `rows(...)` gives them, and the rest of the batch as filtering, as stage_time rows."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

    def rows(self, run_id: int, backend) -> list[StageTime]:
        """Model stages on the backend's device; the rest (tools, parsing, the store) on the machine the run holds."""
        device = backend_device(backend)
        machine = "cpu" if device == "remote" else device
        seconds = {**self.seconds, "filtering": time.perf_counter() - self.started - sum(self.seconds.values())}
        return [StageTime(run_id=run_id, stage=stage, device=device if stage in ("generation", "scoring") else machine,
                          model=backend.model, seconds=value) for stage, value in seconds.items() if value > 0]  # fmt: skip


@dataclass(frozen=True)
class TokenPrice:
    input: float
    """$ per 1M prompt tokens."""
    output: float
    """$ per 1M completion tokens."""


@dataclass(frozen=True)
class Prices:
    """A price table (examples/prices.yaml)."""

    source: str
    currency: str = "USD"
    models: dict[str, TokenPrice] = field(default_factory=dict)
    devices: dict[str, float] = field(default_factory=dict)
    """$ per hour of a device: cuda (one GPU), cpu (the machine)."""


def load_prices(path: str | Path | None = None) -> Prices | None:
    """The table at `path`, else at $DATAGEN_PRICES, else None (figures are then shown without money). A wrong
    field is one line naming the file and the field."""
    path = path or os.environ.get(PRICES_ENV)
    if not path:
        return None
    from datagen.jsonl import read_config_file

    data = read_config_file(Path(path))
    known = {"currency", "models", "devices"}
    for key in data:
        if key not in known:
            raise BadInput(f"{path}: unknown field '{key}' (known: {', '.join(sorted(known))})")
    models: dict[str, TokenPrice] = {}
    for name, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise BadInput(f"{path}: models.{name} needs exactly 'input' and 'output' ($ per 1M tokens)")
        models[str(name)] = TokenPrice(_price(path, f"models.{name}.input", entry["input"]),
                                       _price(path, f"models.{name}.output", entry["output"]))  # fmt: skip
    devices = {}
    for name, value in (data.get("devices") or {}).items():
        if name not in ("cuda", "cpu"):
            raise BadInput(f"{path}: devices.{name}: a device is cuda or cpu")
        devices[name] = _price(path, f"devices.{name}", value)
    currency = data.get("currency", "USD")
    if not isinstance(currency, str):
        raise BadInput(f"{path}: currency must be text, e.g. USD")
    return Prices(str(path), currency, models, devices)


def _price(path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadInput(f"{path}: {where} must be a number >= 0, got {value!r}")
    return float(value)


@dataclass
class Usage:
    """Raw figures of a run (or several): tokens per model, and seconds per (stage, device)."""

    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    """model → (prompt tokens, completion tokens), of its remote stages' generations and of local ones alike."""
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    remote_models: set[str] = field(default_factory=set)

    def add(self, other: Usage) -> None:
        for model, (p, c) in other.tokens.items():
            p0, c0 = self.tokens.get(model, (0, 0))
            self.tokens[model] = (p0 + p, c0 + c)
        for key, value in other.seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        self.remote_models |= other.remote_models


def _stage_seconds(session: Session, **where) -> dict[tuple[str, str], float]:
    column, value = next(iter(where.items()))
    rows = session.exec(
        select(StageTime.stage, StageTime.device, func.sum(StageTime.seconds))
        .where(getattr(StageTime, column) == value).group_by(StageTime.stage, StageTime.device)
    ).all()  # fmt: skip
    return {(stage, device): float(seconds or 0.0) for stage, device, seconds in rows}


def run_usage(session: Session, run: Run) -> Usage:
    seconds = _stage_seconds(session, run_id=run.id)
    remote = {run.model} if any(device == "remote" for _, device in seconds) or run.backend == "openai" else set()
    return Usage({run.model: (run.prompt_tokens, run.completion_tokens)}, seconds, remote)


def training_usage(session: Session, training_run: TrainingRun) -> Usage:
    return Usage({}, _stage_seconds(session, training_run_id=training_run.id))


def loop_usage(session: Session, loop_id: int) -> Usage:
    """A loop's own stages (eval) and every run and training run it made."""
    from storage.tables import LoopStage

    usage = Usage({}, _stage_seconds(session, loop_id=loop_id))
    for stage in session.exec(select(LoopStage).where(LoopStage.loop_id == loop_id)).all():
        if stage.run_id and stage.stage == "generate":
            usage.add(run_usage(session, session.get(Run, stage.run_id)))
        if stage.training_run_id:
            usage.add(training_usage(session, session.get(TrainingRun, stage.training_run_id)))
    return usage


@dataclass
class Cost:
    total: float | None
    """None when some figure has no price (`missing`) or there is no price table."""
    parts: dict[str, float]
    """What each priced figure cost: "tokens MODEL", "STAGE on DEVICE"."""
    missing: list[str]
    currency: str = "USD"
    source: str | None = None

    def describe(self) -> str:
        if self.source is None:
            return f"n/a (no price table: --prices FILE or {PRICES_ENV})"
        if self.total is None:
            return f"n/a (no price in {self.source} for {', '.join(self.missing)})"
        return f"{money(self.total, self.currency)} (prices: {self.source})"


def money(amount: float, currency: str = "USD") -> str:
    return f"{amount:.4g} {currency}" if amount < 0.01 else f"{amount:,.2f} {currency}"


def price(usage: Usage, prices: Prices | None) -> Cost:
    """Tokens of a remote model at its token price; each stage's seconds on a local device at the device's hourly
    price."""
    if prices is None:
        return Cost(None, {}, [], source=None)
    parts: dict[str, float] = {}
    missing: list[str] = []
    for model in sorted(usage.remote_models):
        prompt_tokens, completion_tokens = usage.tokens.get(model, (0, 0))
        rate = prices.models.get(model)
        if rate is None:
            missing.append(f"model {model}")
            continue
        parts[f"tokens {model}"] = (prompt_tokens * rate.input + completion_tokens * rate.output) / 1e6
    for (stage, device), seconds in sorted(usage.seconds.items()):
        if device == "remote" or seconds <= 0:
            continue
        hourly = prices.devices.get(device)
        if hourly is None:
            if f"device {device}" not in missing:
                missing.append(f"device {device}")
            continue
        parts[f"{stage} on {device}"] = seconds / 3600 * hourly
    total = None if missing else sum(parts.values())
    return Cost(total, parts, missing, prices.currency, prices.source)


def usage_dict(usage: Usage) -> dict[str, Any]:
    """The raw figures, as `runs show --json` and the viewer show them."""
    return {
        "tokens": {model: {"prompt": p, "completion": c} for model, (p, c) in usage.tokens.items()},
        "seconds": {f"{stage} on {device}": round(seconds, 3) for (stage, device), seconds in sorted(usage.seconds.items())},
    }


def cost_dict(usage: Usage, prices: Prices | None) -> dict[str, Any]:
    """Raw figures and their price: the `cost` entry of `runs show --json`, the report and the viewer."""
    cost = price(usage, prices)
    return {**usage_dict(usage), "cost": None if cost.total is None else round(cost.total, 6), "currency": cost.currency,
            "parts": {k: round(v, 6) for k, v in cost.parts.items()}, "missing": cost.missing,
            "prices": cost.source, "shown": cost.describe()}  # fmt: skip


POINT = 0.01
"""A point of a metric, for the loop's cost per point of improvement: 0.01 of it (a percentage point of ROUGE-L or
exact match, 0.01 nats of loss)."""


def loop_cost_dict(usage: Usage, prices: Prices | None, kept_items: int, improvement: float | None) -> dict[str, Any]:
    """A loop's raw figures and price, with the cost per kept item (generated rows trained on in the last round) and,
    when the primary verdict is an improvement of `improvement` (in the metric's units), the cost per point of it."""
    found = cost_dict(usage, prices)
    total, currency = found["cost"], found["currency"]
    per_item = total / kept_items if total is not None and kept_items else None
    per_point = total / (improvement / POINT) if total is not None and improvement else None
    if per_point is not None:
        point_shown = money(per_point, currency)
    elif improvement is None:
        point_shown = "n/a (the primary verdict is not an improvement)"
    else:
        point_shown = "n/a (no total cost)"
    return {**found, "kept_items": kept_items, "per_kept_item": per_item, "per_point": per_point,
            "per_kept_item_shown": money(per_item, currency) if per_item is not None else "n/a", "per_point_shown": point_shown,
            "point": f"{POINT} of the primary metric"}  # fmt: skip
