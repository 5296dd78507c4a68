"""`datagen eval-long`: perplexity by context length and passkey accuracy by length and depth, before vs after."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.errors import BadInput
from datagen.cli.options import DbOption, JsonOption


def _numbers(option: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BadInput(f"{option} {text}: expected comma-separated numbers, e.g. 1024,2048,4096") from None


def eval_long(
    model: Annotated[str, typer.Option("--model", "-m", help="The extended model (merged or full fine-tune folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for eval_long.json and the PNGs.")],
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048,4096",
    baseline: Annotated[Optional[str], typer.Option(help="The model before the extension, for the before/after table.")] = None,
    text: Annotated[Optional[list[Path]], typer.Option(help="Held-out long text for perplexity (.jsonl 'text' or text file); repeatable. Default: examples/heldout/heart_of_darkness.txt.")] = None,
    no_text: Annotated[bool, typer.Option("--no-text", help="No perplexity (passkeys only).")] = False,
    train_data: Annotated[Optional[Path], typer.Option(help="The export the model was trained on (default: --training-run's): its passkeys are excluded, --text must not overlap it.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N; auto: cuda when available.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16; auto: bfloat16 on a GPU, float32 on CPU.")] = "auto",
    depths: Annotated[str, typer.Option(help="Passkey depths (0 = start, 1 = end), comma-separated.")] = "0,0.25,0.5,0.75,1",
    samples: Annotated[int, typer.Option(help="Passkey prompts per length and depth (LongLoRA: 10).")] = 10,
    windows: Annotated[int, typer.Option(help="Most perplexity windows of the longest length; every length scores that span.")] = 4,
    training_run: Annotated[Optional[str], typer.Option(help="The `datagen train` run that made --model (links the store row).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the passkeys.")] = 0,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a long-context model: perplexity by length, passkey accuracy by length and depth, PNGs, a store row."""
    from train.eval_long import HELDOUT_TEXT, EvalLongConfig, run

    if samples < 1 or windows < 1:
        raise BadInput("--samples and --windows must be at least 1")
    if no_text and text:
        raise BadInput("--no-text and --text: give one")
    config = EvalLongConfig(
        model=model, out=out, lengths=_numbers("--lengths", lengths, int), baseline=baseline,
        text=() if no_text else tuple(text or (HELDOUT_TEXT,)), depths=_numbers("--depths", depths, float), passkey_samples=samples,
        windows=windows, training_run=training_run, train_data=train_data, device=device, dtype=dtype, seed=seed,
    )  # fmt: skip
    report = run(config, db)
    from rich.table import Table

    from datagen.console import err_console, print_json

    if as_json:
        print_json(report)
        return
    columns = list(report["table"][0])
    table = Table(title=f"Long-context eval of {model}" + (f" vs {baseline}" if baseline else ""), title_justify="left")
    for column in columns:
        table.add_column(column, justify="right")
    for row in report["table"]:
        table.add_row(*("-" if row[c] is None else f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    err_console.print(table)
    err_console.print(f"plots: {', '.join(report['plots'])}")
