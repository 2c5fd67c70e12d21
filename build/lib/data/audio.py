"""Source audio in, clean 24 kHz mono blocks out.

Everything that can go wrong with a user's file is turned into an
`AudioError` with a short, countable `reason` and a human `detail`, so the
sharder can skip the file, count it and go on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24_000  # the model's input rate
FRAME_SAMPLES = 320  # one label frame: 24 kHz / 320 = 75 Hz
FRAME_RATE = SAMPLE_RATE // FRAME_SAMPLES  # 75 label frames per second
# The frame geometry above is the one source: teachers, objective, loader and model checks import it.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")


class AudioError(Exception):
    """A file that cannot be used; `reason` is a stable key for reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceInfo:
    path: str
    frames: int
    sample_rate: int
    channels: int
    bytes: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str, min_sample_rate: int = 8000) -> SourceInfo:
    """Read the header only. Raises AudioError for files we will not use."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioError("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if size == 0:
        raise AudioError("empty_file", "zero bytes")
    if not os.access(path, os.R_OK):
        raise AudioError("unreadable", "permission denied")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("undecodable", _short(e)) from None
    if info.frames <= 0:
        raise AudioError("no_audio", "header declares no samples")
    if info.channels <= 0:
        raise AudioError("undecodable", f"{info.channels} channels")
    if info.samplerate < min_sample_rate:
        raise AudioError("low_sample_rate", f"{info.samplerate} Hz < {min_sample_rate} Hz")
    return SourceInfo(path, int(info.frames), int(info.samplerate), int(info.channels), size)


def stream_mono(path: str, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks at SAMPLE_RATE without loading the file whole.

    Decoding errors part-way raise AudioError("decode_error"); the blocks
    already yielded are good audio and stay with the caller.
    """
    try:
        handle = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError("undecodable", _short(e)) from None
    with handle:
        rate = handle.samplerate
        resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        block_frames = max(1, int(block_seconds * rate))
        while True:
            try:
                block = handle.read(block_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise AudioError("decode_error", f"after {handle.tell() / rate:.1f} s: {_short(e)}") from None
            last = len(block) < block_frames
            mono = block.mean(axis=1, dtype=np.float32)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if len(mono):
                yield mono
            if last:
                return


def samples_problem(audio: np.ndarray) -> str | None:
    """Why decoded samples must not be used by any stage (sharding, extraction), or None."""
    if not np.isfinite(audio).all():
        return "non_finite"
    return None


def check_samples(audio: np.ndarray, where: str = "") -> np.ndarray:
    """`audio`, or AudioError with the reason the sharder reports for the same samples."""
    problem = samples_problem(audio)
    if problem:
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise AudioError(problem, f"{bad} NaN or Inf samples{where}")
    return audio


def decode_mono(path: str) -> np.ndarray:
    """A whole file as float32 mono at SAMPLE_RATE, checked like the sharder's segments (AudioError if not)."""
    return check_samples(np.concatenate(list(stream_mono(path)) or [np.zeros(0, np.float32)]))


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]
