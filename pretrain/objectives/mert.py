"""MERT's objective around the encoder: noise mixup, span masking, per-stream masked prediction, CQT reconstruction.

    objective = Objective(ObjectiveConfig(), encoder, codebook_sizes={"encodec": [1024] * 8})
    loss, logs = objective(audio, lengths, {"encodec": codes [B, T_labels, 8]})

Frames: labels are at 75 Hz (label frame t = samples [320 t, 320 t + 320));
the encoder gives T = conv_frames(N) frames, one or two fewer than N // 320,
whose frame t sees samples [320 t, 320 t + 400): encoder frame t takes label
frame t, and the trailing label frames are dropped (`align`). nnAudio's CQT
is centred (frame j centred on sample 320 j, N // 320 + 1 frames): encoder
frame t takes CQT frame t + 1, centred on sample 320 t + 320, inside its
receptive field. Targets are always computed from the clean audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from pretrain.model import Encoder, real_frames


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "mert"  # "mert": this module (offline teacher codes from data.labels); "bestrq": pretrain/objectives/bestrq.py;
    # "data2vec": pretrain/objectives/data2vec.py
    mask_prob: float = 0.8  # span-start rate (HuBERT semantics: spans of mask_length start at this rate / mask_length)
    mask_length: int = 5
    proj_dim: int = 64  # 128 for MERT-330M
    temperature: float = 0.1
    cqt_weight: float = 1.0  # 0 disables the CQT head
    cqt_bins: int = 336
    cqt_bins_per_octave: int = 48
    cqt_fmin: float = 32.7
    feature_penalty: float = 10.0
    vicreg_weight: float = 0.0  # > 0: adds VICReg's variance and covariance terms (Bardes et al. 2022) of the
    # student's last-layer frames, this weight x (variance + covariance / 25), against dimensional collapse (README)
    mixup_prob: float = 0.5  # chance that an item gets noise segments from other items
    mixup_segments: tuple[int, int] = (1, 3)
    mixup_seconds: tuple[float, float] = (0.5, 1.0)
    sample_rate: int = SAMPLE_RATE
    hop: int = FRAME_SAMPLES
    # kind=bestrq (pretrain/objectives/bestrq.py): targets from a frozen random-projection quantizer of log-mel frames, made in
    # the step; the projection and codebooks are drawn from bestrq_seed (configs/bestrq_95m.yaml explains the values)
    bestrq_seed: int = 0
    bestrq_codebooks: int = 1  # independent quantizers (own projection and codebook), one softmax head each
    bestrq_codebook_size: int = 4096
    bestrq_dim: int = 16  # projection (and codeword) dimension
    bestrq_n_mels: int = 128
    bestrq_n_fft: int = 2048
    bestrq_stack: int = 1  # log-mel frames per 320-sample label frame (hop 320 / stack), concatenated
    bestrq_norm: str = "bin"  # log-mel standardised per crop: "bin", each mel bin over time (what stays the same
    # through the crop leaves the codes); "clip", one mean and std over the crop (MusicFM: over the corpus)
    # kind=data2vec (pretrain/objectives/data2vec.py; configs/music2vec_95m.yaml): regression of an EMA teacher's top-k layers
    data2vec_top_k: int = 8  # feed-forward outputs of the teacher's top k blocks, averaged
    data2vec_ema_decay: float = 0.999  # the teacher's EMA decay at step 0 ...
    data2vec_ema_end_decay: float = 0.9999  # ... growing linearly to this
    data2vec_ema_anneal_steps: int = 0  # ... over this many updates (0: train.steps)
    data2vec_loss_beta: float = 0.0  # 0: squared error (data2vec base); > 0: smooth L1 with this beta (fairseq's loss_beta)
    data2vec_ema_all: bool = True  # the teacher is the EMA of the whole encoder, conv extractor included, reading
    # the clean audio (fairseq: ema_transformer_only=false). false: fairseq's default, an EMA of the blocks fed the
    # student's conv features, which the student can then reshape to make its targets easy (README: data2vec)
    data2vec_target_norm: str = "instance"  # each teacher layer before the average: "instance" (data2vec: per crop
    # and dimension over time, which removes whatever is constant through a crop, its timbre among it) or "batch"
    # (per dimension over all real frames of the batch: a crop's constant part stays in its targets) or "both"
    # (the mean of the two)
    data2vec_clip_weight: float = 0.0  # > 0: adds a clip-level contrastive term of this weight (COLA-style, README:
    # data2vec): the student's mean over the crop, through a linear head, must pick out its own crop's teacher mean
    # among the micro-batch's (InfoNCE), so what is constant through a crop, which the targets drop, is asked for
    data2vec_clip_temperature: float = 0.1


def span_mask(valid: torch.Tensor, total: int, prob: float, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, total] bool on valid's device: per item, int(prob * valid / length + U[0, 1)) spans of `length` frames
    start at distinct random frames of its valid part (HuBERT/fairseq semantics; spans may overlap).
    Vectorised, no host sync: random numbers come from `generator` on the CPU and are moved to the device."""
    device, batch = valid.device, len(valid)
    starts_possible = (valid - length + 1).clamp(min=0)
    spans = (prob * valid / length + torch.rand(batch, generator=generator).to(device)).long()
    spans = torch.minimum(spans, starts_possible)
    scores = torch.rand(batch, total, generator=generator).to(device)
    scores = scores.masked_fill(torch.arange(total, device=device) >= starts_possible[:, None], 2.0)
    starts = scores.argsort(dim=1).argsort(dim=1) < spans[:, None]  # the `spans` lowest scores among possible starts
    mask = starts.clone()
    for shift in range(1, min(length, total)):
        mask[:, shift:] |= starts[:, :-shift]
    return mask


