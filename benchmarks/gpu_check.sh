#!/bin/bash
# The GPU check in one command, on one CUDA GPU with only CUDA PyTorch (>= 2.5) and Triton installed: no Transformer
# Engine and no package index. Everything else comes from local wheel files (benchmarks/gpu_check_requirements.txt).
#
#   bash benchmarks/gpu_check.sh --wheels DIR [gpu_check.py options: --out RESULTS.md --peak-tflops T --dry-run]
#       makes a venv over the system's torch (--system-site-packages) in ${VENV:-/tmp/onereason-gpu-check-venv},
#       installs the wheels of DIR into it (pip --no-index --no-deps), runs benchmarks/gpu_check.py (< 8 minutes on
#       an H100) and writes one results table (default gpu_check_results.md).
#   bash benchmarks/gpu_check.sh --download DIR [--python-version 3.12]
#       on any machine with internet: fills DIR with those wheels (manylinux x86_64, CPython 3.12 by default).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
REQS=$REPO/benchmarks/gpu_check_requirements.txt
PY=${PYTHON:-python3}
VENV=${VENV:-${TMPDIR:-/tmp}/onereason-gpu-check-venv}
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

WHEELS= DOWNLOAD= PYVER=3.12 PASS=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS=$2; shift 2 ;;
    --download) [ $# -ge 2 ] || die "--download needs a directory"; DOWNLOAD=$2; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value such as 3.12"; PYVER=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ -n "$DOWNLOAD" ]; then
  mkdir -p "$DOWNLOAD"
  "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$DOWNLOAD" -r "$REQS"
  du -sh "$DOWNLOAD"
  exit 0
fi
[ -n "$WHEELS" ] || die "give --wheels DIR (the wheels of benchmarks/gpu_check_requirements.txt; make them with --download DIR)"
[ -d "$WHEELS" ] || die "--wheels $WHEELS: no such directory"
"$PY" - <<'PYCHECK' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check.sh: error: this python has no torch: install CUDA PyTorch >= 2.5 (or set PYTHON=)")
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
if (major, minor) < (2, 5):
    sys.exit(f"gpu_check.sh: error: torch {torch.__version__} is older than 2.5 (FlexAttention needs >= 2.5)")
try:
    import triton  # noqa: F401
except ImportError:
    sys.exit("gpu_check.sh: error: Triton is not importable (it comes with CUDA PyTorch wheels)")
if not torch.cuda.is_available():
    print("gpu_check.sh: warning: no CUDA device visible: the check runs on CPU", file=sys.stderr)
PYCHECK

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"   # keeps the system's CUDA torch and Triton
fi
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" -r "$REQS" \
  || die "installing from $WHEELS failed: it needs every wheel of $REQS for this Python ($("$PY" -V))"
cd "$REPO"
exec "$VENV/bin/python" benchmarks/gpu_check.py ${PASS[@]+"${PASS[@]}"}
