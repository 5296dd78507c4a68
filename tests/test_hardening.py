"""Bad input, odd options, faults and concurrency, as a user meets them: `datagen` runs as a real subprocess
(CliRunner would hide tracebacks and exit codes of uncaught errors), in a fresh working directory, so the
default store is ./datagen.db and "nothing written" is checked on disk."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlmodel import Session, select

from datagen.backends import Request, SamplingParams
from datagen.errors import BadInput, DatagenError
from datagen.jsonl import read_records, write_records
from storage.tables import SCHEMA_VERSION
from tests.conftest import REPO

PROMPT = '{"prompt": "The capital of France is"}\n'


def datagen(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "datagen.cli", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def assert_one_line(result: subprocess.CompletedProcess, code: int, text: str, mid_run: bool = False) -> None:
    """The exit code, no traceback, and the error as one line: the only line, or (mid_run) the last line, after
    the progress bar's final state."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or mid_run, result.stderr
    assert lines[-1].startswith("error: ") and text in lines[-1], lines[-1]
    assert not any(line.startswith("error: ") for line in lines[:-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- input files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x", "id": ' + "9" * 5000 + "}", "prompts.jsonl:1: invalid JSON (an integer with more than 4300 digits)"),
        ('{"prompt": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}", "prompts.jsonl:1: invalid JSON (arrays or objects nested too deeply)"),
    ],
    ids=["huge-integer", "deep-nesting"],  # not the 200k-character line: pytest puts the id in PYTEST_CURRENT_TEST, too long for exec
)
def test_huge_integers_and_deep_nesting_are_one_line(tmp_path, line, message):
    (tmp_path / "prompts.jsonl").write_text(PROMPT + line + "\n")
    result = datagen("generate", "prompts.jsonl", cwd=tmp_path)
    assert_one_line(result, 2, message.replace("prompts.jsonl:1", "prompts.jsonl:2"))
    assert not (tmp_path / "datagen.db").exists()


