#!/usr/bin/env bash
# The image's entry point:
#   local CONFIG [key=value ...]        launch/local_pretrain.sh: all GPUs of this machine
#   slurm CONFIG [options] [k=v ...]    launch/slurm_pretrain.sh (inside an allocation: runs the training)
#   teachers STAGE [options] -- ARGS    launch/slurm_teachers.sh
#   MODULE [args]                       python -m MODULE, e.g. pretrain.train, teachers.kmeans, data.shards
#   anything else                       run as a command (bash, python, ...)
set -euo pipefail
HERE=/opt/musicpt
case "${1:---help}" in
    local) shift; exec bash "$HERE/launch/local_pretrain.sh" "$@" ;;
    slurm) shift; exec bash "$HERE/launch/slurm_pretrain.sh" "$@" ;;
    teachers) shift; exec bash "$HERE/launch/slurm_teachers.sh" "$@" ;;
    data.*|teachers.*|pretrain.*) exec python -m "$@" ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) exec "$@" ;;
esac
