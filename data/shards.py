"""Audio files -> WebDataset shards of 24 kHz mono 16-bit segments (FLAC, or WAV with `--codec wav`).

    python -m data.shards build --input AUDIO_DIR_OR_MANIFEST --out SHARDS [--workers 8] [--codec flac|wav]

OUT holds:
  plan.json           which source goes into which shard; made once, reused by re-runs and by every rank
  shard-NNNNNN.tar    KEY.flac or KEY.wav (mono, 24 kHz, 16 bit) + KEY.json (source, offset, duration, samples)
  shard-NNNNNN.json   the shard's summary, written after the tar is renamed: its presence means "done"
  index.json          every shard, counts, hours, content hash: written when all shards are done
  report.json         (report.rankR.json with --world > 1) every skipped file or segment and why

The codec trades bytes for the loader's CPU: a WAV member is ~1.5x a FLAC one on disk, but a random crop
of it is one read, no decoding, and a loader worker delivers ~3x the audio from WAV shards
(bench/data_throughput.py --codecs flac wav). Every reader takes either (`audio_part`), so both kinds of shard sets train alike.

A tar is written under a temporary name and renamed when complete, so a
killed build never leaves a half shard that looks whole; a re-run skips the
shards whose summary exists.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data.audio import AUDIO_EXTENSIONS, FRAME_SAMPLES, SAMPLE_RATE, AudioError, probe, samples_problem, stream_mono
from data.cluster import rank_world
from data.files import atomic_write_json, read_json, remove_temporaries
from data.index import INDEX_NAME, shard_name, summary_path, try_write_index
from data.logs import setup_logging

PLAN_NAME = "plan.json"
# Planning estimates of a second of 24 kHz 16-bit mono: level-0 FLAC of music keeps ~60-70% of PCM's 48 kB.
BYTES_PER_SECOND = {"flac": 32_000, "wav": 48_000}
AUDIO_PARTS = tuple(BYTES_PER_SECOND)  # the audio member of a sample is KEY.<one of these>


class ShardError(Exception):
    """A shard folder that cannot be built or finished as asked; the message names it and what to do."""


@dataclass(frozen=True)
class ShardConfig:
    segment_seconds: float = 30.0
    min_segment_seconds: float = 1.0
    shard_bytes: int = 512 * 2**20
    silence_db: float = -60.0
    min_sample_rate: int = 8000
    seed: int = 0
    codec: str = "flac"  # the audio members: "flac" (smaller) or "wav" (~3x the loader's audio per worker)

    def __post_init__(self):
        if self.codec not in BYTES_PER_SECOND:
            raise ValueError(f"ShardConfig.codec={self.codec!r}: use one of {AUDIO_PARTS}")


def audio_codec(parts: dict) -> str:
    """Which of AUDIO_PARTS holds the audio of a sample read by `data.tar.read_samples`. KeyError names the
    parts found when there is none."""
    for ext in AUDIO_PARTS:
        if ext in parts:
            return ext
    raise KeyError(f"no audio member ({' or '.join('.' + e for e in AUDIO_PARTS)}) among {sorted(parts)}")


def audio_part(parts: dict):
    """The audio member of a sample (bytes, or a Member when read lazily), whichever codec."""
    return parts[audio_codec(parts)]


# ---------------------------------------------------------------- inputs and plan


def list_sources(input_path: str) -> tuple[str, list[str]]:
    """(root, sorted paths relative to root) from a folder or a manifest file."""
    if os.path.isdir(input_path):
        root = os.path.abspath(input_path)
        found = []
        for folder, _, names in os.walk(root, followlinks=True):
            found += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.lower().endswith(AUDIO_EXTENSIONS)]
        return root, sorted(found)
    if os.path.isfile(input_path):
        return _read_manifest(input_path)
    raise FileNotFoundError(f"--input {input_path}: no such folder or manifest file")


def _read_manifest(path: str) -> tuple[str, list[str]]:
    """One path per line (relative to the manifest's folder), or fairseq's TSV (root line, then path<TAB>frames)."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    root = os.path.dirname(os.path.abspath(path))
    if lines and os.path.isdir(lines[0]) and all("\t" in line for line in lines[1:]):
        root, lines = os.path.abspath(lines[0]), [line.split("\t")[0] for line in lines[1:]]
    return root, sorted(set(lines))


def sources_hash(root: str, rels: list[str]) -> str:
    digest = hashlib.sha256()
    for rel in rels:
        try:
            size = os.path.getsize(os.path.join(root, rel))
        except OSError:
            size = -1
        digest.update(f"{rel}\0{size}\n".encode())
    return digest.hexdigest()


def _probe_one(job: tuple[str, str, int]) -> dict:
    root, rel, min_rate = job
    try:
        info = probe(os.path.join(root, rel), min_rate)
    except AudioError as e:
        return {"path": rel, "reason": e.reason, "detail": e.detail}
    return {"path": rel, "frames": info.frames, "rate": info.sample_rate, "channels": info.channels}


def make_plan(root: str, rels: list[str], cfg: ShardConfig, pool) -> dict:
    """Probe every file's header, shuffle with the seed, pack into shards of about cfg.shard_bytes."""
    jobs = [(root, rel, cfg.min_sample_rate) for rel in rels]
    results = list(tqdm(_map(pool, _probe_one, jobs), total=len(jobs), desc="probe", unit="file", disable=not rels))
    results.sort(key=lambda result: result["path"])  # workers answer in any order; every rank must plan alike
    usable = [r for r in results if "frames" in r]
    random.Random(cfg.seed).shuffle(usable)
    shards: list[list[dict]] = []
    filled = math.inf
    for entry in usable:
        size = entry["frames"] / entry["rate"] * BYTES_PER_SECOND[cfg.codec]
        if filled + size > cfg.shard_bytes and filled > 0:
            shards.append([])
            filled = 0.0
        shards[-1].append(entry)
        filled += size
    return {
        "root": root,
        "config": asdict(cfg),
        "sources_hash": sources_hash(root, rels),
        "shards": shards,
        "skipped": [r for r in results if "frames" not in r],
    }


def load_or_make_plan(out_dir: str, root: str, rels: list[str], cfg: ShardConfig, pool) -> dict:
    path = os.path.join(out_dir, PLAN_NAME)
    if not os.path.exists(path):
        plan = make_plan(root, rels, cfg, pool)
        atomic_write_json(path, plan)  # every rank computes the same plan; the last rename wins harmlessly
        return plan
    plan = read_json(path, "a shard plan")
    planned = plan["config"]
    changed = [k for k, v in asdict(cfg).items() if planned.get(k) != v]
    if changed:
        was = ", ".join(f"{k}={planned.get(k)}" for k in changed)
        raise ShardError(
            f"{path}: this folder was built with other settings ({was}). "
            "Re-run with the same settings to finish it, or use a new --out."
        )
    if plan["root"] != root or plan["sources_hash"] != sources_hash(root, rels):
        raise ShardError(
            f"{path}: the input files differ from those this folder was built from ({plan['root']}). "
            "Use a new --out for a new corpus, or delete this folder to rebuild it."
        )
    return plan


# ---------------------------------------------------------------- one shard


def segment_samples(expected: int, cfg: ShardConfig) -> int:
    """Split a track into equal frame-aligned pieces of at most segment_seconds (no tiny tail)."""
    longest = int(cfg.segment_seconds * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
    pieces = max(1, math.ceil(expected / longest))
    return min(longest, math.ceil(expected / pieces / FRAME_SAMPLES) * FRAME_SAMPLES)


def iter_segments(path: str, length: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset in samples, audio) pieces of `length`; the last may be shorter."""
    buffer = np.zeros(0, np.float32)
    offset = 0
    for block in stream_mono(path):
        buffer = np.concatenate([buffer, block])
        while len(buffer) >= length:
            yield offset, buffer[:length]
            buffer, offset = buffer[length:], offset + length
    if len(buffer):
        yield offset, buffer


def segment_problem(audio: np.ndarray, cfg: ShardConfig) -> str | None:
    if len(audio) < cfg.min_segment_seconds * SAMPLE_RATE:
        return "too_short"
    problem = samples_problem(audio)
    if problem:
        return problem
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms <= 10 ** (cfg.silence_db / 20):
        return "silent"
    return None


def encode_flac(audio: np.ndarray) -> bytes:
    """16-bit FLAC at compression level 0: 1152-sample blocks and fixed predictors make the
    loader's seek-and-decode of a crop ~11% faster than the default level, for ~6% more bytes."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=0.0)
    return buffer.getvalue()


def encode_wav(audio: np.ndarray) -> bytes:
    """16-bit PCM WAV: a crop is a seek past the 44-byte header and a copy, no decoding. Rounded to int16
    here as libsndfile's FLAC writer does (its WAV writer truncates), so both codecs hold the same samples."""
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


ENCODERS = {"flac": encode_flac, "wav": encode_wav}


def sample_key(rel: str, segment: int) -> str:
    return f"{hashlib.sha1(rel.encode()).hexdigest()[:16]}_{segment:04d}"


class _HashingWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    tar.addfile(info, io.BytesIO(payload))


def _write_track(tar, root: str, entry: dict, cfg: ShardConfig, summary: dict) -> None:
    rel = entry["path"]
    expected = round(entry["frames"] * SAMPLE_RATE / entry["rate"])
    delivered = 0
    try:
        for segment, (offset, audio) in enumerate(iter_segments(os.path.join(root, rel), segment_samples(expected, cfg))):
            delivered = offset + len(audio)
            problem = segment_problem(audio, cfg)
            if problem:
                summary["skipped"].append({"path": rel, "reason": problem, "detail": f"segment {segment} at {offset / SAMPLE_RATE:.1f} s"})
                continue
            key = sample_key(rel, segment)
            meta = {
                "source": rel, "segment": segment, "offset": offset / SAMPLE_RATE, "offset_samples": offset,
                "duration": len(audio) / SAMPLE_RATE, "samples": len(audio), "sample_rate": SAMPLE_RATE,
                "source_sample_rate": entry["rate"], "source_channels": entry["channels"],
            }
            _add_member(tar, f"{key}.{cfg.codec}", ENCODERS[cfg.codec](audio))
            _add_member(tar, key + ".json", json.dumps(meta, sort_keys=True).encode())
            summary["samples"] += 1
            summary["seconds"] += len(audio) / SAMPLE_RATE
    except AudioError as e:
        summary["skipped"].append({"path": rel, "reason": e.reason, "detail": e.detail})
        return
    if delivered < 0.99 * expected:
        summary["warnings"].append({"path": rel, "reason": "shorter_than_header", "detail": f"{delivered / SAMPLE_RATE:.1f} s of {expected / SAMPLE_RATE:.1f} s kept"})
    summary["files"] += 1


def write_shard(job: tuple[str, int, str, list[dict], ShardConfig]) -> dict:
    """Write one shard under a temporary name, rename it, then write its summary."""
    out_dir, shard_id, root, entries, cfg = job
    name = shard_name(shard_id)
    final = os.path.join(out_dir, name)
    tmp = f"{final}.tmp"
    summary = {"name": name, "samples": 0, "seconds": 0.0, "files": 0, "skipped": [], "warnings": []}
    with open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for entry in entries:
                _write_track(tar, root, entry, cfg, summary)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    summary.update(bytes=hashing.bytes, sha256=hashing.sha256.hexdigest())
    atomic_write_json(summary_path(out_dir, shard_id), summary)
    return summary


# ---------------------------------------------------------------- the build


def _map(pool, fn, jobs):
    return map(fn, jobs) if pool is None else pool.imap_unordered(fn, jobs, chunksize=1 if fn is write_shard else 16)


def report_path(out_dir: str, rank: int, world: int) -> str:
    return os.path.join(out_dir, "report.json" if world == 1 else f"report.rank{rank}.json")


def remove_stale_temporaries(out_dir: str, mine: list[int], rank: int, world: int) -> None:
    """Temporary files a killed run of this rank left: its shards' `.tmp` tars and the `NAME.XXXX.tmp` files of
    their summaries and its report (data.files.atomic_write_json). Other ranks' temporaries may be live: kept."""
    for tar in (os.path.join(out_dir, shard_name(i)) + ".tmp" for i in mine):
        if os.path.exists(tar):
            os.remove(tar)
    remove_temporaries([summary_path(out_dir, i) for i in mine] + [report_path(out_dir, rank, world)])


def build(input_path: str, out_dir: str, cfg: ShardConfig, workers: int = 1, rank: int | None = None, world: int | None = None) -> dict:
    """Build (or finish) this rank's shards; returns the report."""
    rank, world = rank_world(rank, world)
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    root, rels = list_sources(input_path)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        plan = load_or_make_plan(out_dir, root, rels, cfg, pool)
        mine = [i for i in range(len(plan["shards"])) if i % world == rank]
        remove_stale_temporaries(out_dir, mine, rank, world)
        todo = [i for i in mine if not os.path.exists(summary_path(out_dir, i))]
        jobs = [(out_dir, i, root, plan["shards"][i], cfg) for i in todo]
        for _ in tqdm(_map(pool, write_shard, jobs), total=len(jobs), desc=f"shards (rank {rank}/{world})", unit="shard", disable=not jobs):
            pass
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    summaries = [read_json(summary_path(out_dir, i), "a shard summary") for i in mine]
    report = {
        "rank": rank, "world": world, "input": input_path, "out": out_dir,
        "files_listed": len(rels), "shards_planned": len(plan["shards"]), "shards_mine": len(mine),
        "shards_written_now": len(todo), "samples": sum(s["samples"] for s in summaries),
        "hours": sum(s["seconds"] for s in summaries) / 3600,
        "skipped": (plan["skipped"] if rank == 0 else []) + [x for s in summaries for x in s["skipped"]],
        "warnings": [x for s in summaries for x in s["warnings"]],
        "seconds_taken": time.time() - started,
    }
    index = try_write_index(out_dir, plan)
    report["index"] = os.path.join(out_dir, INDEX_NAME) if index else None
    report["content_hash"] = index["content_hash"] if index else None
    atomic_write_json(report_path(out_dir, rank, world), report)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"shards   rank {report['rank']}/{report['world']}: {report['shards_mine']} of {report['shards_planned']} planned; "
        f"{report['shards_written_now']} written now, {report['shards_mine'] - report['shards_written_now']} already done",
        f"audio    {report['samples']} segments, {report['hours']:.3f} h from {report['files_listed']} files listed "
        f"({report['seconds_taken']:.1f} s)",
    ]
    counts: dict[str, int] = {}
    for item in report["skipped"]:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    for reason, count in sorted(counts.items()):
        lines.append(f"skipped  {reason:<16} {count}")
    for item in report["warnings"]:
        lines.append(f"warning  {item['reason']}: {item['path']} ({item['detail']})")
    if report["index"]:
        lines.append(f"index    {report['index']} (content hash {report['content_hash'][:12]})")
    else:
        lines.append("index    not yet: other ranks' shards are still missing; it is written by whichever rank finishes last")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}
    number = text.upper().rstrip("BGKM ")
    unit = text.upper()[len(number):].strip()
    if not number or unit not in units:
        raise argparse.ArgumentTypeError(f"size {text!r}: use bytes or a number with K, M or G (e.g. 512M)")
    return int(float(number) * units[unit])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="audio files -> shards (resumable, splittable with --rank/--world)")
    p.add_argument("--input", required=True, help="a folder (searched recursively) or a manifest: one path per line, or fairseq's TSV")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rank", type=int, help="this machine's part (default: SLURM array task / SLURM_PROCID / RANK, else 0)")
    p.add_argument("--world", type=int, help="number of parts (default: from SLURM or WORLD_SIZE, else 1)")
    defaults = ShardConfig()
    p.add_argument("--segment-seconds", type=float, default=defaults.segment_seconds)
    p.add_argument("--min-segment-seconds", type=float, default=defaults.min_segment_seconds)
    p.add_argument("--shard-size", type=parse_size, default=defaults.shard_bytes, help="target shard size, e.g. 512M or 1G")
    p.add_argument("--silence-db", type=float, default=defaults.silence_db, help="segments with RMS at or below this are skipped")
    p.add_argument("--min-sample-rate", type=int, default=defaults.min_sample_rate)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the file-to-shard shuffle")
    p.add_argument("--codec", choices=AUDIO_PARTS, default=defaults.codec,
                   help="flac: ~2/3 of wav's bytes; wav: ~3x the audio per loader worker")
    args = parser.parse_args(argv)
    setup_logging(args.rank)
    cfg = ShardConfig(args.segment_seconds, args.min_segment_seconds, args.shard_size, args.silence_db, args.min_sample_rate, args.seed,
                      args.codec)
    try:
        report = build(args.input, args.out, cfg, args.workers, args.rank, args.world)
    except (ShardError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(format_report(report), file=sys.stderr)


if __name__ == "__main__":
    main()
