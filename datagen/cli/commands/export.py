"""`datagen export`: accepted rows of runs → a Hugging Face dataset folder with a dataset card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from sqlmodel import Session

from datagen.console import err_console, print_json, summary_table
from datagen.export import CONTAMINATION_NGRAM, DECONTAMINATION_THRESHOLD, ExportConfig, Format, check_repo_id, export, push_to_hub
from datagen.cli.options import DbOption, JsonOption
from storage.store import open_engine


def export_command(
    runs: Annotated[list[str], typer.Option("--run", help="Run name or id, or a sharded job's name (its shard runs); repeat to merge runs.")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Columns trainers read (see the dataset card).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (save_to_disk + data/*.parquet, *.jsonl + README.md).")],
    test_size: Annotated[float, typer.Option(help="Share of instructions held out as the test split; 0: train only.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the split (0 or more).")] = 0,
    with_provenance: Annotated[bool, typer.Option(help="Add run, model, generation_id and similarity columns.")] = False,
    decontaminate: Annotated[
        Optional[Path], typer.Option(help="JSONL evaluation set (instruction, question or text field): drop overlapping rows.")
    ] = None,
    decontamination_threshold: Annotated[float, typer.Option(help="ROUGE-L F above which an instruction matches an eval item.")] = DECONTAMINATION_THRESHOLD,
    ngram: Annotated[int, typer.Option(help="Shared word n-gram length that marks contamination.")] = CONTAMINATION_NGRAM,
    system: Annotated[Optional[str], typer.Option(help="System turn for --format messages.")] = None,
    license: Annotated[str, typer.Option(help="License id for the card, e.g. apache-2.0 (check the seeds' and the model's terms).")] = "other",
    license_name: Annotated[Optional[str], typer.Option(help="With --license other: the card's license_name id.")] = None,
    language: Annotated[str, typer.Option(help="Language code for the card.")] = "en",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out (only a folder datagen exported).")] = False,
    ignore_curation: Annotated[bool, typer.Option(help="Also export the instances `datagen curate` dropped.")] = False,
    push_to_hub_repo: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also upload to the Hub as OWNER/NAME.")] = None,
    private: Annotated[bool, typer.Option(help="Make the Hub repository private.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export accepted instructions and instances as a datasets.DatasetDict with a dataset card."""
    config = ExportConfig(
        runs=tuple(runs), format=format, out=out, test_size=test_size, seed=seed, with_provenance=with_provenance,
        decontaminate=decontaminate, decontamination_threshold=decontamination_threshold, ngram=ngram, system=system,
        license=license, license_name=license_name, language=language, overwrite=overwrite,
        ignore_curation=ignore_curation,
    )  # fmt: skip
    if push_to_hub_repo:
        check_repo_id(push_to_hub_repo)
    with Session(open_engine(db, create=False)) as session:
        result = export(session, config)
    url = push_to_hub(result.dataset, out, push_to_hub_repo, private) if push_to_hub_repo else None
    counts = result.counts
    if as_json:
        print_json({"out": str(out), "format": format.value, "columns": result.columns, "counts": counts, "hub": url})
        return
    unit, skipped = ("texts", "texts without a kept call (skipped)") if format is Format.toolformer else (
        "instructions", "instructions without instances (skipped)")  # fmt: skip
    rows = [("format", format.value), ("rows", counts["rows"]), (unit, counts["tasks"])]
    rows += [(split, counts[split]) for split in ("train", "test") if split in counts]
    rows += [(skipped, counts["tasks_without_instances"])]
    rows += [(f"decontaminated ({reason})", n) for reason, n in counts["decontaminated"].items()]
    rows += [("dropped by curation", counts["curated_out"])] if counts["curated_out"] else []
    rows += [("written to", str(out))] + ([("pushed to", url)] if url else [])
    err_console.print(summary_table(f"Export of {', '.join(f.name for f in result.runs)}", rows))