def test_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string; str.splitlines() splits at them."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a\u2028b\u0085c\u2029d"}\r\n{"prompt": "e"}\n', encoding="utf-8")
    assert read_records(path) == [(1, {"prompt": "a\u2028b\u0085c\u2029d"}), (2, {"prompt": "e"})]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        write_records(tmp_path / "folder", [{"a": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


# ---- options ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "option, message",
    [
        (["--batch-size", "0"], "batch_size must be an integer from 1 to"),
        (["--batch-size", "-3"], "batch_size must be an integer from 1 to"),
        (["--n", "99999999999999999999"], "n must be an integer from 1 to 128, got 99999999999999999999"),
        (["--max-tokens", "0"], "max_tokens must be an integer from 1 to"),
        (["--max-tokens", "99999999999999999999"], "max_tokens must be an integer from 1 to"),
        (["--seed", "-1"], "seed must be an integer from 0 to"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
        (["--top-p", "5"], "top_p must be in (0, 1], got 5.0"),
        (["--out", "."], "--out .: is a folder; give a file name"),
        (["--out", "missing/x.jsonl"], "--out missing/x.jsonl: the folder missing does not exist"),
        (["--backend", "openai", "--base-url", "localhost:8000"], "base URL 'localhost:8000' must start with http://"),
        (["--base-url", "http://127.0.0.1:1", "--timeout", "0"], "--timeout must be a number of seconds > 0"),
        (["--timeout", "5"], "--timeout and --concurrency are for --backend openai"),
        (["--db", "sqlite:///nowhere/x.db"], "--db sqlite:///nowhere/x.db: the folder nowhere does not exist"),
    ],
)
def test_bad_generate_options_fail_before_any_work(tmp_path, option, message):
    """Each is checked before a model loads (these take well under the ~5 s a model load takes) and before the
    store is opened: no database file, no run row, no output file."""
    (tmp_path / "prompts.jsonl").write_text(PROMPT)
    started = time.perf_counter()
    result = datagen("generate", "prompts.jsonl", *option, cwd=tmp_path)
    assert_one_line(result, 2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    assert time.perf_counter() - started < 60


def test_dedup_out_must_be_a_file_in_a_folder_that_exists(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"instruction": "Write a poem."}\n')
    (tmp_path / "out").mkdir()
    assert_one_line(datagen("dedup", "in.jsonl", "--out", "out", cwd=tmp_path), 2, "--out out: is a folder")
    assert_one_line(datagen("dedup", "in.jsonl", "--pairs", "no/p.jsonl", cwd=tmp_path), 2, "--pairs no/p.jsonl: the folder no")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs", "show", "nope"], "no database at datagen.db"),
        (["runs", "list"], "no database at datagen.db"),
        (["dedup", "--run", "nope"], "no database at datagen.db"),
    ],
)
def test_reading_commands_never_create_a_database(tmp_path, args, message):
    assert_one_line(datagen(*args, cwd=tmp_path), 2, message)
    assert not any(tmp_path.iterdir())


def test_an_unknown_run_in_an_existing_database(tmp_path):
    from storage.store import open_engine

    open_engine(f"sqlite:///{tmp_path / 'datagen.db'}").dispose()
    assert_one_line(datagen("runs", "show", "nope", cwd=tmp_path), 2, "no run named or numbered 'nope'")


def test_unreachable_database_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "prompts.jsonl").write_text(PROMPT)
    started = time.perf_counter()
    result = datagen("generate", "prompts.jsonl", "--db", "postgresql+psycopg://u:secret@127.0.0.1:1/x", cwd=tmp_path)
    assert_one_line(result, 1, "cannot open the database postgresql+psycopg://u:***@127.0.0.1:1/x")
    assert "secret" not in result.stderr and time.perf_counter() - started < 60


# ---- offline ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allow_hub, offline", [(None, True), ("1", False)])
def test_the_cli_sets_hub_offline_before_any_hugging_face_import(allow_hub, offline):
    """Without HF_HUB_OFFLINE in the environment (the test session sets it): importing the CLI must set it before
    huggingface_hub reads it, once, at import."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DATAGEN_ALLOW_HUB")}
    if allow_hub:
        env["DATAGEN_ALLOW_HUB"] = allow_hub
    code = ("import datagen.cli, os; import huggingface_hub.constants as hub, datasets.config as ds; "
            "print(hub.HF_HUB_OFFLINE, ds.HF_DATASETS_OFFLINE, os.environ.get('TRANSFORMERS_OFFLINE'))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ([str(offline), str(offline), "1"] if offline else ["False", "False", "None"])


# ---- the store under concurrency --------------------------------------------------------------------------------

OPEN_AT = "import sys, time\nfrom storage.store import open_engine\nat = float(sys.argv[2])\ntime.sleep(max(0, at - time.time()))\nopen_engine(sys.argv[1]).dispose()\n"


def _open_at_once(url: str, processes: int) -> list[subprocess.CompletedProcess]:
    """`processes` real processes that all open `url` at the same instant (after their imports)."""
    at = time.time() + 8
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    running = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(at)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]  # fmt: skip
    for process in running:
        process.wait(timeout=120)
    return running


def _schema_rows(url: str) -> list:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT key, value FROM schema_info")).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def test_many_processes_open_one_new_sqlite_file(tmp_path):
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'new{attempt}.db'}"
        for process in _open_at_once(url, 6):
            assert process.returncode == 0, process.stderr.read()
        assert _schema_rows(url) == [("schema_version", str(SCHEMA_VERSION))]


def test_many_processes_open_one_new_postgres_database(postgres_url):
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_url)
    for attempt in range(2):
        name = f"race_{os.getpid()}_{attempt}"
        with psycopg.connect(admin.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = admin.set(database=name).render_as_string(hide_password=False)
        for process in _open_at_once(url, 8):
            assert process.returncode == 0, process.stderr.read()
        assert _schema_rows(url) == [("schema_version", str(SCHEMA_VERSION))]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def _wait_until_idle(pid: int, window: float = 1.5) -> None:
    """Until the process used (almost) no CPU for `window` seconds: a generating process keeps the CPU busy, one
    in SQLite's busy handler sleeps. On a loaded machine a batch takes seconds, so a fixed sleep would not do."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        before = _cpu_ticks(pid)
        time.sleep(window)
        if _cpu_ticks(pid) - before <= 1:
            return
    raise AssertionError("the run never waited for the lock")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc")
def test_a_locked_database_fails_the_run_in_one_line_and_keeps_its_rows(tmp_path, embedded_model_path):
    """Another process holds the write lock mid-run for longer than DATAGEN_DB_LOCK_TIMEOUT: the batch's write
    waits that long (SQLite's busy handler retries it), then fails; once the lock is released the run is marked
    failed, the batches committed before are kept, and the user reads one line (exit 1)."""
    from storage.tables import Generation, Run

    lines = "".join(json.dumps({"prompt": f"Count to {i}:"}) + "\n" for i in range(40))
    (tmp_path / "prompts.jsonl").write_text(lines)
    db = tmp_path / "datagen.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATAGEN_DB_LOCK_TIMEOUT": "4"}
    command = [sys.executable, "-m", "datagen.cli", "generate", "prompts.jsonl", "--backend", "transformers",
               "--batch-size", "1", "--max-tokens", "2", "--temperature", "0", "--run", "locked", "--out", "out.jsonl"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # wait for the first committed batch
            assert process.poll() is None, process.stderr.read()
            if db.exists():
                with sqlite3.connect(db, timeout=30) as reader:
                    try:
                        if reader.execute("SELECT count(*) FROM generation").fetchone()[0] >= 1:
                            break
                    except sqlite3.OperationalError:
                        pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder = sqlite3.connect(db, timeout=30, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as another writer (or a sqlite3 shell) would hold it
        _wait_until_idle(process.pid)  # its next batch is generated and its write waits for the lock
        time.sleep(4 + 1)  # past the 4 s it waits: the write fails, and marking the run failed waits for the lock
        holder.execute("ROLLBACK")
        holder.close()
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert_one_line(subprocess.CompletedProcess(command, process.returncode, "", stderr), 1,
                    "the database is locked: another process held its write lock for more than 4 s", mid_run=True)  # fmt: skip
    from storage.store import open_engine

    with Session(open_engine(f"sqlite:///{db}")) as session:
        run = session.exec(select(Run)).one()
        assert run.status == "failed" and "database is locked" in run.error
        kept = session.exec(select(Generation)).all()
        assert 1 <= len(kept) < 40 and run.requests == len(kept)


# ---- backends -----------------------------------------------------------------------------------------------------

class _Scripted(BaseHTTPRequestHandler):
    answer = b'{"object": "text_completion", "model": "m"}'

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args):
        pass


def test_a_200_without_choices_names_the_server():
    from datagen.backends.openai_backend import OpenAIBackend

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://user:secret@127.0.0.1:{server.server_address[1]}"
    backend = OpenAIBackend("m", base_urls=url, max_retries=0)
    try:
        with pytest.raises(DatagenError, match=r"server at http://\*\*\*:\*\*\*@127.0.0.1:\d+ answered /v1/completions with 200 but without a 'choices' list") as err:
            backend.generate([Request(prompt="x", params=SamplingParams(max_tokens=2))])
        assert "secret" not in str(err.value)
    finally:
        backend.close()
        server.shutdown()
        server.server_close()


def test_credentials_in_base_urls_are_masked_in_messages():
    from datagen.backends.openai_backend import OpenAIBackend

    url = f"http://user:secret@127.0.0.1:{_free_port()}/v1"
    backend = OpenAIBackend("m", base_urls=url, max_retries=1, retry_backoff=0.01)
    try:
        with pytest.raises(DatagenError) as err:
            backend.generate([Request(prompt="x")])
    finally:
        backend.close()
    assert "127.0.0.1" in str(err.value) and "secret" not in str(err.value) and "user" not in str(err.value)
    with pytest.raises(BadInput) as bad:
        OpenAIBackend("m", base_urls="user:secret@localhost:8000")
    assert "secret" not in str(bad.value)


def test_credentials_and_api_key_are_never_stored(tmp_path, embedded_model_path):
    """A dead server with credentials in its URL and an API key: the run fails; neither the password nor the key
    is in the run's config, its error, or anywhere in the database file."""
    (tmp_path / "prompts.jsonl").write_text(PROMPT)
    url = f"http://user:secret@127.0.0.1:{_free_port()}"
    result = datagen("generate", "prompts.jsonl", "--backend", "openai", "--base-url", url, "--timeout", "2",
                     "--concurrency", "1", "--run", "masked", cwd=tmp_path, env={"OPENAI_API_KEY": "sk-very-secret-key"})  # fmt: skip
    assert_one_line(result, 1, "no usable answer from the OpenAI-compatible server", mid_run=True)
    assert "secret" not in result.stderr
    from storage.store import open_engine
    from storage.tables import Run

    with Session(open_engine(f"sqlite:///{tmp_path / 'datagen.db'}")) as session:
        run = session.exec(select(Run)).one()
        assert run.status == "failed" and "127.0.0.1" in run.error
        assert run.config["base_urls"] == [url.replace("user:secret", "***:***")]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("datagen.db*"))
    assert b"secret" not in stored and b"sk-very" not in stored
