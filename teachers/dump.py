"""The dump stage every teacher shares: shards -> one label sidecar per shard, resumable and splittable.

A teacher is any object with `name`, `codebooks`, `cardinality`,
`config_hash` and `encode(wave: float32 Tensor [samples]) -> int Tensor
[samples // 320, codebooks]`. Workers build their own teacher from a
picklable `make_teacher()`, so a model is loaded once per process. A teacher
that also has `encode_batch(waves: list of Tensors) -> list of codes` is given
`batch` segments of a shard at a time (a GPU is idle on one 30 s segment).
"""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys
import time
from typing import Callable

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from data.cluster import rank_world
from data.files import atomic_write_json, read_json, remove_temporaries
from data.index import read_index
from data.shards import audio_part
from data.tar import read_samples
from data.labels import (code_dtype, sidecar_path, summary_path, teacher_identity, try_write_manifest,
                             write_sidecar)
from teachers import TeacherError

_worker_teacher = None
# glibc returns freed blocks over 32 MB to the OS at once, so a conv net's large activations are page-faulted
# in anew on every call: EnCodec on 30 s segments spent half its time in the kernel (6.8x -> 13.4x real time
# on one core with these settings). They only act when set before the process starts.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": str(1 << 30)}


def restart_with_tuned_malloc(args: list[str]) -> None:
    """Re-run this process as `python *args` once with MALLOC_ENV set; workers inherit it.
    No-op when it is already set or MUSICPT_NO_MALLOC_TUNING is."""
    if all(os.environ.get(k) for k in MALLOC_ENV) or os.environ.get("MUSICPT_NO_MALLOC_TUNING"):
        return
    os.environ.update({k: os.environ.get(k) or v for k, v in MALLOC_ENV.items()})
    os.execv(sys.executable, [sys.executable, *args])


def label_shard(teacher, shard_dir: str, labels_dir: str, shard: str, batch: int = 1) -> dict:
    """Encode every sample of one shard, `batch` at a time when the teacher has `encode_batch`; write its
    summary, then its sidecar (the done marker)."""
    batch = batch if hasattr(teacher, "encode_batch") else 1
    codes, frames, seconds = {}, 0, 0.0
    histogram = np.zeros((teacher.codebooks, teacher.cardinality), dtype=np.int64)
    dtype = code_dtype(teacher.cardinality)
    for group in batches(read_samples(os.path.join(shard_dir, shard)), batch):
        keys = [key for _, _, key, _ in group]
        waves = [torch.from_numpy(sf.read(io.BytesIO(audio_part(parts)), dtype="float32")[0]) for *_, parts in group]
        with torch.inference_mode():
            encoded = teacher.encode_batch(waves) if batch > 1 else [teacher.encode(waves[0])]
        for key, wave, sample_codes in zip(keys, waves, encoded):
            sample_codes = sample_codes.cpu().numpy()
            check_codes(teacher, sample_codes, len(wave), f"{shard}/{key}")
            codes[key] = sample_codes.astype(dtype)
            for book in range(teacher.codebooks):
                histogram[book] += np.bincount(sample_codes[:, book], minlength=teacher.cardinality)
            frames += len(sample_codes)
            seconds += len(wave) / SAMPLE_RATE
    summary = {"shard": shard, "samples": len(codes), "frames": frames, "seconds": seconds,
               "histogram": histogram.tolist()}
    atomic_write_json(summary_path(labels_dir, shard), summary)
    write_sidecar(sidecar_path(labels_dir, shard), codes)
    return summary


