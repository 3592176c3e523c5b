"""The sbatch scripts of examples/: a dry run outside SLURM prints every step; inside a (simulated) job a stage starts
only after its predecessor's training_complete.json, an early stop (exit 75) requeues the job, completed stages are
skipped. SLURM itself is simulated by fake ``srun`` / ``scontrol`` executables that log their arguments."""
import os
import pwd
import subprocess
import sys

import pytest

from conftest import REPO

FAKE_SRUN = r"""#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
save=
for a; do case $a in checkpoint.save=*) save=${a#checkpoint.save=} ;; esac; done
[ -n "$save" ] || exit 0                                  # conversion / export steps
outcome=$(sed -n "s/^$(basename "$save")=//p" "$FAKE_OUTCOMES")
case $outcome in
  complete) mkdir -p "$save" && echo '{}' > "$save/training_complete.json"; exit 0 ;;
  early) exit 75 ;;                                       # the trainer saved and stopped early
  zero) exit 0 ;;                                         # exit 0 without the marker
  *) exit 3 ;;
esac
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG"
[ "$1" = show ] && echo node-a && echo node-b
exit 0
"""


def bare_env(**extra):
    """The environment of a login shell without USER and without any SLURM variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "USER"}
    return {**env, **extra}


def script(name, *args, env):
    return subprocess.run(["bash", f"examples/{name}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_pretrain_dry_run_prints_every_stage_with_its_config_and_plan():
    proc = script("pretrain_8b.sh", "--dry-run", env=bare_env(PYTHON=sys.executable, WORK="/shared/w"))
    assert proc.returncode == 0, proc.stderr
    assert "unbound variable" not in proc.stderr
    lines = proc.stdout.splitlines()
    train = [l for l in lines if l.startswith("srun ") and "megatron_onereason.train" in l]
    assert len(train) == 3  # one srun per stage
    for i, line in enumerate(train, 1):
        assert f"--config examples/configs/stage{i}.yaml" in line
        assert f"checkpoint.save=/shared/w/ckpt/stage{i} checkpoint.load=/shared/w/ckpt/stage{i}" in line
        assert "--container-image=/shared/w/images/megatron-onereason.sqsh" in line
        assert "--container-mounts=/shared/w:/shared/w" in line
    assert "model.load=/shared/w/ckpt/stage1 " in train[1] and "model.load=/shared/w/ckpt/stage2 " in train[2]
    # Chaining: stage N+1 (and the export) is gated on stage N's marker, printed between the two srun lines.
    for before, after in ((1, 2), (2, 3)):
        gate = lines.index(f"# stage {after} starts only if /shared/w/ckpt/stage{before}/training_complete.json exists")
        assert lines.index(train[before - 1]) < gate < lines.index(train[after - 1])
    assert any("exit 75 -> scontrol requeue" in l for l in lines)
    # The resolved configs and memory plans (the planner, run locally).
    assert proc.stdout.count("tensor_model_parallel_size: 4") == 3
    assert proc.stdout.count("trainable:\n#     - itemic_rows") == 1
    assert proc.stdout.count("of 80 GiB: fits") == 3
    assert lines[-1].startswith("srun ") and "mcore_to_hf.py --mcore-dir /shared/w/ckpt/stage3" in lines[-1]


def test_sft_dry_run_waits_for_pretraining():
    proc = script("sft_8b.sh", "--dry-run", env=bare_env(PYTHON=sys.executable, WORK="/shared/w"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    gate = lines.index("# SFT starts only if /shared/w/ckpt/stage3/training_complete.json exists")
    (train,) = [i for i, l in enumerate(lines) if l.startswith("srun ") and "megatron_onereason.train" in l]
    assert gate < train and "--config examples/configs/sft.yaml" in lines[train]
    assert "8 nodes x 8 GPUs" in lines[0] and "DP=8 on 64 ranks" in proc.stdout


def test_defaults_need_no_user_variable():
    """WORK defaults to /lustre/<login>/onereason even where USER is unset (cron, containers); GRPO shares the lib."""
    proc = script("grpo_multinode.sh", "--dry-run", env=bare_env())
    assert proc.returncode == 0, proc.stderr
    work = f"/lustre/{pwd.getpwuid(os.getuid()).pw_name}/onereason"  # what `id -un` prints
    assert proc.stdout.splitlines()[0] == f"# dry run of grpo_multinode.sh: 4 nodes x 8 GPUs, WORK={work}"
    (driver,) = [l for l in proc.stdout.splitlines() if "megatron_onereason.rl.run" in l]
    assert f"--container-image={work}/images/megatron-onereason.sqsh" in driver and f"save={work}/ckpt/onereason-grpo" in driver


def test_outside_slurm_without_dry_run_one_line_error():
    proc = script("pretrain_8b.sh", env=bare_env())
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "pretrain_8b.sh: error: not inside a SLURM job: submit it (sbatch examples/pretrain_8b.sh), or preview it "
        "with: bash examples/pretrain_8b.sh --dry-run"]


@pytest.fixture
def job(tmp_path):
    """A simulated SLURM job: fake srun/scontrol on PATH, a converted base checkpoint and an image on WORK."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (work / "ckpt" / "qwen3-8b-itemic").mkdir(parents=True)
    (work / "ckpt" / "qwen3-8b-itemic" / "latest_checkpointed_iteration.txt").write_text("release")
    (work / "images").mkdir()
    (work / "images" / "megatron-onereason.sqsh").write_bytes(b"hsqs")
    log, outcomes = tmp_path / "log", tmp_path / "outcomes"
    env = bare_env(PATH=f"{bin_dir}:{os.environ['PATH']}", WORK=str(work), FAKE_LOG=str(log),
                   FAKE_OUTCOMES=str(outcomes), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]",
                   SLURM_NNODES="2", SLURM_SUBMIT_DIR=REPO)

    def submit(name, **stage_outcomes):
        outcomes.write_text("".join(f"{k}={v}\n" for k, v in stage_outcomes.items()))
        log.write_text("")
        proc = script(name, env=env)
        calls = log.read_text().splitlines()
        stages = [a.split("=", 1)[1].rsplit("/", 1)[1] for c in calls for a in c.split()
                  if a.startswith("checkpoint.save=")]
        return proc, stages, calls

    submit.work = work
    return submit


