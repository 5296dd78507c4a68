"""A throwaway PostgreSQL server for tests: DATAGEN_TEST_POSTGRES_URL if set, else initdb + pg_ctl
in a temporary folder on a free loopback port (as the `postgres` user when running as root, since
the server refuses to run as root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version_dir / name).exists():
            return str(version_dir / name)
    return None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a SQLAlchemy URL of an empty database; raise RuntimeError if no server can be had."""
    if url := os.environ.get("DATAGEN_TEST_POSTGRES_URL"):
        yield url
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql) and DATAGEN_TEST_POSTGRES_URL is unset")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="datagen-pg-"))
    data = root / "data"
    if as_user:
        shutil.chown(root, "postgres")
    port = _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "datagen", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
         "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://datagen@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
