"""`datagen models`: list the embedded models and prepare them (convert GGUF to a cached safetensors folder)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from datagen import models
from datagen.console import err_console, print_json
from datagen.cli.options import JsonOption

app = typer.Typer(help="List and prepare the embedded models.", no_args_is_help=True)


@app.command("list")
def list_models(as_json: JsonOption = False) -> None:
    """List the embedded models: whether their package is installed and whether they are prepared."""
    rows = []
    for model in models.EMBEDDED_MODELS.values():
        try:
            installed = models.gguf_path(model).is_file()
        except Exception:
            installed = False
        rows.append(
            {
                "name": model.name,
                "default": model.name == models.DEFAULT_MODEL,
                "installed": installed,
                "prepared": models.is_prepared(model.name),
                "path": str(models.prepared_path(model)),
                "install": model.pip_install,
                "description": model.description,
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="Embedded models")
    for column in ("name", "default", "installed", "prepared", "path", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("name", "default", "installed", "prepared", "path", "description")))
    err_console.print(table)


@app.command("prepare")
def prepare(
    name: Annotated[str, typer.Argument(help="Embedded model to prepare.")] = models.DEFAULT_MODEL,
) -> None:
    """Check the packaged GGUF file's sha256 and convert it once into the cache (DATAGEN_CACHE or ~/.cache/datagen)."""
    if name not in models.EMBEDDED_MODELS:
        from datagen.errors import BadInput

        raise BadInput(f"unknown embedded model '{name}'; choose from: {', '.join(models.EMBEDDED_MODELS)}")
    with err_console.status(f"preparing {name} (first time: ~20 s)"):
        path = models.prepare(name)
    typer.echo(str(path))