def test_early_stop_requeues_and_does_not_chain(job):
    proc, stages, calls = job("pretrain_8b.sh", stage1="early")
    assert proc.returncode == 75 and stages == ["stage1"]
    assert "scontrol requeue 4242" in calls
    assert not any("mcore_to_hf" in c for c in calls)


def test_exit_zero_without_marker_stops_the_chain(job):
    proc, stages, calls = job("pretrain_8b.sh", stage1="complete", stage2="zero")
    assert proc.returncode == 1 and stages == ["stage1", "stage2"]
    assert "stage stage2 exited 0 but wrote no" in proc.stderr and "requeue" not in " ".join(calls)


def test_complete_stages_chain_and_are_skipped_when_resubmitted(job):
    proc, stages, _ = job("pretrain_8b.sh", stage1="complete", stage2="early")
    assert proc.returncode == 75 and stages == ["stage1", "stage2"]
    # The requeued job skips stage 1 and resumes stage 2, then chains stage 3 and exports.
    proc, stages, calls = job("pretrain_8b.sh", stage2="complete", stage3="complete")
    assert proc.returncode == 0, proc.stderr
    assert stages == ["stage2", "stage3"] and "stage stage1: complete" in proc.stdout
    assert sum("mcore_to_hf.py" in c for c in calls) == 1
    assert not any("hf_to_mcore" in c for c in calls)  # the converted base exists: no second conversion


def test_missing_image_is_refused_with_the_import_command(job):
    os.remove(job.work / "images" / "megatron-onereason.sqsh")
    proc, stages, calls = job("pretrain_8b.sh", stage1="complete")
    assert proc.returncode == 1 and not any(c.startswith("srun") for c in calls)
    (line,) = proc.stderr.strip().splitlines()
    assert "megatron-onereason.sqsh not found" in line and "enroot import -o" in line


def test_sft_refuses_a_partly_pretrained_model(job):
    proc, stages, calls = job("sft_8b.sh", sft="complete")
    assert proc.returncode == 1 and stages == [] and not any(c.startswith("srun") for c in calls)
    assert "SFT needs" in proc.stderr and "stage3/training_complete.json" in proc.stderr
