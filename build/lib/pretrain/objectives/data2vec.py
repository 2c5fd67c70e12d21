"""data2vec (Baevski et al. 2022) as Music2Vec (Li et al. 2022) uses it for music: the student regresses, on masked
frames, the average of the top `data2vec_top_k` feed-forward outputs of an EMA teacher that sees the same frames
unmasked. No offline teacher stage and no `data.labels`.

    objective = Data2VecObjective(ObjectiveConfig(kind="data2vec"), encoder)
    loss, logs = objective(audio, lengths, {})    # logs: loss/data2vec, var/target, var/prediction
    objective.after_update(step, total_steps)      # after each optimizer update: the teacher follows

As fairseq's data2vec_audio (examples/data2vec/models/data2vec_audio.py, base config), but for the teacher:
by default (`data2vec_ema_all`) it is the EMA of the whole encoder, conv extractor included, and reads the clean
audio (fairseq's ema_transformer_only=false); with `data2vec_ema_all=false` it is fairseq's default, an EMA of the
blocks and of the norm before them only (`ema_layers_only`), fed the student's projected conv features of the
unmasked crop, with the student's own positional conv (the README says why we differ). Each target layer is instance-normalised over time (here over the crop's real frames) before the average; the loss
is the squared error (or, with `data2vec_loss_beta` > 0, smooth L1) summed over dimensions, scaled by
1 / sqrt(dim), averaged over masked frames; a linear
`final_proj` maps the student's last layer to the target. The EMA decay goes linearly from `data2vec_ema_decay`
to `data2vec_ema_end_decay` over `data2vec_ema_anneal_steps` updates (0: the run's train.steps, so a resume with more
steps stretches the rest of the schedule, as it does the learning rate's), then stays.

The teacher is an fp32 copy kept outside the module tree (as the CQT kernels and BEST-RQ's quantizer are): DeepSpeed
neither trains it, nor casts it to bf16/fp16 (an EMA step of 1e-4 would vanish in bf16's 8-bit mantissa), nor
holds it in its checkpoint files; its weights are the checkpoint part "teacher" (`TeacherState`), saved by every
rank beside the trainer's counters and restored with them. It runs under autocast in the student's dtype.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.bestrq import normalise
from pretrain.model import Encoder, real_frames
from pretrain.objectives.mert import Objective, ObjectiveConfig

STREAM = "data2vec"  # the logs' name: loss/data2vec
TEACHER_PREFIXES = ("norm.", "blocks.")  # what the EMA follows (fairseq's ema_layers_only: not the positional conv)


def ema_decay(cfg: ObjectiveConfig, step: int, total_steps: int) -> float:
    """The decay after `step` updates: linear from data2vec_ema_decay to data2vec_ema_end_decay (fairseq's
    get_annealed_rate), reached at data2vec_ema_anneal_steps (0: total_steps) and kept after."""
    end_step = cfg.data2vec_ema_anneal_steps or total_steps
    start, end = cfg.data2vec_ema_decay, cfg.data2vec_ema_end_decay
    if step >= end_step:
        return end
    return end - (end - start) * (1 - step / end_step)


def spread(x: torch.Tensor) -> torch.Tensor:
    """fairseq's compute_var: the mean over dimensions of the standard deviation over rows ([M, D] -> scalar)."""
    return torch.sqrt(x.float().var(dim=0) + 1e-6).mean()


