#!/usr/bin/env bash
# The whole pipeline, as far as it exists, on the embedded demo corpus, on CPU:
#   demo corpus -> audio shards -> teachers (k-means log-mel+chroma and MFCC: fit + dump;
#   EnCodec codes from a RANDOM-INIT model, since pretrained weights cannot be downloaded here)
#   -> one pass of the streaming loader with every teacher's labels joined.
# Later stages (trainer, probing) join this script as they land.
# Usage: bash launch/demo.sh [WORK_DIR] (default: demo_out/); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_out}
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    python3 -m venv .venv
fi
"$PY" -m pip install --quiet -e .
export OMP_NUM_THREADS=1

SHARDS="$WORK/shards"
echo "== 1/5 demo corpus: 10 minutes of synthetic music in 24 keys"
"$PY" -m data.demo --out "$WORK/corpus" --minutes 10
echo "== 2/5 shards: 24 kHz mono FLAC segments in WebDataset tars"
"$PY" -m data.shards build --input "$WORK/corpus/audio" --out "$SHARDS" --workers 2 --shard-size 4M
for teacher in logmel_chroma mfcc; do
    echo "== 3/5 k-means teacher $teacher: fit, then label every frame"
    for stage in fit dump; do
        "$PY" -m teachers.kmeans $stage --config configs/teachers/$teacher.yaml \
            shards="$SHARDS" out="$WORK/teachers/$teacher" --workers 2
    done
done
echo "== 4/5 EnCodec teacher (random init: pass --weights PATH for the real codes)"
"$PY" -m teachers.encodec dump --shards "$SHARDS" --random-init --device cpu --workers 2
echo "== 5/5 streaming loader: one evaluation pass over every sample, labels joined"
"$PY" - "$SHARDS" <<'PYEOF'
import sys, warnings
from data.stream import AudioLoader, StreamConfig
shards = sys.argv[1]
labels = tuple(f"{shards}/labels/{name}" for name in ("logmel_chroma", "mfcc", "encodec"))
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*random-init.*")
    loader = AudioLoader(StreamConfig(shards, crop_seconds=5.0, batch_size=8, num_workers=2, train=False, labels=labels))
batches = list(loader)
seconds = sum(b["lengths"].sum().item() for b in batches) / 24000
print(f"loader: {len(batches)} batches, {sum(len(b['keys']) for b in batches)} crops, {seconds:.0f} s of audio, "
      f"audio {tuple(batches[0]['audio'].shape)}, labels "
      + ", ".join(f"{name} {tuple(codes.shape)}" for name, codes in batches[0]["labels"].items()))
PYEOF
echo "demo done: outputs in $WORK/ (the trainer is not built yet)"
