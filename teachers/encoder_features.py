"""A trained encoder's layer as k-means features: the targets of HuBERT's second iteration (MusicHuBERT too).

    streams:
      - name: layer6
        k: 500
        features: {kind: encoder, ckpt: runs/mert_95m, layer: 6}

`ckpt` is a run directory (its newest complete checkpoint), one checkpoint folder, or a file written by
`python -m pretrain.export`. The fit pins it (`EncoderFeatureConfig.pinned`): a run directory becomes the
checkpoint folder it had then, recorded with its fingerprint (data.files.fingerprint), so the dump uses the
same weights or refuses, and the labels' manifest lists it under `sources`, so the loader refuses the labels
once that checkpoint has changed. `layer` 0 is the input of the first block (the projected conv features, with the
positional conv and norm: pretrain.downstream.extract's "embedding"), layer i the output of block i. The encoder runs frozen,
in fp32, in eval mode (no dropout, no layerdrop, no mask) on the whole segment.

Frames: encoder frame t sees samples [320 t, 320 t + 400), so it is label frame t; the conv stack gives one or two
frames fewer than N // 320, and the last encoder frame is repeated to fill them, so a segment of N samples gets
N // 320 frames like every other feature kind (data/features.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from data.audio import FRAME_SAMPLES
from data.files import fingerprint
from pretrain.export import checkpoint_folder, load_any  # the model, not the trainer: teachers stay free of training code


@functools.lru_cache(maxsize=4)
def _encoder(path: str):
    try:
        encoder, _ = load_any(path)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"features kind encoder: ckpt={path!r} is not a run directory, checkpoint folder or "
                         f"exported encoder ({error}); train one with python -m pretrain.train, or export one with "
                         "python -m pretrain.export") from None
    return encoder.eval().requires_grad_(False)


def resolved(path: str) -> str:
    """A run directory's newest complete checkpoint folder; a checkpoint folder or an export file as it is."""
    return path if os.path.isfile(path) else checkpoint_folder(path)


@dataclass(frozen=True)
class EncoderFeatureConfig:
    kind: str = "encoder"
    ckpt: str = ""  # run directory, checkpoint folder or exported encoder file
    layer: int = 0  # 0: the first block's input ("embedding"); i: block i's output
    fingerprint: str = ""  # data.files.fingerprint of the ckpt, set by `pinned()` (the fit records it); "": unchecked

    def __post_init__(self) -> None:
        if self.kind != "encoder":
            raise ValueError(f"EncoderFeatureConfig is for kind 'encoder', got {self.kind!r}")
        if not self.ckpt:
            raise ValueError("features kind encoder needs ckpt=RUN_DIR (or a checkpoint folder or an exported encoder)")
        layers = _encoder(self.ckpt).cfg.layers
        if not 0 <= self.layer <= layers:
            raise ValueError(f"features kind encoder: layer={self.layer}, but {self.ckpt} has layers 0 (embedding) "
                             f"to {layers}")
        if self.fingerprint and fingerprint(self.ckpt) != self.fingerprint:
            raise ValueError(f"features kind encoder: {self.ckpt} has changed since the k-means fit that used it; fit "
                             "again into a new `out` (and dump into a new labels folder), or restore that checkpoint")

    def pinned(self) -> "EncoderFeatureConfig":
        """The same features tied to one checkpoint: a run directory becomes its newest checkpoint folder (a run
        that goes on training does not change them), with that checkpoint's fingerprint."""
        path = os.path.abspath(resolved(self.ckpt))
        return replace(self, ckpt=path, fingerprint=self.fingerprint or fingerprint(path))

    @property
    def dim(self) -> int:
        return _encoder(self.ckpt).cfg.dim


class EncoderFeatures(torch.nn.Module):
    """[B, N] (or [N]) 24 kHz audio -> [B, N // 320, dim] (or [N // 320, dim]) float32: one layer of a frozen encoder."""

    def __init__(self, cfg: EncoderFeatureConfig):
        super().__init__()
        self.cfg, self.encoder = cfg, _encoder(cfg.ckpt)

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() == 1:
            return self.forward(audio.unsqueeze(0)).squeeze(0)
        frames = audio.shape[-1] // FRAME_SAMPLES
        device = audio.device
        if int(self.encoder.frames(audio.shape[-1])) < 1:
            return audio.new_zeros(audio.shape[0], frames, self.cfg.dim)
        lengths = torch.full((audio.shape[0],), audio.shape[-1], device=device)
        x = self.encoder.to(device).hidden_states(audio.float(), lengths)[0][self.cfg.layer]
        missing = frames - x.shape[1]
        if missing > 0:
            x = torch.cat([x, x[:, -1:].expand(-1, missing, -1)], dim=1)
        return x[:, :frames].float().contiguous()
