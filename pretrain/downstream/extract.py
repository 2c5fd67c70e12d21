"""Embeddings for downstream tasks: `python -m pretrain.downstream.extract --ckpt RUN_OR_FILE --input AUDIO_OR_SHARDS --out DIR`.

Each clip (an audio file, or a sample of a shard folder) is cut into windows
of `--window-seconds` (default: the run's training crop) every
`--hop-seconds`; the frozen encoder runs on batches of windows and every
layer's output is pooled over the clip's real frames (mean, or mean and
standard deviation with `--pooling mean_std`). The layers are the
transformer's input ("embedding": conv features after projection and
positions) and each block's output (the last after the final norm, as
Hugging Face's hidden states). `--unit window` writes one example per
window instead of one per clip; `--frames` also writes each clip's frames
(float16 [layers, T, dim], non-overlapping windows stitched, 75 Hz).
`--patchout T` keeps 1 of every T frames after the conv extractor.
`--baseline mfcc|chroma|logmel` writes MFCC, chroma or log-mel statistics in the
same format (no model), and `--random-init CONFIG` a randomly initialised encoder:
the trainer's step-0 weights for that config (seeded with its `train.seed`).

    DIR/info.json     format musicpt-features/1, layer_names, dim, pooling, unit, model and window settings
    DIR/index.jsonl   {"key", "clip", "path", "seconds"} per example, appended as clips finish
    DIR/features/     one float32 [layers, dim] (.npy) per example; DIR/frames/ with --frames
    DIR/skipped.jsonl clips that could not be decoded, with the reason

A killed run started again skips the clips already in the index.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from data.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioError, check_samples, decode_mono
from data.features import FeatureConfig, FeatureExtractor
from data.files import atomic_write_bytes, atomic_write_json, read_json
from data.logs import setup_logging
from data.shards import audio_part, list_sources
from data.tar import read_samples
from pretrain.config import load_config
from pretrain.downstream.probe_metrics import ProbeError
from pretrain.export import load_any
from pretrain.model import Encoder

FORMAT = "musicpt-features/1"


@dataclass(frozen=True)
class ExtractConfig:
    window_seconds: float = 5.0
    hop_seconds: float = 5.0
    pooling: str = "mean"  # "mean" or "mean_std"
    unit: str = "clip"  # "clip" or "window"
    frames: bool = False
    patchout: int = 1
    batch_size: int = 16

    @property
    def window(self) -> int:
        return int(round(self.window_seconds * SAMPLE_RATE)) // FRAME_SAMPLES * FRAME_SAMPLES

    @property
    def hop(self) -> int:
        return int(round(self.hop_seconds * SAMPLE_RATE)) // FRAME_SAMPLES * FRAME_SAMPLES


# ---------------------------------------------------------------- what produces the layers


class EncoderLayers:
    """[B, N] audio -> list of [B, T, D] layer outputs and [B] real frames, from a frozen encoder."""

    def __init__(self, encoder, device: torch.device, patchout: int = 1):
        self.encoder, self.device, self.patchout = encoder.to(device).eval(), device, patchout
        self.names = ["embedding"] + [f"layer_{i + 1}" for i in range(encoder.cfg.layers)]
        self.dim = encoder.cfg.dim

    @torch.no_grad()
    def __call__(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.encoder.hidden_states(audio.to(self.device), lengths.to(self.device), self.patchout)


class FeatureStats:
    """The baselines: MFCC (39-d with deltas), chroma (12-d) or log-mel (229-d) frames as a single "layer"."""

    def __init__(self, kind: str, device: torch.device):
        self.extractor, self.device = FeatureExtractor(FeatureConfig(kind=kind)).to(device), device
        self.names, self.dim = [kind], FeatureConfig(kind=kind).dim

    @torch.no_grad()
    def __call__(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [self.extractor(audio.to(self.device))], (lengths // FRAME_SAMPLES).clamp(min=1).to(self.device)


# ---------------------------------------------------------------- clips and windows


def clips(input_path: str):
    """(clip name, decoder) for each clip: audio files under a folder, or the samples of a shard folder."""
    if os.path.exists(os.path.join(input_path, "index.json")):
        index = read_json(os.path.join(input_path, "index.json"), "the shard index")
        for shard in index["shards"]:
            for _, _, key, parts in read_samples(os.path.join(input_path, shard["name"])):
                yield key, (lambda encoded=audio_part(parts): check_samples(sf.read(io.BytesIO(encoded), dtype="float32")[0]))
        return
    root, names = list_sources(input_path)
    for name in names:
        yield name, (lambda path=os.path.join(root, name): decode_mono(path))


def windows(audio: np.ndarray, cfg: ExtractConfig) -> list[tuple[np.ndarray, int]]:
    """(window padded to cfg.window samples, real samples) every cfg.hop samples; a short clip gives one."""
    hop = cfg.window if cfg.frames else cfg.hop  # stitched frames need windows that neither overlap nor leave gaps
    out = []
    for start in range(0, max(1, len(audio) - cfg.window + hop), hop):
        piece = audio[start:start + cfg.window]
        out.append((np.pad(piece, (0, cfg.window - len(piece))), len(piece)))
    return out


def pool(layers: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Per window: [B, L, 3, D] sums of frames, of squared frames, and frame counts over real frames."""
    stacked = torch.stack([layer.float() for layer in layers], dim=1)  # [B, L, T, D]
    real = (torch.arange(stacked.shape[2], device=valid.device)[None] < valid[:, None]).float()[:, None, :, None]
    sums = (stacked * real).sum(2)
    squares = (stacked.pow(2) * real).sum(2)
    counts = real.sum(2).expand_as(sums)
    return torch.stack([sums, squares, counts], dim=2)


