"""Claim-and-complete throughput of empty jobs through DBOS queues, with 1, 2 and 4 worker processes, on SQLite and
PostgreSQL: what scheduling a job run costs on top of the pipeline it runs.

    python bench/workers.py                                  # 200 jobs, 8 at a time per worker, queue polled every 0.1 s
    python bench/workers.py --jobs 30 --concurrency 1 --poll 1   # `datagen worker`'s defaults

Each worker is a process configured as `datagen worker` configures DBOS (datagen/jobs/worker.py: one queue, listened
to, its per-worker concurrency set before launch), running an empty workflow in place of `run_job`, whose real body is a pipeline
command that runs for minutes. All jobs are enqueued through a DBOS client, the workers started, and the clock runs from the first
job's dequeue to the last one's completion (DBOS's own timestamps); workers start one after another, so the first
fraction of a second of a many-worker figure has fewer workers. Per-job overhead is the worker time one job
costs: workers x wall time / jobs. Target: under 50 ms per job on PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUEUE = "bench"


def worker(url: str, concurrency: int, poll: float) -> None:
    from dbos import DBOS, DBOSClient

    @DBOS.workflow(name="empty")
    def empty(i: int) -> int:
        return i

    client = DBOSClient(system_database_url=url, application_name="datagen-bench")
    # As `datagen worker` does (datagen/jobs/schedules.py set_worker_limit): the limit set before launch.
    client.register_queue(QUEUE, worker_concurrency=concurrency, polling_interval_sec=poll, on_conflict="always_update")
    client.destroy()
    DBOS(config={"name": "datagen-bench", "system_database_url": url, "executor_id": uuid.uuid4().hex,
                 "application_version": "bench", "log_level": "WARNING"})  # fmt: skip
    DBOS.listen_queues([QUEUE])
    DBOS.launch()
    print("ready", flush=True)
    signal.sigwait([signal.SIGTERM])
    os._exit(0)


def measure(url: str, workers: int, jobs: int, concurrency: int, poll: float) -> float:
    """Wall seconds from the first job's dequeue to the last one's completion, all jobs enqueued before workers start."""
    from dbos import DBOS, DBOSClient

    DBOS.migrate(url)
    client = DBOSClient(system_database_url=url, application_name="datagen-bench")
    prefix = uuid.uuid4().hex[:8]
    for i in range(jobs):
        client.enqueue({"queue_name": QUEUE, "workflow_name": "empty", "workflow_id": f"{prefix}-{i}", "app_version": "bench"}, i)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, "--concurrency", str(concurrency), "--poll", str(poll)],
                              stdout=subprocess.PIPE, text=True) for _ in range(workers)]  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = client.list_workflows(workflow_id_prefix=prefix, status="SUCCESS", load_input=False, load_output=False)
            if len(done) == jobs:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"only {len(done)} of {jobs} jobs completed in 600 s")
        client.destroy()
        return (max(w.completed_at or w.updated_at for w in done) - min(w.dequeued_at for w in done)) / 1000
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="Job runs at a time per worker (datagen worker --concurrency).")
    parser.add_argument("--poll", type=float, default=0.1, help="Seconds between a worker's queue polls (datagen worker: 1).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.concurrency, args.poll)
        return
    from sqlalchemy import create_engine

    from tests.postgres import postgres_server

    print(f"command: python bench/workers.py {' '.join(sys.argv[1:])}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit: {commit}; machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; load average {os.getloadavg()[0]:.1f}")
    print(f"{args.jobs} empty jobs, {args.concurrency} at a time per worker, queue polled every {args.poll} s")
    print(f"{'store':10} {'workers':>7} {'wall s':>8} {'jobs/s':>8} {'scaling':>8} {'ms/job':>8}")
    for store in args.stores:
        first = None
        for n in args.workers:
            if store == "sqlite":
                url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-workers-')}/bench.db"
                seconds = measure(url, n, args.jobs, args.concurrency, args.poll)
            else:
                with postgres_server() as server:
                    name = f"bench_{uuid.uuid4().hex[:8]}"
                    with create_engine(server, isolation_level="AUTOCOMMIT").connect() as c:
                        c.exec_driver_sql(f"CREATE DATABASE {name}")
                    seconds = measure(server.rsplit("/", 1)[0] + f"/{name}", n, args.jobs, args.concurrency, args.poll)
            rate = args.jobs / seconds
            first = first or rate
            print(f"{store:10} {n:>7} {seconds:>8.2f} {rate:>8.1f} {rate / first:>7.2f}x {1000 * n * seconds / args.jobs:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
