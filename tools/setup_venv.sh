#!/usr/bin/env bash
# Create or refresh .venv/ in the repo root with megatron_onereason installed editable (CPU torch).
# Re-running is cheap: the install is skipped while setup.py is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.onereason-setup
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 and megatron_onereason[dev] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: on these machines `pip install torch==2.13.0` takes the CPU build that lies on disk;
  # an unpinned torch would pull a multi-GB CUDA build. GPU clusters use the Dockerfile instead.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