def statistics(moments: np.ndarray, pooling: str) -> np.ndarray:
    """[L, 3, D] summed moments -> float32 [L, D] mean, or [L, 2D] mean and standard deviation."""
    sums, squares, counts = moments[:, 0], moments[:, 1], np.maximum(moments[:, 2], 1)
    mean = sums / counts
    if pooling == "mean":
        return mean.astype(np.float32)
    std = np.sqrt(np.maximum(squares / counts - mean ** 2, 0))
    return np.concatenate([mean, std], axis=1).astype(np.float32)


# ---------------------------------------------------------------- output


def example_name(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Output:
    """The features folder: refuses other settings, knows which clips are complete, writes a clip at a time."""

    def __init__(self, out: str, info: dict):
        self.out, self.info = out, info
        for sub in ("features", "frames"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        info_path = os.path.join(out, "info.json")
        if os.path.exists(info_path):
            saved = read_json(info_path, "the features description")
            changed = [k for k in info if saved.get(k) != info[k]]
            if changed:
                raise ProbeError(f"{out}: holds features made with other settings ({', '.join(changed)}); "
                                 "use another --out, or the same settings to finish it")
        else:
            atomic_write_json(info_path, info)
        self.index = os.path.join(out, "index.jsonl")
        self.done = self._complete_clips()

    def _complete_clips(self) -> set[str]:
        """Clips whose every example row made it into the index; rows of incomplete clips are dropped."""
        rows = []
        if os.path.exists(self.index):
            with open(self.index) as file:
                for line in file:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line torn by a kill
        counts, expected = {}, {}
        for row in rows:
            counts[row["clip"]] = counts.get(row["clip"], 0) + 1
            expected[row["clip"]] = row["of"]
        done = {clip for clip, count in counts.items() if count == expected[clip]}
        kept = "".join(json.dumps(row) + "\n" for row in rows if row["clip"] in done)
        atomic_write_bytes(self.index, kept.encode())
        return done

    def write_clip(self, clip: str, seconds: float, moments: list[np.ndarray], frames: np.ndarray | None) -> int:
        pooling = self.info["pooling"]
        if self.info["unit"] == "clip":
            examples = [(clip, statistics(np.sum(moments, axis=0), pooling))]
        else:
            examples = [(f"{clip}#{w:04d}", statistics(m, pooling)) for w, m in enumerate(moments)]
        rows = []
        for key, array in examples:
            path = os.path.join("features", example_name(key))
            atomic_write_bytes(os.path.join(self.out, path), npy_bytes(array))
            rows.append({"key": key, "clip": clip, "path": path, "seconds": seconds, "of": len(examples)})
        if frames is not None:
            atomic_write_bytes(os.path.join(self.out, "frames", example_name(clip)), npy_bytes(frames))
        with open(self.index, "a") as file:
            file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.done.add(clip)
        return len(rows)

    def skip(self, clip: str, reason: str) -> None:
        with open(os.path.join(self.out, "skipped.jsonl"), "a") as file:
            file.write(json.dumps({"clip": clip, "reason": reason}) + "\n")


# ---------------------------------------------------------------- the run


class Pending:
    """Windows of clips waiting for the model, and the results of clips not yet complete."""

    def __init__(self):
        self.queue, self.results = [], {}  # queue: (clip, window index, audio, real samples)

    def add(self, clip: str, seconds: float, clip_windows: list[tuple[np.ndarray, int]]) -> None:
        self.results[clip] = {"seconds": seconds, "moments": [None] * len(clip_windows), "frames": [None] * len(clip_windows)}
        self.queue += [(clip, w, audio, real) for w, (audio, real) in enumerate(clip_windows)]


def run_batch(pending: Pending, layers_of, cfg: ExtractConfig, output: Output) -> int:
    batch, pending.queue = pending.queue[:cfg.batch_size], pending.queue[cfg.batch_size:]
    audio = torch.from_numpy(np.stack([item[2] for item in batch]))
    lengths = torch.tensor([item[3] for item in batch])
    layers, valid = layers_of(audio, lengths)
    moments = pool(layers, valid).cpu().numpy()
    for i, (clip, w, _, _) in enumerate(batch):
        result = pending.results[clip]
        result["moments"][w] = moments[i]
        if cfg.frames:
            result["frames"][w] = torch.stack([layer[i, :int(valid[i])] for layer in layers]).half().cpu().numpy()
    written = 0
    for clip in [c for c, r in pending.results.items() if all(m is not None for m in r["moments"])]:
        result = pending.results.pop(clip)
        frames = np.concatenate(result["frames"], axis=1) if cfg.frames else None
        written += output.write_clip(clip, result["seconds"], result["moments"], frames)
    return written


def extract(input_path: str, out: str, layers_of, cfg: ExtractConfig, model_info: dict, limit: int | None = None) -> dict:
    info = {"format": FORMAT, "layer_names": layers_of.names, "dim": layers_of.dim, "model": model_info,
            "input": os.path.abspath(input_path), **asdict(cfg)}
    info.pop("batch_size")
    output, pending, started = Output(out, info), Pending(), time.perf_counter()
    report = {"clips": 0, "already_done": 0, "examples": 0, "skipped": {}, "audio_seconds": 0.0}
    for n, (clip, decode) in enumerate(tqdm(clips(input_path), desc="extract", unit="clip", disable=None)):
        if limit is not None and n >= limit:
            break
        if clip in output.done:
            report["already_done"] += 1
            continue
        try:
            audio = decode()
            if len(audio) < FRAME_SAMPLES * 2:
                raise AudioError("too_short", f"{len(audio)} samples")
        except (AudioError, sf.LibsndfileError, RuntimeError, ValueError) as error:
            reason = getattr(error, "reason", type(error).__name__)
            output.skip(clip, f"{reason}: {getattr(error, 'detail', error)}")
            report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
            continue
        pending.add(clip, len(audio) / SAMPLE_RATE, windows(audio, cfg))
        report["clips"] += 1
        report["audio_seconds"] += len(audio) / SAMPLE_RATE
        while len(pending.queue) >= cfg.batch_size:
            report["examples"] += run_batch(pending, layers_of, cfg, output)
    while pending.queue:
        report["examples"] += run_batch(pending, layers_of, cfg, output)
    report["seconds"] = time.perf_counter() - started
    return report


def layers_source(device: torch.device, ckpt: str | None = None, random_init: str | None = None,
                  baseline: str | None = None, seed: int | None = None, patchout: int = 1):
    """(layers function, model description, default window seconds) for one of: `ckpt` (a run directory,
    checkpoint folder or export), `random_init` (a config: the trainer's step-0 encoder at `seed`, default the
    config's train.seed) or `baseline` (a hand-made feature kind)."""
    if baseline:
        return FeatureStats(baseline, device), {"baseline": baseline}, None
    if random_init:
        # Only the encoder is built: placeholder data and a mert objective pass the config checks for any preset
        # or run (a bestrq config has no labels); the encoder and its seed do not depend on the objective.
        cfg = load_config(random_init, ["data.shards=unused", "data.labels=[unused]", "objective.kind=mert"])
        seed = cfg.train.seed if seed is None else seed
        torch.manual_seed(seed)  # as pretrain.train seeds its model: these are the trainer's step-0 weights
        encoder, meta = Encoder(cfg.model), {"random_init": random_init, "seed": seed}
        crop = cfg.data.crop_seconds
    else:
        encoder, meta = load_any(ckpt)
        crop = meta.pop("crop_seconds")
        meta["checkpoint"] = os.path.abspath(meta["checkpoint"])
    return EncoderLayers(encoder, device, patchout), meta, crop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a run directory, a checkpoint folder, or a file from python -m pretrain.export")
    source.add_argument("--random-init", metavar="CONFIG", help="a randomly initialised encoder of this preset")
    source.add_argument("--baseline", choices=("mfcc", "chroma", "logmel"),
                        help="MFCC, chroma or log-mel statistics instead of a model")
    parser.add_argument("--input", required=True, help="a folder of audio files, or a shard folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--window-seconds", type=float, help="default: the run's training crop (else 5)")
    parser.add_argument("--hop-seconds", type=float, help="default: the window (no overlap)")
    parser.add_argument("--pooling", choices=("mean", "mean_std"), default="mean")
    parser.add_argument("--unit", choices=("clip", "window"), default="clip")
    parser.add_argument("--frames", action="store_true", help="also write frame-level features per clip")
    parser.add_argument("--patchout", type=int, default=1, help="keep 1 of every T frames after the conv extractor")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, help="for --random-init (default: the config's train.seed, as the trainer)")
    parser.add_argument("--limit", type=int, help="only the first N clips")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        layers_of, model_info, crop = layers_source(torch.device(args.device), args.ckpt, args.random_init, args.baseline,
                                                    args.seed, args.patchout)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    window = args.window_seconds or crop or 5.0
    cfg = ExtractConfig(window, args.hop_seconds or window, args.pooling, args.unit, args.frames, args.patchout, args.batch_size)
    try:
        report = extract(args.input, args.out, layers_of, cfg, model_info, args.limit)
    except ProbeError as error:
        sys.exit(f"error: {error}")
    skipped = ", ".join(f"{n} {reason}" for reason, n in report["skipped"].items()) or "none"
    print(f"extracted {report['clips']} clips ({report['examples']} examples, {report['audio_seconds']:.0f} s of audio) "
          f"in {report['seconds']:.1f} s, {report['clips'] / max(report['seconds'], 1e-9):.1f} clips/s; "
          f"{report['already_done']} already done; skipped: {skipped}; features in {args.out}")


if __name__ == "__main__":
    main()
