#!/usr/bin/env bash
# From a folder of recordings to a trained, exported and probed encoder (launch/recipe.py says how):
#   bash launch/recipe.sh AUDIO_DIR PRESET [--work DIR] [--probe TASK.yaml ...] [--slurm] [--dry-run] [key=value ...]
#   bash launch/recipe.sh --status WORK
# PYTHON (default .venv/bin/python, else python3) is the interpreter.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" "$REPO/launch/recipe.py" "$@"
