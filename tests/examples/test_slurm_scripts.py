"""The sbatch scripts of examples/: a dry run outside SLURM prints every step and validates every config; inside a
(simulated) job a stage starts only after its predecessor's training_complete.json, an early stop (exit 75 on every
rank) requeues the job, completed stages are skipped, the RL driver runs in the Ray head's container. SLURM itself is
simulated by fake ``srun`` / ``scontrol`` executables that log their arguments; the fake ``srun`` runs its command
once per task (SLURM_PROCID set) and, like ``--kill-on-bad-exit=1``, turns any task's non-zero exit into 137 (the
other tasks killed). A fake ``python`` plays the trainer / RL driver, ``ray`` the Ray nodes."""
import os
import pwd
import subprocess
import sys

import pytest

from conftest import REPO

FAKE_SRUN = r"""#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
kill_on_bad_exit=0 ntasks=${FAKE_NTASKS:-2}
while [ $# -gt 0 ]; do
  case $1 in
    -w) shift 2 ;;
    --kill-on-bad-exit=1) kill_on_bad_exit=1; shift ;;
    --ntasks=*) ntasks=${1#--ntasks=}; shift ;;
    -*) shift ;;
    *) break ;;
  esac
done
worst=0
for ((rank = 0; rank < ntasks; rank++)); do
  SLURM_PROCID=$rank "$@"; rc=$?
  [ $rc -gt $worst ] && worst=$rc
done
if [ $worst != 0 ] && [ $kill_on_bad_exit = 1 ]; then exit 137; fi
exit $worst
"""
FAKE_PYTHON = r"""#!/bin/bash
save=
for a; do case $a in checkpoint.save=*|save=*) save=${a#*save=} ;; esac; done
[ -n "$save" ] || exit 0                                  # conversion / export steps
outcome=$(sed -n "s/^$(basename "$save")=//p" "$FAKE_OUTCOMES")
case $outcome in
  complete) if [ "$SLURM_PROCID" = 0 ]; then mkdir -p "$save" && echo '{}' > "$save/training_complete.json"; fi
            exit 0 ;;
  early) exit 75 ;;                                       # every rank saved and stopped early
  zero) exit 0 ;;                                         # exit 0 without the marker (the RL driver: finished)
  crash) [ "$SLURM_PROCID" = 1 ] && exit 3; exit 0 ;;     # one rank fails
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
    assert any("exit 75 (every rank stopped early, saved) -> scontrol requeue" in l for l in lines)
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
    head, _, driver = [l for l in proc.stdout.splitlines() if l.startswith("srun ")]
    assert f"--container-image={work}/images/megatron-onereason.sqsh" in head and f"save={work}/ckpt/onereason-grpo" in driver
    # The RL config resolved and validated (by the repository's .venv: no PYTHON here).
    assert "#   algorithm: grpo" in proc.stdout and f"#     catalog: {work}/models/Qwen3-8B-itemic" in proc.stdout


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
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON),
                       ("ray", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (work / "ckpt" / "qwen3-8b-itemic").mkdir(parents=True)
    (work / "ckpt" / "qwen3-8b-itemic" / "latest_checkpointed_iteration.txt").write_text("release")
    (work / "images").mkdir()
    (work / "images" / "megatron-onereason.sqsh").write_bytes(b"hsqs")
    log, outcomes = tmp_path / "log", tmp_path / "outcomes"
    env = bare_env(PATH=f"{bin_dir}:{os.environ['PATH']}", WORK=str(work), FAKE_LOG=str(log),
                   FAKE_OUTCOMES=str(outcomes), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]",
                   SLURM_NNODES="2", SLURM_SUBMIT_DIR=REPO, RAY_START_WAIT="0")

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


def test_early_stop_on_every_rank_requeues_and_does_not_chain(job):
    """Every rank exits 75 after saving: srun keeps --kill-on-bad-exit (for crashes), the ranks' 75 does not trigger
    it, and the first rank's exit code requeues the job."""
    proc, stages, calls = job("pretrain_8b.sh", stage1="early")
    assert proc.returncode == 75 and stages == ["stage1"], proc.stderr
    (train,) = [c for c in calls if "checkpoint.save=" in c]
    assert "--kill-on-bad-exit=1" in train
    assert "scontrol requeue 4242" in calls
    assert (job.work / "jobs" / "4242" / "stage1.rank0_exit").read_text().strip() == "75"
    assert not any("mcore_to_hf" in c for c in calls)