def noise_mixup(audio: torch.Tensor, lengths: torch.Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of `audio` where each item, with probability cfg.mixup_prob, has 1-3 segments of 0.5-1 s from
    other items of the batch added at random positions (within both items' real lengths).
    Vectorised, no host sync: all segments are gathered and added with one index_add_."""
    batch, samples = audio.shape
    if batch < 2 or cfg.mixup_prob <= 0:
        return audio.clone()
    device, g = audio.device, generator
    (low_count, high_count), (low, high) = cfg.mixup_segments, cfg.mixup_seconds
    chosen = torch.rand(batch, generator=g) < cfg.mixup_prob
    count = torch.randint(low_count, high_count + 1, (batch,), generator=g)
    active = chosen[:, None] & (torch.arange(high_count) < count[:, None])  # [B, S]: which segment slots are used
    other = (torch.arange(batch)[:, None] + torch.randint(1, batch, (batch, high_count), generator=g)) % batch
    seconds = low + (high - low) * torch.rand(batch, high_count, generator=g)
    where = torch.rand(2, batch, high_count, generator=g)
    active, other, seconds, where = (t.to(device) for t in (active, other, seconds, where))
    own, theirs = lengths[:, None], lengths[other]
    size = torch.minimum((seconds * cfg.sample_rate).long(), torch.minimum(own, theirs)) * active
    src = torch.minimum((where[0] * (theirs - size + 1)).long(), theirs - size)
    dst = torch.minimum((where[1] * (own - size + 1)).long(), own - size)
    offsets = torch.arange(int(high * cfg.sample_rate) + 1, device=device)
    keep = offsets < size[..., None]  # [B, S, M]
    last = batch * samples - 1
    src_index = ((other * samples + src)[..., None] + offsets).clamp(max=last)
    dst_index = ((torch.arange(batch, device=device)[:, None] * samples + dst)[..., None] + offsets).clamp(max=last)
    flat = audio.reshape(-1)
    added = flat[src_index] * keep
    return flat.clone().index_add_(0, dst_index.reshape(-1), added.reshape(-1)).view(batch, samples)


VICREG_COVARIANCE_SHARE = 25  # VICReg weighs invariance, variance and covariance 25 : 25 : 1


def variance_covariance(frames: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of the real rows of `frames` ([..., D]; `real`: [...] bool), in fp32:
    the mean over dimensions of how far each one's std falls below 1, and the sum of the squared off-diagonal
    covariances over D. Together they ask every dimension to vary and no two to vary together: a representation of
    full rank. Masked sums, not boolean indexing, so the host never waits for the device."""
    x = frames.float().reshape(-1, frames.shape[-1])
    weights = real.reshape(-1, 1).float()
    count = weights.sum()
    centred = (x - (x * weights).sum(0) / count.clamp(min=1)) * weights
    covariance = centred.T @ centred / (count - 1).clamp(min=1)
    variance = F.relu(1 - torch.sqrt(covariance.diagonal() + 1e-4)).mean()
    covariance = (covariance.pow(2).sum() - covariance.diagonal().pow(2).sum()) / x.shape[1]
    return variance, covariance


def feature_penalty(features: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """HuBERT's penalty: mean square of the conv features [B, T, C], here over real (not padded) frames only."""
    squares = features.float().pow(2).mean(-1)
    if padding is None:
        return squares.mean()
    real = (~padding).float()
    return (squares * real).sum() / real.sum().clamp(min=1.0)


class CodewordHead(nn.Module):
    """Logits = cosine(projection of h, learned codeword embeddings) / temperature, one codebook."""

    def __init__(self, dim: int, proj_dim: int, size: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim)
        self.codewords = nn.Parameter(torch.randn(size, proj_dim) * proj_dim ** -0.5)
        self.temperature = temperature

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [M, D] -> [M, size]
        return F.normalize(self.proj(h).float(), dim=-1) @ F.normalize(self.codewords.float(), dim=-1).T / self.temperature


class Objective(nn.Module):
    def __init__(self, cfg: ObjectiveConfig, encoder: Encoder, codebook_sizes: dict[str, list[int]]):
        super().__init__()
        self.cfg, self.encoder = cfg, encoder
        dim = encoder.cfg.dim
        self.heads = nn.ModuleDict({
            f"{stream}_{book}": CodewordHead(dim, cfg.proj_dim, size, cfg.temperature)
            for stream, sizes in codebook_sizes.items() for book, size in enumerate(sizes)
        })
        self._cqt = None  # a fixed transform kept outside the module tree (see `cqt`)
        if cfg.cqt_weight > 0:
            from nnAudio.features import CQT2010v2

            self._cqt = [CQT2010v2(sr=cfg.sample_rate, hop_length=cfg.hop, fmin=cfg.cqt_fmin, n_bins=cfg.cqt_bins,
                                   bins_per_octave=cfg.cqt_bins_per_octave, output_format="Magnitude", verbose=False)]
            self.cqt_head = nn.Linear(dim, cfg.cqt_bins)

    @torch.compiler.disable  # train.compile: runs eagerly, as uncompiled (nnAudio pads in a bare try/except that
    def cqt(self, audio: torch.Tensor) -> torch.Tensor:  # Dynamo cannot trace: short octaves fall back to zeros)
        """[B, N] -> magnitude CQT [B, bins, N // hop + 1] in fp32 on audio's device. Its kernels are not part
        of the module: precision casts (DeepSpeed's bf16/fp16) and checkpoints leave them alone."""
        transform = self._cqt[0]
        first = next(transform.buffers())
        if first.device != audio.device:
            transform.to(audio.device)
        return transform(audio.float())

    @torch.compiler.disable  # data-dependent size, computed on the host: outside any compiled graph
    def draw_mask(self, lengths: torch.Tensor, frames: int, device: torch.device, generator: torch.Generator | None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The span mask ([B, frames] bool) and the flat indices of its frames ([M], row-major, as boolean indexing
        orders them), both on `device`. Drawn on the host from CPU `lengths` (a device tensor is copied back: a
        sync), so the masked-frame count needs no device sync and the gathers have a size known in advance."""
        valid = self.encoder.frames(lengths.cpu()).clamp(min=0)
        mask = span_mask(valid, frames, self.cfg.mask_prob, self.cfg.mask_length, generator)
        picked = mask.flatten().nonzero().squeeze(1)
        if device.type == "cuda":
            mask, picked = mask.pin_memory(), picked.pin_memory()
        return mask.to(device, non_blocking=True), picked.to(device, non_blocking=True)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts as detached tensors (no device sync here when `lengths` is on the CPU, as the
        trainer passes it; the trainer reads the parts when it logs).
        `generator` draws masks and mixup (per rank); `skip` is the layerdrop choice (the same on every rank)."""
        step, loss, logs = self.masked_step(audio, lengths, generator, skip)
        h, picked, frames = step["h"], step["picked"], step["frames"]
        for stream, codes in labels.items():
            targets = codes[:, :frames].flatten(0, 1).index_select(0, picked)  # label frame t -> encoder frame t
            for book in range(targets.shape[1]):
                logits = self.heads[f"{stream}_{book}"](h)
                ce = F.cross_entropy(logits, targets[:, book], ignore_index=-1)
                loss = loss + ce
                logs[f"loss/{stream}_{book}"] = ce.detach()
                known = (targets[:, book] >= 0).float()  # frames with a label (-1: none); no boolean indexing
                hits = (logits.detach().argmax(-1) == targets[:, book]).float() * known
                logs[f"acc/{stream}_{book}"] = hits.sum() / known.sum().clamp(min=1.0)
        return self.finish(loss, logs, audio, step)

    def masked_step(self, audio: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None,
                    skip: torch.Tensor | None) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
        """What every objective does first: the span mask, mixup (training only), the encoder on the masked
        input, the masked frames' outputs h [M, D] (in x[mask]'s order) and the feature penalty. Returns
        (the encoder's outputs with "mask", "picked", "frames" and "h"; the weighted penalty; the logs so far)."""
        frames = int(self.encoder.frames(audio.shape[1]))
        mask, picked = self.draw_mask(lengths, frames, audio.device, generator)
        lengths = lengths.to(audio.device, non_blocking=True)
        noisy = noise_mixup(audio, lengths, self.cfg, generator) if self.training else audio
        out = self.encoder(noisy, lengths, mask, skip=skip)  # the encoder casts what its front end needs
        h = out["x"].flatten(0, 1).index_select(0, picked)
        penalty = feature_penalty(out["features"], out["padding"])
        logs = {"masked_frames": mask.sum(), "feature_penalty": penalty.detach()}
        step = {**out, "mask": mask, "picked": picked, "frames": frames, "h": h, "lengths": lengths}
        return step, penalty * self.cfg.feature_penalty, logs

    def finish(self, loss: torch.Tensor, logs: dict, audio: torch.Tensor, step: dict,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Adds the CQT head's and VICReg's terms (when on) and the total to the logs."""
        if self._cqt is not None:
            mse = self.cqt_loss(audio, step["h"], step["frames"], step["picked"])
            loss = loss + self.cfg.cqt_weight * mse
            logs["loss/cqt"] = mse.detach()
        if self.cfg.vicreg_weight > 0:
            variance, covariance = variance_covariance(step["x"], real_frames(step["x"], step["padding"]))
            loss = loss + self.cfg.vicreg_weight * (variance + covariance / VICREG_COVARIANCE_SHARE)
            logs.update({"loss/variance": variance.detach(), "loss/covariance": covariance.detach()})
        logs["loss"] = loss.detach()
        return loss, logs

    def cqt_loss(self, audio: torch.Tensor, h: torch.Tensor, frames: int, picked: torch.Tensor) -> torch.Tensor:
        """MSE of the CQT head on the masked frames' outputs h [M, D] against the clean audio's CQT."""
        with torch.no_grad():
            cqt = self.cqt(audio).transpose(1, 2)[:, 1:frames + 1]  # CQT frame t + 1 -> encoder frame t
        return F.mse_loss(self.cqt_head(h).float(), cqt.flatten(0, 1).index_select(0, picked))
