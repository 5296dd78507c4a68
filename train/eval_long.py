"""Long-context evaluation: perplexity by context length and passkey accuracy by length and depth, before vs after.

    datagen eval-long --model runs/long/merged --baseline smollm2-135m --lengths 1024,2048,4096 \
        --text heldout.jsonl --out runs/long/eval --training-run long

- Perplexity: the held-out text is tokenized once and cut into non-overlapping windows of each length; the
  perplexity is exp of the mean next-token loss over every token of every window (LongLoRA eval.py evaluates
  PG19 and proof-pile the same way, with full attention).
- Passkey: LongLoRA's passkey_retrieval.py prompt (train/long_data.py) at each length and depth, greedy decoding
  of a few tokens, exact match of the first number against the key.
Both models run with full attention in eval mode (S²-Attn is for training only). Writes OUT/eval_long.json,
OUT/passkey_heatmap.png (length x depth, one panel per model), OUT/perplexity.png (one line per model) and a
long_context_eval row in the store, linked to the training run when one is named.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.errors import BadInput
from train.long_data import passkey_correct, passkey_sample

RESULTS_FILE = "eval_long.json"
HEATMAP_FILE = "passkey_heatmap.png"
PERPLEXITY_FILE = "perplexity.png"
PASSKEY_NEW_TOKENS = 8
"""Greedy tokens generated after "The pass key is": enough for a number up to 50000 and its period."""


@dataclass(frozen=True)
class EvalLongConfig:
    model: str
    """The extended model (a merged or full fine-tune folder)."""
    out: Path
    lengths: tuple[int, ...]
    baseline: str | None = None
    """The model before the extension, evaluated the same way for the before/after table."""
    text: tuple[Path, ...] = ()
    """Held-out long text for perplexity (.jsonl with "text", or text files); none: no perplexity."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 2
    """Passkey prompts per length and depth (different keys)."""
    windows: int = 4
    """Most perplexity windows per length."""
    training_run: str | None = None
    """Name of the `datagen train` run that made the model, to link the store row."""
    seed: int = 0


@dataclass
class ModelResult:
    model: str
    perplexity: dict[int, float | None] = field(default_factory=dict)
    """length → perplexity (None: the text is shorter than one window)."""
    passkey: dict[int, dict[float, float]] = field(default_factory=dict)
    """length → depth → accuracy."""


def check(config: EvalLongConfig) -> None:
    if not config.lengths or any(length < 16 for length in config.lengths):
        raise BadInput(f"--lengths {','.join(map(str, config.lengths))}: give lengths of at least 16 tokens")
    if any(not 0.0 <= d <= 1.0 for d in config.depths):
        raise BadInput("--depths: each depth must be in [0, 1]")
    for path in config.text:
        if not path.is_file():
            raise BadInput(f"--text {path}: no such file")


# --- Measuring (the model is a transformers causal LM in eval mode) -------------------------------------------------------


def perplexity(model, token_ids: Sequence[int], length: int, windows: int) -> float | None:
    import torch

    starts = range(0, len(token_ids) - length + 1, length)[:windows]
    if not starts:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for start in starts:
            ids = torch.tensor([token_ids[start : start + length]], device=model.device)
            loss = model(input_ids=ids, labels=ids).loss  # mean over length - 1 predicted tokens
            total += float(loss) * (length - 1)
            count += length - 1
    return math.exp(total / count)


def passkey_accuracy(model, tokenizer, length: int, depth: float, samples: int, rng: random.Random) -> float:
    import torch

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    correct = 0
    for _ in range(samples):
        sample = passkey_sample(count_tokens, length, depth, rng)
        ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=PASSKEY_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        correct += passkey_correct(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True), sample.completion)
    return correct / samples


def evaluate_model(name: str, config: EvalLongConfig, texts: Sequence[str], progress: Callable[[], None]) -> ModelResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datagen import models

    path = models.resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    token_ids = [t for text in texts for t in (*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)]
    result = ModelResult(model=name)
    rng = random.Random(config.seed)  # the same keys for both models
    for length in config.lengths:
        result.perplexity[length] = perplexity(model, token_ids, length, config.windows) if texts else None
        result.passkey[length] = {}
        for depth in config.depths:
            result.passkey[length][depth] = passkey_accuracy(model, tokenizer, length, depth, config.passkey_samples, rng)
            progress()
    del model
    return result


