"""One optimizer update: the piece of the trainer a profiler trace is read against.

    step = TrainStep(cfg, engine, device, rank, world, generator, progress, interval, samples_log)
    step(batches)        # train.grad_accum micro-batches with a finite loss; progress.step += 1

A micro-batch goes through the phases of `micro_step`, each a named range in
a torch.profiler trace (`record_function`): host-to-device copy, forward
(mixup, masks and the encoder inside the objective), the all-ranks agreement
on a non-finite loss and on stop signals, backward, and the optimizer step
(DeepSpeed applies it at the train.grad_accum boundary, clipping included).
A batch whose loss is non-finite on any rank is skipped by every rank;
train.max_nonfinite of them in a row stop the run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.profiler import record_function

from data.audio import SAMPLE_RATE
from data.logs import logger
from data.stream import to_device
from pretrain import faults
from pretrain.config import RunConfig
from pretrain.metrics import Interval, Metrics
from pretrain.model import layerdrop_choice

log = logger("pretrain.train")  # the trainer's messages keep their logger name (musicpt.pretrain.train)


class TrainingError(RuntimeError):
    pass


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass
class Progress:
    """The trainer's counters; its checkpoint part "trainer" (beside "rng" and "loader"; DeepSpeed saves the engine)."""
    step: int = 0  # optimizer updates done
    samples: int = 0  # crops trained on by this rank
    audio_seconds: float = 0.0  # real (unpadded) audio trained on by all ranks
    nonfinite: int = 0  # batches skipped for a non-finite loss

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples, self.audio_seconds = state["step"], state["samples"], state["audio_seconds"]
        self.nonfinite = state["nonfinite"]


class TrainStep:
    """`step(batches)`: one optimizer update (see the module docstring); `stop_signal` is set by the trainer's
    signal handler, `stop_agreed` once every rank has heard of one."""

    def __init__(self, cfg: RunConfig, engine, device: torch.device, rank: int, world: int,
                 generator: torch.Generator, progress: Progress, metrics: Metrics, interval: Interval,
                 samples_log: str | None = None):
        self.cfg, self.engine, self.device, self.rank, self.world = cfg, engine, device, rank, world
        self.generator, self.progress, self.metrics, self.interval = generator, progress, metrics, interval
        self.samples_log = samples_log  # every batch's keys and offsets (train.log_samples)
        self.stop_signal, self.stop_agreed, self.consecutive_nonfinite = 0, False, 0  # signal seen here / by all ranks

    def __call__(self, batches) -> None:
        """One optimizer update: train.grad_accum micro-batches with a finite loss."""
        done = 0
        while done < self.cfg.train.grad_accum:
            with record_function("data"), self.interval.waiting():
                batch = next(batches)
            done += self.micro_step(batch, done)
        self.progress.step += 1
        after_update = getattr(self.engine.module, "after_update", None)  # data2vec: its EMA teacher follows
        if after_update is not None:
            after_update(self.progress.step, self.cfg.train.steps)

    def micro_step(self, batch: dict, micro: int) -> bool:
        """Forward and, when every rank's loss is finite, backward and the engine's step; False: skipped."""
        with record_function("to_device"):
            audio, labels = to_device(batch, self.device)  # lengths stay on the host
        with record_function("forward"):
            loss, logs = self.forward(audio, batch["lengths"], labels, micro)
        self.log_samples(batch)
        with record_function("agree"):
            finite = self.agree_finite(loss)
        if not finite:
            self.skip_nonfinite(batch)
            return False
        self.consecutive_nonfinite = 0
        with record_function("backward"):
            self.engine.backward(loss)
        with record_function("optimizer"):
            self.engine_step()
        self.count(batch, logs)
        return True

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, labels: dict, micro: int):
        step = self.progress.step
        skip = layerdrop_choice(self.cfg.model.layerdrop, self.cfg.model.layers,  # the same on every rank
                                torch.Generator().manual_seed(seed_of(self.cfg.train.seed, step, micro, 3)))
        loss, logs = self.engine(audio, lengths, labels, self.generator, skip)
        return faults.nonfinite_loss(loss, self.rank, step + 1), logs

    def log_samples(self, batch: dict) -> None:
        if self.samples_log:
            with open(self.samples_log, "a") as file:
                file.write(json.dumps({"step": self.progress.step + 1, "keys": batch["keys"],
                                       "offsets": batch["offsets"].tolist()}) + "\n")

    def agree_finite(self, loss: torch.Tensor) -> bool:
        """All ranks learn whether any loss is non-finite and whether a stop signal arrived (one small all-reduce)."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), torch.tensor(float(self.stop_signal), device=loss.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        self.stop_agreed = self.stop_agreed or bool(stop)
        return not nonfinite

    def skip_nonfinite(self, batch: dict) -> None:
        self.progress.nonfinite += 1
        self.consecutive_nonfinite += 1
        step = self.progress.step + 1
        log.warning("step %d: non-finite loss, batch skipped (keys %s)", step, batch["keys"])
        if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"step {step}: {self.consecutive_nonfinite} batches in a row gave a non-finite loss "
                f"(last batch on rank {self.rank}: {batch['keys']}). Lower optim.lr, use train.precision=bf16 or "
                f"model.attention_relax=32, and resume from the last checkpoint in {self.cfg.train.run_dir}.")

    def engine_step(self) -> None:
        try:
            self.engine.step()
        except Exception as error:
            if "loss scale" not in str(error).lower():
                raise
            raise TrainingError(
                f"step {self.progress.step + 1}: fp16 gradients still overflow at the minimum loss scale "
                f"{self.cfg.train.min_loss_scale}; the run would only skip steps from here. Use train.precision=bf16, "
                "or model.attention_relax=32 and model.pre_ln=true, or a lower optim.lr; then resume.") from error

    def count(self, batch: dict, logs: dict) -> None:
        """A trained micro-batch: its logs summed on the device, the counters and the interval's throughput."""
        self.metrics.add(logs)
        self.progress.samples += len(batch["keys"])
        seconds = float(batch["lengths"].sum()) / SAMPLE_RATE
        self.progress.audio_seconds += seconds * self.world
        self.interval.add(seconds * self.world, len(batch["keys"]) * self.world)
