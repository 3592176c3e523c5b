#!/bin/bash
# The GPU check in one command, on one CUDA GPU whose python already holds CUDA PyTorch (>= 2.5) and Triton: no
# Transformer Engine, no package index. What that python lacks comes from local wheel files, at the versions CI tests
# (benchmarks/gpu_check_requirements.txt).
#
#   bash benchmarks/gpu_check.sh --wheels DIR [--out RESULTS.md] [gpu_check.py options: --steps --budget-s ...]
#       installs the wheels of DIR with pip --no-index --no-deps --target SITE (default
#       ${TMPDIR:-/tmp}/onereason-gpu-check-site) and runs benchmarks/gpu_check.py with that python and
#       PYTHONPATH=SITE. No venv: a venv made from inside a venv (the lent machine's python3 is one) sees the base
#       interpreter's packages, not the parent venv's, and loses torch. Each step appends its row to RESULTS.md when
#       it ends; the whole check stops within --budget-s (450 s: under 8 minutes on one H200 with the install).
#   bash benchmarks/gpu_check.sh --dry-run [--wheels DIR] [--out RESULTS.md]
#       every step at tiny sizes, on CPU when there is no GPU; needs no wheels when the python already has the
#       requirements (as the repository's .venv does).
#   bash benchmarks/gpu_check.sh --download DIR [--python-version 3.12]
#       on any machine with pip and internet: fills DIR with exactly the pinned wheels (CPython 3.12, x86_64 Linux).
# PYTHON: the python to use (default: python3; for --dry-run without --wheels the repository's .venv when it exists).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
REQS=$REPO/benchmarks/gpu_check_requirements.txt
SITE=${SITE:-${TMPDIR:-/tmp}/onereason-gpu-check-site}
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

WHEELS= DOWNLOAD= DRY_RUN=0 PYVER=3.12 PASS=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS=$2; shift 2 ;;
    --download) [ $# -ge 2 ] || die "--download needs a directory"; DOWNLOAD=$2; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value such as 3.12"; PYVER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; PASS+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$DRY_RUN" = 1 ] && [ -z "$WHEELS" ] && [ -x "$REPO/.venv/bin/python" ]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi

if [ -n "$DOWNLOAD" ]; then
  mkdir -p "$DOWNLOAD"
  "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$DOWNLOAD" -r "$REQS"
  du -sh "$DOWNLOAD"
  exit 0
fi

if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die "--wheels $WHEELS: no such directory"
  mkdir -p "$SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      --find-links "$WHEELS" -r "$REQS" \
    || die "installing from $WHEELS failed: it needs the wheels of $REQS for $("$PY" -V 2>&1)" \
           "(make them with --download DIR)"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export USE_HUB_KERNELS=0  # transformers >= 5.2x would fetch kernels from the hub; nothing is fetched here

DRY_RUN=$DRY_RUN HAVE_WHEELS=${WHEELS:+1} "$PY" - <<'PYCHECK' || exit 2
import os, sys
def die(message):
    sys.exit(f"gpu_check.sh: error: {message}")
try:
    import torch
except ImportError:
    die(f"{sys.executable} has no torch: run with the python that holds CUDA PyTorch >= 2.5 (set PYTHON=)")
if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
    die(f"torch {torch.__version__} is older than 2.5 (FlexAttention needs >= 2.5)")
from importlib.util import find_spec
for name in ("megatron.core", "transformers"):
    if find_spec(name.split(".")[0]) is None or find_spec(name) is None:
        die(f"{name} is not importable after installing the wheels" if os.environ["HAVE_WHEELS"] else
            f"{sys.executable} cannot import {name}: give --wheels DIR (make it with: bash benchmarks/gpu_check.sh "
            "--download DIR)")
if not torch.cuda.is_available():
    if os.environ["DRY_RUN"] != "1":
        die("no CUDA device is visible: run it on the GPU machine, or preview it on CPU with --dry-run")
    print("gpu_check.sh: no CUDA device visible: the dry run runs on CPU", file=sys.stderr)
else:
    try:
        import triton  # noqa: F401
    except ImportError:
        die("Triton is not importable (it comes with CUDA PyTorch wheels; FlexAttention needs it)")
PYCHECK

cd "$REPO"
exec "$PY" benchmarks/gpu_check.py ${PASS[@]+"${PASS[@]}"}
