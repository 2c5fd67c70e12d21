#!/usr/bin/env bash
# Pretraining on a SLURM cluster.
#
#   bash launch/slurm_pretrain.sh CONFIG [options] [key=value ...]
#
# CONFIG is a preset name (mert_95m, mert_330m, tiny) or a YAML path; key=value go to pretrain.train.
# Outside an allocation this writes RUN_DIR/sbatch.sh and submits it; inside one (SLURM_JOB_ID set: the
# submitted script, or salloc) it runs the training: srun starts one task per GPU (or TASKS_PER_NODE CPU
# tasks), each task one `python -m pretrain.train` process whose rank is SLURM_PROCID.
#
# Preemption and time limits: the job asks for USR1 SIGNAL_SECONDS before its end (--signal=B:USR1@...)
# and is --requeue-able. On USR1 the trainers save a checkpoint and stop, and the job requeues itself; on
# SIGTERM (scontrol requeue, preemption, scancel) they save and stop and SLURM decides what follows. A
# requeued job runs again with the same job name, hence the same run directory, and resumes there.
#
# Options (flag or environment variable; defaults per preset):
#   --nodes N (NODES)                 --gpus-per-node G (GPUS_PER_NODE; 0: CPU)
#   --tasks-per-node T (TASKS_PER_NODE; CPU only, else = G)   --cpus-per-task C (CPUS_PER_TASK)
#   --time D-HH:MM:SS (TIME)          --partition P (PARTITION)   --account A (ACCOUNT)
#   --job-name NAME (JOB_NAME; default: the config's name)    --run-root DIR (RUN_ROOT; default: runs/)
#   --signal-seconds S (SIGNAL_SECONDS; default 300)          --python CMD (PYTHON; default .venv/bin/python;
#                                     a command with arguments is fine: "apptainer exec --nv img.sif python")
#   --dependency SPEC (DEPENDENCY)    start after other jobs, e.g. afterok:1234 (sbatch --dependency)
#   SRUN_ARGS                         extra srun arguments, e.g. Pyxis: "--container-image=musicpt.sqsh"
#   --dry-run                         print the sbatch script and command, submit nothing
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
CONFIG=$1; shift
if [ -f "$CONFIG" ]; then CONFIG_PATH=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
elif [ -f "$REPO/configs/$CONFIG.yaml" ]; then CONFIG_PATH=$REPO/configs/$CONFIG.yaml
else echo "error: no config $CONFIG (neither a file nor configs/$CONFIG.yaml)" >&2; exit 2; fi
NAME=$(basename "$CONFIG_PATH" .yaml)

case "$NAME" in  # nodes gpus-per-node cpus-per-task time: MERT's global batches assume 64 GPUs
    mert_95m|mert_330m) defaults=(8 8 10 2-00:00:00) ;;
    tiny*|small*)       defaults=(1 0 1 02:00:00) ;;  # the CPU presets
    *)                  defaults=(1 8 10 1-00:00:00) ;;
esac
NODES=${NODES:-${defaults[0]}} GPUS_PER_NODE=${GPUS_PER_NODE:-${defaults[1]}}
CPUS_PER_TASK=${CPUS_PER_TASK:-${defaults[2]}} TIME=${TIME:-${defaults[3]}} TASKS_PER_NODE=${TASKS_PER_NODE:-2}
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} JOB_NAME=${JOB_NAME:-$NAME} RUN_ROOT=${RUN_ROOT:-$REPO/runs}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300} PYTHON=${PYTHON:-$REPO/.venv/bin/python} DEPENDENCY=${DEPENDENCY:-} DRY_RUN=0
OVERRIDES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=$2; shift ;;                 --gpus-per-node) GPUS_PER_NODE=$2; shift ;;
        --tasks-per-node) TASKS_PER_NODE=$2; shift ;; --cpus-per-task) CPUS_PER_TASK=$2; shift ;;
        --time) TIME=$2; shift ;;                   --partition) PARTITION=$2; shift ;;
        --account) ACCOUNT=$2; shift ;;             --job-name) JOB_NAME=$2; shift ;;
        --run-root) RUN_ROOT=$2; shift ;;           --signal-seconds) SIGNAL_SECONDS=$2; shift ;;
        --python) PYTHON=$2; shift ;;               --dry-run) DRY_RUN=1 ;;
        --dependency) DEPENDENCY=$2; shift ;;
        -h|--help) usage 0 ;;
        *=*) OVERRIDES+=("$1") ;;
        *) echo "error: unknown option $1 (see bash launch/slurm_pretrain.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
