"""`datagen long-data`: long training rows (packed documents, passkeys, long instructions from runs) mixed with
short ones, written as an export folder for `datagen train --context-length`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.cli.options import DbOption, JsonOption


def long_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output export folder (prompt-completion).")],
    length: Annotated[int, typer.Option(help="Target tokens per long row (the context length to train at).")] = 4096,
    model: Annotated[str, typer.Option("--model", "-m", help="Model whose tokenizer counts tokens.")] = "smollm2-135m",
    corpus: Annotated[Optional[list[Path]], typer.Option(help="Documents to pack: .jsonl with 'text', or text files; repeatable.")] = None,
    passkeys: Annotated[int, typer.Option(help="Passkey-retrieval rows, depths spread from 0 to 1.")] = 0,
    runs: Annotated[Optional[list[str]], typer.Option("--runs", help="datagen run whose tasks make long instruction rows; repeatable.")] = None,
    instructions: Annotated[int, typer.Option(help="Long instruction rows built from --runs.")] = 0,
    short: Annotated[Optional[Path], typer.Option(help="An alpaca or prompt-completion export to mix in as short rows.")] = None,
    short_share: Annotated[float, typer.Option(help="Share of short rows in the result (LongAlpaca: ~0.25).")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed of passkeys, task choice and mixing.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build long-context training data: packed documents, passkey retrieval and long instructions, mixed with short rows."""
    from train.long_data import LongDataConfig, build

    config = LongDataConfig(
        out=out, length=length, model=model, corpus=tuple(corpus or ()), passkeys=passkeys, runs=tuple(runs or ()),
        instructions=instructions, short=short, short_share=short_share, seed=seed, overwrite=overwrite,
    )  # fmt: skip
    counts = build(config, db)
    from datagen.console import err_console, print_json, summary_table

    if as_json:
        print_json({"out": str(out), **counts})
        return
    err_console.print(summary_table(f"Long data in {out}", [(k, v) for k, v in counts.items()]))
