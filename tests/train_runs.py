"""Launching the trainer from tests, with its exit code.

One process runs as ``python -m megatron_onereason.train`` (its exit code is the trainer's); several run under
torchrun, whose own exit code is 1 for any failing worker, so the workers' code is read from torchrun's log
(``exitcode: 75``).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
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


def cli(*args):
    """Run a repository script (``python *args``) and require exit code 0."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def tiny_blend_args(root, vocab, iters):
    """The trainer's test overrides: a text and an itemic source written under ``root`` (seeded), 96-token packs of
    <= 48-token samples, 4 packs per iteration, cosine from 3e-3 to 3e-4 over ``iters`` after one warm-up step."""
    from megatron_onereason.data.indexed import IndexedPairWriter

    rng = np.random.default_rng(0)
    (first_id, end_id), = vocab.id_ranges  # the tiny default scheme's tokens are one id range
    for source, (n_docs, low) in {"text": (50, 0), "items": (40, first_id)}.items():
        with IndexedPairWriter(os.path.join(root, source)) as writer:
            for _ in range(n_docs):
                n = int(rng.integers(6, 50))
                writer.add(rng.integers(low, end_id, n), (rng.random(n) < 0.8).astype(np.uint8))
    return [f"data.blend=[0.6, {os.path.join(root, 'text')}, 0.4, {os.path.join(root, 'items')}]",
            "data.seq_length=96", "data.max_sample_length=48", "train.global_batch_size=4",
            f"optim.decay_iters={iters}", "optim.warmup_iters=1", "optim.lr=3e-3", "optim.min_lr=3e-4"]


def read_metrics(path):
    """The trainer's ``logging.metrics_jsonl`` rows."""
    with open(path) as f:
        return [json.loads(line) for line in f]