# --- Reporting ------------------------------------------------------------------------------------------------------------


def table_rows(results: Sequence[ModelResult], lengths: Sequence[int]) -> list[dict[str, Any]]:
    """One row per length: each model's perplexity and mean passkey accuracy over depths, side by side."""
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for label, result in zip(_labels(results), results):
            accuracies = list(result.passkey[length].values())
            row[f"perplexity {label}"] = result.perplexity[length]
            row[f"passkey {label}"] = sum(accuracies) / len(accuracies)
        rows.append(row)
    return rows


def _labels(results: Sequence[ModelResult]) -> list[str]:
    return ["before", "after"] if len(results) == 2 else ["model"]


def plot(results: Sequence[ModelResult], config: EvalLongConfig, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels(results)
    figure, panels = plt.subplots(1, len(results), figsize=(5 * len(results), 4), dpi=120, squeeze=False)
    for axes, label, result in zip(panels[0], labels, results):
        grid = [[result.passkey[length][depth] for length in config.lengths] for depth in config.depths]
        image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        axes.set_xticks(range(len(config.lengths)), [str(n) for n in config.lengths])
        axes.set_yticks(range(len(config.depths)), [f"{d:.0%}" for d in config.depths])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("passkey depth")
        axes.set_title(f"passkey accuracy, {label}: {result.model}", fontsize=8)
    figure.colorbar(image, ax=panels[0].tolist())
    figure.savefig(out / HEATMAP_FILE)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for label, result in zip(labels, results):
        points = [(n, p) for n, p in result.perplexity.items() if p is not None]
        axes.plot([n for n, _ in points], [p for _, p in points], "o-", label=f"{label}: {result.model}")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / PERPLEXITY_FILE)
    plt.close(figure)
    return [out / HEATMAP_FILE, out / PERPLEXITY_FILE]


def training_run_id(session, name: str | None) -> int | None:
    from sqlmodel import select

    from storage.tables import TrainingRun

    if name is None:
        return None
    run = session.exec(select(TrainingRun).where(TrainingRun.name == name)).first()
    if run is None:
        raise BadInput(f"--training-run {name}: no training run of that name in the store")
    return run.id


def record(db_url: str | None, config: EvalLongConfig, report: dict[str, Any]) -> int:
    from sqlmodel import Session

    from storage.store import open_engine
    from storage.tables import LongContextEval

    with Session(open_engine(db_url)) as session:
        row = LongContextEval.model_validate(
            {"model": config.model, "baseline": config.baseline, "training_run_id": training_run_id(session, config.training_run),
             "out": str(config.out), "results": report}  # fmt: skip
        )
        session.add(row)
        session.commit()
        return row.id


def run(config: EvalLongConfig, db_url: str | None = None) -> dict[str, Any]:
    """Check, evaluate the baseline (if any) then the model, write the JSON, the plots and the store row."""
    from datagen import models
    from datagen.console import progress
    from train.long_data import read_corpus

    from sqlmodel import Session

    from storage.store import open_engine

    check(config)
    with Session(open_engine(db_url)) as session:
        training_run_id(session, config.training_run)  # an unknown name fails before any model loads
    texts = read_corpus(config.text)
    models.configure_offline()
    names = [n for n in (config.baseline, config.model) if n]
    for name in names:
        models.resolve(name)  # BadInput for an unknown model, before loading anything
    out = config.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    bar = progress("points")
    results = []
    with bar:
        task = bar.add_task("eval-long", total=len(names) * len(config.lengths) * len(config.depths), status="")
        for name in names:
            results.append(evaluate_model(name, config, texts, lambda: bar.advance(task)))
    report = {
        "lengths": list(config.lengths),
        "depths": list(config.depths),
        "passkey_samples": config.passkey_samples,
        "models": {label: {"model": r.model, "perplexity": r.perplexity, "passkey": r.passkey}
                   for label, r in zip(_labels(results), results)},  # fmt: skip
        "table": table_rows(results, config.lengths),
    }
    report["plots"] = [str(p) for p in plot(results, config, out)]
    (out / RESULTS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["id"] = record(db_url, config, json.loads(json.dumps(report)))
    return report
