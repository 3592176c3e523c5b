"""Launching the trainer from tests, with its exit code.

One process runs as ``python -m megatron_onereason.train`` (its exit code is the trainer's); several run under
torchrun, whose own exit code is 1 for any failing worker, so the workers' code is read from torchrun's log
(``exitcode: 75``).
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_trainer(nproc, args, timeout=400, env=None):
    """Run the trainer; returns the CompletedProcess with ``.code`` set to the trainer's exit code."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_onereason.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_onereason.train", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"trainer timed out after {timeout}s:\n{(e.stdout or '')[-3000:]}\n{(e.stderr or '')[-3000:]}")
    proc.code = proc.returncode
    if nproc > 1 and proc.returncode:  # torchrun's report: the first worker to fail, then the others it stopped
        root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", proc.stderr, re.S)
        proc.code = int(root.group(1)) if root else proc.returncode
    return proc


def expect_code(proc, code):
    if proc.code != code:
        pytest.fail(f"trainer exited with {proc.code}, expected {code}:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
                    f"\nerror lines: {error_lines(proc)}")
    return proc


def error_lines(proc):
    """The trainer's one-line error reports (``train: error: ...``)."""
    return [line for line in proc.stderr.splitlines() if line.startswith(("train: error:", "train: config error:"))]
