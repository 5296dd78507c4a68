"""`datagen ui`: serve the run viewer (datagen/ui/) over the store."""

from __future__ import annotations

import getpass
import ipaddress
import socket
from typing import Annotated, Optional

import typer

from datagen.console import err_console
from datagen.errors import BadInput, MissingExtra
from datagen.cost import load_prices
from datagen.cli.options import DbOption, PricesOption
from storage.store import _safe, database_url, open_engine


def is_loopback(host: str) -> bool:
    """127.x, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_host_names(host: str, extra: list[str]) -> tuple[str, ...]:
    """The names a request's Host header may give (IP addresses always pass): localhost; serving the network, also the
    name it listens on and the machine's own names; and any --allowed-host (a name a proxy or DNS gives it)."""
    names = ["localhost", *extra]
    if not is_loopback(host):
        names += [socket.gethostname(), socket.getfqdn()]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            names.append(host)
    return tuple(dict.fromkeys(name.lower() for name in names))


def browse_url(host: str, port: int) -> str:
    """The URL to open: an address that listens everywhere is opened on loopback; IPv6 goes in brackets (RFC 3986)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}/"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}/" if address.version == 6 else f"http://{address}:{port}/"


def ui(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but 127.0.0.1/localhost exposes the store to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    allow_edits: Annotated[bool, typer.Option("--allow-edits", help="Let the item pages reject an item by hand (recorded with who and when; export honours it).")] = False,
    curator: Annotated[Optional[str], typer.Option(help="Name recorded with manual verdicts (default: your user name); needs --allow-edits.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="Another host name the Host header may give (repeatable; IP addresses and localhost always pass).")] = None,
    prices: PricesOption = None,
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
    price_table = load_prices(prices)
    engine = open_engine(db, create=False)  # read-only: no database is made for a viewer
    local = is_loopback(host)
    if not local:
        err_console.print(
            f"[bold yellow]warning:[/] listening on {host}: anyone who can reach this machine can read the store "
            "(prompts, completions, configs); use --host 127.0.0.1 to keep it local"
        )
    err_console.print(f"datagen ui{' (edits allowed)' if allow_edits else ''}: {_safe(database_url(db))} at {browse_url(host, port)} (Ctrl+C stops)")
    names = allowed_host_names(host, allowed_host or [])
    app = create_app(engine, allowed_hosts=names, curator=(curator or getpass.getuser()) if allow_edits else None)
    app.state.prices = price_table  # run pages price tokens and seconds with it (datagen/cost.py)
    uvicorn.run(app, host=host, port=port, log_level="warning")
