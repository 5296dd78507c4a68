"""A job run's command as the worker starts it: `python -m datagen.jobs.child PIPELINE OPTIONS` is
`datagen PIPELINE OPTIONS` that dies with its worker (it execs `python -m datagen.cli`).

The worker starts it in a session of its own (subprocess's start_new_session, which needs no code run between fork
and exec), and the child asks the kernel here, in itself, for SIGKILL when the worker goes (prctl PR_SET_PDEATHSIG,
Linux), so a worker killed with -9 leaves no run writing behind it. Setting that from the worker, in a preexec_fn,
is not safe: the worker has threads, and a child forked from a threaded process may deadlock before exec
(Python's subprocess documentation, preexec_fn). SIGTERM needs nothing here: each pipeline command sets its own handler
(datagen/sigterm.py) and the worker sends SIGTERM to the child it started.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with(worker_pid: int) -> None:
    """SIGKILL when the worker's thread that started this process ends; exit at once if the worker is gone already
    (it died between starting this process and this call, and this process was handed to init)."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:
        os._exit(128 + signal.SIGKILL)


if __name__ == "__main__":
    die_with(int(os.environ["DATAGEN_WORKER_PID"]))
    # exec keeps the death signal (it is cleared only for set-user-ID programs) and keeps the jobs layer from
    # importing the CLI above it (tests/test_layers.py)
    os.execv(sys.executable, [sys.executable, "-m", "datagen.cli", *sys.argv[1:]])
