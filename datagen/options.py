"""CLI option types shared by every command (Typer's Annotated style), so flags read the same everywhere."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
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


def _check_base_urls(urls: list[str] | None) -> list[str] | None:
    """Each --base-url is checked while the command line is parsed: before any file is read or store opened."""
    from datagen.backends.openai_backend import server_root

    for url in urls or ():
        server_root(url)
    return urls


BaseUrlOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--base-url",
        callback=_check_base_urls,
        help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1; repeat for data-parallel servers.",
    ),
]
TimeoutOption = Annotated[
    Optional[float], typer.Option("--timeout", help="openai backend: seconds for one HTTP request (default: 120).")
]
ConcurrencyOption = Annotated[
    Optional[int], typer.Option("--concurrency", help="openai backend: requests in flight at once, over all servers (default: 8).")
]
ApiKeyOption = Annotated[
    Optional[str],
    typer.Option(
        "--api-key",
        envvar="OPENAI_API_KEY",
        show_default=False,
        help="openai backend: the servers' API key (sent as a Bearer token, never stored); default $OPENAI_API_KEY. "
        "Prefer the variable: a flag is visible to other users in `ps`.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
PricesOption = Annotated[
    Optional[Path],
    typer.Option("--prices", help="Price table (YAML, e.g. examples/prices.yaml) that turns tokens and device seconds into money at display time (default: $DATAGEN_PRICES; none: no money shown).", show_default=False),
]
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


class Servers(tuple):
    """The --base-url values of a command, with the other settings of talking to those servers
    (--timeout, --concurrency, --api-key), as `server_options` collects them. A tuple of the URLs, so a
    command passes it wherever it passed its base_url list."""

    timeout: float | None = None
    concurrency: int | None = None
    api_key: str | None = None


def server_options(command: Callable) -> Callable:
    """Give a generating command --timeout, --concurrency and --api-key next to its --base-url; the command's
    `base_url` argument then arrives as `Servers`, which `make_backend` reads. One place for every command
    that talks to a server (generate, self-instruct, alpaca, toolformer): applied where datagen/cli.py
    registers them."""
    # Typer reads the signature and the resolved annotations (strings under `from __future__ import annotations`).
    hints = typing.get_type_hints(command, include_extras=True)
    signature = inspect.signature(command)
    parameters = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for name, annotation in (("timeout", TimeoutOption), ("concurrency", ConcurrencyOption), ("api_key", ApiKeyOption))
    ]

    @functools.wraps(command)
    def wrapper(*args, timeout=None, concurrency=None, api_key=None, **kwargs):
        urls = kwargs.get("base_url")
        if not urls and (timeout is not None or concurrency is not None):
            raise BadInput("--timeout and --concurrency are for --backend openai with --base-url")
        if urls:
            if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
                raise BadInput(f"--timeout must be a number of seconds > 0, got {timeout}")
            if concurrency is not None and not 1 <= concurrency <= 4096:
                raise BadInput(f"--concurrency must be from 1 to 4096, got {concurrency}")
            servers = Servers(urls)
            servers.timeout, servers.concurrency, servers.api_key = timeout, concurrency, api_key
            kwargs["base_url"] = servers
        return command(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*parameters, *extra])
    wrapper.__annotations__ = {**hints, **{p.name: p.annotation for p in extra}}
    del wrapper.__wrapped__  # else inspect and typing would read the command's own, shorter, signature
    return wrapper


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


def make_backend(backend: BackendName, model: str, base_url: Sequence[str] | None) -> Backend:
    """Build the backend the flags ask for; the openai backend needs --base-url. The API key is passed to the
    backend only, never stored; a run's config and errors show base URLs with their credentials masked."""
    from datagen.backends import resolve_backend_name

    name = resolve_backend_name(backend)
    if name is BackendName.openai:
        if not base_url:
            raise BadInput("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        options = {}
        if isinstance(base_url, Servers):
            options = {k: v for k in ("timeout", "concurrency", "api_key") if (v := getattr(base_url, k)) is not None}
        return load_backend(name, model, base_urls=list(base_url), notify=_notify, **options)
    if base_url:
        raise BadInput("--base-url is only for --backend openai")
    return load_backend(name, model)


def _notify(message: str) -> None:
    """Backend notices (a server taken out of rotation, back in): one line above the progress bar."""
    from datagen.console import err_console

    err_console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
