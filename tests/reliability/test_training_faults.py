"""Faults of real training runs: each ends with one clear line (rank 0 only) and nothing lost (issue "Nothing
silently wrong", items 1-4 and 6; issue "Pre-training on real clusters", item 5: resharding).

Trainer starts dominate the time, so one base run (saved at every iteration, stopped at 4 of 6) is shared: copies of
its directory are damaged, resumed with changed settings, exported at an earlier iteration, and its losses are the
oracle every resumed run must reproduce.
"""
import glob
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import REPO
from train_runs import cli, error_lines, expect_code, read_metrics, run_trainer, tiny_blend_args
from megatron_onereason.checkpoint.mcore_io import TRACKER_FILE, CheckpointModelInfo, committed_iteration
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab
from megatron_onereason.training.run_dir import LOCK_FILE, RUN_JSON

pytestmark = pytest.mark.multiprocess
ITERS, STOP = 6, 4  # the base run's schedule length and where it stops (exit 75)


@pytest.fixture(scope="module")
def setup(tokenizers_3x32, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    hf = tokenizers_3x32["extended"]
    ckpt = str(root / "mcore")
    cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf, "--out-dir", ckpt, "--tp", "2")
    return {"root": root, "hf": hf, "ckpt": ckpt, "base": tiny_blend_args(str(root), ItemicVocab.load(hf), ITERS)}


def train(setup, name, nproc, *overrides, code=0, iters=ITERS):
    """Run the trainer, require exit ``code``; returns (process, metrics rows)."""
    metrics = str(setup["root"] / f"{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    args = [f"model.load={setup['ckpt']}", f"train.iters={iters}", f"logging.metrics_jsonl={metrics}",
            *setup["base"], *overrides]
    proc = expect_code(run_trainer(nproc, args), code)
    return proc, read_metrics(metrics) if os.path.exists(metrics) else []


def resume_args(save):
    return [f"checkpoint.save={save}", f"checkpoint.load={save}"]


def the_error(proc):
    """The run's one error line: exactly one, no traceback (a shared error is printed by rank 0 only)."""
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-6000:]
    # No trainer traceback (torchrun adds its own report of the failed worker, which names no project file).
    assert not re.search(r'File ".*/(megatron_onereason|megatron/core)/', proc.stderr), proc.stderr[-6000:]
    return lines[0]


def losses(rows):
    return [r["loss"] for r in rows]


def megatron_cosine_lr(step, lr, min_lr, warmup=1, decay=ITERS):
    """Megatron's OptimizerParamScheduler (linear warm-up from 0, cosine decay), written out by hand."""
    if step <= warmup:
        return lr * step / warmup
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (lr - min_lr)


