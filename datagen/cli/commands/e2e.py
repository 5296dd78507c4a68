"""`datagen e2e`: generate → dedup → export → train → evaluate, for some rounds (datagen/e2e.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.console import err_console, print_json, summary_table
from datagen.cli.options import DbOption, JsonOption


def e2e(
    config: Annotated[Path, typer.Option("--config", "-c", help="Loop YAML (examples/e2e_tiny.yaml shows every section).")],
    rounds: Annotated[Optional[int], typer.Option("--rounds", "-r", help="Rounds; round r+1 generates with round r's tuned model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.md, metrics.json and every round's artifacts.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Loop name in the store; the same name resumes.")] = None,
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Evaluation items (records with outputs) instead of held-out seeds.")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes of every training run over its own rows.")] = None,
    replicates: Annotated[Optional[int], typer.Option("--replicates", help="Training runs per tuned model (training seeds seed, seed+1, ...).")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Self-Instruct's experiment in one command: tune on seeds + generated data, compare with the base and seeds alone."""
    from datagen.e2e import load_loop_config, run_loop
    from storage.run_lock import hold_run
    from storage.store import open_engine

    settings = load_loop_config(config, dict(rounds=rounds, out=out, name=name, eval_file=eval_file, epochs=epochs, replicates=replicates))
    started = time.perf_counter()
    engine = open_engine(db)
    with hold_run(engine, settings.name):  # one writer per loop, as per run (storage/run_lock.py)
        metrics = run_loop(settings, engine, db, log=lambda line: err_console.print(line, markup=False))
    if as_json:
        print_json(metrics)
        return
    rows = [("primary", metrics["primary"]["verdict"])]
    rows += [(name, f"loss per item {m['loss_per_item']:.4f} · ROUGE-L {m['rouge_l']:.4f} · degenerate {m['degeneration_rate']:.0%}")
             for name, m in metrics["models"].items()]
    rows += [("report", str(settings.out / "report.md")), ("seconds", round(time.perf_counter() - started, 1))]
    err_console.print(summary_table(f"Loop {settings.name}", rows))
