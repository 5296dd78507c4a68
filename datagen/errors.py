"""One error hierarchy, mapped to the CLI's exit codes (0 ok, 1 failure, 2 bad usage or bad input)."""


class DatagenError(Exception):
    """A failure the user should read as one line, without a traceback (exit 1)."""

    exit_code = 1


class BadInput(DatagenError):
    """Malformed input files or options: the message names the file, line and field (exit 2)."""

    exit_code = 2


class Stopped(DatagenError):
    """SIGTERM stopped a run between two batches (datagen/sigterm.py): stored `stopped`, resumed by a rerun. Exit 143,
    what a shell reports for a process ended by SIGTERM."""

    exit_code = 128 + 15


class MissingExtra(DatagenError):
    """An optional dependency is not installed; the message names the pip command that fixes it (exit 2)."""

    exit_code = 2

    def __init__(self, package: str, extra: str):
        super().__init__(f"this needs the '{package}' package: pip install 'datagen[{extra}]'")


class StoreError(DatagenError):
    """The database cannot be reached, or its schema is newer than this datagen (exit 1)."""
