"""CLI option types shared by every command (Typer's Annotated style), so flags read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from datagen.backends import BackendName, ServerOptions
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


def server_options(base_url: list[str] | None, timeout: float | None, concurrency: int | None, api_key: str | None) -> ServerOptions:
    """--timeout, --concurrency and --api-key of a command that talks to servers, checked before anything is read:
    the first two only make sense with --base-url."""
    if not base_url and (timeout is not None or concurrency is not None):
        raise BadInput("--timeout and --concurrency are for --backend openai with --base-url")
    return ServerOptions(timeout=timeout, concurrency=concurrency, api_key=api_key)


def notify(message: str) -> None:
    """Backend notices (a server taken out of rotation, back in): one line above the progress bar."""
    from datagen.console import err_console

    err_console.print(f"note: {message}", markup=False, highlight=False, soft_wrap=True)
