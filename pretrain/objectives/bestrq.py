"""BEST-RQ (Chiu et al. 2022; MusicFM, Won et al. 2024): masked prediction of codes from a frozen random-projection
quantizer, computed in the step from the clean audio. No offline teacher stage and no `data.labels`.

    objective = BestRQObjective(cfg.objective, encoder)     # cfg: pretrain/config.py, objective.kind=bestrq
    loss, logs = objective(audio, lengths, {})       # logs: loss/bestrq_N, acc/bestrq_N per codebook

Targets (settings `objective.bestrq.*`, `BestRQSettings`), per 320-sample label frame (75 Hz, the encoder's frame rate):
1. log-mel (data/features.py: Slaney mel, natural log, window `n_fft` centred on the frame) at hop
   320 / `stack`, so `stack` sub-frames fall inside each label frame;
2. normalised over the crop's real frames (`norm`): "bin", per mel bin over time (instance norm: mean 0,
   std 1 per bin), or "clip", one mean and std over all the crop's bins and frames (MusicFM's scalar
   normalisation, with the crop's statistics instead of the corpus's) — see `normalise`;
3. the `stack` sub-frames of a label frame concatenated: [n_mels x stack];
4. per codebook, projected by a fixed Xavier-normal matrix to `dim` dims and assigned the nearest of
   `codebook_size` random unit vectors by cosine.
Frames past a clip's real length get code -1 (ignored by the loss; the mask never reaches them anyway).

The projection, the codebooks and the log-mel filters are not part of the module tree (like the CQT kernels of
pretrain/objectives/masked.py): they are drawn on the CPU from `seed` when the objective is built, so they are
identical on every rank and after a resume, are never trained, cast to bf16/fp16 by DeepSpeed, or saved in a
checkpoint (the seed in the run's config.yaml is what makes them again); exports hold the encoder only, as for mert.

The loss is the shared masked step's (pretrain/objectives/masked.py: span mask, optional noise mixup of the input,
masked frames only, feature penalty, optional CQT head), with one linear softmax head per codebook, as in BEST-RQ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.audio import FRAME_SAMPLES
from data.features import FeatureConfig, FeatureExtractor
from pretrain.model import Encoder, EncoderConfig
from pretrain.objectives.masked import MaskedObjective, normalise

STREAM = "bestrq"  # the logs' name: loss/bestrq_N, acc/bestrq_N
NORM_DIMS = {"bin": (1,), "clip": (1, 2)}  # norm -> the dims of [B, T, n_mels] that `normalise` reduces over


@dataclass(frozen=True)
class BestRQSettings:
    """objective.bestrq.*: the quantizer's projection and codebooks are drawn from `seed` (configs/bestrq_95m.yaml
    explains the values)."""
    seed: int = 0
    codebooks: int = 1  # independent quantizers (own projection and codebook), one softmax head each
    codebook_size: int = 4096
    dim: int = 16  # projection (and codeword) dimension
    n_mels: int = 128
    n_fft: int = 2048
    stack: int = 1  # log-mel frames per 320-sample label frame (hop 320 / stack), concatenated
    norm: str = "bin"  # log-mel standardised per crop: "bin", each mel bin over time (what stays the same
    # through the crop leaves the codes); "clip", one mean and std over the crop (MusicFM: over the corpus)

    def check(self, model: EncoderConfig) -> None:
        for name, low in (("codebooks", 1), ("codebook_size", 2), ("dim", 1), ("n_mels", 1), ("stack", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)} must be at least {low}")
        if self.norm not in NORM_DIMS:
            raise ValueError(f"norm={self.norm!r}: use 'bin' (per mel bin over time) or 'clip' (one mean and std "
                             "over the crop)")
        if FRAME_SAMPLES % self.stack:
            raise ValueError(f"stack={self.stack} must divide the {FRAME_SAMPLES}-sample label frame (log-mel hop = "
                             f"{FRAME_SAMPLES} / stack), e.g. 1, 2, 4 or 5")
        if not FRAME_SAMPLES // self.stack <= self.n_fft:
            raise ValueError(f"n_fft={self.n_fft} is shorter than the log-mel hop {FRAME_SAMPLES // self.stack}; "
                             "use e.g. 2048")
def xavier_normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """[..., fan_in, fan_out] with std sqrt(2 / (fan_in + fan_out)) (Glorot; BEST-RQ's and MusicFM's projection)."""
    fan_in, fan_out = shape[-2], shape[-1]
    return torch.randn(shape, generator=generator) * math.sqrt(2.0 / (fan_in + fan_out))


class RandomProjectionQuantizer:
    """codes(audio [B, N], lengths [B]) -> int64 [B, N // 320, books]. A plain object, not an nn.Module."""

    def __init__(self, settings: BestRQSettings):
        self.stack, self.norm_dims = settings.stack, NORM_DIMS[settings.norm]
        self.features = FeatureExtractor(FeatureConfig(kind="logmel", hop=FRAME_SAMPLES // settings.stack,
                                                       n_fft=settings.n_fft, n_mels=settings.n_mels))
        generator = torch.Generator().manual_seed(settings.seed)
        books, size, dim = settings.codebooks, settings.codebook_size, settings.dim
        self.projection = xavier_normal((books, settings.n_mels * self.stack, dim), generator)  # [books, in, dim]
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


class BestRQObjective(MaskedObjective):
    """The shared masked step with one softmax head per codebook, predicting `RandomProjectionQuantizer`'s codes."""

    Settings = BestRQSettings
    reads_labels = False

    def __init__(self, cfg, encoder: Encoder, codebook_sizes: dict[str, list[int]] | None = None):
        own = cfg.bestrq
        super().__init__(cfg, encoder, codebook_sizes)
        self.heads = nn.ModuleDict({  # made after the CQT head: the same draws from the seed as ever
            f"{STREAM}_{book}": SoftmaxHead(encoder.cfg.dim, own.codebook_size) for book in range(own.codebooks)})
        self._quantizer = RandomProjectionQuantizer(own)  # outside the module tree: not trained, cast or saved

    @torch.compiler.disable  # train.compile: eager, in fp32, like the CQT target
    def targets(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The quantizer's codes of the clean audio: int64 [B, N // 320, codebooks], -1 past the real end."""
        return self._quantizer.codes(audio, lengths)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As MertObjective.forward, with the quantizer's codes as the one stream (`labels`: {}, unused)."""
        step, loss, logs = self.masked_step(audio, lengths, generator, skip)
        loss = self.code_losses(step, {STREAM: self.targets(audio, lengths)}, loss, logs)
        return self.finish(loss, logs, audio, step)