class Data2VecObjective(Objective):
    """Masked regression of an EMA teacher's averaged layers (see the module docstring)."""

    def __init__(self, cfg: ObjectiveConfig, encoder: Encoder, codebook_sizes: dict[str, list[int]] | None = None):
        if codebook_sizes:
            raise ValueError(f"objective.kind=data2vec makes its own targets; it takes no teacher labels (got "
                             f"{sorted(codebook_sizes)}): leave data.labels empty")
        if not 1 <= cfg.data2vec_top_k <= encoder.cfg.layers:
            raise ValueError(f"objective.data2vec_top_k={cfg.data2vec_top_k}: use 1 to model.layers={encoder.cfg.layers}")
        super().__init__(cfg, encoder, {})
        self.final_proj = nn.Linear(encoder.cfg.dim, encoder.cfg.dim)
        self.clip_head = nn.Linear(encoder.cfg.dim, encoder.cfg.dim) if cfg.data2vec_clip_weight > 0 else None
        teacher = copy.deepcopy(encoder).float().eval().requires_grad_(False)
        self._teacher = [teacher]  # a list: outside the module tree (not trained, cast, or in DeepSpeed's files)

    @property
    def teacher(self) -> Encoder:
        return self._teacher[0]

    def teacher_parameters(self) -> dict[str, torch.Tensor]:
        """The EMA weights by name, fp32: the teacher's norm before the blocks and its blocks; with
        data2vec_ema_all every weight but the mask embedding (the teacher never sees a mask)."""
        return {name: p for name, p in self.teacher.named_parameters()
                if (name != "mask_embedding" if self.cfg.data2vec_ema_all else name.startswith(TEACHER_PREFIXES))}

    @torch.no_grad()
    def after_update(self, step: int, total_steps: int) -> None:
        """The teacher follows the student after optimizer update `step` (1-based): t <- d t + (1 - d) s."""
        decay = ema_decay(self.cfg, step, total_steps)
        student, teacher = dict(self.encoder.named_parameters()), self.teacher_parameters()
        first = next(iter(teacher))
        if teacher[first].device != student[first].device:
            self.teacher.to(student[first].device)
            teacher = self.teacher_parameters()
        torch._foreach_lerp_(list(teacher.values()), [student[n].detach().float() for n in teacher], 1.0 - decay)

    @torch.compiler.disable  # train.compile: the teacher runs eagerly (it is outside the compiled module)
    @torch.no_grad()
    def teach(self, projected: torch.Tensor, padding: torch.Tensor | None, audio: torch.Tensor,
              lengths: torch.Tensor) -> dict:
        """The teacher's outputs ({"x", "ffn", ...}, fp32): of the student's unmasked projected frames, with the
        student's current positional conv; with data2vec_ema_all, of the clean audio through the whole teacher."""
        teacher = self.teacher
        if next(teacher.parameters()).device != projected.device:
            teacher.to(projected.device)
        autocast = torch.autocast(projected.device.type, dtype=projected.dtype, enabled=projected.dtype != torch.float32)
        with autocast:
            if self.cfg.data2vec_ema_all:
                return teacher(audio.float(), lengths, all_layers=True)
            teacher.positions.load_state_dict(self.encoder.positions.state_dict())  # not an EMA: the student's
            return teacher.contextualise(projected.detach().float(), padding, all_layers=True)

    def layer_targets(self, taught: dict, real: torch.Tensor) -> torch.Tensor:
        """The average of the teacher's top-k feed-forward outputs [B, T, D] (fp32), each normalised as
        data2vec_target_norm says (default: instance norm over the crop's real frames [B, T])."""
        norm = TARGET_NORMS[self.cfg.data2vec_target_norm]
        top = [norm(ffn.float(), real) for ffn in taught["ffn"][-self.cfg.data2vec_top_k:]]
        return sum(top) / len(top)

    def targets(self, projected: torch.Tensor, padding: torch.Tensor | None, audio: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """The regression targets [B, T, D] (see teach and layer_targets)."""
        return self.layer_targets(self.teach(projected, padding, audio, lengths), real_frames(projected, padding))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict[str, torch.Tensor],
                generator: torch.Generator | None = None, skip: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As Objective.forward (masks, optional mixup, feature penalty, optional CQT head); `labels` must be empty."""
        if labels:
            raise ValueError(f"objective.kind=data2vec got teacher labels {sorted(labels)}; leave data.labels empty")
        step, loss, logs = self.masked_step(audio, lengths, generator, skip)
        taught = self.teach(step["projected"], step["padding"], audio, step["lengths"])
        real = real_frames(step["projected"], step["padding"])
        target = self.layer_targets(taught, real).flatten(0, 1).index_select(0, step["picked"])  # [M, D]
        prediction = self.final_proj(step["h"]).float()
        beta = self.cfg.data2vec_loss_beta
        error = (F.mse_loss(prediction, target, reduction="none") if beta == 0 else
                 F.smooth_l1_loss(prediction, target, reduction="none", beta=beta))
        regression = error.sum(-1).mean() / math.sqrt(target.shape[-1])
        logs.update({f"loss/{STREAM}": regression.detach(), "var/target": spread(target),
                     "var/prediction": spread(prediction.detach())})
        loss = loss + regression
        if self.clip_head is not None:
            clip = clip_contrast(self.clip_head(clip_means(step["x"], real)).float(), clip_means(taught["x"].float(), real),
                                 self.cfg.data2vec_clip_temperature)
            loss = loss + self.cfg.data2vec_clip_weight * clip
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


TARGET_NORMS = {"instance": normalise, "batch": normalise_batch, "both": normalise_both}  # data2vec_target_norm


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
