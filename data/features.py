"""Frame-level audio features (log-mel, chroma, MFCC) in torch, batched: the k-means teachers' inputs, BEST-RQ's
targets and the hand-made baselines of extraction.

Alignment. Audio is mono 24 kHz float32 ``[batch, samples]`` and labels run at
75 Hz, i.e. one frame per ``hop = 320`` samples. Frame ``i`` describes samples
``[hop*i, hop*i + hop)``: its analysis window (``n_fft`` samples, Hann) is
centred on sample ``hop*i + hop/2`` (= ``320 i + 160``). A signal of ``N``
samples gives exactly ``N // hop`` frames; a trailing partial hop is dropped.
This is done by padding ``(n_fft - hop) // 2`` samples on the left and just
enough on the right, then an STFT with ``center=False``. Padding reflects the
signal where it is long enough and continues with zeros beyond that, so inputs
shorter than ``n_fft`` still work (inputs shorter than ``hop`` give 0 frames).

Features, all derived from one power STFT ``|X|^2`` (periodic Hann window of
``n_fft``, no window normalisation):

* ``logmel``: ``log(mel + log_offset)``, natural log, ``n_mels`` bands of a
  Slaney-scale, Slaney-area-normalised filterbank from ``f_min`` to ``f_max``
  (librosa's default mel filterbank; not cross-checked, librosa is not installed).
* ``chroma``: each FFT bin with ``f_min <= f <= f_max`` is assigned whole to
  its nearest pitch class, ``round(12 log2(f / 440) + 69) % 12`` (C = 0), and
  the *power* spectrum is summed per class (power, like librosa's ``chroma_stft``
  default; its soft Gaussian bin weights are replaced by hard assignment).
  With 11.7 Hz bins, semitones are only resolved above ~200 Hz; lower bins
  land on a pitch class by their centre frequency alone.
  Each frame is then scaled to max 1; frames whose largest class energy is
  below ``log_offset`` (the floor log-mel treats as silence) are all zeros.
* ``mfcc``: orthonormal DCT-II of the same kind of log-mel but with
  ``mfcc_n_mels`` bands, first ``n_mfcc`` coefficients; with ``deltas`` the
  delta and delta-delta (``compute_deltas``, ``win_length=5`` as in HuBERT's
  feature dump) are appended: ``[mfcc, delta, delta2]``.
* ``logmel_chroma``: ``[logmel, chroma]`` (MERT v0 style, 229 + 12 dims).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import Tensor

from data.audio import FRAME_SAMPLES, SAMPLE_RATE

KINDS = ("mfcc", "logmel", "chroma", "logmel_chroma")
DELTA_WIN_LENGTH = 5  # HuBERT / fairseq dump_mfcc_feature uses compute_deltas' default of 5
N_CHROMA = 12


@dataclass(frozen=True)
class FeatureConfig:
    kind: str = "logmel_chroma"  # one of KINDS
    sample_rate: int = SAMPLE_RATE
    hop: int = FRAME_SAMPLES     # 24000 / 320 = 75 Hz label rate
    n_fft: int = 2048            # 85 ms window, 11.7 Hz bins: semitones resolved above ~200 Hz
    n_mels: int = 229            # log-mel bins (MERT v0: 229-dim log-mel + chroma)
    f_min: float = 27.5          # A0, lowest piano key
    f_max: float = 12000.0       # Nyquist at 24 kHz
    n_mfcc: int = 13             # 13 -> 39 dims with deltas, 20 -> 60
    mfcc_n_mels: int = 40        # HuBERT's Kaldi MFCC uses 23 bands up to 8 kHz; 40 ("hires") for 12 kHz
    deltas: bool = True          # MFCC + delta + delta-delta (HuBERT / MusicHuBERT style)
    log_offset: float = 1e-6     # floor added before log, in |STFT|^2 units

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if not 0 < self.hop <= self.n_fft:
            raise ValueError(f"need 0 < hop <= n_fft, got hop={self.hop}, n_fft={self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got {self.f_min}, {self.f_max}")
        if self.n_mfcc > self.mfcc_n_mels:
            raise ValueError(f"n_mfcc ({self.n_mfcc}) must be <= mfcc_n_mels ({self.mfcc_n_mels})")

    @property
    def dim(self) -> int:
        if self.kind == "mfcc":
            return self.n_mfcc * 3 if self.deltas else self.n_mfcc
        if self.kind == "logmel":
            return self.n_mels
        if self.kind == "chroma":
            return N_CHROMA
        return self.n_mels + N_CHROMA


def num_frames(num_samples: int, hop: int = FRAME_SAMPLES) -> int:
    """Frames for a signal of `num_samples`: one per whole hop, trailing partial hop dropped."""
    return num_samples // hop


def chroma_filters(n_fft: int, sample_rate: int, f_min: float, f_max: float) -> Tensor:
    """[12, n_fft // 2 + 1] 0/1 matrix: FFT bin -> nearest pitch class (C = 0); bins outside [f_min, f_max] unused."""
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft
    keep = (freqs >= max(f_min, 1e-3)) & (freqs <= f_max)
    midi = 12 * torch.log2(freqs[keep] / 440.0) + 69
    pitch_class = torch.round(midi).long() % N_CHROMA
    fb = torch.zeros(N_CHROMA, freqs.numel(), dtype=torch.float32)
    fb[pitch_class, torch.nonzero(keep).squeeze(1)] = 1.0
    return fb


def pad_for_frames(audio: Tensor, left: int, right: int) -> Tensor:
    """Pad [B, N] by reflection as far as the signal allows (pad < N), then with zeros."""
    n = audio.shape[-1]
    reflect_left, reflect_right = min(left, n - 1), min(right, n - 1)
    out = F.pad(audio.unsqueeze(1), (reflect_left, reflect_right), mode="reflect").squeeze(1)
    if reflect_left < left or reflect_right < right:
        out = F.pad(out, (left - reflect_left, right - reflect_right))
    return out


class FeatureExtractor(torch.nn.Module):
    """[B, N] (or [N]) audio -> [B, N // hop, cfg.dim] (or [N // hop, dim]) float32 features.

    Internally everything stays [batch, channels, time] (torch.stft's layout) and each feature is one
    matmul of a [channels, n_freqs] filter matrix with the power spectrogram; logmel_chroma stacks the
    mel and chroma filters into one matrix so the spectrogram is read once.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("filters", self._filters(), persistent=False)  # [channels, n_freqs]
        dct = AF.create_dct(cfg.n_mfcc, cfg.mfcc_n_mels, norm="ortho").T.contiguous()  # [n_mfcc, mfcc_n_mels]
        self.register_buffer("dct", dct, persistent=False)

    def _filters(self) -> Tensor:
        """[channels, n_freqs]: mel triangles (mfcc_n_mels for mfcc, else n_mels), then the 12 chroma rows."""
        c = self.cfg
        if c.kind == "mfcc":
            return self._mel(c.mfcc_n_mels)
        if c.kind == "logmel":
            return self._mel(c.n_mels)
        chroma = chroma_filters(c.n_fft, c.sample_rate, c.f_min, c.f_max)
        return chroma if c.kind == "chroma" else torch.cat([self._mel(c.n_mels), chroma])

    def _mel(self, n_mels: int) -> Tensor:
        """[n_mels, n_freqs] Slaney-scale, Slaney-normalised triangles (librosa's default filterbank)."""
        c = self.cfg
        n_freqs = c.n_fft // 2 + 1
        fb = AF.melscale_fbanks(n_freqs, c.f_min, c.f_max, n_mels, c.sample_rate, norm="slaney", mel_scale="slaney")
        return fb.T.contiguous()

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() == 1:
            return self.forward(audio.unsqueeze(0)).squeeze(0)
        if audio.dim() != 2:
            raise ValueError(f"expected audio [batch, samples] or [samples], got shape {tuple(audio.shape)}")
        if not audio.is_floating_point():
            raise TypeError(f"expected float audio in [-1, 1], got {audio.dtype}")
        audio = audio.to(torch.float32)
        if num_frames(audio.shape[-1], self.cfg.hop) == 0:
            return audio.new_zeros(audio.shape[0], 0, self.cfg.dim)
        bands = self.filters.to(audio.device) @ self.power_spectrogram(audio)  # [B, channels, T]
        kind = self.cfg.kind
        if kind == "mfcc":
            feats = self.mfcc(self.log(bands))
        elif kind == "logmel":
            feats = self.log(bands)
        elif kind == "chroma":
            feats = self.normalise_chroma(bands)
        else:
            n_mels = self.cfg.n_mels
            feats = torch.cat([self.log(bands[:, :n_mels]), self.normalise_chroma(bands[:, n_mels:])], dim=1)
        return feats.transpose(1, 2).contiguous()  # [B, T, dim]

    def power_spectrogram(self, audio: Tensor) -> Tensor:
        """[B, N] float32 -> |STFT|^2 [B, n_fft // 2 + 1, N // hop]; frame i centred on sample hop*i + hop//2."""
        c = self.cfg
        frames = num_frames(audio.shape[-1], c.hop)
        left = (c.n_fft - c.hop) // 2
        right = (frames - 1) * c.hop + c.n_fft - left - audio.shape[-1]
        padded = pad_for_frames(audio, left, right)
        window = self.window.to(audio.device)
        spec = torch.stft(padded, c.n_fft, hop_length=c.hop, window=window, center=False, return_complex=True)
        return torch.addcmul(spec.real.square(), spec.imag, spec.imag)  # re^2 + im^2, 3x faster than abs()^2

    def log(self, bands: Tensor) -> Tensor:
        return torch.log(bands + self.cfg.log_offset)

    def normalise_chroma(self, energy: Tensor) -> Tensor:
        """[B, 12, T] pitch-class energy -> each frame scaled to max 1; frames below log_offset -> 0."""
        peak = energy.amax(dim=1, keepdim=True)
        audible = peak >= self.cfg.log_offset
        return torch.where(audible, energy / peak.clamp_min(self.cfg.log_offset), torch.zeros_like(energy))

    def mfcc(self, logmel: Tensor) -> Tensor:
        """[B, mfcc_n_mels, T] log-mel -> [B, n_mfcc (x3 with deltas), T]."""
        coeffs = self.dct.to(logmel.device) @ logmel
        if not self.cfg.deltas:
            return coeffs
        delta = AF.compute_deltas(coeffs, win_length=DELTA_WIN_LENGTH)  # along the last (time) axis
        delta2 = AF.compute_deltas(delta, win_length=DELTA_WIN_LENGTH)
        return torch.cat([coeffs, delta, delta2], dim=1)
