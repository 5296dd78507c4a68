"""One error hierarchy, mapped to the CLI's exit codes (0 ok, 1 failure, 2 bad usage or bad input, 3 stopped early)."""


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


class StoppedEarly(DatagenError):
    """A run stopped before its target by its own rule: the request budget (`max_requests`) spent, or the stall guard
    (`max_stalled_batches` batches in a row accepted nothing). Stored `stopped` with the reason; a rerun under the same
    name with a larger budget resumes it. Exit 3, so a caller (the job worker, a shell script) tells it from a failure
    by the exit code alone."""

    exit_code = 3

    def __init__(self, run: str, reason: str):
        super().__init__(f"stopped before the target: {reason}")
        self.run = run
        self.reason = reason


class MissingExtra(DatagenError):
    """An optional dependency is not installed; the message names the pip command that fixes it (exit 2)."""

    exit_code = 2

    def __init__(self, package: str, extra: str):
        super().__init__(f"this needs the '{package}' package: pip install 'datagen[{extra}]'")


class StoreError(DatagenError):
    """The database cannot be reached, or its schema is newer than this datagen (exit 1)."""
