"""BEST-RQ (Chiu et al. 2022; MusicFM, Won et al. 2024): masked prediction of codes from a frozen random-projection
quantizer, computed in the step from the clean audio. No offline teacher stage and no `data.labels`.

    objective = BestRQObjective(ObjectiveConfig(kind="bestrq"), encoder)
    loss, logs = objective(audio, lengths, {})       # logs: loss/bestrq_N, acc/bestrq_N per codebook

Targets, per 320-sample label frame (75 Hz, the encoder's frame rate):
1. log-mel (data/features.py: Slaney mel, natural log, window `bestrq_n_fft` centred on the frame) at hop
   320 / `bestrq_stack`, so `bestrq_stack` sub-frames fall inside each label frame;
2. normalised over the crop's real frames (`bestrq_norm`): "bin", per mel bin over time (instance norm: mean 0,
   std 1 per bin), or "clip", one mean and std over all the crop's bins and frames (MusicFM's scalar
   normalisation, with the crop's statistics instead of the corpus's) — see `normalise`;
3. the `bestrq_stack` sub-frames of a label frame concatenated: [n_mels x stack];
4. per codebook, projected by a fixed Xavier-normal matrix to `bestrq_dim` dims and assigned the nearest of
   `bestrq_codebook_size` random unit vectors by cosine.
Frames past a clip's real length get code -1 (ignored by the loss; the mask never reaches them anyway).

The projection, the codebooks and the log-mel filters are not part of the module tree (like the CQT kernels of
pretrain/objectives/mert.py): they are drawn on the CPU from `bestrq_seed` when the objective is built, so they are
identical on every rank and after a resume, are never trained, cast to bf16/fp16 by DeepSpeed, or saved in a
checkpoint (the seed in the run's config.yaml is what makes them again); exports hold the encoder only, as for mert.

The loss is the mert objective's (pretrain/objectives/mert.py: span mask, optional noise mixup of the input, masked
frames only, feature penalty, optional CQT head), with one linear softmax head per codebook, as in BEST-RQ.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from data.audio import FRAME_SAMPLES
from pretrain.model import Encoder
from pretrain.objectives.mert import Objective, ObjectiveConfig
from data.features import FeatureConfig, FeatureExtractor

STREAM = "bestrq"  # the logs' name: loss/bestrq_N, acc/bestrq_N
NORM_DIMS = {"bin": (1,), "clip": (1, 2)}  # bestrq_norm -> the dims of [B, T, n_mels] that `normalise` reduces over
NORM_FLOOR = 1e-3  # std floor of the instance norm, in natural-log units: a constant bin (silence) maps to 0


def normalise(feats: torch.Tensor, real: torch.Tensor, dims: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Mean 0 and std 1 per feature over the real frames ([B, T, D], real [B, T] bool); padded frames become 0.
    `dims` are the ones reduced over: (1,) time, per item (the instance norm); (0, 1) the whole batch.

    Why per crop (instance norm) and not corpus statistics: it needs no pass over the data, is a pure function
    of the crop (deterministic, the same on every rank and after a resume), and takes away what a random
    projection would otherwise be dominated by (the average spectral tilt and the loudness of the recording,
    which would put most frames on a few codes). Its cost: codes describe each frame relative to its crop's
    average spectrum, so the same audio frame can get another code in another crop of the same track, and what
    stays the same through the crop (a held note, the instrument's spectral envelope) is not in its codes.
    dims (1, 2) over time and features: one mean and std per crop, which keeps the spectrum's shape in the codes
    and takes away only the recording's level and contrast (`bestrq_norm: clip`)."""
    weight = real.to(feats.dtype)[..., None].expand_as(feats)
    count = weight.sum(dims, keepdim=True).clamp(min=1.0)
    mean = (feats * weight).sum(dims, keepdim=True) / count
    var = ((feats - mean).square() * weight).sum(dims, keepdim=True) / count
    return (feats - mean) / var.sqrt().clamp(min=NORM_FLOOR) * weight


def xavier_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """[..., fan_in, fan_out] with std sqrt(2 / (fan_in + fan_out)) (Glorot; BEST-RQ's and MusicFM's projection)."""
    fan_in, fan_out = shape[-2], shape[-1]
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / (fan_in + fan_out))


