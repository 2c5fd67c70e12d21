"""K-means teachers (HuBERT/MERT-style acoustic targets): fit FAISS k-means on sampled frame features, dump labels.

    python -m teachers.kmeans fit  --config configs/teachers/logmel_chroma.yaml [key=value ...]
    python -m teachers.kmeans dump --config configs/teachers/logmel_chroma.yaml [--workers N --rank R --world W]

A config lists one or more streams; each is a feature (data.features, or
a trained encoder's layer: teachers.encoder_features) and a k, and becomes one
codebook of the labels: MERT v0's log-mel k=300 and chroma k=200 are two
streams, MusicHuBERT's 39-d MFCC k=500 is one, HuBERT's second iteration
(k=500 over layer 6 of the first) is one.

`fit` reads every shard once, samples frames into a fixed-size reservoir per
stream (memory is `max_frames x dim` floats, whatever the corpus size),
standardises them and trains FAISS k-means on all sampled frames. It writes
`OUT/kmeans.npz` (centroids, mean, std per stream) and then `OUT/kmeans.json`
(settings, inertia, sample counts, hash), which marks the fit done; a re-run
with the same settings does nothing.
`dump` assigns every frame of every shard to its nearest centroid in torch
(CPU or GPU) and writes sidecars as described in data.labels.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import soundfile as sf
import torch
from omegaconf import MISSING, OmegaConf
from tqdm import tqdm

from data.cluster import local_device
from data.files import atomic_write_bytes, atomic_write_json, read_json
from data.index import read_index
from data.logs import setup_logging
from data.settings import merge_settings
from data.shards import audio_part
from data.tar import read_samples
from teachers import TeacherError
from teachers.dump import dump, format_report, restart_with_tuned_malloc
from teachers.encoder_features import EncoderFeatureConfig, EncoderFeatures
from data.features import FeatureConfig, FeatureExtractor
from teachers.reservoir import Reservoir


@dataclass
class StreamSpec:
    name: str = MISSING
    k: int = MISSING
    features: dict[str, Any] = field(default_factory=dict)  # FeatureConfig fields, e.g. {kind: logmel, n_mels: 229}


@dataclass
class KMeansConfig:
    name: str = MISSING  # teacher name: the labels' name in training configs
    shards: str = MISSING  # shard folder (data.shards build --out)
    out: str = MISSING  # fit writes the model here
    labels: str = ""  # dump writes sidecars here; default SHARDS/labels/NAME
    streams: list[StreamSpec] = field(default_factory=list)
    normalize: bool = True  # standardise each feature dimension before k-means (stats from the sample)
    max_frames: int = 500_000  # reservoir size per stream: the most frames k-means sees
    segment_fraction: float = 1.0  # share of segments read by fit (seeded), to bound its time on huge corpora
    iterations: int = 20
    seed: int = 0
    device: str = "cpu"  # where dump computes features and assignments
    workers: int = 1  # dump processes (CPU)

    @property
    def labels_dir(self) -> str:
        return self.labels or os.path.join(self.shards, "labels", self.name)


def load_config(path: str, overrides: list[str] = ()) -> KMeansConfig:
    """YAML over the schema's defaults, `key=value` overrides over the YAML; errors name the file and key."""
    if not os.path.isfile(path):
        raise TeacherError(f"{path}: no such config; see configs/teachers/ for examples")
    cfg: KMeansConfig = merge_settings(KMeansConfig, [OmegaConf.load(path)], overrides, path, TeacherError,
                                       " (e.g. k=500, or streams.0.features.ckpt=RUN)")
    if not cfg.streams:
        raise TeacherError(f"{path}: `streams` is empty; give at least one {{name, k, features}}")
    for stream in cfg.streams:
        feature_config(stream, path)
    return cfg


def feature_config(stream: StreamSpec, source: str = "config") -> FeatureConfig | EncoderFeatureConfig:
    """The stream's features: a spectral kind (data/features.py) or kind encoder, a trained encoder's layer
    (teachers/encoder_features.py: HuBERT's second iteration)."""
    features = dict(stream.features)
    try:
        if features.get("kind") == "encoder":
            return EncoderFeatureConfig(**features).pinned()  # one checkpoint, fingerprinted
        return FeatureConfig(**features)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise TeacherError(f"{source}: stream {stream.name}: bad features {features} ({e})") from None