[ "$GPUS_PER_NODE" -gt 0 ] && TASKS_PER_NODE=$GPUS_PER_NODE
RUN_DIR=$RUN_ROOT/$JOB_NAME  # stable across requeues: the job name, not the job id
given_run_dir=0
for item in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
    case "$item" in train.run_dir=*) RUN_DIR=${item#train.run_dir=}; given_run_dir=1 ;; esac
done
[ "$given_run_dir" = 1 ] || OVERRIDES+=("train.run_dir=$RUN_DIR")
read -r -a PYTHON_CMD <<< "$PYTHON"
read -r -a SRUN_EXTRA <<< "${SRUN_ARGS:-}"
TRAIN=("${PYTHON_CMD[@]}" -m pretrain.train --config "$CONFIG_PATH" "${OVERRIDES[@]}")

batch_script() {
    echo "#!/bin/bash"
    echo "#SBATCH --job-name=$JOB_NAME"
    echo "#SBATCH --nodes=$NODES"
    echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
    echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
    [ "$GPUS_PER_NODE" -gt 0 ] && echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
    echo "#SBATCH --time=$TIME"
    [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
    [ -n "$ACCOUNT" ] && echo "#SBATCH --account=$ACCOUNT"
    [ -n "$DEPENDENCY" ] && echo "#SBATCH --dependency=$DEPENDENCY" && echo "#SBATCH --kill-on-invalid-dep=yes"
    echo "#SBATCH --signal=B:USR1@$SIGNAL_SECONDS"
    echo "#SBATCH --requeue"
    echo "#SBATCH --open-mode=append"
    echo "#SBATCH --output=$RUN_DIR/slurm-%j.out"
    printf 'exec bash %q %q' "$REPO/launch/slurm_pretrain.sh" "$CONFIG_PATH"
    printf ' %q' --job-name "$JOB_NAME" --python "$PYTHON" "${OVERRIDES[@]}"
    echo
}

if [ -z "${SLURM_JOB_ID:-}" ] || [ "$DRY_RUN" = 1 ]; then  # submit
    if [ "$DRY_RUN" = 1 ]; then
        echo "# $RUN_DIR/sbatch.sh"; batch_script
        echo "# submit: sbatch $RUN_DIR/sbatch.sh"
        echo "# each task runs: RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID WORLD_SIZE=\$SLURM_NTASKS ${TRAIN[*]}"
        exit 0
    fi
    mkdir -p "$RUN_DIR"
    batch_script > "$RUN_DIR/sbatch.sh"
    job=$(sbatch --parsable "$RUN_DIR/sbatch.sh")
    echo "submitted job $job: $JOB_NAME, $NODES node(s) x $TASKS_PER_NODE task(s); run directory $RUN_DIR; log $RUN_DIR/slurm-$job.out"
    exit 0
fi

# -- inside the allocation
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/status.json"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: ${SLURM_NTASKS:-1} task(s), master $MASTER_ADDR:$MASTER_PORT, run directory $RUN_DIR"
signalled=""
forward() {  # the trainers checkpoint at the end of the current step and exit
    signalled=$1
    echo "$(date -u +%FT%TZ) SIG$1: asking the trainers to save a checkpoint and stop"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
srun --kill-on-bad-exit=1 "${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"}" bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' task "${TRAIN[@]}" &
srun_pid=$!
status=0
while true; do  # `wait` returns early when a trapped signal arrives; keep waiting while srun runs
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
if grep -qs '"state": "stopped"' "$RUN_DIR/status.json" && [ "$signalled" = USR1 ]; then
    echo "$(date -u +%FT%TZ) checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