class RandomProjectionQuantizer:
    """codes(audio [B, N], lengths [B]) -> int64 [B, N // 320, books]. A plain object, not an nn.Module."""

    def __init__(self, cfg: ObjectiveConfig):
        self.stack, self.norm_dims = cfg.bestrq_stack, NORM_DIMS[cfg.bestrq_norm]
        self.features = FeatureExtractor(FeatureConfig(kind="logmel", hop=FRAME_SAMPLES // cfg.bestrq_stack,
                                                       n_fft=cfg.bestrq_n_fft, n_mels=cfg.bestrq_n_mels))
        generator = torch.Generator().manual_seed(cfg.bestrq_seed)
        books, size, dim = cfg.bestrq_codebooks, cfg.bestrq_codebook_size, cfg.bestrq_dim
        self.projection = xavier_normal((books, cfg.bestrq_n_mels * self.stack, dim), generator)  # [books, in, dim]
        self.codebooks = F.normalize(torch.randn(books, size, dim, generator=generator), dim=-1)  # [books, size, dim]

    def to(self, device: torch.device) -> "RandomProjectionQuantizer":
        self.features.to(device)
        self.projection, self.codebooks = self.projection.to(device), self.codebooks.to(device)
        return self

    def stacked_features(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, N // 320, n_mels x stack]: label frame t holds sub-frames stack t ... stack t + stack - 1."""
        frames, hop = audio.shape[1] // FRAME_SAMPLES, FRAME_SAMPLES // self.stack
        feats = self.features(audio.float())[:, :frames * self.stack]  # [B, frames x stack, n_mels]
        real = torch.arange(feats.shape[1], device=audio.device)[None] < (lengths // hop)[:, None]
        feats = normalise(feats, real, self.norm_dims)
        return feats.reshape(len(audio), frames, -1)

    @torch.no_grad()
    def codes(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.projection.device != audio.device:
            self.to(audio.device)
        lengths = lengths.to(audio.device)
        x = self.stacked_features(audio, lengths)  # [B, T, in]
        books = []
        for projection, codebook in zip(self.projection, self.codebooks):
            z = F.normalize(x @ projection, dim=-1)  # [B, T, dim]
            books.append((z @ codebook.T).argmax(-1))  # nearest unit vector by cosine
        codes = torch.stack(books, dim=-1)  # [B, T, books]
        past_end = torch.arange(codes.shape[1], device=audio.device)[None] >= (lengths // FRAME_SAMPLES)[:, None]
        return codes.masked_fill(past_end[..., None], -1)


class SoftmaxHead(nn.Linear):
    """BEST-RQ's prediction head: a linear layer to the codebook's logits, in fp32 for the cross-entropy."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [M, D] -> [M, size]
        return super().forward(h).float()


class BestRQObjective(Objective):
    """The mert objective's masked prediction, with codes from `RandomProjectionQuantizer` instead of teachers."""

    def __init__(self, cfg: ObjectiveConfig, encoder: Encoder, codebook_sizes: dict[str, list[int]] | None = None):
        if codebook_sizes:
            raise ValueError(f"objective.kind=bestrq makes its own targets; it takes no teacher labels (got "
                             f"{sorted(codebook_sizes)}): leave data.labels empty")
        super().__init__(cfg, encoder, {})
        self.heads = nn.ModuleDict({f"{STREAM}_{book}": SoftmaxHead(encoder.cfg.dim, cfg.bestrq_codebook_size)
                                    for book in range(cfg.bestrq_codebooks)})
        self._quantizer = RandomProjectionQuantizer(cfg)  # outside the module tree: not trained, cast or saved

    @torch.compiler.disable  # train.compile: eager, in fp32, like the CQT target
    def targets(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The quantizer's codes of the clean audio: int64 [B, N // 320, bestrq_codebooks], -1 past the real end."""
        return self._quantizer.codes(audio, lengths)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As Objective.forward; `labels` must be empty (a loader without data.labels gives {})."""
        if labels:
            raise ValueError(f"objective.kind=bestrq got teacher labels {sorted(labels)}; leave data.labels empty")
        return super().forward(audio, lengths, {STREAM: self.targets(audio, lengths)}, generator, skip)
