#!/usr/bin/env bash
# Create .venv/ at the repo root and install infopt (editable) with what it needs.
# On a CPU machine torch comes from `pip install torch==2.13.0` (a local CPU wheel), never a
# multi-GB CUDA build. On a machine whose system python already has a CUDA torch, the venv
# reuses it (--system-site-packages) instead of downloading another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && \
     "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c 'import torch' 2>/dev/null; then
  "$VPY" -m pip install -q torch==2.13.0
fi
"$VPY" -m pip install -q -e '.[dev]'
"$VPY" -c 'import torch, transformers, triton; print(f"infopt env: torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")'
