#!/usr/bin/env bash
# The whole pipeline, as far as it exists, on the embedded demo corpus, on CPU:
#   demo corpus -> audio shards -> one pass of the streaming loader.
# Later stages (teachers, trainer, probing) join this script as they land.
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

echo "== 1/3 demo corpus: 10 minutes of synthetic music in 24 keys"
"$PY" -m data.demo --out "$WORK/corpus" --minutes 10
echo "== 2/3 shards: 24 kHz mono FLAC segments in WebDataset tars"
"$PY" -m data.shards build --input "$WORK/corpus/audio" --out "$WORK/shards" --workers 2 --shard-size 4M
echo "== 3/3 streaming loader: one evaluation pass over every sample"
"$PY" - "$WORK/shards" <<'PYEOF'
import sys
from data.stream import AudioLoader, StreamConfig
loader = AudioLoader(StreamConfig(sys.argv[1], crop_seconds=5.0, batch_size=8, num_workers=2, train=False))
batches = list(loader)
seconds = sum(b["lengths"].sum().item() for b in batches) / 24000
print(f"loader: {len(batches)} batches, {sum(len(b['keys']) for b in batches)} crops, {seconds:.0f} s of audio, "
      f"shape {tuple(batches[0]['audio'].shape)}")
PYEOF
echo "demo done: outputs in $WORK/ (teachers and trainer are not built yet)"
