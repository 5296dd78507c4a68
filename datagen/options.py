"""CLI option types shared by every command (Typer's Annotated style), so flags read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.backends import Backend, BackendName, load_backend

DbOption = Annotated[
    Optional[str],
    typer.Option("--db", envvar="DATAGEN_DB", help="SQLAlchemy URL of the store (default: sqlite:///datagen.db)."),
]
ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name, local Hugging Face folder, or hub id (with DATAGEN_ALLOW_HUB=1).")
]
BackendOption = Annotated[
    BackendName, typer.Option("--backend", "-b", help="auto: vllm if installed and a GPU is present, else transformers.")
]
BaseUrlOption = Annotated[
    Optional[list[str]],
    typer.Option("--base-url", help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1; repeat for data-parallel servers."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML file of options; flags given on the command line win.")
]


def make_backend(backend: BackendName, model: str, base_url: list[str] | None) -> Backend:
    """Build the backend the flags ask for; the openai backend needs --base-url."""
    from datagen.backends import resolve_backend_name
    from datagen.errors import BadInput

    name = resolve_backend_name(backend)
    if name is BackendName.openai:
        if not base_url:
            raise BadInput("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        return load_backend(name, model, base_urls=base_url)
    if base_url:
        raise BadInput("--base-url is only for --backend openai")
    return load_backend(name, model)
