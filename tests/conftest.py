"""Small audio fixtures: seconds of sine tones written in the formats users bring."""
from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from synth import demo
from data.shards import ShardConfig, build
from teachers import dump as dump_stage
from teachers.kmeans import KMeansConfig, KMeansTeacher, StreamSpec, fit

os.environ.setdefault("OMP_NUM_THREADS", "1")


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (1 - 0.1 * c) for c in range(channels)], axis=1)


def write(path, audio: np.ndarray, rate: int, **kw) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    sf.write(str(path), audio, rate, **kw)
    return str(path)


@pytest.fixture
def good_corpus(tmp_path):
    """Four decodable files: stereo wav 44.1k (65 s), mono flac 48k, ogg 22.05k, 6-channel wav 11.025k."""
    root = tmp_path / "audio"
    write(root / "long.wav", tone(65, 44100, channels=2), 44100)
    write(root / "sub" / "b.flac", tone(10, 48000, freq=330), 48000)
    write(root / "c.ogg", tone(5, 22050, freq=550, channels=2), 22050, format="OGG", subtype="VORBIS")
    write(root / "six.wav", tone(4, 11025, freq=220, channels=6), 11025)
    return root


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """One minute of demo music in several shards, labelled by a small log-mel + chroma k-means:
    (shards folder, labels folder); the fitted k-means model is in the shards folder's sibling `kmeans`."""
    base = tmp_path_factory.mktemp("train")
    demo.generate(base / "corpus", minutes=1.0, seed=1)
    shards = str(base / "shards")
    build(str(base / "corpus" / "audio"), shards, ShardConfig(shard_bytes=300_000))
    streams = [StreamSpec("logmel", 16, {"kind": "logmel", "n_mels": 64}), StreamSpec("chroma", 8, {"kind": "chroma"})]
    cfg = KMeansConfig(name="logmel_chroma", shards=shards, out=str(base / "kmeans"), labels=f"{shards}/labels/km",
                       streams=streams, max_frames=2000)
    fit(cfg)
    dump_stage.dump(lambda: KMeansTeacher(cfg.out), shards, cfg.labels)
    return shards, cfg.labels