def extractor(features: FeatureConfig | EncoderFeatureConfig) -> torch.nn.Module:
    return EncoderFeatures(features) if isinstance(features, EncoderFeatureConfig) else FeatureExtractor(features)


def fit_settings(cfg: KMeansConfig) -> dict:
    """Everything that changes the centroids."""
    streams = [{"name": s.name, "k": s.k, "features": asdict(feature_config(s))} for s in cfg.streams]
    return {"streams": streams, "normalize": cfg.normalize, "max_frames": cfg.max_frames,
            "segment_fraction": cfg.segment_fraction, "iterations": cfg.iterations, "seed": cfg.seed}


# ---------------------------------------------------------------- fit


def sample_frames(cfg: KMeansConfig, index: dict) -> tuple[dict[str, Reservoir], int]:
    """One pass over the shards: every chosen segment's frames go into each stream's reservoir."""
    extractors = {s.name: extractor(feature_config(s)) for s in cfg.streams}
    reservoirs = {s.name: Reservoir(cfg.max_frames, feature_config(s).dim, seed=cfg.seed + i) for i, s in enumerate(cfg.streams)}
    rng, segments = np.random.default_rng(cfg.seed), 0
    for shard in tqdm(index["shards"], desc=f"{cfg.name} fit: sample frames", unit="shard"):
        for _, _, _, parts in read_samples(os.path.join(cfg.shards, shard["name"])):
            if rng.random() >= cfg.segment_fraction:
                continue
            audio = torch.from_numpy(sf.read(io.BytesIO(audio_part(parts)), dtype="float32")[0])
            with torch.inference_mode():
                for name, extract in extractors.items():
                    reservoirs[name].add(extract(audio).numpy())
            segments += 1
    return reservoirs, segments


def kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn's): each new centre is the best of 2 + log(k) candidates
    drawn in proportion to the squared distance to the nearest centre so far. FAISS's own start is k random
    frames, which left log-mel k=300 about 6% above scikit-learn's inertia; from this start it is no worse."""
    rng = np.random.default_rng(seed)
    norms = np.einsum("ij,ij->i", x, x)
    trials = 2 + int(np.log(k))

    def sq_dist(centres: np.ndarray) -> np.ndarray:  # [len(centres), n]
        return np.maximum(norms[None] - 2 * centres @ x.T + np.einsum("ij,ij->i", centres, centres)[:, None], 0)

    chosen = [int(rng.integers(len(x)))]
    closest = sq_dist(x[chosen])[0]
    for _ in range(1, k):
        candidates = rng.choice(len(x), size=trials, p=closest / closest.sum())
        options = np.minimum(closest[None], sq_dist(x[candidates]))
        best = int(options.sum(axis=1).argmin())
        chosen.append(int(candidates[best]))
        closest = options[best]
    return np.ascontiguousarray(x[chosen])


def train_kmeans(x: np.ndarray, k: int, iterations: int, seed: int, normalize: bool, what: str) -> dict:
    if len(x) < k:
        raise TeacherError(f"{what}: only {len(x)} frames sampled for k={k}; use more audio, a larger "
                         "segment_fraction, or a smaller k")
    mean = x.mean(axis=0) if normalize else np.zeros(x.shape[1], np.float32)
    std = x.std(axis=0) + 1e-5 if normalize else np.ones(x.shape[1], np.float32)
    xn = np.ascontiguousarray((x - mean) / std, dtype=np.float32)
    # max_points_per_centroid: use every sampled frame (FAISS would otherwise subsample to 256 k).
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=len(x) // k + 1, verbose=False)
    km.train(xn, init_centroids=kmeans_plusplus(xn, k, seed))
    return {"centroids": km.centroids.astype(np.float32), "mean": mean.astype(np.float32),
            "std": std.astype(np.float32), "inertia": float(km.obj[-1]), "frames": len(x)}


