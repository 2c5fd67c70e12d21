"""MERT's objective: masked prediction of offline teachers' codes (k-means, EnCodec; data.labels), one cosine
codeword head per codebook, on the shared masked step (pretrain/objectives/masked.py: mixup, span masking, CQT
reconstruction, feature penalty, VICReg's terms).

    objective = MertObjective(ObjectiveConfig(), encoder, codebook_sizes={"encodec": [1024] * 8})
    loss, logs = objective(audio, lengths, {"encodec": codes [B, T_labels, 8]})   # logs: loss/encodec_N, acc/...
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import Encoder, EncoderConfig
from pretrain.objectives.masked import MaskedObjective


@dataclass(frozen=True)
class MertSettings:
    """objective.mert.*"""
    proj_dim: int = 64  # the codeword heads' projection (128 for MERT-330M)
    temperature: float = 0.1  # of the cosine logits

    def check(self, model: EncoderConfig) -> None:
        if self.proj_dim < 1 or self.temperature <= 0:
            raise ValueError(f"proj_dim={self.proj_dim}, temperature={self.temperature}: the projection has at least "
                             "1 dimension and the temperature is above 0 (MERT: 64 or 128, 0.1)")


class CodewordHead(nn.Module):
    """Logits = cosine(projection of h, learned codeword embeddings) / temperature, one codebook."""

    def __init__(self, dim: int, proj_dim: int, size: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim)
        self.codewords = nn.Parameter(torch.randn(size, proj_dim) * proj_dim ** -0.5)
        self.temperature = temperature

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [M, D] -> [M, size]
        return F.normalize(self.proj(h).float(), dim=-1) @ F.normalize(self.codewords.float(), dim=-1).T / self.temperature


class MertObjective(MaskedObjective):
    Settings = MertSettings
    reads_labels = True

    def __init__(self, cfg, encoder: Encoder, codebook_sizes: dict[str, list[int]]):
        own = cfg.mert
        super().__init__(cfg, encoder, codebook_sizes, heads={
            f"{stream}_{book}": CodewordHead(encoder.cfg.dim, own.proj_dim, size, own.temperature)
            for stream, sizes in codebook_sizes.items() for book, size in enumerate(sizes)})

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts as detached tensors (no device sync here when `lengths` is on the CPU, as the
        trainer passes it; the trainer reads the parts when it logs).
        `generator` draws masks and mixup (per rank); `skip` is the layerdrop choice (the same on every rank)."""
        step, loss, logs = self.masked_step(audio, lengths, generator, skip)
        loss = self.code_losses(step, labels, loss, logs)
        return self.finish(loss, logs, audio, step)
