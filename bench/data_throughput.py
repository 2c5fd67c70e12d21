"""Loader throughput over FLAC and WAV shards against raw soundfile FLAC decoding of the same audio.

    python bench/data_throughput.py [--shards DIR [DIR ...]] [--codecs flac wav] [--minutes 10] [--workers 1]
                                    [--json bench/results/data_throughput.json]

Without --shards it generates the demo corpus and shards it once per codec (`data.shards build --codec`) in
a temporary folder. It prints, in audio-seconds per second per core:
  raw      soundfile decoding every segment's FLAC whole, bytes already in memory (one core): the peer
  naive    the webdataset library pipeline: read tar, decode whole FLAC, crop (one core)
  loader   data.stream.AudioLoader per shard set: read tar, shuffle, read only the crop, batch (per worker)
the ratio loader / raw for each shard set (targets: >= 0.9 at 5 s crops) and each set's bytes per audio-second,
as medians of per-round ratios (rounds are interleaved because CPU speed on shared machines drifts). The loader
delivers crops, so it decodes less than it reads: that is the point of seeking inside the member. --json writes
the figures (the docs' table is made of that file by bench/report.py).
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

from synth import demo  # noqa: E402
from data.files import atomic_write_json  # noqa: E402
from data.audio import SAMPLE_RATE  # noqa: E402
from data.index import read_index  # noqa: E402
from data.shards import AUDIO_PARTS, ShardConfig, audio_codec, audio_part, build  # noqa: E402
from data.stream import AudioLoader, StreamConfig, choose_offset  # noqa: E402
from data.tar import read_samples  # noqa: E402


def raw_decode_rate(encoded: list[bytes]) -> float:
    started, seconds = time.perf_counter(), 0.0
    for member in encoded:
        audio, _ = sf.read(io.BytesIO(member), dtype="float32")
        seconds += len(audio) / SAMPLE_RATE
    return seconds / (time.perf_counter() - started)


def naive_rate(paths: list[str], crop_seconds: float, rng: np.random.Generator) -> float:
    crop = int(crop_seconds * SAMPLE_RATE)
    started, seconds = time.perf_counter(), 0.0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        audio, _ = sf.read(io.BytesIO(audio_part(sample)), dtype="float32")
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


def make_shards(tmp: str, minutes: float, codecs: list[str]) -> list[str]:
    demo.generate(os.path.join(tmp, "demo"), minutes=minutes, seed=0)
    folders = [os.path.join(tmp, f"shards-{codec}") for codec in codecs]
    for codec, out in zip(codecs, folders):
        build(os.path.join(tmp, "demo", "audio"), out, ShardConfig(shard_bytes=8 * 2**20, codec=codec), workers=2)
    return folders


def shard_set(folder: str) -> dict:
    """A shard folder's tar paths, codec, audio members (bytes) and bytes per audio-second."""
    paths = sorted(glob.glob(os.path.join(folder, "shard-*.tar")))
    samples = [parts for p in paths for _, _, _, parts in read_samples(p)]
    hours = read_index(folder)["hours"]
    return {"folder": folder, "paths": paths, "codec": audio_codec(samples[0]), "members": [audio_part(s) for s in samples],
            "bytes_per_second": sum(os.path.getsize(p) for p in paths) / (hours * 3600), "minutes": hours * 60}


def figures(args, sets: list[dict], rates: dict) -> dict:
    """What the run measured, as written by --json: medians over the rounds, and each loader's per-round ratios."""
    raw = np.array(rates["raw"])
    loader = {}
    for s in sets:
        rate = np.array(rates[s["folder"]])
        loader[s["codec"]] = {"rate": float(np.median(rate)), "ratio_to_raw": float(np.median(rate / raw)),
                              "ratio_to_naive": float(np.median(rate / np.array(rates["naive"]))),
                              "ratio_per_round": [round(float(r), 3) for r in rate / raw],
                              "bytes_per_second": s["bytes_per_second"]}
    return {"cores": os.cpu_count(), "workers": args.workers, "crop_seconds": args.crop_seconds,
            "batch_size": args.batch_size, "rounds": args.rounds, "minutes": round(sets[0]["minutes"], 2),
            "raw": float(np.median(raw)), "naive": float(np.median(rates["naive"])),
            "naive_ratio_to_raw": float(np.median(np.array(rates["naive"]) / raw)), "loader": loader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", nargs="+", help="existing shard folders (default: build them from the demo corpus)")
    parser.add_argument("--codecs", nargs="+", choices=AUDIO_PARTS, default=list(AUDIO_PARTS),
                        help="codecs of the shard sets built without --shards")
    parser.add_argument("--minutes", type=float, default=10.0, help="demo corpus size when --shards is not given")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--batches", type=int, default=30, help="loader batches per round")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved measurement rounds; medians are printed")
    parser.add_argument("--json", help="write the figures to this file (bench/results/data_throughput.json: the docs' table)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-seconds", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [shard_set(f) for f in (args.shards or make_shards(tmp, args.minutes, args.codecs))]
        peer = next((s for s in sets if s["codec"] == "flac"), sets[0])  # raw whole-member decode of this set
        loaders = []
        for s in sets:
            cfg = StreamConfig(s["folder"], crop_seconds=args.crop_seconds, batch_size=args.batch_size,
                               num_workers=args.workers, shuffle_buffer=64, prefetch_factor=4)
            loaders.append((iter(AudioLoader(cfg, rank=0, world=1)), cfg.prefetch_factor))
            next(loaders[-1][0])  # worker start-up is not throughput
        rng = np.random.default_rng(0)
        rates = {"raw": [], "naive": [], **{s["folder"]: [] for s in sets}}
        for _ in range(args.rounds):  # interleaved: a noisy neighbour slows them all alike
            rates["raw"].append(raw_decode_rate(peer["members"]))
            rates["naive"].append(naive_rate(peer["paths"], args.crop_seconds, rng))
            for s, (batches, prefetch) in zip(sets, loaders):
                rates[s["folder"]].append(loader_rate(batches, args.batches, args.workers, args.workers * prefetch))
    result = figures(args, sets, rates)
    print(f"cores: {result['cores']}, loader workers: {args.workers}, crop {args.crop_seconds} s, batch {args.batch_size}, "
          f"{args.rounds} rounds (medians)")
    print(f"raw soundfile {peer['codec'].upper()} decode{'':<9}: {result['raw']:8.0f} audio-s/s per core")
    print(f"naive webdataset pipeline ({peer['codec']:<4}) : {result['naive']:8.0f} audio-s/s per core (delivered crops)")
    for codec, loader in result["loader"].items():
        print(f"AudioLoader over {codec:<4} shards   : {loader['rate']:8.0f} audio-s/s per worker (delivered crops); "
              f"{loader['bytes_per_second'] / 1000:.1f} kB per audio-second on disk")
        print(f"  ratio to raw {peer['codec']} decode     : {loader['ratio_to_raw']:.2f} (target >= 0.90); per round: "
              + " ".join(f"{r:.2f}" for r in loader["ratio_per_round"]))
        print(f"  ratio to naive             : {loader['ratio_to_naive']:.2f}")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
