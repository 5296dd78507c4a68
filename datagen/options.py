"""CLI option types shared by every command (Typer's Annotated style), so flags read the same everywhere."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional, Union

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


def typed_options(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` checked against the types of the dataclass `cls`'s fields, before the config is built: a YAML
    `temperature: hot` or `num_instructions: abc` is BadInput naming `source` and the key, not a TypeError later.
    Integers are accepted for float fields (and become floats); lists for tuple fields."""
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        hint = hints[key]
        if typing.get_origin(hint) in (Union, types.UnionType):
            if value is None and type(None) in typing.get_args(hint):
                checked[key] = None
                continue
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if hint is bool:
            ok, kind = isinstance(value, bool), "true or false"
        elif hint is int:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif hint is float:
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        elif hint is str:
            ok, kind = isinstance(value, str), "a string"
        elif typing.get_origin(hint) is tuple:
            ok, kind = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of strings"
            value = tuple(value) if ok else value
        else:
            ok, kind = True, ""
        if not ok:
            raise BadInput(f"{source}: option '{key}' must be {kind}, got {value!r}")
        checked[key] = value
    return checked


def option_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


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
