"""Label-dump throughput per core: k-means teachers (features + nearest centroid) and EnCodec.

    python bench/labels.py [--minutes 3] [--device cpu] [--threads 1] [--default-malloc]

Generates and shards a small demo corpus, fits the two k-means teachers of
configs/teachers/ on it (few frames: fit time is not what is measured), then
times `teacher.encode` over every segment, one process with --threads
threads, interleaved over --rounds rounds, and prints audio-seconds per
second per core (median) next to raw FLAC decoding of the same segments.
EnCodec runs randomly initialised: the same network and cost as the
pretrained model, whose paper reports about 10x real time on one CPU core.
It runs with the malloc settings the dump CLIs use (teachers.dump.MALLOC_ENV, unless
MUSICPT_NO_MALLOC_TUNING is set);
--default-malloc measures without them.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from synth import demo  # noqa: E402
from data.audio import SAMPLE_RATE  # noqa: E402
from data.index import read_index  # noqa: E402
from data.shards import ShardConfig, audio_part, build  # noqa: E402
from data.tar import read_samples  # noqa: E402
from teachers.dump import restart_with_tuned_malloc  # noqa: E402
from teachers.encodec import EncodecTeacher  # noqa: E402
from teachers.kmeans import KMeansTeacher, fit, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODEC_PAPER_X_REAL_TIME = 10.0


def make_shards(tmp: str, minutes: float) -> str:
    demo.generate(os.path.join(tmp, "demo"), minutes=minutes, seed=0)
    out = os.path.join(tmp, "shards")
    build(os.path.join(tmp, "demo", "audio"), out, ShardConfig(shard_bytes=8 * 2**20), workers=1)
    return out


def load_segments(shards: str) -> list[bytes]:
    return [audio_part(parts) for s in read_index(shards)["shards"]
            for _, _, _, parts in read_samples(os.path.join(shards, s["name"]))]


def rate(fn, flacs: list[bytes]) -> float:
    """Audio-seconds per second of decoding every segment and passing it to fn."""
    started, seconds = time.perf_counter(), 0.0
    for flac in flacs:
        audio = torch.from_numpy(sf.read(io.BytesIO(flac), dtype="float32")[0])
        with torch.inference_mode():
            fn(audio)
        seconds += len(audio) / SAMPLE_RATE
    return seconds / (time.perf_counter() - started)


def kmeans_teacher(name: str, shards: str, tmp: str, device: str) -> KMeansTeacher:
    cfg = load_config(os.path.join(REPO, "configs", "teachers", f"{name}.yaml"),
                      [f"shards={shards}", f"out={tmp}/{name}", "max_frames=20000", "iterations=5"])
    fit(cfg)
    return KMeansTeacher(cfg.out, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(tmp, args.minutes)
        flacs = load_segments(shards)
        teachers = {name: kmeans_teacher(name, shards, tmp, args.device) for name in ("logmel_chroma", "mfcc")}
        teachers["encodec (random init)"] = EncodecTeacher(random_init=True, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates: dict[str, list[float]] = {"raw FLAC decode": [], **{name: [] for name in teachers}}
        for _ in range(args.rounds):
            rates["raw FLAC decode"].append(rate(lambda audio: None, flacs))
            for name, teacher in teachers.items():
                rates[name].append(rate(teacher.encode, flacs))
    cores = args.threads if args.device == "cpu" else 1
    print(f"{len(flacs)} segments, {args.minutes} min of audio, device {args.device}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    for name, values in rates.items():
        per_core = float(np.median(values)) / cores
        print(f"{name:<24} {per_core:9.1f} audio-s/s per {'core' if args.device == 'cpu' else 'device'}")
    encodec = float(np.median(rates["encodec (random init)"])) / cores
    print(f"encodec x real time / paper's ~{ENCODEC_PAPER_X_REAL_TIME:.0f}x on one core: {encodec / ENCODEC_PAPER_X_REAL_TIME:.2f}")


if __name__ == "__main__":
    if "--default-malloc" in sys.argv:
        sys.argv.remove("--default-malloc")
    else:
        restart_with_tuned_malloc(sys.argv)  # as the dump CLIs run
    main()
