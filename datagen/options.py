"""CLI option types shared by every command (Typer's Annotated style), so flags read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from datagen.backends import Backend, BackendName, load_backend
from datagen.errors import BadInput

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


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config YAML file as a mapping of option names to values; a missing, invalid or non-mapping file is BadInput."""
    if not path.is_file():
        raise BadInput(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BadInput(f"{path}: invalid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise BadInput(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded


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
