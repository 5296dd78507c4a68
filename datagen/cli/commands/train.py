"""`datagen train`: fine-tune a model on a `datagen export` (full, LoRA, QLoRA or DoRA).

Flags left out fall back to the YAML file (--config), then to the defaults in train/config.py; any option of the
config can also be set with `--set key=value`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.cli.options import ConfigOption, DbOption, JsonOption
from train.config import Method, Precision, load_config, parse_set
from train.rope import RopeType


def train(
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="A `datagen export` folder, or a run name/id to export on the fly.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder: adapter or model, merged/, checkpoints/, summary.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model: embedded name, local folder or hub id (default: smollm2-135m).")] = None,
    method: Annotated[Optional[Method], typer.Option(help="full, lora, qlora (4-bit NF4 base) or dora (default: lora).")] = None,
    config: ConfigOption = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config option as key=value (YAML value); repeatable.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training split (default: 3).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 2e-4 for adapters, 2e-5 for full).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Examples per device per micro-batch (default: 4).")] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per step (default: 4).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example / packed row (default: 1024).")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Pack examples into rows (no attention across them).")] = None,
    completion_only_loss: Annotated[Optional[bool], typer.Option("--completion-only-loss/--full-loss", help="Mask the prompt out of the loss (default: on).")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="Adapter rank (default: 16).")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="Adapter scaling numerator (default: 32).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="Adapter dropout (default: 0.05).")] = None,
    precision: Annotated[Optional[Precision], typer.Option(help="auto: bf16 on a GPU that has it, else fp32.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward: less memory, ~30% slower (default: on).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for adapter init, shuffling and dropout (default: 42).")] = None,
    context_length: Annotated[Optional[int], typer.Option(help="Extend the model to this many positions by RoPE scaling; --max-length defaults to it.")] = None,
    rope: Annotated[Optional[RopeType], typer.Option(help="RoPE scaling with --context-length: linear or yarn (default: linear); dynamic is refused (vLLM serves it differently).")] = None,
    rope_factor: Annotated[Optional[float], typer.Option(help="RoPE scaling factor (default: context length / the model's positions).")] = None,
    s2_attn: Annotated[Optional[bool], typer.Option("--s2-attn/--no-s2-attn", help="Train with LongLoRA's shifted sparse attention (full attention after).")] = None,
    trainable: Annotated[Optional[str], typer.Option(help="Adapters: also train these in full, comma-separated: embed,norm (LongLoRA's LoRA+).")] = None,
    merge: Annotated[Optional[bool], typer.Option("--merge/--no-merge", help="Also write OUT/merged (adapter merged into the base).")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue from the last checkpoint in OUT/checkpoints.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace an existing OUT.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Training run name in the store (default: train-METHOD-TIMESTAMP).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune a model on a datagen export: full, LoRA, QLoRA or DoRA, with eval loss, checkpoints and a merged model."""
    flags = dict(
        data=data, out=out, model=model, method=method, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length,
        packing=packing, completion_only_loss=completion_only_loss, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, precision=precision, gradient_checkpointing=gradient_checkpointing, seed=seed,
        merge=merge, resume=resume, overwrite=overwrite, name=name, context_length=context_length, rope=rope,
        rope_factor=rope_factor, s2_attn=s2_attn,
        trainable=[part.strip() for part in trainable.split(",") if part.strip()] if trainable is not None else None,
    )  # fmt: skip
    settings = load_config(config, {**parse_set(set_), **{k: v for k, v in flags.items() if v is not None}})

    from train.sft import SFTRecipe  # torch, transformers, trl: loaded only once the options are valid

    recipe = SFTRecipe(settings, db_url=db)
    recipe.setup()
    summary = recipe.train()
    if not recipe.state.is_main_process:
        return
    from datagen.console import err_console, print_json, summary_table

    if as_json:
        print_json(summary)
        return
    serve = summary.get("merged") or (summary["out"] if settings.method is Method.full else None)
    rows = [
        ("method", summary["method"]), ("model", summary["model"]), ("dataset", f"{summary['dataset']} ({summary['format']})"),
        ("steps", summary["steps"]), ("train tokens", summary["train_tokens"]), ("tokens/s", summary["tokens_per_s"]),
        ("peak memory (GB)", round(summary["peak_memory_bytes"] / 1e9, 2)),
        ("eval loss before", summary["initial_eval_loss"]), ("eval loss after", summary["eval_loss"]),
        ("final train loss", summary["final_train_loss"]), ("written to", summary["out"]),
    ]  # fmt: skip
    if serve:
        rows.append(("generate with", f"datagen generate PROMPTS --model {serve}"))
    err_console.print(summary_table(f"Training run {summary['name']}", rows))
