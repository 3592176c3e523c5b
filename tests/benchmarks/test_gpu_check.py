"""benchmarks/gpu_check.py --dry-run resolves every step of the GPU check at tiny sizes on CPU (the same code the
GPU run takes: conversion, local-spec bf16 logits against transformers, the trainer on packs, stage-1 freezing);
benchmarks/gpu_check.sh refuses bad arguments with one line."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dry_run_resolves_every_step(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert set(rows) == {"step", "env", "logits", "train", "freeze"}
    for step in ("env", "logits", "train", "freeze"):
        assert f"| {step} | PASS |" in rows[step]
    assert "megatron-core: " in rows["env"] and "transformer_engine: " in rows["env"]
    assert "max |Δ| megatron bf16 vs HF fp32" in rows["logits"] and "argmax agreement with fp32: 1.0000 megatron bf16" in rows["logits"]
    assert "tokens/s: " in rows["train"] and "pack: 1024 tokens" in rows["train"] and "planned" in rows["train"]
    assert "frozen tensors bit-identical: 45/45" in rows["freeze"]
    assert "old vocabulary rows bit-identical: yes" in rows["freeze"]


def test_unknown_step_is_refused():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--steps", "env,fp8"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check: unknown step(s) ['fp8']; known: env, logits, train, freeze"


@pytest.mark.parametrize("args, message", [
    ([], "give --wheels DIR"),
    (["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: no such directory"),
])
def test_shell_entry_refuses_bad_arguments(args, message):
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "VENV": "/nonexistent/venv"})
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check.sh: error: ") and message in line