def test_a_crashed_rank_fails_the_job_without_requeue(job):
    proc, stages, calls = job("pretrain_8b.sh", stage1="crash")
    assert proc.returncode == 1 and stages == ["stage1"]
    assert "stage stage1 failed (srun exit 137, first rank's exit 0)" in proc.stderr
    assert not any("requeue" in c for c in calls)


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


def test_rl_driver_runs_in_the_ray_heads_container_after_sft_and_marks_completion(job):
    proc, _, calls = job("grpo_multinode.sh", **{"onereason-grpo": "zero"})
    assert proc.returncode == 1 and not any(c.startswith("srun") for c in calls)  # SFT not complete yet
    assert proc.stderr.strip() == (f"grpo_multinode.sh: error: onereason-grpo needs {job.work}/ckpt/sft/"
                                   "training_complete.json (its predecessor did not complete): run or finish that "
                                   "stage first")
    (job.work / "ckpt" / "sft").mkdir()
    (job.work / "ckpt" / "sft" / "training_complete.json").write_text("{}")
    proc, _, calls = job("grpo_multinode.sh", **{"onereason-grpo": "zero"})
    assert proc.returncode == 0, proc.stderr
    head, workers, driver = [c for c in calls if c.startswith("srun")]
    assert "--container-name=onereason-ray-head-4242" in head and "ray start --head" in head
    assert "--container-name" not in workers and "--exclude=node-a" in workers
    assert driver.startswith("srun --overlap --container-name=onereason-ray-head-4242 ")
    assert "--container-image" not in driver and "-w node-a" in driver
    assert f"actor.model.load={job.work}/ckpt/sft " in driver and "megatron_onereason.rl.run" in driver
    assert (job.work / "ckpt" / "onereason-grpo" / "training_complete.json").exists()
    proc, _, calls = job("grpo_multinode.sh", **{"onereason-grpo": "zero"})  # resubmitted: nothing to do
    assert proc.returncode == 0 and "onereason-grpo: complete" in proc.stdout
    assert not [c for c in calls if c.startswith("srun")]


def test_rl_early_stop_requeues(job):
    (job.work / "ckpt" / "sft").mkdir()
    (job.work / "ckpt" / "sft" / "training_complete.json").write_text("{}")
    proc, _, calls = job("mopd_multinode.sh", **{"onereason-mopd": "early"})
    assert proc.returncode == 75 and "scontrol requeue 4242" in calls
    assert not (job.work / "ckpt" / "onereason-mopd" / "training_complete.json").exists()


def test_dry_run_port_is_the_trainers_and_below_the_ephemeral_range():
    from megatron_onereason.platform.distributed import job_port

    proc = script("sft_8b.sh", "--dry-run", env=bare_env(PYTHON="false", SLURM_JOB_ID="1234567"))
    assert proc.returncode == 0, proc.stderr
    assert f"MASTER_PORT={job_port(1234567)}" in proc.stdout.splitlines()[1] and job_port(1234567) < 32768


@pytest.mark.parametrize("with_venv", [True, False])
def test_dry_run_uses_the_repositorys_venv(tmp_path, with_venv):
    """No PYTHON and no package on the PATH's python: the dry run resolves the configs with REPO/.venv if present."""
    for name in ("examples", "megatron_onereason"):
        (tmp_path / name).symlink_to(os.path.join(REPO, name))
    if with_venv:
        (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {k: v for k, v in bare_env().items() if k not in ("PYTHON", "PYTHONPATH")}
    proc = script("sft_8b.sh", "--dry-run", env={**env, "REPO": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    if with_venv:
        assert "DP=8 on 64 ranks" in proc.stdout
    else:
        assert "cannot import megatron_onereason.plan: set PYTHON=" in proc.stdout


def test_rl_dry_run_refuses_an_invalid_config():
    proc = script("mopd_multinode.sh", "--dry-run",
                  env=bare_env(PYTHON=sys.executable, ALGO_ARGS="mopd.is_low=3 actor.data_parallel_size=0"))
    assert proc.returncode == 1 and not any(l.startswith("srun") for l in proc.stdout.splitlines())
    assert proc.stderr.strip().splitlines() == [
        "rl config: config error: examples/configs/mopd_8b.yaml: actor.data_parallel_size must be >= 1, got 0",
        "grpo_multinode.sh: error: the RL config does not validate (the line above)"]
