"""data2vec (Baevski et al. 2022) as Music2Vec (Li et al. 2022) uses it for music: the student regresses, on masked
frames, the average of the top `top_k` feed-forward outputs of an EMA teacher that sees the same frames
unmasked. No offline teacher stage and no `data.labels`. Settings: `objective.data2vec.*` (`Data2VecSettings`).

    objective = Data2VecObjective(cfg.objective, encoder)   # cfg: pretrain/config.py, objective.kind=data2vec
    loss, logs = objective(audio, lengths, {})    # logs: loss/data2vec, var/target, var/prediction
    objective.after_update(step, total_steps)      # after each optimizer update: the teacher follows

As fairseq's data2vec_audio (examples/data2vec/models/data2vec_audio.py, base config), but for the teacher:
by default (`ema_all`) it is the EMA of the whole encoder, conv extractor included, and reads the clean
audio (fairseq's ema_transformer_only=false); with `ema_all=false` it is fairseq's default, an EMA of the
blocks and of the norm before them only (`ema_layers_only`), fed the student's projected conv features of the
unmasked crop, with the student's own positional conv (the README says why we differ). Each target layer is instance-normalised over time (here over the crop's real frames) before the average; the loss
is the squared error (or, with `loss_beta` > 0, smooth L1) summed over dimensions, scaled by
1 / sqrt(dim), averaged over masked frames; a linear
`final_proj` maps the student's last layer to the target. The EMA decay goes linearly from `ema_decay`
to `ema_end_decay` over `ema_anneal_steps` updates (0: the run's train.steps, so a resume with more
steps stretches the rest of the schedule, as it does the learning rate's), then stays.

The teacher is an fp32 copy kept outside the module tree (as the CQT kernels and BEST-RQ's quantizer are): DeepSpeed
neither trains it, nor casts it to bf16/fp16 (an EMA step of 1e-4 would vanish in bf16's 8-bit mantissa), nor
holds it in its checkpoint files; its weights are the checkpoint part "teacher" (`TeacherState`), saved by every
rank beside the trainer's counters and restored with them. It runs under autocast in the student's dtype.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import Encoder, EncoderConfig, real_frames
from pretrain.objectives.masked import MaskedObjective, normalise

STREAM = "data2vec"  # the logs' name: loss/data2vec
TEACHER_PREFIXES = ("norm.", "blocks.")  # what the EMA follows (fairseq's ema_layers_only: not the positional conv)


@dataclass(frozen=True)
class Data2VecSettings:
    """objective.data2vec.* (configs/music2vec_95m.yaml): regression of an EMA teacher's top-k layers."""
    top_k: int = 8  # feed-forward outputs of the teacher's top k blocks, averaged
    ema_decay: float = 0.999  # the teacher's EMA decay at step 0 ...
    ema_end_decay: float = 0.9999  # ... growing linearly to this
    ema_anneal_steps: int = 0  # ... over this many updates (0: train.steps)
    loss_beta: float = 0.0  # 0: squared error (data2vec base); > 0: smooth L1 with this beta (fairseq's loss_beta)
    ema_all: bool = True  # the teacher is the EMA of the whole encoder, conv extractor included, reading
    # the clean audio (fairseq: ema_transformer_only=false). false: fairseq's default, an EMA of the blocks fed the
    # student's conv features, which the student can then reshape to make its targets easy (README: data2vec)
    target_norm: str = "instance"  # each teacher layer before the average: "instance" (data2vec: per crop
    # and dimension over time, which removes whatever is constant through a crop, its timbre among it) or "batch"
    # (per dimension over all real frames of the batch: a crop's constant part stays in its targets) or "both"
    # (the mean of the two)
    clip_weight: float = 0.0  # > 0: adds a clip-level contrastive term of this weight (COLA-style, README:
    # data2vec): the student's mean over the crop, through a linear head, must pick out its own crop's teacher mean
    # among the micro-batch's (InfoNCE), so what is constant through a crop, which the targets drop, is asked for
    clip_temperature: float = 0.1

    def check(self, model: EncoderConfig) -> None:
        if not 1 <= self.top_k <= model.layers:
            raise ValueError(f"top_k={self.top_k}: average 1 to model.layers={model.layers} of the teacher's layers")
        for name in ("ema_decay", "ema_end_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: an EMA decay is in [0, 1] (data2vec: 0.999 growing "
                                 "to 0.9999)")
        if self.loss_beta < 0:
            raise ValueError(f"loss_beta={self.loss_beta}: 0 (squared error) or a positive smooth-L1 beta")
        if self.ema_anneal_steps < 0:
            raise ValueError(f"ema_anneal_steps={self.ema_anneal_steps} must be at least 0 (0: train.steps)")
        if self.target_norm not in TARGET_NORMS:
            raise ValueError(f"target_norm={self.target_norm!r}; use one of {tuple(TARGET_NORMS)}")
        if self.clip_weight < 0 or self.clip_temperature <= 0:
            raise ValueError(f"clip_weight={self.clip_weight} and clip_temperature={self.clip_temperature}: the "
                             "weight is at least 0 (0: off), the temperature above 0")


