"""benchmarks/gpu_check.sh --dry-run resolves every step of the GPU check at tiny sizes on CPU with no wheels (the
same code the GPU run takes: conversion, local-spec bf16 logits against transformers, stage-1 freezing, the trainer
on packs, the RL actor on tree packs); the table grows one row per step as each ends; a step is cut at its time limit;
the shell entry refuses what cannot work with one line; the wheels it installs are the versions CI tests."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dry_run_resolves_every_step(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out), "--work",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHON"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert set(rows) == {"step", "env", "logits", "freeze", "train", "rl"}
    for step in ("env", "logits", "freeze", "train", "rl"):
        assert f"| {step} | PASS |" in rows[step]
    assert "megatron-core: " in rows["env"] and "pins: as pinned" in rows["env"]
    assert r"max \|Δ\| megatron bf16 vs HF fp32" in rows["logits"]
    assert "argmax agreement with fp32: 1.0000 megatron bf16" in rows["logits"]
    assert "tokens/s: " in rows["train"] and "pack: 1024 tokens" in rows["train"] and "planned" in rows["train"]
    assert "MFU (of 790 TFLOP/s)" in rows["train"]
    assert "frozen tensors bit-identical: 45/45" in rows["freeze"]
    assert "old vocabulary rows bit-identical: yes" in rows["freeze"]
    for length in (256, 512, 1024):
        assert f"{length} positions: " in rows["rl"]
    assert out.read_text().rstrip().endswith("5/5 steps passed in " + out.read_text().split("passed in ")[1].strip())


def test_rows_are_written_as_each_step_ends_and_the_budget_stops_the_rest(tmp_path, monkeypatch):
    out = tmp_path / "results.md"
    seen = []

    def fake_step(name, sizes, work, peak, limit_s):
        seen.append(out.read_text())  # what a kill at this moment would leave
        return {"ok": name != "logits", "n": len(seen)}

    clock = iter([0.0, 1.0, 2.0, 99.0, 200.0])  # deadline, one reading before each step, the footer
    monkeypatch.setattr(gpu_check.time, "time", lambda: next(clock))
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    rc = gpu_check.main(["--dry-run", "--steps", "env,logits,train", "--budget-s", "100", "--out", str(out),
                         "--work", str(tmp_path)])
    assert rc == 1
    assert seen[0].endswith("|---|---|---|\n") and seen[1].endswith("| env | PASS | n: 1 |\n")
    lines = out.read_text().splitlines()
    assert lines[-4:-1] == ["| logits | FAIL | n: 2 |",
                            "| train | FAIL | error: not run: the check's budget of 100 s is spent |", ""]
    assert lines[-1] == "1/3 steps passed in 200 s."


def test_a_step_past_its_time_limit_is_stopped_and_reported(tmp_path):
    start = gpu_check.time.time()
    result = gpu_check.run_step("env", gpu_check.TINY, str(tmp_path), 0.0, limit_s=1)
    assert gpu_check.time.time() - start < 30
    assert not result["ok"] and result["error"].startswith("stopped at its time limit of 1 s")


def test_unknown_step_is_refused():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--steps", "env,fp8"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: unknown step(s) ['fp8']; known: env, logits, freeze, train, rl"


@pytest.mark.parametrize("python, args, message", [
    ("venv", [], "no CUDA device is visible: run it on the GPU machine, or preview it on CPU with --dry-run"),
    ("venv", ["--wheels", "/nonexistent/wheels"], "--wheels /nonexistent/wheels: no such directory"),
    ("base", ["--dry-run"], "has no torch: run with the python that holds CUDA PyTorch >= 2.5 (set PYTHON=)"),
])
def test_shell_entry_refuses_what_cannot_work(python, args, message):
    python = sys.executable if python == "venv" else os.path.join(sys.base_prefix, "bin", "python3")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": python, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gpu_check.sh: error: ") and message in line


def test_the_carried_wheels_are_the_versions_ci_tests():
    with open(os.path.join(REPO, "requirements", "lock-cpu.txt")) as f:
        lock = dict(line.strip().lower().split("==") for line in f if "==" in line and not line.startswith("#"))
    pins = gpu_check.pinned_versions()
    assert set(pins) == {"megatron-core", "transformers"}  # what the lent machine's image lacks or has at 5.17
    assert {name: lock[name] for name in pins} == pins
