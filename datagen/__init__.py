"""datagen: generate instruction-tuning data with language models, filter it, store it, train on it.

The library every client calls (the `datagen` CLI, scheduled jobs, the e2e loop, a notebook):

    from datagen import SelfInstructConfig, Store, run_self_instruct

    store = Store("sqlite:///demo.db")
    handle = run_self_instruct(SelfInstructConfig(num_instructions=5), "examples/seed_tasks.jsonl", store=store, name="demo")
    handle.status, handle.figures().accepted
    dataset = handle.to_dataset()

Names are imported on first use, so `import datagen` stays light (no torch, no SQL engine). The library's
functions are named apart from datagen's modules (`export_dataset`, not `export`: `datagen.export` is a module).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # configs, one per pipeline (pydantic models: every knob a typed, documented field)
    "BootstrapConfig": "pipelines.bootstrap",
    "SelfInstructConfig": "pipelines.self_instruct",
    "AlpacaConfig": "pipelines.alpaca",
    "ToolformerConfig": "pipelines.toolformer",
    "TrainConfig": "train.config",
    "LoopConfig": "datagen.e2e",
    "ExportConfig": "datagen.export",
    "Format": "datagen.export",
    "SeedTask": "pipelines.seeds",
    "read_seeds": "pipelines.seeds",
    # backends
    "SamplingParams": "datagen.backends",
    "Request": "datagen.backends",
    "ServerOptions": "datagen.backends",
    "make_backend": "datagen.backends",
    "load_backend": "datagen.backends",
    # the store and runs
    "Store": "datagen.runs",
    "RunHandle": "datagen.runs",
    "run_self_instruct": "datagen.runs",
    "run_alpaca": "datagen.runs",
    "run_toolformer": "datagen.runs",
    "dedup_run": "datagen.runs",
    "export_dataset": "datagen.runs",
    "train_model": "datagen.runs",
    "evaluate_model": "datagen.runs",
    "run_loop": "datagen.runs",
    # errors (exit codes on the CLI)
    "DatagenError": "datagen.errors",
    "BadInput": "datagen.errors",
    "StoppedEarly": "datagen.errors",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from datagen.backends import Request, SamplingParams, ServerOptions, load_backend, make_backend
    from datagen.e2e import LoopConfig
    from datagen.errors import BadInput, DatagenError, StoppedEarly
    from datagen.export import ExportConfig, Format
    from datagen.runs import (
        RunHandle,
        Store,
        dedup_run,
        evaluate_model,
        export_dataset,
        run_alpaca,
        run_loop,
        run_self_instruct,
        run_toolformer,
        train_model,
    )
    from pipelines.alpaca import AlpacaConfig
    from pipelines.bootstrap import BootstrapConfig
    from pipelines.seeds import SeedTask, read_seeds
    from pipelines.self_instruct import SelfInstructConfig
    from pipelines.toolformer import ToolformerConfig
    from train.config import TrainConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'datagen' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