def ema_decay(settings: Data2VecSettings, step: int, total_steps: int) -> float:
    """The decay after `step` updates: linear from ema_decay to ema_end_decay (fairseq's get_annealed_rate),
    reached at ema_anneal_steps (0: total_steps) and kept after."""
    end_step = settings.ema_anneal_steps or total_steps
    start, end = settings.ema_decay, settings.ema_end_decay
    if step >= end_step:
        return end
    return end - (end - start) * (1 - step / end_step)


def spread(x: torch.Tensor) -> torch.Tensor:
    """fairseq's compute_var: the mean over dimensions of the standard deviation over rows ([M, D] -> scalar)."""
    return torch.sqrt(x.float().var(dim=0) + 1e-6).mean()


class Data2VecObjective(MaskedObjective):
    """Masked regression of an EMA teacher's averaged layers (see the module docstring)."""

    Settings = Data2VecSettings
    reads_labels = False

    def __init__(self, cfg, encoder: Encoder, codebook_sizes: dict[str, list[int]] | None = None):
        try:
            cfg.data2vec.check(encoder.cfg)
        except ValueError as error:
            raise ValueError(f"objective.data2vec.{error}") from None
        super().__init__(cfg, encoder, codebook_sizes)
        self.own = cfg.data2vec
        self.final_proj = nn.Linear(encoder.cfg.dim, encoder.cfg.dim)
        self.clip_head = nn.Linear(encoder.cfg.dim, encoder.cfg.dim) if self.own.clip_weight > 0 else None
        teacher = copy.deepcopy(encoder).float().eval().requires_grad_(False)
        self._teacher = [teacher]  # a list: outside the module tree (not trained, cast, or in DeepSpeed's files)

    @property
    def teacher(self) -> Encoder:
        return self._teacher[0]

    def teacher_parameters(self) -> dict[str, torch.Tensor]:
        """The EMA weights by name, fp32: the teacher's norm before the blocks and its blocks; with
        ema_all every weight but the mask embedding (the teacher never sees a mask)."""
        return {name: p for name, p in self.teacher.named_parameters()
                if (name != "mask_embedding" if self.own.ema_all else name.startswith(TEACHER_PREFIXES))}

    @torch.no_grad()
    def after_update(self, step: int, total_steps: int) -> None:
        """The teacher follows the student after optimizer update `step` (1-based): t <- d t + (1 - d) s."""
        decay = ema_decay(self.own, step, total_steps)
        student, teacher = dict(self.encoder.named_parameters()), self.teacher_parameters()
        first = next(iter(teacher))
        if teacher[first].device != student[first].device:
            self.teacher.to(student[first].device)
            teacher = self.teacher_parameters()
        torch._foreach_lerp_(list(teacher.values()), [student[n].detach().float() for n in teacher], 1.0 - decay)

    @staticmethod
    def checkpoint_parts(objective_of) -> dict:
        """The EMA teacher's weights, the part "teacher" (`TeacherState`)."""
        return {"teacher": TeacherState(objective_of)}

    @torch.compiler.disable  # train.compile: the teacher runs eagerly (it is outside the compiled module)
    @torch.no_grad()
    def teach(self, projected: torch.Tensor, padding: torch.Tensor | None, audio: torch.Tensor,
              lengths: torch.Tensor) -> dict:
        """The teacher's outputs ({"x", "ffn", ...}, fp32): of the student's unmasked projected frames, with the
        student's current positional conv; with ema_all, of the clean audio through the whole teacher."""
        teacher = self.teacher
        if next(teacher.parameters()).device != projected.device:
            teacher.to(projected.device)
        autocast = torch.autocast(projected.device.type, dtype=projected.dtype, enabled=projected.dtype != torch.float32)
        with autocast:
            if self.own.ema_all:
                return teacher(audio.float(), lengths, all_layers=True)
            teacher.positions.load_state_dict(self.encoder.positions.state_dict())  # not an EMA: the student's
            return teacher.contextualise(projected.detach().float(), padding, all_layers=True)

    def layer_targets(self, taught: dict, real: torch.Tensor) -> torch.Tensor:
        """The average of the teacher's top-k feed-forward outputs [B, T, D] (fp32), each normalised as
        target_norm says (default: instance norm over the crop's real frames [B, T])."""
        norm = TARGET_NORMS[self.own.target_norm]
        top = [norm(ffn.float(), real) for ffn in taught["ffn"][-self.own.top_k:]]
        return sum(top) / len(top)

    def targets(self, projected: torch.Tensor, padding: torch.Tensor | None, audio: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """The regression targets [B, T, D] (see teach and layer_targets)."""
        return self.layer_targets(self.teach(projected, padding, audio, lengths), real_frames(projected, padding))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As MertObjective.forward (masks, optional mixup, feature penalty, optional CQT head); `labels`: {}, unused."""
        step, loss, logs = self.masked_step(audio, lengths, generator, skip)
        taught = self.teach(step["projected"], step["padding"], audio, step["lengths"])
        real = real_frames(step["projected"], step["padding"])
        target = self.layer_targets(taught, real).flatten(0, 1).index_select(0, step["picked"])  # [M, D]
        prediction = self.final_proj(step["h"]).float()
        beta = self.own.loss_beta
        error = (F.mse_loss(prediction, target, reduction="none") if beta == 0 else
                 F.smooth_l1_loss(prediction, target, reduction="none", beta=beta))
        regression = error.sum(-1).mean() / math.sqrt(target.shape[-1])
        logs.update({f"loss/{STREAM}": regression.detach(), "var/target": spread(target),
                     "var/prediction": spread(prediction.detach())})
        loss = loss + regression
        if self.clip_head is not None:
            clip = clip_contrast(self.clip_head(clip_means(step["x"], real)).float(), clip_means(taught["x"].float(), real),
                                 self.own.clip_temperature)
            loss = loss + self.own.clip_weight * clip
            logs["loss/clip"] = clip.detach()
        return self.finish(loss, logs, audio, step)


def clip_means(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each crop's mean over its real frames: [B, T, D], [B, T] -> [B, D]."""
    weights = real.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def clip_contrast(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the micro-batch ([B, D] each): each crop's student vector must be nearest (cosine) to its own
    crop's teacher vector; both sides are centred over the batch first (what every crop shares says nothing of
    the crop). A batch of one has nothing to tell apart: 0."""
    if student.shape[0] < 2:
        return student.sum() * 0
    queries, keys = (F.normalize(v - v.mean(0), dim=-1) for v in (student, teacher))
    logits = queries @ keys.T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def normalise_batch(feats: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per feature, mean 0 and std 1 over all real frames of the batch ([B, T, D], real [B, T] bool): unlike the
    instance norm, what is constant through one crop but differs between crops stays in the targets."""
    return normalise(feats, real, dims=(0, 1))


def normalise_both(feats: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The mean of the instance and the batch norm: each frame relative to its crop, plus half of the crop's
    standardised offset from the batch."""
    return (normalise(feats, real) + normalise_batch(feats, real)) / 2


TARGET_NORMS = {"instance": normalise, "batch": normalise_batch, "both": normalise_both}  # target_norm


class TeacherState:
    """The checkpoint part "teacher": the EMA weights of the engine's current objective (looked up at each call,
    since a failed load rebuilds the engine)."""

    def __init__(self, objective_of):
        self.objective_of = objective_of

    def state_dict(self) -> dict:
        return {name: p.detach().cpu().clone() for name, p in self.objective_of().teacher_parameters().items()}

    def load_state_dict(self, state: dict) -> None:
        teacher = self.objective_of().teacher_parameters()
        if set(state) != set(teacher):
            raise ValueError(f"the saved data2vec teacher holds {len(state)} tensors, this model's {len(teacher)}: "
                             "another model.* than the checkpoint's")
        with torch.no_grad():
            for name, p in teacher.items():
                p.copy_(state[name])
