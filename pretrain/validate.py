"""Validation during training: held-out objective metrics and a representation-collapse alarm.

At step 0 (the untrained encoder) and every `train.eval_every` steps the trainer calls `Validator.run` on
rank 0 (the other ranks wait at a barrier, so the numbers do not depend on the world size):

- eval/...: the objective (masked loss and accuracy per codebook, CQT loss, feature penalty, total) on
  the first `train.eval_batches` batches of `train.eval_shards`, read in evaluation mode (each sample once,
  in order, deterministic crops), the model in eval mode (no dropout, layerdrop or mixup), masks from a
  generator with a fixed seed: the same frames are masked at every eval, so evals compare.
- collapse/...: on one fixed batch (the first eval batch; without eval shards the first batch of
  `data.shards` read in evaluation mode), the encoder without masking: effective rank (principal
  components holding 95% of the variance) of the final layer's frames, of the clip-mean embeddings and of
  the conv features before their layer norm; the mean per-dimension std of the frames and the fraction
  of dead dimensions. The alarm: a WARNING when an effective rank falls below `train.collapse_rank`
  or below `train.collapse_fraction` x its value at the run's first eval (step 0's: the encoder at init).

The training RNG streams are untouched (torch's CPU and CUDA generators are forked; the trainer's
mask generator is never used), so a run with evals resumes exactly.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace

import torch
from torch import nn

from data.stream import AudioLoader
from pretrain.config import ConfigError, RunConfig
from pretrain.metrics import jsonl_rows
from pretrain.model import real_frames

MASK_SEED = 20240917  # evaluation masks: the same at every eval and in every run
ENERGY = 0.95  # effective rank: principal components that hold this fraction of the variance
DEAD = 1e-3  # a dimension is dead when its std across frames is below this x the RMS of all the values
COLLAPSE_KEYS = {"collapse/effective_rank": "encoder output", "collapse/conv_effective_rank": "conv features"}


def effective_rank(x: torch.Tensor, energy: float = ENERGY) -> int:
    """How many principal components of the rows of `x` ([N, D], centred here) hold `energy` of their
    variance. Constant rows (variance below 1e-8 of the mean square of the values) have rank 0."""
    x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
    if len(x) < 2:
        return 0
    centred = x - x.mean(0)
    if centred.pow(2).mean() <= 1e-8 * x.pow(2).mean() or not torch.isfinite(centred).all():
        return 0
    variance = torch.linalg.svdvals(centred).pow(2)
    share = variance.cumsum(0) / variance.sum()
    return int((share < energy - 1e-9).sum()) + 1


@torch.no_grad()
def collapse_stats(encoder: nn.Module, audio: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """Collapse signals of `encoder` (an `Encoder`, put in eval mode by the caller) on one batch, no masking."""
    device = encoder.projection.weight.device  # the encoder casts the audio as its front end needs
    out = encoder(audio.to(device), lengths.to(device), None, skip=torch.zeros(encoder.cfg.layers, dtype=torch.bool))
    real = real_frames(out["x"], out["padding"])
    frames, conv = out["x"][real].double().cpu(), out["features"][real].double().cpu()  # [M, D], [M, C]
    counts = real.sum(1)
    clips = (out["x"].double() * real[..., None]).sum(1)[counts > 0] / counts[counts > 0, None]  # [B', D]
    std = frames.std(0, correction=0) if len(frames) else torch.zeros(frames.shape[1], dtype=torch.float64)
    scale = frames.pow(2).mean().sqrt() if len(frames) else torch.tensor(0.0, dtype=torch.float64)
    return {
        "collapse/effective_rank": float(effective_rank(frames)),
        "collapse/conv_effective_rank": float(effective_rank(conv)),
        "collapse/clip_effective_rank": float(effective_rank(clips.cpu())),
        "collapse/dim_std_mean": float(std.mean()),
        "collapse/dead_dims": float((std < DEAD * scale).double().mean()) if scale > 0 else 1.0,
        "collapse/conv_rms": float(conv.pow(2).mean().sqrt()) if len(conv) else 0.0,
        "collapse/frames": float(len(frames)),
    }


@torch.no_grad()
def objective_metrics(objective: nn.Module, batches, seed: int = MASK_SEED) -> dict[str, float]:
    """Mean over `batches` of the objective's logs (eval/ keys), masks drawn from a generator seeded `seed`."""
    device = objective.encoder.projection.weight.device
    generator, skip = torch.Generator().manual_seed(seed), torch.zeros(objective.encoder.cfg.layers, dtype=torch.bool)
    sums, count = {}, 0
    for batch in batches:
        labels = {name: codes.to(device) for name, codes in batch["labels"].items()}
        _, logs = objective(batch["audio"].to(device), batch["lengths"], labels, generator, skip)
        for name, value in logs.items():
            if name != "masked_frames":
                sums[name] = sums.get(name, 0.0) + value.float()
        count += 1
    if not count:
        return {}
    names = sorted(sums)
    values = (torch.stack([sums[name] for name in names]) / count).tolist()  # one device sync
    return {"eval/batches": float(count), **{f"eval/{name}": value for name, value in zip(names, values)}}


