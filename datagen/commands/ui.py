"""`datagen ui`: serve the run viewer (datagen/ui/) over the store."""

from __future__ import annotations

import getpass
import ipaddress
from typing import Annotated, Optional

import typer

from datagen.console import err_console
from datagen.errors import BadInput, MissingExtra
from datagen.options import DbOption
from storage.store import _safe, database_url, open_engine


def is_loopback(host: str) -> bool:
    """127.x or localhost: served with the Host check. (IPv6 ::1 is served as non-local: Starlette's Host check cannot
    parse a bracketed IPv6 Host header.)"""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address.is_loopback


def ui(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but 127.0.0.1/localhost exposes the store to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    allow_edits: Annotated[bool, typer.Option("--allow-edits", help="Let the item pages reject an item by hand (recorded with who and when; export honours it).")] = False,
    curator: Annotated[Optional[str], typer.Option(help="Name recorded with manual verdicts (default: your user name); needs --allow-edits.")] = None,
) -> None:
    """Browse runs, items, rejections with their reasons, lineage and plots in a web browser (read-only by default)."""
    try:
        import uvicorn

        from datagen.ui.app import create_app
    except ModuleNotFoundError as err:
        raise MissingExtra(err.name or "fastapi", "ui") from None
    if not 0 < port < 65536:
        raise BadInput(f"--port must be between 1 and 65535, not {port}")
    if curator is not None and not allow_edits:
        raise BadInput("--curator names who edits: it needs --allow-edits")
    engine = open_engine(db, create=False)  # read-only: no database is made for a viewer
    local = is_loopback(host)
    if not local:
        err_console.print(
            f"[bold yellow]warning:[/] listening on {host}: anyone who can reach this machine can read the store "
            "(prompts, completions, configs); use --host 127.0.0.1 to keep it local"
        )
    err_console.print(f"datagen ui{' (edits allowed)' if allow_edits else ''}: {_safe(database_url(db))} at http://{'127.0.0.1' if local else host}:{port}/ (Ctrl+C stops)")
    app = create_app(engine, local_only=local, curator=(curator or getpass.getuser()) if allow_edits else None)
    uvicorn.run(app, host=host, port=port, log_level="warning")
