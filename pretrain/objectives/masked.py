"""What every objective shares: the masked step around the encoder, its settings, and the interface the trainer sees.

    objective = OBJECTIVES[cfg.objective.kind](cfg.objective, encoder, codebook_sizes)   # pretrain/objectives
    loss, logs = objective(audio, lengths, labels, generator, skip)
    objective.after_update(step, total_steps)      # after each optimizer update (data2vec: its EMA teacher)
    parts = type(objective).checkpoint_parts(lambda: engine.module)   # state it saves beside the trainer's

An objective is one module: a subclass of `MaskedObjective` with `Settings` (a frozen dataclass, its own section
`objective.<kind>` of the run config, with a `check(model)` that raises ValueError naming the key), `reads_labels`
(whether it trains on offline teachers' codes, data.labels), its heads, its forward, and, when it has state outside
the trained module, `after_update` and `checkpoint_parts`. `MaskedConfig` holds the settings every kind shares.

The masked step: span masking (HuBERT semantics), noise mixup of the input (training only), the encoder on the
masked input, the masked frames' outputs, HuBERT's feature penalty, then, when on, MERT's CQT reconstruction head
and VICReg's variance and covariance terms. Frames: labels are at 75 Hz (label frame t = samples [320 t, 320 t +
320)); encoder frame t takes label frame t, and the trailing label frames are dropped. nnAudio's CQT is centred
(frame j centred on sample 320 j, N // 320 + 1 frames): encoder frame t takes CQT frame t + 1, centred on sample
320 t + 320, inside its receptive field. Targets are always computed from the clean audio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from pretrain.model import Encoder, real_frames


@dataclass(frozen=True)
class MaskedConfig:
    """objective.*: the kind and the settings of the masked step every kind shares (pretrain/objectives builds
    ObjectiveConfig from this and each kind's own section)."""
    kind: str = "mert"  # a key of pretrain/objectives' OBJECTIVES
    mask_prob: float = 0.8  # span-start rate (HuBERT semantics: spans of mask_length start at this rate / mask_length)
    mask_length: int = 5
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


def noise_mixup(audio: torch.Tensor, lengths: torch.Tensor, cfg: MaskedConfig, generator: torch.Generator | None = None) -> torch.Tensor:
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
    and takes away only the recording's level and contrast (`objective.bestrq.norm: clip`)."""
    weight = real.to(feats.dtype)[..., None].expand_as(feats)
    count = weight.sum(dims, keepdim=True).clamp(min=1.0)
    mean = (feats * weight).sum(dims, keepdim=True) / count
    var = ((feats - mean).square() * weight).sum(dims, keepdim=True) / count
    return (feats - mean) / var.sqrt().clamp(min=NORM_FLOOR) * weight



class MaskedObjective(nn.Module):
    """The shared masked step (`masked_step`, `code_losses`, `finish`) and the trainer's interface; a kind's
    module subclasses it (see the module docstring)."""

    Settings: type = None  # a kind's own settings, objective.<kind>.*
    reads_labels = False  # True: trains on data.labels (offline teachers' codes); False: makes its targets in the step

    def __init__(self, cfg: MaskedConfig, encoder: Encoder, codebook_sizes: dict[str, list[int]] | None = None,
                 heads: dict[str, nn.Module] | None = None):
        """`heads`: stream_book -> a head giving that codebook's logits from the masked frames' outputs
        (`code_losses`)."""
        super().__init__()
        if codebook_sizes and not self.reads_labels:
            raise ValueError(f"{type(self).__name__} makes its own targets; it takes no teacher labels (got "
                             f"{sorted(codebook_sizes)}): leave data.labels empty")
        self.cfg, self.encoder = cfg, encoder
        self.heads = nn.ModuleDict(heads or {})
        self._cqt = None  # a fixed transform kept outside the module tree (see `cqt`)
        if cfg.cqt_weight > 0:
            from nnAudio.features import CQT2010v2

            self._cqt = [CQT2010v2(sr=cfg.sample_rate, hop_length=cfg.hop, fmin=cfg.cqt_fmin, n_bins=cfg.cqt_bins,
                                   bins_per_octave=cfg.cqt_bins_per_octave, output_format="Magnitude", verbose=False)]
            self.cqt_head = nn.Linear(encoder.cfg.dim, cfg.cqt_bins)

    def after_update(self, step: int, total_steps: int) -> None:
        """Called after optimizer update `step` (1-based); nothing here (data2vec's teacher follows the student)."""

    @staticmethod
    def checkpoint_parts(objective_of) -> dict:
        """Checkpoint parts (name -> object with state_dict/load_state_dict) for state outside the trained module;
        `objective_of()` gives the engine's current objective. None here."""
        return {}

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

    def code_losses(self, step: dict, labels: dict[str, torch.Tensor], loss: torch.Tensor, logs: dict,
                    ) -> torch.Tensor:
        """Adds to `loss` (and to `logs`) the cross-entropy of each codebook's head on the masked frames, against
        `labels` {stream: int codes [B, T_labels, books]} (-1: no label); returns the new loss."""
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
        return loss

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