def evaluate(model: nn.Module, batches=(), collapse_batch: dict | None = None, seed: int = MASK_SEED) -> dict[str, float]:
    """eval/ and collapse/ scalars of `model` (an objective of pretrain/objectives, or a DeepSpeed engine around one).

    `batches`: loader batches for the objective metrics; `collapse_batch`: the batch for the collapse
    signals (None: the first of `batches`). The model is in eval mode meanwhile and is given back in the
    mode it was in; torch's CPU and CUDA RNG states are restored afterwards."""
    objective = getattr(model, "module", model)
    device = objective.encoder.projection.weight.device
    training = objective.training  # (a DeepSpeed engine's own flag does not follow its module's)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            model.eval()
            first = []

            def keep_first():
                for batch in batches:
                    if not first:
                        first.append(batch)
                    yield batch

            scalars = objective_metrics(objective, keep_first(), seed)
            batch = collapse_batch if collapse_batch is not None else (first[0] if first else None)
            if batch is not None:
                scalars.update(collapse_stats(objective.encoder, batch["audio"], batch["lengths"]))
        finally:
            model.train(training)
    return scalars


def collapse_warning(stats: dict[str, float], step: int, reference: dict | None = None,
                     min_rank: float = 2, fraction: float = 0.1) -> str | None:
    """A WARNING line when an effective rank in `stats` is below `min_rank` or below `fraction` x its value
    in `reference` (the first eval's scalars, at step 0, with their "step"); None when nothing collapsed."""
    found, advice = [], []
    for key, what in COLLAPSE_KEYS.items():
        if key not in stats:
            continue
        value, before = stats[key], (reference or {}).get(key)
        reasons = []
        if value < min_rank:
            reasons.append(f"below train.collapse_rank={min_rank:g}")
        if fraction > 0 and before and value < fraction * before:
            reasons.append(f"under {fraction:g} x its {before:g} at step {reference.get('step', '?')}")
        if not reasons:
            continue
        found.append(f"{what} effective rank {value:g} ({', '.join(reasons)})")
        if what == "conv features":
            advice.append("The feature penalty can squash the conv features: try objective.feature_penalty=0 "
                          "(or 10x lower), or model.feature_grad_mult=0.1.")
        else:
            advice.append("Try VICReg's terms (objective.vicreg_weight=3, as the CPU presets have them), a lower "
                          "optim.lr or a longer optim.warmup_steps, resumed from a checkpoint before the collapse, and "
                          "check the targets (codes that hardly vary across frames make a trivial task: see eval/acc).")
    if not found:
        return None
    dead = stats.get("collapse/dead_dims")
    detail = f"; {100 * dead:.0f}% of output dims dead" if dead else ""
    return f"WARNING: representation collapse at step {step}: {'; '.join(found)}{detail}. {' '.join(advice)}"


def default_eval_labels(eval_shards: str, labels: tuple[str, ...]) -> list[str]:
    """EVAL_SHARDS/labels/NAME for each training label folder .../NAME."""
    return [os.path.join(eval_shards, "labels", os.path.basename(os.path.normpath(folder))) for folder in labels]