def fit(cfg: KMeansConfig) -> dict:
    """Fit every stream; a no-op if OUT already holds a fit with the same settings and shards."""
    index = read_index(cfg.shards)
    settings = fit_settings(cfg)
    done_path = os.path.join(cfg.out, "kmeans.json")
    if os.path.exists(done_path):
        done = read_json(done_path, "a k-means fit record")
        if done["settings"] == settings and done["shards_content_hash"] == index["content_hash"]:
            print(f"{done_path}: already fitted with these settings; nothing to do", file=sys.stderr)
            return done
        raise TeacherError(f"{done_path}: holds a fit with other settings or shards; use a new `out` or delete it to refit")
    started = time.time()
    reservoirs, segments = sample_frames(cfg, index)
    arrays, streams = {}, []
    for spec in cfg.streams:
        r = reservoirs[spec.name]
        result = train_kmeans(r.sample, spec.k, cfg.iterations, cfg.seed, cfg.normalize, f"{cfg.name}/{spec.name}")
        arrays.update({f"{spec.name}.{key}": result[key] for key in ("centroids", "mean", "std")})
        streams.append({"name": spec.name, "k": spec.k, "dim": r.rows.shape[1], "frames_seen": r.seen,
                        "frames_sampled": result["frames"], "inertia": result["inertia"],
                        "inertia_per_frame": result["inertia"] / result["frames"]})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(os.path.join(cfg.out, "kmeans.npz"), buffer.getvalue())
    record = {"teacher": cfg.name, "settings": settings, "shards_content_hash": index["content_hash"],
              "segments_read": segments, "streams": streams, "seconds": time.time() - started,
              "config_hash": hashlib.sha256(buffer.getvalue()).hexdigest()}
    atomic_write_json(done_path, record)
    return record


# ---------------------------------------------------------------- the teacher


class KMeansTeacher:
    """Nearest-centroid codes per stream: encode(wave [N]) -> [N // 320, streams]."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        record = read_json(os.path.join(model_dir, "kmeans.json"), "a k-means fit record (run `teachers.kmeans fit`)")
        arrays = np.load(os.path.join(model_dir, "kmeans.npz"))
        self.name, self.config_hash, self.device = record["teacher"], record["config_hash"], torch.device(device)
        self.streams = []
        for stream in record["settings"]["streams"]:
            extract = extractor(feature_config(StreamSpec(stream["name"], stream["k"], stream["features"]), model_dir))
            extract = extract.to(self.device)
            tensors = [torch.from_numpy(arrays[f"{stream['name']}.{key}"]).to(self.device) for key in ("centroids", "mean", "std")]
            self.streams.append((extract, *tensors))
        self.codebook_sizes = [s["k"] for s in record["settings"]["streams"]]
        self.codebooks, self.cardinality = len(self.streams), max(self.codebook_sizes)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        wave = wave.to(self.device)
        codes = []
        for extract, centroids, mean, std in self.streams:
            x = (extract(wave) - mean) / std
            distances = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
            codes.append(distances.argmin(dim=1))
        return torch.stack(codes, dim=1)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m teachers.kmeans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fit", "dump"])
    parser.add_argument("--config", required=True, help="YAML, e.g. configs/teachers/logmel_chroma.yaml")
    parser.add_argument("--workers", type=int, help="dump processes (default: the config's `workers`)")
    parser.add_argument("--rank", type=int, help="dump: this machine's part (default: from SLURM / RANK)")
    parser.add_argument("--world", type=int, help="dump: number of parts (default: from SLURM / WORLD_SIZE)")
    parser.add_argument("overrides", nargs="*", help="key=value over the config, e.g. k=500 max_frames=100000")
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.rank)
    try:
        run(args)
    except (TeacherError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.command == "fit":
        record = fit(cfg)
        for s in record["streams"]:
            print(f"fit      {cfg.name}/{s['name']}: k={s['k']} on {s['frames_sampled']} of {s['frames_seen']} frames "
                  f"({s['dim']}-d), inertia/frame {s['inertia_per_frame']:.4f}", file=sys.stderr)
        print(f"model    {cfg.out} ({record['seconds']:.1f} s)", file=sys.stderr)
        return
    make_teacher = functools.partial(KMeansTeacher, cfg.out, local_device(cfg.device))
    streams = read_json(os.path.join(cfg.out, "kmeans.json"), "a k-means fit record (run `teachers.kmeans fit`)")
    sources = [{"path": s["features"]["ckpt"], "fingerprint": s["features"]["fingerprint"], "layer": s["features"]["layer"]}
               for s in streams["settings"]["streams"] if s["features"].get("kind") == "encoder"]
    report = dump(make_teacher, cfg.shards, cfg.labels_dir, args.workers or cfg.workers, args.rank, args.world,
                  extra={"model": os.path.abspath(cfg.out), **({"sources": sources} if sources else {})})
    print(format_report(report), file=sys.stderr)


if __name__ == "__main__":
    restart_with_tuned_malloc(["-m", "teachers.kmeans", *sys.argv[1:]])
    main()
