# Plumbing shared by the sbatch scripts of examples/ (sourced, not run). It gives every script:
#   --dry-run      print the resolved srun commands (and, with a Python that imports megatron_onereason, each
#                  training stage's resolved config and memory plan) without a cluster
#   WORK           shared filesystem for checkpoints, TensorBoard, metrics (default /lustre/$USER/onereason)
#   IMAGE          the container as an enroot squashfs on shared storage (default $WORK/images/megatron-onereason.sqsh):
#                    docker build -t megatron-onereason .
#                    enroot import -o $WORK/images/megatron-onereason.sqsh dockerd://megatron-onereason
#                  (a registry reference such as nvcr.io#org/image:tag also works, imported again by every step)
#   MOUNTS         pyxis --container-mounts, comma-separated SRC:DST (default $WORK:$WORK; add data elsewhere, or
#                  $PWD:/opt/megatron_onereason to run this checkout instead of the image's copy)
#   CODE           the package inside the image (the container's working directory)
#   PYTHON, PLAN_MODEL, PLAN_VOCAB_SIZE   dry run only: the local Python that resolves and validates every stage's
#                  config (default: the repository's .venv when it exists, else python3), and the model the planner
#                  plans (default 8b with 176250 tokens: Qwen3 + 5 domain tokens + 3 x 8192 codes)
# and the stage lineage: a training stage starts only when its predecessor wrote its completion marker
# (CHECKPOINT_SAVE/training_complete.json, written when a run reaches train.iters); a trainer that stopped early
# (SIGTERM from --signal, train.exit_at_iteration) saved and exits 75 on every rank, and the job is requeued
# (scontrol requeue: needs #SBATCH --requeue) to resume the same stage; completed stages are skipped on every later
# start. Each rank runs through RANK_WRAPPER: srun keeps --kill-on-bad-exit (a crashed rank must not leave the others
# hanging in a collective), but a rank's 75 is not a "bad exit" that would kill ranks still saving; the first
# rank's exit code, kept on WORK, decides between requeue and the next stage.

EXIT_REQUEUE=75                     # megatron_onereason.cli.EXIT_REQUEUE (sysexits EX_TEMPFAIL)
COMPLETE_MARKER=training_complete.json
# bash -c body, "$@" = the rank's command: rank 0 writes its exit code to $RANK0_EXIT; 75 becomes 0.
RANK_WRAPPER='"$@"; rc=$?; if [ "${SLURM_PROCID:-0}" = 0 ]; then echo $rc > "$RANK0_EXIT"; fi; '\
'if [ $rc = 75 ]; then exit 0; fi; exit $rc'

DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^#SBATCH/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "$(basename "$0"): unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
  esac
done

sbatch_value() {  # the script's own "#SBATCH --NAME=VALUE" (the spooled copy SLURM runs keeps them)
  sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$0" | sed -n 1p
}

ONEREASON_USER=${USER:-$(id -un)}
WORK=${WORK:-/lustre/$ONEREASON_USER/onereason}
IMAGE=${IMAGE:-$WORK/images/megatron-onereason.sqsh}
MOUNTS=${MOUNTS:-$WORK:$WORK}
CODE=${CODE:-/opt/megatron_onereason}
NODES=${SLURM_NNODES:-$(sbatch_value nodes)}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(sbatch_value gpus-per-node)}

die() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# The rendezvous port of srun-launched ranks: megatron_onereason.platform.distributed.job_port (below the ephemeral
# port range 32768-60999, from which the kernel picks outgoing connections' ports).
MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 10000))
if [ -n "${PYTHON:-}" ]; then
  DRY_PYTHON=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
  DRY_PYTHON=$REPO/.venv/bin/python          # the README's set-up
else
  DRY_PYTHON=python3
fi

if [ "$DRY_RUN" = 1 ]; then
  JOB_ID=${SLURM_JOB_ID:-DRYRUN}
  MASTER_ADDR=${MASTER_ADDR:-FIRST_NODE}
  echo "# dry run of $(basename "$0"): $NODES nodes x $GPUS_PER_NODE GPUs, WORK=$WORK"
  echo "# IMAGE=$IMAGE  MOUNTS=$MOUNTS  CODE=$CODE  MASTER_PORT=$MASTER_PORT"
  case $IMAGE in *.sqsh) [ -f "$IMAGE" ] || echo "# note: $IMAGE does not exist here (make it with enroot import, see examples/slurm_lib.sh)" ;; esac
else
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit it (sbatch $0), or preview it with: bash $0 --dry-run"
  case $IMAGE in
    *.sqsh) [ -f "$IMAGE" ] || die "container image $IMAGE not found: make it once with 'docker build -t megatron-onereason . && enroot import -o $IMAGE dockerd://megatron-onereason', or set IMAGE=" ;;
  esac
  JOB_ID=$SLURM_JOB_ID
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail
  mkdir -p "$WORK"
fi
export MASTER_ADDR MASTER_PORT
SRUN=(srun "--container-image=$IMAGE" "--container-mounts=$MOUNTS" "--container-workdir=$CODE")

run() {  # one srun step, or its resolved command line in a dry run
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'; echo
    return 0
  fi
  "$@"
}

background() {  # a long-lived srun step (Ray nodes) started in the background, given RAY_START_WAIT s to come up
  if [ "$DRY_RUN" = 1 ]; then
    run "$@"
    echo "# (in the background)"
  else
    "$@" &
    sleep "${RAY_START_WAIT:-20}"
  fi
}

dry_python_has() {  # MODULE: the dry run's Python imports it (else a note, and the config is not validated)
  if (cd "$REPO" && "$DRY_PYTHON" -c "import $1") 2>/dev/null; then
    return 0
  fi
  echo "# ($DRY_PYTHON cannot import $1: set PYTHON= to a Python with this package to resolve and validate the config)"
  return 1
}