def batches(items, size: int):
    """Lists of up to `size` consecutive items."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def check_codes(teacher, codes: np.ndarray, samples: int, where: str) -> None:
    expected = (samples // FRAME_SAMPLES, teacher.codebooks)
    if codes.shape != expected or codes.min(initial=0) < 0 or codes.max(initial=0) >= teacher.cardinality:
        raise ValueError(f"teacher {teacher.name} gave codes of shape {codes.shape} (range "
                         f"{codes.min(initial=0)}..{codes.max(initial=0)}) for {where}; expected {expected} "
                         f"in 0..{teacher.cardinality - 1}. This is a bug in the teacher.")


def _init_worker(make_teacher: Callable) -> None:
    global _worker_teacher
    torch.set_num_threads(1)
    _worker_teacher = make_teacher()


def _label_in_worker(job: tuple[str, str, str, int]) -> dict:
    return label_shard(_worker_teacher, *job)


def check_or_start(labels_dir: str, identity: dict, index: dict) -> None:
    """Record what this folder is being filled with, or refuse to mix another teacher or shard set into it."""
    path = os.path.join(labels_dir, "dump.json")
    wanted = {**identity, "shards_content_hash": index["content_hash"]}
    if not os.path.exists(path):
        atomic_write_json(path, wanted)
        return
    started = read_json(path, "a dump record")
    changed = [k for k in wanted if started.get(k) != wanted[k]]
    if changed:
        was = ", ".join(f"{k}: {started.get(k)!r} -> {wanted[k]!r}" for k in changed)
        raise TeacherError(f"{path}: this labels folder was started with another teacher or shard set ({was}). "
                         "Re-run with the same ones to finish it, or dump into a new folder.")


def dump(make_teacher: Callable, shard_dir: str, labels_dir: str, workers: int = 1,
         rank: int | None = None, world: int | None = None, extra: dict | None = None, batch: int = 1) -> dict:
    """Label this rank's unfinished shards; write the manifest if all shards are done; return a report.
    `batch`: segments per `encode_batch` call, for teachers that have one."""
    rank, world = rank_world(rank, world)
    started = time.time()
    index = read_index(shard_dir)
    teacher = make_teacher()
    identity = teacher_identity(teacher)
    os.makedirs(labels_dir, exist_ok=True)
    check_or_start(labels_dir, identity, index)
    names = [s["name"] for s in index["shards"]]
    mine = names[rank::world]
    remove_temporaries([path for name in mine for path in (summary_path(labels_dir, name), sidecar_path(labels_dir, name))])
    todo = [name for name in mine if not os.path.exists(sidecar_path(labels_dir, name))]
    jobs = [(shard_dir, labels_dir, name, batch) for name in todo]
    progress = tqdm(total=len(jobs), desc=f"{teacher.name} labels (rank {rank}/{world})", unit="shard", disable=not jobs)
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (make_teacher,)) as pool:
            for _ in pool.imap_unordered(_label_in_worker, jobs):
                progress.update()
    else:
        for job in jobs:
            label_shard(teacher, *job)
            progress.update()
    progress.close()
    summaries = [read_json(summary_path(labels_dir, name), "a label shard summary") for name in mine]
    manifest = try_write_manifest(labels_dir, identity, index, extra or {})
    return {"teacher": teacher.name, "rank": rank, "world": world, "labels": labels_dir,
            "shards_mine": len(mine), "shards_done_now": len(todo),
            "frames": sum(s["frames"] for s in summaries), "hours": sum(s["seconds"] for s in summaries) / 3600,
            "usage": codebook_usage(summaries, identity["codebook_sizes"], teacher.cardinality),
            "seconds_taken": time.time() - started, "manifest": manifest is not None}


def codebook_usage(summaries: list[dict], sizes: list[int], cardinality: int) -> list[dict]:
    """Per codebook: codes used of its size, and code entropy in bits (at most log2(size))."""
    histogram = np.zeros((len(sizes), cardinality))
    for summary in summaries:
        histogram += np.array(summary["histogram"])
    usage = []
    for counts, size in zip(histogram, sizes):
        p = counts[counts > 0] / max(counts.sum(), 1)
        usage.append({"used": int((counts > 0).sum()), "of": size, "entropy_bits": float(-(p * np.log2(p)).sum()) + 0.0})  # + 0.0: no "-0.00"
    return usage


def format_report(report: dict) -> str:
    lines = [
        f"labels   {report['teacher']} rank {report['rank']}/{report['world']} -> {report['labels']}: "
        f"{report['shards_mine']} shards, {report['shards_done_now']} labelled now",
        f"frames   {report['frames']} ({report['hours']:.3f} h) in {report['seconds_taken']:.1f} s",
    ]
    for book, use in enumerate(report["usage"]):
        lines.append(f"codebook {book}: {use['used']}/{use['of']} codes used, entropy {use['entropy_bits']:.2f} of "
                     f"{math.log2(use['of']):.2f} bits")
    lines.append("manifest teacher.json written" if report["manifest"] else
                 "manifest not yet: other ranks' shards are still missing; the last rank to finish writes it")
    return "\n".join(lines)
