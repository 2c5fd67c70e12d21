#!/usr/bin/env bash
# The whole pipeline on the embedded demo corpus, on CPU:
#   demo corpus -> audio shards -> teachers (k-means log-mel+chroma and MFCC: fit + dump;
#   EnCodec codes from a RANDOM-INIT model, since pretrained weights cannot be downloaded here)
#   -> one pass of the streaming loader with every teacher's labels joined
#   -> pretraining of the tiny preset, interrupted by SIGTERM and resumed: configs/tiny_data2vec.yaml (an EMA
#      teacher's layers as targets), the objective that learns most at this scale (README);
#      PRESET=configs/tiny.yaml bash launch/demo.sh trains MERT's objective on the k-means log-mel+chroma labels
#   -> a summary and a weights-only export of the encoder
#   -> MARBLE-style probes (pitch, instrument, key) on a separate labelled probe corpus: the trained model
#      against the same architecture untrained and against MFCC, chroma and log-mel statistics.
# Usage: [PRESET=configs/tiny_data2vec.yaml] bash launch/demo.sh [WORK_DIR] (default: demo_out/); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_out}
PRESET=${PRESET:-configs/tiny_data2vec.yaml}
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    python3 -m venv .venv
fi
"$PY" -m pip install --quiet -e .
export OMP_NUM_THREADS=1

SHARDS="$WORK/shards"
echo "== 1/8 demo corpus: 10 minutes of synthetic music in 24 keys"
"$PY" -m data.demo --out "$WORK/corpus" --minutes 10
echo "== 2/8 shards: 24 kHz mono FLAC segments in WebDataset tars"
"$PY" -m data.shards build --input "$WORK/corpus/audio" --out "$SHARDS" --workers 2 --shard-size 4M
for teacher in logmel_chroma mfcc; do
    echo "== 3/8 k-means teacher $teacher: fit, then label every frame"
    for stage in fit dump; do
        "$PY" -m teachers.kmeans $stage --config configs/teachers/$teacher.yaml \
            shards="$SHARDS" out="$WORK/teachers/$teacher" --workers 2
    done
done
echo "== 4/8 EnCodec teacher (random init: pass --weights PATH for the real codes)"
"$PY" -m teachers.encodec dump --shards "$SHARDS" --random-init --device cpu --workers 2
echo "== 5/8 streaming loader: one evaluation pass over every sample, labels joined"
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
RUN="$WORK/runs/$(basename "$PRESET" .yaml)"
LABELS=()  # MERT's objective trains on the k-means labels; data2vec and BEST-RQ make their targets in the step
if "$PY" -c 'import sys; from pretrain.config import reads_labels; sys.exit(not reads_labels(sys.argv[1]))' "$PRESET"; then
    LABELS=("data.labels=[$SHARDS/labels/logmel_chroma]")
fi
TRAIN=("$PY" -m pretrain.train --config "$PRESET" data.shards="$SHARDS" "${LABELS[@]}" train.run_dir="$RUN")
echo "== 6/8 pretraining $PRESET: 300 steps, stopped by SIGTERM after step 120, then resumed"
if grep -qs '"state": "finished"' "$RUN/status.json"; then
    echo "-- already trained: $RUN (delete it to train again)"
else
    "${TRAIN[@]}" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null && ! grep -qs '"step": 120,' "$RUN/metrics.jsonl"; do sleep 1; done
    kill -TERM "$pid" 2>/dev/null || true  # what a cluster sends before preempting: save a checkpoint, exit
    wait "$pid" || true
    echo "-- stopped; the same command again resumes from the newest checkpoint"
    "${TRAIN[@]}" | grep -v '^  \|^[a-z_]*:$\|^# resolved'
fi
echo "== 7/8 summary and export"
"$PY" -m pretrain.export --ckpt "$RUN" --out "$WORK/encoder.pt"
"$PY" - "$RUN" <<'PYEOF'
import json, sys
run = sys.argv[1]
all_rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
rows = [row for row in all_rows if "loss" in row]  # training rows, not the eval/collapse rows
first, last = rows[0], rows[-1]
terms = {"loss/data2vec": "data2vec regression", "loss/cqt": "CQT loss"}
parts = [f"{name} {first[key]:.3f} -> {last[key]:.3f}" for key, name in terms.items() if key in last]
accs = [key for key in last if key.startswith("acc/")]
if accs:
    acc = lambda row: sum(row[key] for key in accs) / len(accs)
    parts.append(f"masked accuracy {acc(first):.3f} -> {acc(last):.3f}")
print(f"steps {first['step']} -> {last['step']}: loss {first['loss']:.2f} -> {last['loss']:.2f}, " + ", ".join(parts))
evals = [row for row in all_rows if "collapse/effective_rank" in row]
if evals:
    print(f"collapse signals (pretrain/validate.py): output effective rank {evals[0]['collapse/effective_rank']:.0f} "
          f"at step {evals[0]['step']} -> {evals[-1]['collapse/effective_rank']:.0f} at step {evals[-1]['step']}, "
          f"conv features {evals[0]['collapse/conv_effective_rank']:.0f} -> {evals[-1]['collapse/conv_effective_rank']:.0f}")
print(f"checkpoints: {run}/checkpoints   metrics: {run}/metrics.jsonl   TensorBoard: tensorboard --logdir {run}/tensorboard")
if last["loss"] >= first["loss"]:
    sys.exit("the loss did not fall: something is wrong")
PYEOF
echo "== 8/8 what the encoder learned: probes on a separate labelled corpus (held-out timbres)"
# Pitch of single notes, instrument family of phrases, key of chord progressions, played by synthetic timbres
# that neither the training corpus nor the probes' train split contain. The trained encoder against the same
# architecture at its step-0 init and MFCC / chroma / log-mel statistics (bench/learning.py, probe stages only).
"$PY" bench/learning.py --run "$RUN" --work "$WORK/learning" --scale 0.5
echo "demo done: outputs in $WORK/"
