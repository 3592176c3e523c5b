#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
