"""One optimizer update: the piece of the trainer a profiler trace is read against.

    step = TrainStep(cfg, engine, device, rank, world, generator, progress, interval, samples_log)
    step(batches)        # train.grad_accum micro-batches, then the update; progress.step += 1

A micro-batch goes through the phases of `micro_step`, each a named range in
a torch.profiler trace (`record_function`): host-to-device copy, forward
(mixup, masks and the encoder inside the objective), backward, and
DeepSpeed's step (which counts micro-batches and, at the train.grad_accum
boundary, applies the update, clipping included). Nothing in a micro-step
waits for the device: whether a loss was non-finite is kept on the device,
and all ranks agree on it and on stop signals once per update, before the
boundary's step ("agree", the step's one host sync). An update with a
non-finite loss on any rank is skipped by every rank (weights, optimizer
state and schedule stay as they were; its batches are spent) and tried
again with the next batches; train.max_nonfinite skipped updates in a row
stop the run.
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
from pretrain.engine import skipped_update
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
        """One optimizer update of train.grad_accum micro-batches whose losses are finite on every rank."""
        while not self.update(batches):
            pass
        self.progress.step += 1
        self.engine.module.after_update(self.progress.step, self.cfg.train.steps)  # e.g. data2vec's EMA teacher

    def update(self, batches) -> bool:
        """train.grad_accum micro-batches and the update; False: a loss was non-finite on some rank, skipped."""
        nonfinite = torch.zeros(self.cfg.train.grad_accum, device=self.device)  # per micro-batch, on the device
        done = []
        for micro in range(self.cfg.train.grad_accum):
            with record_function("data"), self.interval.waiting():
                batch = next(batches)
            nonfinite[micro], logs = self.micro_step(batch, micro)
            done.append((batch, logs))
        with record_function("agree"):
            here, anywhere = self.agree(nonfinite)
        if anywhere:
            self.skip_nonfinite(here, [batch for batch, _ in done])
            with record_function("optimizer"):
                self.engine_step(skip=True)
            return False
        self.consecutive_nonfinite = 0
        with record_function("optimizer"):
            self.engine_step()
        for batch, logs in done:
            self.count(batch, logs)
        return True

    def micro_step(self, batch: dict, micro: int) -> tuple[torch.Tensor, dict]:
        """Forward, backward and (but for the update's last micro-batch) DeepSpeed's step; returns whether the
        loss was non-finite (a device scalar) and the logs."""
        with record_function("to_device"):
            audio, labels = to_device(batch, self.device)  # lengths stay on the host
        with record_function("forward"):
            loss, logs = self.forward(audio, batch["lengths"], labels, micro)
        self.log_samples(batch)
        with record_function("backward"):
            self.engine.backward(loss)
        if micro < self.cfg.train.grad_accum - 1:
            with record_function("optimizer"):
                self.engine_step()  # only DeepSpeed's micro-batch count: no update before the boundary
        return (~torch.isfinite(loss.detach())).float(), logs

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

    def agree(self, nonfinite: torch.Tensor) -> tuple[list[int], bool]:
        """All ranks learn whether any loss of the update was non-finite and whether a stop signal arrived (one
        small all-reduce and the update's one host sync); returns this rank's non-finite micro-batches and
        whether any rank had one."""
        flags = torch.cat([nonfinite.amax().reshape(1), torch.tensor([float(self.stop_signal)], device=self.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        *here, anywhere, stop = torch.cat([nonfinite, flags]).tolist()
        self.stop_agreed = self.stop_agreed or bool(stop)
        return [micro for micro, flag in enumerate(here) if flag], bool(anywhere)

    def skip_nonfinite(self, here: list[int], batches: list[dict]) -> None:
        self.progress.nonfinite += 1
        self.consecutive_nonfinite += 1
        step = self.progress.step + 1
        where = "on another rank"
        if here:
            keys = [key for micro in here for key in batches[micro]["keys"]]
            where = f"rank {self.rank}, micro-batch {', '.join(str(m + 1) for m in here)} of {len(batches)}, keys {keys}"
        log.warning("step %d: non-finite loss (%s); update skipped on every rank", step, where)
        if self.consecutive_nonfinite >= self.cfg.train.max_nonfinite:
            raise TrainingError(
                f"step {step}: {self.consecutive_nonfinite} updates in a row had a non-finite loss (the last: {where}). "
                f"Lower optim.lr, use train.precision=bf16 or model.attention_relax=32, and resume from the last "
                f"checkpoint in {self.cfg.train.run_dir}.")

    def engine_step(self, skip: bool = False) -> None:
        """DeepSpeed's step; `skip`: at the boundary, without an update (engine.skipped_update)."""
        try:
            skipped_update(self.engine) if skip else self.engine.step()
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
