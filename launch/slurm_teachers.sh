#!/usr/bin/env bash
# The offline stages as a SLURM array job: array task i of N runs the stage with --rank i --world N
# (each stage reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT itself), so N machines share the shards.
#
#   bash launch/slurm_teachers.sh STAGE [--world N] [options] -- STAGE_ARGS...
#
# STAGE:   shards   python -m data.shards build STAGE_ARGS      (e.g. --input /data/audio --out /data/shards)
#          kmeans   python -m teachers.kmeans dump STAGE_ARGS   (e.g. --config configs/teachers/logmel_chroma.yaml)
#          encodec  python -m teachers.encodec dump STAGE_ARGS  (e.g. --shards /data/shards --weights encodec.th)
#          fit      python -m teachers.kmeans fit STAGE_ARGS    (one task: the fit reads a sample of every shard)
# Every stage skips what is already done, so a failed array task is simply submitted again. The last task
# to finish writes the shard index or the teacher manifest.
# Options (flag or environment variable): --world N (WORLD, default 8; fit: 1) --cpus-per-task C (CPUS_PER_TASK,
#   default 8) --gpus-per-task G (GPUS_PER_TASK, default 0; encodec on GPU: 1) --time T (TIME, default 12:00:00)
#   --partition P (PARTITION) --account A (ACCOUNT) --log-dir DIR (LOG_DIR, default slurm-logs)
#   --python PATH (PYTHON, default .venv/bin/python) --dry-run (print the sbatch script, submit nothing)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit "${1:-2}"; }
[ $# -ge 1 ] || usage
STAGE=$1; shift
case "$STAGE" in
    shards) MODULE=(data.shards build) ;;       kmeans) MODULE=(teachers.kmeans dump) ;;
    encodec) MODULE=(teachers.encodec dump) ;;  fit) MODULE=(teachers.kmeans fit); WORLD=1 ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown stage $STAGE: use shards, kmeans, encodec or fit" >&2; exit 2 ;;
esac
WORLD=${WORLD:-8} CPUS_PER_TASK=${CPUS_PER_TASK:-8} GPUS_PER_TASK=${GPUS_PER_TASK:-0} TIME=${TIME:-12:00:00}
PARTITION=${PARTITION:-} ACCOUNT=${ACCOUNT:-} LOG_DIR=${LOG_DIR:-slurm-logs} PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --world) WORLD=$2; shift ;;           --cpus-per-task) CPUS_PER_TASK=$2; shift ;;
        --gpus-per-task) GPUS_PER_TASK=$2; shift ;; --time) TIME=$2; shift ;;
        --partition) PARTITION=$2; shift ;;   --account) ACCOUNT=$2; shift ;;
        --log-dir) LOG_DIR=$2; shift ;;       --python) PYTHON=$2; shift ;;
        --dry-run) DRY_RUN=1 ;;               --) shift; break ;;
        *) echo "error: unknown option $1; put the stage's own arguments after --" >&2; exit 2 ;;
    esac
    shift
done
[ "$STAGE" = fit ] && WORLD=1
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)

{
    echo "#!/bin/bash"
    echo "#SBATCH --job-name=teachers-$STAGE"
    echo "#SBATCH --array=0-$((WORLD - 1))"
    echo "#SBATCH --ntasks=1"
    echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
    [ "$GPUS_PER_TASK" -gt 0 ] && echo "#SBATCH --gpus-per-task=$GPUS_PER_TASK"
    echo "#SBATCH --time=$TIME"
    [ -n "$PARTITION" ] && echo "#SBATCH --partition=$PARTITION"
    [ -n "$ACCOUNT" ] && echo "#SBATCH --account=$ACCOUNT"
    echo "#SBATCH --output=$LOG_DIR/teachers-$STAGE-%A_%a.out"
    echo 'export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}'
    echo 'echo "array task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT on $(hostname)"'
    read -r -a PYTHON_CMD <<< "$PYTHON"  # a command with arguments is fine, e.g. "apptainer exec img.sif python"
    printf 'exec'
    printf ' %q' "${PYTHON_CMD[@]}" -m "${MODULE[@]}" "$@"
    [ "$STAGE" = fit ] || printf ' --workers %q' "$CPUS_PER_TASK"
    echo
} > "$LOG_DIR/teachers-$STAGE.sbatch"

if [ "$DRY_RUN" = 1 ]; then
    cat "$LOG_DIR/teachers-$STAGE.sbatch"
    echo "# submit: sbatch $LOG_DIR/teachers-$STAGE.sbatch"
    exit 0
fi
job=$(sbatch --parsable "$LOG_DIR/teachers-$STAGE.sbatch")
echo "submitted array job $job: $STAGE in $WORLD part(s); logs $LOG_DIR/teachers-$STAGE-${job}_*.out"