def snapshot(directory):
    """Every file under ``directory`` with its bytes: what a refused run must leave untouched."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def flip_bytes(path, n=64):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        block = f.read(n)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))


@pytest.fixture(scope="module")
def base(setup):
    """One process, saved at every iteration, stopped at STOP of ITERS (exit 75, stage not complete)."""
    save = str(setup["root"] / "base")
    proc, rows = train(setup, "base", 1, *resume_args(save), "checkpoint.save_interval=1",
                       f"train.exit_at_iteration={STOP}", code=75)
    assert [r["step"] for r in rows] == list(range(1, STOP + 1)) and committed_iteration(save) == STOP
    assert not os.path.exists(os.path.join(save, "training_complete.json"))
    return {"save": save, "rows": rows, "stderr": proc.stderr}


def copy_of(setup, base, name):
    path = str(setup["root"] / name)
    shutil.copytree(base["save"], path)
    return path


# ------------------------------------------------------------------------------------------- 1. NaN / inf
def test_diverging_run_stops_before_saving_and_the_tracker_stays_finite(setup, tmp_path):
    """lr=1e5 (the issue's case): with train.nonfinite=skip the first non-finite step is skipped and the next one
    stops the run (train.nonfinite=stop, the default, stops at the first; same code path)."""
    save = str(tmp_path / "nan")
    proc, rows = train(setup, "nan", 1, *resume_args(save), "optim.lr=1e5", "optim.min_lr=0",
                       "checkpoint.save_interval=1", "train.nonfinite=skip", "train.max_nonfinite_skips=1", code=1)
    line = the_error(proc)
    assert re.search(r"iteration \d+: non-finite \(NaN/inf\) (loss|gradients) after 1 skipped non-finite steps "
                     r"\(train.max_nonfinite_skips\); stopped before the update, nothing saved", line), line
    skipped = int(re.search(r"iteration (\d+): non-finite \S+; update skipped \(1 of at most 1\)",
                            proc.stderr).group(1))
    stopped = int(re.search(r"iteration (\d+)", line).group(1))
    assert stopped > skipped
    assert [r["step"] for r in rows] == list(range(1, stopped))  # no metrics row for the stopped step
    assert [r["skipped"] for r in rows] == [int(r["step"] == skipped) for r in rows]
    assert all(math.isfinite(r["loss"]) for r in rows[: skipped - 1])
    assert committed_iteration(save) == stopped - 1  # the tracker never moved onto a non-finite state
    # The last committed state is finite: the export checks every tensor.
    cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", save, "--out-dir", str(tmp_path / "hf"))
    assert not os.path.exists(os.path.join(save, "training_complete.json"))


# ------------------------------------------------------------------------------------------- 2. damaged checkpoints
def test_damaged_checkpoint_is_refused_offering_the_previous_iteration_and_resumed_from_it(setup, base):
    save = copy_of(setup, base, "damaged")
    shard = sorted(glob.glob(os.path.join(save, f"iter_{STOP:07d}", "*.distcp")))[0]
    flip_bytes(shard)  # 64 flipped bytes: loaded silently before checksums
    common = os.path.join(save, f"iter_{STOP:07d}", "common.pt")
    os.truncate(common, os.path.getsize(common) // 2)  # a truncated file: a bare EOFError on every rank before
    before = snapshot(save)
    proc, _ = train(setup, "damaged_refused", 2, *resume_args(save), code=1)  # two ranks, one line
    line = the_error(proc)
    assert f"iter_{STOP:07d} is damaged: {os.path.basename(shard)}: checksum mismatch" in line
    assert "common.pt: " in line and "(truncated or overwritten)" in line
    assert f"the previous checkpoint, iteration {STOP - 1}, verifies" in line
    assert "checkpoint.fallback_to_previous=true" in line
    assert snapshot(save) == before  # refused: nothing changed, nothing lost

    proc, rows = train(setup, "damaged_fallback", 1, *resume_args(save), "checkpoint.fallback_to_previous=true")
    assert [r["step"] for r in rows] == list(range(STOP, ITERS + 1))
    assert losses(rows)[0] == losses(base["rows"])[STOP - 1]  # iteration STOP trained again, bit-exact
    assert f"resuming from iteration {STOP - 1} instead" in proc.stderr
    assert os.path.isdir(os.path.join(save, f"iter_{STOP:07d}.damaged"))  # kept for inspection
    assert committed_iteration(save) == ITERS
    # Run to its end: the stage-complete marker (what stage chaining waits for) names the run and iteration.
    with open(os.path.join(save, "training_complete.json")) as f, open(os.path.join(save, RUN_JSON)) as g:
        complete, run = json.load(f), json.load(g)
    assert complete["iteration"] == ITERS and complete["run_id"] == run["run_id"]


# ------------------------------------------------------------------------------------------- 3. one run per directory
def _wait_for(predicate, proc, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the first training ended early ({proc.returncode}):\n{open(log).read()[-4000:]}")
        time.sleep(0.2)
    pytest.fail("the first training made no checkpoint in time")


def test_two_runs_in_one_directory_are_refused_and_a_dead_runs_lock_is_taken_over(setup, tmp_path):
    save = str(tmp_path / "shared")
    first_args = [f"model.load={setup['ckpt']}", "train.iters=200", *setup["base"], *resume_args(save),
                  "checkpoint.save_interval=1", "optim.decay_iters=200"]
    log = str(tmp_path / "first.log")
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "megatron_onereason.train", *first_args], cwd=REPO,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=out, stderr=out)
    try:
        _wait_for(lambda: (committed_iteration(save) or 0) >= 1, first, log)
        # A second training on the same directory while the first is writing.
        proc, _ = train(setup, "second", 1, *resume_args(save), code=1)
        line = the_error(proc)
        assert f"checkpoint.save={save} is in use by another training" in line and f"pid {first.pid}" in line
    finally:
        first.kill()  # a crash: the lock stays behind, its process is gone
        first.wait(timeout=60)
    assert os.path.exists(os.path.join(save, LOCK_FILE))
    committed = committed_iteration(save)
    # Leftovers of the killed run: a save that never committed, a half-written tracker. Both go at the next start,
    # and the dead run's lock is taken over by the run that resumes it.
    uncommitted = os.path.join(save, f"iter_{committed + 50:07d}")
    os.makedirs(uncommitted)
    open(os.path.join(uncommitted, "__0_0.distcp"), "w").write("half")
    half_tracker = os.path.join(save, f".{TRACKER_FILE}.tmp-{socket.gethostname()}-{first.pid}")
    open(half_tracker, "w").write("9")
    proc, rows = train(setup, "resumed", 1, *resume_args(save), "optim.decay_iters=200",
                       f"train.exit_at_iteration={committed + 1}", code=75, iters=200)
    assert "taking over the lock of run" in proc.stderr and f"its process {first.pid}" in proc.stderr
    assert [r["step"] for r in rows] == [committed + 1] and committed_iteration(save) == committed + 1
    assert not os.path.exists(uncommitted) and not os.path.exists(half_tracker)
    assert not os.path.exists(os.path.join(save, LOCK_FILE))  # released at the end
    # A new run (not resuming) must not mix its iterations into another run's directory.
    before = snapshot(save)
    proc, _ = train(setup, "third_fresh", 1, f"checkpoint.save={save}", code=1)
    assert f"checkpoint.save={save} already holds run " in the_error(proc)
    assert "To continue that run set checkpoint.load=" in the_error(proc)
    assert snapshot(save) == before


# ------------------------------------------------------------------------------------------- 4. honest resume
def test_changed_lr_on_resume_is_refused_then_used_with_the_override(setup, base):
    for step, row in enumerate(base["rows"], 1):  # the oracle reproduces the logged schedule
        assert row["lr"] == pytest.approx(megatron_cosine_lr(step, 3e-3, 3e-4), rel=1e-12)
    save = copy_of(setup, base, "changed_lr")
    before = snapshot(save)
    proc, _ = train(setup, "lr_refused", 1, *resume_args(save), "optim.lr=1e-3", code=1)
    line = the_error(proc)
    assert f"resuming {save}/iter_{STOP:07d} with changed settings: optim.lr: 0.003 in the checkpoint, 0.001 now" \
        in line and "checkpoint.override_changed_settings=true" in line
    assert snapshot(save) == before

    proc, rows = train(setup, "lr_override", 1, *resume_args(save), "optim.lr=1e-3",
                       "checkpoint.override_changed_settings=true", f"train.exit_at_iteration={STOP + 1}", code=75)
    assert "continuing" in proc.stderr and "optim.lr: 0.003 in the checkpoint, 0.001 now" in proc.stderr
    assert [r["step"] for r in rows] == [STOP + 1]
    assert rows[0]["lr"] == pytest.approx(megatron_cosine_lr(STOP + 1, 1e-3, 3e-4), rel=1e-12)
    with open(os.path.join(save, f"iter_{STOP + 1:07d}", "config.yaml")) as f:
        assert yaml.safe_load(f)["optim"]["lr"] == 1e-3  # the checkpoint records what it was trained with


# ------------------------------------------------------------------------------------------- export any iteration
def test_mcore_to_hf_exports_an_earlier_iteration(setup, base, tmp_path):
    from safetensors.torch import load_file

    def export(name, *extra):
        out = str(tmp_path / name)
        proc = cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", base["save"], "--out-dir", out, *extra)
        assert "Apex" not in proc.stderr and "Transformer Engine" not in proc.stderr  # quiet library notices
        return {k: v for f in sorted(glob.glob(os.path.join(out, "*.safetensors"))) for k, v in load_file(f).items()}

    latest, second = export("latest"), export("it2", "--iteration", "2")
    assert set(latest) == set(second) and any(not (latest[k] == second[k]).all() for k in latest)
    proc = subprocess.run([sys.executable, "checkpoints_convert/mcore_to_hf.py", "--mcore-dir", base["save"],
                           "--out-dir", str(tmp_path / "it9"), "--iteration", "9"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mcore_to_hf: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "iter_0000009" in lines[0], proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- resharding
def parameter_count(stderr):
    return re.search(r"parameters: \S+ trainable of (\S+)M", stderr).group(1)


def test_distributed_optimizer_resumes_at_another_layout(setup, base, tmp_path):
    """PP2 -> TP2 -> TP1 x DP2 with the distributed optimizer (so PP2 -> PP1 and TP2 -> TP1), two processes: each
    resumed step equals the uninterrupted TP1 base run's, and the parameter count printed at start is the model's
    at every layout (HF count + vocabulary padding rows)."""
    distopt = "parallel.use_distributed_optimizer=true"
    save = str(tmp_path / "reshard")
    runs, rows = [], []
    for step, layout in enumerate(["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                                   "parallel.tensor_model_parallel_size=1"], 2):
        proc, got = train(setup, f"reshard_{step}", 2, layout, distopt, *resume_args(save),
                          f"train.exit_at_iteration={step}", code=75)
        runs.append(proc)
        rows += got
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(rows), losses(base["rows"]), rtol=0, atol=2e-5)
    assert "RNG states not restored" in runs[1].stderr  # it did resume at another layout
    info = CheckpointModelInfo.load(setup["ckpt"])
    expected = info.config.num_parameters() + (info.padded_vocab_size - info.config.vocab_size) * \
        info.config.hidden_size
    assert {parameter_count(p.stderr) for p in runs} | {parameter_count(base["stderr"])} == {f"{expected / 1e6:.4g}"}


def test_resharding_refusals_name_the_format_and_the_version(monkeypatch):
    from megatron_onereason.cli import UserError
    from megatron_onereason.training import checkpointing

    saved, now = {"tp": 2, "pp": 1, "dp": 1}, {"tp": 1, "pp": 1, "dp": 2}
    checkpointing._check_optimizer_resharding("ck/iter_0000002", "fully_reshardable", saved, now)
    checkpointing._check_optimizer_resharding("ck/iter_0000002", "dp_reshardable", saved, {**saved, "dp": 4})
    with pytest.raises(UserError, match=r"saved at TP2 PP1 and is resumed at TP1 PP1, but its distributed-optimizer "
                                        r"state is dp_reshardable .*resume at TP2 PP1 \(any DP\)"):
        checkpointing._check_optimizer_resharding("ck/iter_0000002", "dp_reshardable", saved, now)
    import megatron.core
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    monkeypatch.delattr(DistributedOptimizer, "load_parameter_state_from_fully_reshardable")
    with pytest.raises(UserError, match=rf"megatron-core {re.escape(megatron.core.__version__)} has no fully "
                                        "reshardable distributed-optimizer format"):
        checkpointing._check_optimizer_resharding("ck/iter_0000002", "fully_reshardable", saved, now)


# ----------------------------------------------------------------------------------- round 2: data and checksums
def test_changed_data_seed_on_resume_is_refused_then_restarts_the_data_with_the_override(setup, base):
    """The restored data position indexes the old shuffle: a new data.seed is refused, or with the override the data
    starts again from its first pack (the step's consumed_samples counts from 0) and the log says so."""
    save = copy_of(setup, base, "changed_seed")
    before = snapshot(save)
    proc, _ = train(setup, "seed_refused", 1, *resume_args(save), "data.seed=7", code=1)
    line = the_error(proc)
    assert "data.seed: 1234 in the checkpoint, 7 now" in line and "checkpoint.override_changed_settings=true" in line
    assert snapshot(save) == before
    proc, rows = train(setup, "seed_override", 1, *resume_args(save), "data.seed=7",
                       "checkpoint.override_changed_settings=true", f"train.exit_at_iteration={STOP + 1}", code=75)
    assert "the data order changed, so the data starts again from its first pack" in proc.stderr
    assert [r["step"] for r in rows] == [STOP + 1] and rows[0]["consumed_samples"] == 4  # one batch from 0


def test_a_deleted_manifest_with_a_damaged_shard_is_not_resumed(setup, base):
    save = copy_of(setup, base, "no_manifest")
    iter_dir = os.path.join(save, f"iter_{STOP:07d}")
    os.remove(os.path.join(iter_dir, "onereason_checksums.json"))
    flip_bytes(sorted(glob.glob(os.path.join(iter_dir, "*.distcp")))[0])
    before = snapshot(save)
    proc, _ = train(setup, "no_manifest", 1, *resume_args(save), code=1)
    line = the_error(proc)
    assert "onereason_checksums.json: missing (this checkpoint was saved with checksums" in line
    assert f"the previous checkpoint, iteration {STOP - 1}, verifies" in line
    assert "not verified" not in proc.stderr
    assert snapshot(save) == before
