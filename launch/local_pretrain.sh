#!/usr/bin/env bash
# Pretraining on one machine with all its GPUs (or on its CPU):
#
#   bash launch/local_pretrain.sh CONFIG [key=value ...]
#
# CONFIG is a preset name (mert_95m, mert_330m, tiny) or a YAML path. torchrun starts one process per
# GPU (NPROC overrides; on CPU the default is 1 process). The run directory defaults to runs/NAME;
# running the same command again resumes there. Ctrl-C or SIGTERM: the trainers save and stop.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
CONFIG=$1; shift
if [ -f "$CONFIG" ]; then CONFIG_PATH=$CONFIG
elif [ -f "$REPO/configs/$CONFIG.yaml" ]; then CONFIG_PATH=$REPO/configs/$CONFIG.yaml
else echo "error: no config $CONFIG (neither a file nor configs/$CONFIG.yaml)" >&2; exit 2; fi
NAME=$(basename "$CONFIG_PATH" .yaml)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
RUN=("train.run_dir=${RUN_ROOT:-runs}/$NAME")
for item in "$@"; do case "$item" in train.run_dir=*) RUN=() ;; esac; done
echo "$NPROC process(es) ($GPUS GPU(s)), $OMP_NUM_THREADS thread(s) each"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m pretrain.train --config "$CONFIG_PATH" "${RUN[@]+"${RUN[@]}"}" "$@"