class Validator:
    """The eval data, the first eval's collapse values and the alarm, for the trainer (rank 0 runs it)."""

    def __init__(self, cfg: RunConfig, codebook_sizes: dict[str, list[int]], run_dir: str):
        self.cfg = cfg.train
        self.fixed_batch = None
        if self.cfg.eval_shards:
            labels = tuple(self.cfg.eval_labels) or tuple(default_eval_labels(self.cfg.eval_shards, cfg.data.labels))
            self.data = replace(cfg.data, shards=self.cfg.eval_shards, labels=labels, train=False)
            try:
                loader = AudioLoader(self.data, rank=0, world=1)  # checks the index and the labels now
            except (OSError, ValueError) as error:
                raise ConfigError(f"train.eval_shards={self.cfg.eval_shards!r} with labels {list(labels)} (set "
                                  f"train.eval_labels to name them): {error}") from None
            sizes = {m["teacher"]: m["codebook_sizes"] for m in loader.manifests}
            if sizes != codebook_sizes:
                raise ConfigError(f"train.eval_labels {list(labels)}: teachers and codebook sizes {sizes}, but training "
                                  f"uses {codebook_sizes} (data.labels); label the eval shards with the same teachers")
        else:  # the collapse signals only, on the first batch of the training shards in evaluation mode
            self.data = replace(cfg.data, labels=(), train=False, num_workers=0)
        self.reference = first_collapse_row(os.path.join(run_dir, "metrics.jsonl"))

    def run(self, model: nn.Module, step: int) -> tuple[dict[str, float], list[str]]:
        """(scalars, console lines) for the eval at `step`."""
        started = time.perf_counter()
        # A new loader each time: evaluation mode reads from the start of the first shard again.
        if self.cfg.eval_shards:
            loader = AudioLoader(self.data, rank=0, world=1, shield_workers=True)
            try:
                scalars = evaluate(model, itertools.islice(loader, self.cfg.eval_batches))
            finally:
                loader.close()
        else:
            if self.fixed_batch is None:
                with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from torch's RNG
                    self.fixed_batch = next(iter(AudioLoader(self.data, rank=0, world=1)))
            scalars = evaluate(model, (), self.fixed_batch)
        scalars["eval/seconds"] = time.perf_counter() - started
        lines = [eval_line(step, scalars, getattr(model, "module", model).encoder)]
        if "collapse/effective_rank" in scalars:
            warning = collapse_warning(scalars, step, self.reference, self.cfg.collapse_rank, self.cfg.collapse_fraction)
            scalars["collapse/alarm"] = float(warning is not None)
            if warning:
                lines.append(warning)
            if self.reference is None:
                self.reference = {"step": step, **scalars}
        return scalars, lines


def first_collapse_row(path: str) -> dict | None:
    """The first metrics.jsonl row with collapse signals: the reference of the relative alarm (after a resume too)."""
    return next((row for _, row in jsonl_rows(path) if "collapse/effective_rank" in row), None)


def eval_line(step: int, scalars: dict[str, float], encoder: nn.Module | None = None) -> str:
    """eval step 2000 | loss 5.210 | cqt 0.743 | acc 0.251 | rank 41/768 | conv rank 12/512 | clip rank 7 | dead 0% | 3.1s"""
    parts = [f"eval step {step}"]
    if "eval/loss" in scalars:
        parts.append(f"loss {scalars['eval/loss']:.3f}")
        if "eval/loss/cqt" in scalars:
            parts.append(f"cqt {scalars['eval/loss/cqt']:.3f}")
        accuracies = [v for k, v in scalars.items() if k.startswith("eval/acc/")]
        if accuracies:
            parts.append(f"acc {sum(accuracies) / len(accuracies):.3f}")
    if "collapse/effective_rank" in scalars:
        dim = f"/{encoder.cfg.dim}" if encoder is not None else ""
        conv = f"/{encoder.cfg.conv_layers[-1][0]}" if encoder is not None else ""
        parts += [f"rank {scalars['collapse/effective_rank']:.0f}{dim}",
                  f"conv rank {scalars['collapse/conv_effective_rank']:.0f}{conv}",
                  f"clip rank {scalars['collapse/clip_effective_rank']:.0f}",
                  f"dead {100 * scalars['collapse/dead_dims']:.0f}%"]
    parts.append(f"{scalars.get('eval/seconds', 0):.1f}s")
    return " | ".join(parts)
