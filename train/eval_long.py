"""Long-context evaluation: perplexity by context length and passkey accuracy by length and depth, before vs after.

    datagen eval-long --model runs/long/merged --baseline smollm2-135m --lengths 1024,2048,4096 \
        --out runs/long/eval --training-run long

- Perplexity: the held-out text (default: examples/heldout/heart_of_darkness.txt, a public-domain book no
  training default reads) is tokenized once; every length scores the same span of it, the first `windows`
  windows of the longest length that fits, cut into non-overlapping windows of that length, so a difference
  between lengths is the context, not the text. Perplexity is exp of the mean next-token loss over every
  predicted token of every window (LongLoRA eval.py evaluates PG19 and proof-pile the same way, with full
  attention).
- Passkey: LongLoRA's passkey_retrieval.py prompt (train/long_data.py) at each length and depth, greedy decoding
  of a few tokens, exact match of the first number against the key; 10 samples per cell (LongLoRA's
  passkey_retrieval.py runs 10 iterations per length).
- Held out, checked: the keys are drawn from their own random stream and every key that `datagen long-data`
  recorded in the training data (`--train-data`, or the dataset of `--training-run`) is excluded; a `--text`
  whose word 13-grams (GPT-3's contamination unit, Brown et al. 2020, appendix C) overlap that data's by more
  than 1% is refused. With no training data named, nothing can be checked and the report says so.
- Inputs as in training: the tokenizer's special tokens (a BOS where it adds one, as TRL does) start every window
  and every passkey prompt.
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

HELDOUT_TEXT = Path(__file__).resolve().parents[1] / "examples" / "heldout" / "heart_of_darkness.txt"
"""The default held-out text (provenance in examples/heldout/README.md)."""
OVERLAP_NGRAM = 13
OVERLAP_LIMIT = 0.01
"""Share of the held-out text's word 13-grams that may also be in the training data."""

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
    text: tuple[Path, ...] = (HELDOUT_TEXT,)
    """Held-out long text for perplexity (.jsonl with "text", or text files); empty: no perplexity."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 10
    """Passkey prompts per length and depth (different keys; LongLoRA: 10)."""
    windows: int = 4
    """Most perplexity windows of the longest length that fits the text; shorter lengths score the same span."""
    training_run: str | None = None
    """Name of the `datagen train` run that made the model, to link the store row (and find its training data)."""
    train_data: Path | None = None
    """The export the model was trained on (default: the training run's): its passkeys are excluded and --text
    must not overlap it."""
    device: str = "auto"
    """cpu, cuda, cuda:N...; auto: cuda when available."""
    dtype: str = "auto"
    """float32, bfloat16 or float16; auto: bfloat16 on a GPU that supports it, float32 otherwise."""
    seed: int = 0


@dataclass
class ModelResult:
    model: str
    perplexity: dict[int, float | None] = field(default_factory=dict)
    """length → perplexity (None: the text is shorter than one window)."""
    passkey: dict[int, dict[float, float]] = field(default_factory=dict)
    """length → depth → accuracy."""
    keys: list[int] = field(default_factory=list)
    """Every passkey asked, in order (the same for both models)."""


def check(config: EvalLongConfig) -> None:
    if not config.lengths or any(length < 16 for length in config.lengths):
        raise BadInput(f"--lengths {','.join(map(str, config.lengths))}: give lengths of at least 16 tokens")
    if any(not 0.0 <= d <= 1.0 for d in config.depths):
        raise BadInput("--depths: each depth must be in [0, 1]")
    for path in config.text:
        if not path.is_file():
            raise BadInput(f"--text {path}: no such file")
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise BadInput(f"--dtype {config.dtype}: expected auto, float32, bfloat16 or float16")
    if config.train_data is not None and not config.train_data.is_dir():
        raise BadInput(f"--train-data {config.train_data}: no such folder")


# --- Keeping the eval held out ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    path: Path
    passkeys: frozenset[int]
    """Every passkey in its rows (train and test splits)."""
    texts: list[str]
    """Prompt + completion of every row."""


def read_training_data(path: Path) -> TrainingData:
    """The passkeys `datagen long-data` recorded (rows of kind "passkey": the key is the completion) and the text
    of every row of an export folder."""
    from train.data import open_export

    export = open_export(path)  # BadInput for a folder that is not an export
    passkeys, texts = set(), []
    for split in export.splits.values():
        for row in split:
            prompt, completion = row.get("prompt") or "", row.get("completion") or ""
            if row.get("kind") == "passkey":
                passkeys.add(int(str(completion).strip()))
            texts.append(f"{prompt} {completion}" if isinstance(prompt, str) else json.dumps(row))
    return TrainingData(path, frozenset(passkeys), texts)


def _ngrams(text: str, n: int = OVERLAP_NGRAM) -> set[int]:
    words = text.lower().split()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def text_overlap(held_out: Sequence[str], training: Sequence[str]) -> float:
    """Share of the held-out texts' word 13-grams that are also in the training texts."""
    seen = set().union(*(_ngrams(t) for t in training)) if training else set()
    grams = set().union(*(_ngrams(t) for t in held_out)) if held_out else set()
    return len(grams & seen) / len(grams) if grams else 0.0


def eval_passkey_rng(seed: int) -> random.Random:
    """The eval's own stream of keys: `datagen long-data` draws from random.Random(seed) itself."""
    return random.Random(f"eval-long passkeys {seed}")


# --- Measuring (the model is a transformers causal LM in eval mode) -------------------------------------------------------


def perplexity_spans(lengths: Sequence[int], tokens: int, windows: int) -> dict[int, int]:
    """length → tokens scored (a multiple of it from the start of the text), the same span for every length
    that fits: `windows` windows of the longest length that fits; 0 for a length longer than the text."""
    fitting = [n for n in lengths if n <= tokens]
    if not fitting:
        return {n: 0 for n in lengths}
    span = min(windows, tokens // max(fitting)) * max(fitting)
    return {n: span // n * n if n <= tokens else 0 for n in lengths}


def perplexity(model, token_ids: Sequence[int], length: int, span: int, prefix: Sequence[int] = ()) -> float | None:
    """exp(mean next-token loss) over the windows of `length` in the first `span` tokens; each window starts with
    `prefix` (the tokenizer's BOS, if it adds one) followed by length - len(prefix) text tokens."""
    import torch

    if span < length:
        return None
    body = length - len(prefix)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, span - length + 1, length):
            ids = torch.tensor([[*prefix, *token_ids[start : start + body]]], device=model.device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over length - 1 predicted tokens
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def passkey_accuracy(model, tokenizer, length: int, depth: float, samples: int, rng: random.Random,
                     exclude: frozenset[int] = frozenset()) -> tuple[float, list[int]]:  # fmt: skip
    """Accuracy over `samples` prompts of at most `length` tokens (special tokens included), and their keys."""
    import torch

    def count_tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])  # with the special tokens the prompt is given below

    correct, keys = 0, []
    for _ in range(samples):
        sample = passkey_sample(count_tokens, length, depth, rng, exclude=exclude)
        keys.append(int(sample.completion))
        ids = tokenizer(sample.prompt, return_tensors="pt")["input_ids"].to(model.device)
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=PASSKEY_NEW_TOKENS,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        correct += passkey_correct(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True), sample.completion)
    return correct / samples, keys


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (a BOS for Llama's, none for SmolLM2's), as TRL's training
    tokenization does."""
    plain = tokenizer("The", add_special_tokens=False)["input_ids"]
    full = tokenizer("The")["input_ids"]
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def resolve_device(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, getattr(torch, dtype)


def evaluate_model(name: str, config: EvalLongConfig, texts: Sequence[str], exclude: frozenset[int],
                   progress: Callable[[], None]) -> ModelResult:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datagen import models

    path = models.resolve(name)
    device, dtype = resolve_device(config.device, config.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    token_ids = [t for text in texts for t in (*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)]
    spans = perplexity_spans(config.lengths, len(token_ids), config.windows)
    prefix = special_prefix(tokenizer)
    result = ModelResult(model=name)
    rng = eval_passkey_rng(config.seed)  # the same keys for both models
    for length in config.lengths:
        result.perplexity[length] = perplexity(model, token_ids, length, spans[length], prefix) if texts else None
        result.passkey[length] = {}
        for depth in config.depths:
            result.passkey[length][depth], keys = passkey_accuracy(model, tokenizer, length, depth, config.passkey_samples, rng, exclude)
            result.keys += keys
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
    notes = []
    for label, result in zip(labels, results):
        points = [(n, p) for n, p in result.perplexity.items() if p is not None and math.isfinite(p) and p > 0]
        missing = [n for n, p in result.perplexity.items() if (n, p) not in points]
        if points:
            axes.plot([n for n, _ in points], [p for _, p in points], "o-", label=f"{label}: {result.model}")
        if missing:  # shown as missing, never as a value: no --text, or the text is shorter than one window
            notes.append(f"{label}: no perplexity at {', '.join(map(str, missing))}")
    axes.set_xscale("log", base=2)
    if axes.lines:
        axes.set_yscale("log")
        axes.legend(fontsize=8)
    axes.set_xlim(min(config.lengths) / 1.5, max(config.lengths) * 1.5)
    if notes:
        axes.text(0.02, 0.02, "\n".join(notes), transform=axes.transAxes, fontsize=7, va="bottom")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.grid(alpha=0.3)
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
    from storage.tables import TrainingRun

    check(config)
    with Session(open_engine(db_url)) as session:
        run_id = training_run_id(session, config.training_run)  # an unknown name fails before any model loads
        train_path = config.train_data or (Path(session.get(TrainingRun, run_id).dataset) if run_id is not None else None)
    if train_path is not None and not train_path.is_dir():
        raise BadInput(f"--training-run {config.training_run}: its dataset {train_path} is gone; pass --train-data DIR")
    texts = read_corpus(config.text)
    training = read_training_data(train_path) if train_path is not None else None
    overlap = text_overlap(texts, training.texts) if training is not None and texts else None
    if overlap is not None and overlap > OVERLAP_LIMIT:
        raise BadInput(
            f"--text {', '.join(map(str, config.text))}: {overlap:.1%} of its word {OVERLAP_NGRAM}-grams are in the training "
            f"data {training.path}; perplexity on it would measure memorisation (give held-out text)"
        )
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
            results.append(evaluate_model(name, config, texts, training.passkeys if training else frozenset(), lambda: bar.advance(task)))
    if training is not None:  # passkey_sample excluded them; checked, not assumed
        assert not set(results[0].keys) & training.passkeys, "an eval passkey is a training key"
    device, dtype = resolve_device(config.device, config.dtype)
    report = {
        "lengths": list(config.lengths),
        "depths": list(config.depths),
        "passkey_samples": config.passkey_samples,
        "passkeys": results[0].keys,
        "text": [str(p) for p in config.text],
        "training_data": None if training is None else
            {"path": str(training.path), "passkeys_excluded": len(training.passkeys), "text_overlap": overlap},
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "models": {label: {"model": r.model, "perplexity": r.perplexity, "passkey": r.passkey}
                   for label, r in zip(_labels(results), results)},  # fmt: skip
        "table": table_rows(results, config.lengths),
    }
    report["plots"] = [str(p) for p in plot(results, config, out)]
    (out / RESULTS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["id"] = record(db_url, config, json.loads(json.dumps(report)))
    return report
