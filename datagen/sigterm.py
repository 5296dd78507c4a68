"""SIGTERM ends a pipeline run between two batches, never inside one.

A batch is one transaction, the store's unit of progress: interrupting one throws its work away. While a pipeline
command holds `stop_between_batches()`, SIGTERM only sets a flag; each batch loop (pipelines/bootstrap.py for
self-instruct and alpaca, pipelines/toolformer.py, datagen/generate.py) calls `check` before it starts a batch, and
`check` raises `Stopped` once the flag is set. The command stores the run as `stopped` with that message
(storage.store.record_failure), prints it as its one line and exits 143; rerunning it resumes after the last
committed batch. `datagen worker` forwards its SIGTERM to the job runs in flight (datagen/jobs/worker.py).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from datagen.errors import Stopped

_requested = threading.Event()


@contextmanager
def stop_between_batches() -> Iterator[None]:
    """While held, SIGTERM asks the batch loop to stop before its next batch; the previous handler comes back after.
    Outside the main thread (a library call in a worker thread) Python cannot install a handler: nothing is held."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: _requested.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def requested() -> bool:
    """SIGTERM came: a loop with a batch in flight (pipelines/bootstrap.py, pipelined) finishes it, then checks."""
    return _requested.is_set()


def check(committed: int, then: str = "rerun to resume") -> None:
    """Called before each batch, `committed` being the run's batches committed so far: Stopped if SIGTERM came."""
    if _requested.is_set():
        where = f"after batch {committed}" if committed else "before its first batch"
        raise Stopped(f"SIGTERM: stopped {where}; {then}")
