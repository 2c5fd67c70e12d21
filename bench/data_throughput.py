"""Loader throughput against raw soundfile FLAC decoding of the same shards, on this machine.

    python bench/data_throughput.py [--shards DIR] [--minutes 10] [--workers 1] [--batches 60]

Without --shards it generates the demo corpus and shards it in a temporary
folder first. It prints, in audio-seconds per second per core:
  raw      soundfile decoding every segment's FLAC whole, bytes already in memory (one core)
  naive    the webdataset library pipeline: read tar, decode whole FLAC, crop (one core)
  loader   data.stream.AudioLoader: read tar, shuffle, decode only the crop, batch (per worker)
and the ratio loader / raw (target >= 0.7), as medians of per-round ratios
(rounds are interleaved because CPU speed on shared machines drifts). The loader delivers crops, so it
decodes less than it reads: that is the point of seeking inside the FLAC.
"""
from __future__ import annotations

import argparse
import glob
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
import webdataset as wds  # noqa: E402

from data import demo  # noqa: E402
from data.audio import SAMPLE_RATE  # noqa: E402
from data.shards import ShardConfig, build  # noqa: E402
from data.stream import AudioLoader, StreamConfig, choose_offset
from data.tar import read_samples  # noqa: E402


def raw_decode_rate(flacs: list[bytes]) -> float:
    started, seconds = time.perf_counter(), 0.0
    for flac in flacs:
        audio, _ = sf.read(io.BytesIO(flac), dtype="float32")
        seconds += len(audio) / SAMPLE_RATE
    return seconds / (time.perf_counter() - started)


def naive_rate(paths: list[str], crop_seconds: float, rng: np.random.Generator) -> float:
    crop = int(crop_seconds * SAMPLE_RATE)
    started, seconds = time.perf_counter(), 0.0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        audio, _ = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
        offset = choose_offset(len(audio), crop, rng)
        seconds += len(audio[offset:offset + crop]) / SAMPLE_RATE
    return seconds / (time.perf_counter() - started)


def loader_rate(batches, count: int, workers: int, prefetched: int) -> float:
    for _ in range(prefetched):  # made while the other rates were measured: not counted
        next(batches)
    started, seconds = time.perf_counter(), 0.0
    for _ in range(count):
        seconds += next(batches)["lengths"].sum().item() / SAMPLE_RATE
    return seconds / (time.perf_counter() - started) / max(workers, 1)


def make_shards(tmp: str, minutes: float) -> str:
    demo.generate(os.path.join(tmp, "demo"), minutes=minutes, seed=0)
    out = os.path.join(tmp, "shards")
    build(os.path.join(tmp, "demo", "audio"), out, ShardConfig(shard_bytes=8 * 2**20), workers=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="existing shard folder (default: build one from the demo corpus)")
    parser.add_argument("--minutes", type=float, default=10.0, help="demo corpus size when --shards is not given")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--batches", type=int, default=30, help="loader batches per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved measurement rounds; medians are printed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates = {"raw": [], "naive": [], "loader": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(tmp, args.minutes)
        paths = sorted(glob.glob(os.path.join(shards, "shard-*.tar")))
        flacs = [parts["flac"] for p in paths for _, _, _, parts in read_samples(p)]
        cfg = StreamConfig(shards, crop_seconds=args.crop_seconds, batch_size=args.batch_size,
                           num_workers=args.workers, shuffle_buffer=64, prefetch_factor=4)
        batches = iter(AudioLoader(cfg, rank=0, world=1))
        next(batches)  # worker start-up is not throughput
        rng = np.random.default_rng(0)
        for _ in range(args.rounds):  # interleaved: a noisy neighbour slows all three alike
            rates["raw"].append(raw_decode_rate(flacs))
            rates["naive"].append(naive_rate(paths, args.crop_seconds, rng))
            rates["loader"].append(loader_rate(batches, args.batches, args.workers, args.workers * cfg.prefetch_factor))
    raw, naive, loader = (np.array(rates[k]) for k in ("raw", "naive", "loader"))
    print(f"cores: {os.cpu_count()}, loader workers: {args.workers}, crop {args.crop_seconds} s, batch {args.batch_size}")
    print(f"raw soundfile FLAC decode : {np.median(raw):8.0f} audio-s/s per core")
    print(f"naive webdataset pipeline : {np.median(naive):8.0f} audio-s/s per core (delivered crops)")
    print(f"data.stream.AudioLoader   : {np.median(loader):8.0f} audio-s/s per worker (delivered crops)")
    print(f"ratio loader / raw decode : {np.median(loader / raw):.2f}  (median of {args.rounds} rounds; target >= 0.70)")
    print(f"ratio loader / naive      : {np.median(loader / naive):.2f}")
    print("per-round loader / raw    :", " ".join(f"{r:.2f}" for r in loader / raw))


if __name__ == "__main__":
    main()
