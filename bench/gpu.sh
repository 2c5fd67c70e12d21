#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py): training (mert_95m, mert_330m; bf16, fp16; eager and train.compile), the real
# loader's data wait, EnCodec and k-means label dumps, extraction with patchout; one table, and OUT/gpu.json.
# At most 8 minutes on one H100/H200. It installs nothing. On a GPU machine without network that has torch 2.11 +
# torchaudio 2.11 on Python 3.12: first, on a machine with network, from the project root,
#   python3 launch/wheelhouse.py .whl --python 3.12 --without torch,torchaudio
# fills .whl/ (ignored by git); take .whl/ along with the checkout and, from the project root there, run
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit; bash bench/gpu.sh
#
#   bash bench/gpu.sh [--out bench_out/gpu] [--sections train,loader,encodec,kmeans,extract]
#   bash bench/gpu.sh --smoke [--out DIR]      # the same code paths on CPU at tiny sizes, about a minute
# PYTHON (default python3) is the interpreter; a relative --out is taken from the project root.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "${PYTHON:-python3}" bench/gpu.py "$@"