show_config() {  # dry run: the resolved config and memory plan of a training stage; a config error stops the dry run
  [ "$DRY_RUN" = 1 ] || return 0
  dry_python_has megatron_onereason.plan || return 0
  echo "# resolved config and memory plan (python -m megatron_onereason.plan):"
  local out
  out=$(cd "$REPO" && "$DRY_PYTHON" -m megatron_onereason.plan --print-config --world-size $((NODES * GPUS_PER_NODE)) \
      --model "${PLAN_MODEL:-8b}" --vocab-size "${PLAN_VOCAB_SIZE:-176250}" "$@") || die "the config above does not validate"
  echo "$out" | sed 's/^/#   /'
}

show_rl_config() {  # dry run: the RL run's resolved config (--config FILE overrides...); a config error stops it
  [ "$DRY_RUN" = 1 ] || return 0
  dry_python_has megatron_onereason.rl.config || return 0
  echo "# resolved RL config (megatron_onereason.rl.config.RLConfig):"
  local out
  out=$(cd "$REPO" && "$DRY_PYTHON" - "$@" <<'PY'
import sys
from megatron_onereason.cli import run_cli
from megatron_onereason.config import load_config, to_dict
from megatron_onereason.rl.config import RLConfig
import yaml
args = sys.argv[1:]
sys.exit(run_cli("rl config", lambda: print(yaml.safe_dump(to_dict(load_config(RLConfig, args[1], args[2:])),
                                                            sort_keys=False), end="")))
PY
  ) || die "the RL config does not validate (the line above)"
  echo "$out" | sed 's/^/#   /'
}
rank0_exit_file() {  # NAME: where the first rank of this job's step NAME writes its exit code (shared WORK)
  echo "$WORK/jobs/$JOB_ID/$1.rank0_exit"
}

requeue() {  # $1: what stopped early
  echo "$1 stopped early after saving its checkpoint (exit $EXIT_REQUEUE): requeueing job $JOB_ID to resume it"
  if ! scontrol requeue "$JOB_ID"; then
    die "scontrol requeue $JOB_ID failed (submitted with --no-requeue?): resubmit the same script to resume"
  fi
  exit "$EXIT_REQUEUE"
}

mark_complete() {  # DIR WHAT: the completion marker of a run that ended well without writing one (the RL driver)
  mkdir -p "$1"
  printf '{"written_by": "%s", "job": "%s"}\n' "$(basename "$0")" "$JOB_ID" > "$1/$COMPLETE_MARKER.tmp"
  mv "$1/$COMPLETE_MARKER.tmp" "$1/$COMPLETE_MARKER"
  echo "$2: complete ($1/$COMPLETE_MARKER)"
}

require_complete() {  # DIR WHAT: refuse to go on unless DIR holds a completion marker
  if [ "$DRY_RUN" = 1 ]; then
    echo "# $2 starts only if $1/$COMPLETE_MARKER exists"
  elif [ ! -f "$1/$COMPLETE_MARKER" ]; then
    die "$2 needs $1/$COMPLETE_MARKER (its predecessor did not complete): run or finish that stage first"
  fi
}

train_stage() {  # NAME CONFIG INIT [override ...]: one srun of the trainer, resuming WORK/ckpt/NAME
  local name=$1 config=$2 init=$3
  shift 3
  local save=$WORK/ckpt/$name
  if [ "$DRY_RUN" = 0 ] && [ -f "$save/$COMPLETE_MARKER" ]; then
    echo "stage $name: complete ($save/$COMPLETE_MARKER), skipped"
    return 0
  fi
  local args=(--config "examples/configs/$config" model.load="$init" checkpoint.save="$save" checkpoint.load="$save"
              logging.tensorboard_dir="$WORK/tb/$name" logging.metrics_jsonl="$WORK/metrics/$name.jsonl" "$@")
  echo "# stage $name"
  show_config "${args[@]}"
  local rc=0 rank0=
  RANK0_EXIT=$(rank0_exit_file "$name")
  export RANK0_EXIT
  if [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$(dirname "$RANK0_EXIT")"
    rm -f "$RANK0_EXIT"
  fi
  run "${SRUN[@]}" --kill-on-bad-exit=1 bash -c "$RANK_WRAPPER" rank python -m megatron_onereason.train "${args[@]}" \
    || rc=$?
  [ "$DRY_RUN" = 1 ] || rank0=$(cat "$RANK0_EXIT" 2>/dev/null || echo none)
  if [ "$DRY_RUN" = 1 ]; then
    echo "# then: exit 0 with $save/$COMPLETE_MARKER -> next step; the first rank's exit $EXIT_REQUEUE (every rank" \
         "stopped early, saved) -> scontrol requeue $JOB_ID; else the job fails"
  elif [ "$rc" != 0 ]; then
    die "stage $name failed (srun exit $rc, first rank's exit ${rank0}); see the log above"
  elif [ "$rank0" = "$EXIT_REQUEUE" ]; then
    requeue "stage $name"
  elif [ ! -f "$save/$COMPLETE_MARKER" ]; then
    die "stage $name exited 0 but wrote no $save/$COMPLETE_MARKER: not chaining the next stage on a partial run"
  fi
}

export_hf() {  # MCORE_DIR OUT_DIR: export to Hugging Face once (mcore_to_hf.py renames a complete directory)
  if [ "$DRY_RUN" = 0 ] && [ -d "$2" ]; then
    echo "export: $2 exists, skipped"
    return 0
  fi
  require_complete "$1" "export of $1"
  run "${SRUN[@]}" --nodes=1 --ntasks=1 python checkpoints_convert/mcore_to_hf.py --mcore-dir "$1" --out-dir "$2"
}
