#!/usr/bin/env bash
# The whole pipeline on the embedded demo corpus, on CPU:
#   demo corpus (10 minutes of synthetic music in 24 keys: WAV, FLAC, OGG (MP3 where libsndfile writes it), 22-48 kHz, mono and stereo, plus
#   one unreadable file) -> bash launch/recipe.sh: audio shards -> the teacher the preset trains on (k-means
#   log-mel + chroma: fit + dump) -> pretraining of the tiny preset (300 steps) -> weights-only and Hugging Face
#   exports -> MARBLE-style probes (pitch, instrument family, key) on a separate labelled probe corpus: the trained
#   encoder against the same architecture untrained and against MFCC, chroma and log-mel statistics.
# Everything goes to WORK_DIR/PRESET_NAME/ (demo_out/tiny/), beside the corpus (demo_out/corpus/).
# Usage: [PRESET=configs/tiny.yaml] bash launch/demo.sh [WORK_DIR] (default: demo_out/); safe to re-run: what is
# done is skipped. PRESET=configs/tiny_data2vec.yaml trains with data2vec's objective (no teacher stage).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-demo_out}
PRESET=${PRESET:-configs/tiny.yaml}
NAME=$(basename "$PRESET" .yaml)  # each preset's run in its own folder beside the shared corpus
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    python3 -m venv .venv
fi
"$PY" -m pip install --quiet -e .
export OMP_NUM_THREADS=1

echo "== 1/3 demo corpus: 10 minutes of synthetic music in 24 keys"
"$PY" -m synth.demo --out "$WORK/corpus" --minutes 10
printf 'RIFF, but not audio' > "$WORK/corpus/audio/unreadable.wav"  # skipped by the sharder, with its reason
echo "== 2/3 the recipe: bash launch/recipe.sh $WORK/corpus/audio $PRESET --work $WORK/$NAME"
PYTHON="$PY" bash launch/recipe.sh "$WORK/corpus/audio" "$PRESET" --work "$WORK/$NAME" --workers 2
echo "== 3/3 what the encoder learned: probes on a separate labelled corpus (held-out timbres)"
# Pitch of single notes, instrument family of phrases, key of chord progressions, played by synthetic timbres
# that neither the training corpus nor the probes' train split contain. The trained encoder against the same
# architecture at its step-0 init and MFCC / chroma / log-mel statistics (bench/learning.py, probe stages only).
"$PY" bench/learning.py --run "$WORK/$NAME/runs/$NAME" --work "$WORK/$NAME/learning" --scale 0.5
echo "demo done: outputs in $WORK/$NAME/ (the encoder: $WORK/$NAME/encoder.pt and $WORK/$NAME/hf/)"
