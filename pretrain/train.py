"""Pretraining: `python -m pretrain.train --config configs/NAME.yaml [key=value ...]`.

One process per device: run it plainly (a world of one), or under
`torchrun --nproc_per_node=N -m pretrain.train ...` or the `deepspeed`
launcher. A run lives in `train.run_dir`; starting again in the same folder
resumes from its newest valid checkpoint, exactly: model, optimizer,
schedule, loss scale, data stream position, masking and dropout RNGs.
When it holds checkpoints and none of them loads, the start is refused
before anything on disk changes (pretrain/checkpoint.py; train.restart=true
moves the old run aside and starts over). SIGTERM or SIGUSR1 (cluster
preemption) saves a checkpoint and exits.

Pieces: the optimizer update is pretrain/step.py (`TrainStep`), the check of
a resumed run's settings pretrain/resume_check.py, the metrics and their
interval bookkeeping pretrain/metrics.py; `Trainer` here ties them together.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from functools import partial

import torch
from tqdm import tqdm

from data.files import atomic_write_bytes, atomic_write_json
from data.labels import label_entropy
from data.logs import logger, setup_logging
from data.stream import AudioLoader
from pretrain.checkpoint import CheckpointError, Checkpointer, checkpoint_names
from pretrain.config import ConfigError, RunConfig, load_config, to_yaml
from pretrain.engine import build_engine, device_for_rank, init_distributed, loss_scale
from pretrain.metrics import Interval, Metrics, console_line, truncate_jsonl
from pretrain.model import Encoder, training_flops
from pretrain.init_from import initial_weights
from pretrain.objectives import OBJECTIVES
from pretrain.resume_check import check_resumable
from pretrain.step import Progress, TrainingError, TrainStep, seed_of
from pretrain.validate import Validator

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def datasheet_flops(device: torch.device) -> float:
    """The dense bf16 datasheet peak (FLOP/s) of `device` from PEAK_TFLOPS; 0.0 off CUDA or for an unknown GPU."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), 0.0)
log = logger(__name__)


class RNGStates:
    """A rank's random streams as one checkpoint part: the masks-and-mixup generator, torch's default
    generator (dropout) and, on a GPU, CUDA's."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator, self.device = generator, device

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else torch.empty(0)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"].numel():
            torch.cuda.set_rng_state(state["cuda_rng"])


class StreamState:
    """The data stream's position as a checkpoint part; with train.force_resume, a stream that cannot resume
    exactly (other world size, workers or loader settings) starts afresh instead of stopping the run."""

    def __init__(self, loader: AudioLoader, force_resume: bool):
        self.loader, self.force_resume = loader, force_resume

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.loader.load_state_dict(state)
        except ValueError as error:
            if not self.force_resume:
                raise
            log.warning("train.force_resume: the data stream starts afresh (%s)", error)


class Trainer:
    """The run around the step (pretrain/step.py): resume, the loop, logging, validation and saves."""

    def __init__(self, cfg: RunConfig, device: torch.device, rank: int, world: int):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.run_dir = cfg.train.run_dir
        # Batches stay int16 until to_device converts them on the device (half the bytes; pinned on a GPU).
        self.loader = AudioLoader(cfg.data, rank, world, shield_workers=True, convert=False,
                                  pin_memory=device.type == "cuda")
        self.codebook_sizes = {m["teacher"]: m["codebook_sizes"] for m in self.loader.manifests}
        # prior_gap rows: only rank 0 writes them (older manifests make this read every shard summary)
        self.label_entropy = label_entropies(self.loader.manifests, cfg.data.labels) if rank == 0 else {}
        self.engine = self.new_engine()
        self.generator = torch.Generator().manual_seed(seed_of(cfg.train.seed, rank, 2))  # masks and mixup
        self.progress = Progress()
        parts = {"trainer": self.progress, "rng": RNGStates(self.generator, device),
                 "loader": StreamState(self.loader, cfg.train.force_resume)}
        parts.update(OBJECTIVES[cfg.objective.kind].checkpoint_parts(lambda: self.engine.module))  # e.g. an EMA teacher
        self.checkpointer = Checkpointer(self.run_dir, rank, world, cfg.train.keep, parts)
        self.resume()  # refuses (CheckpointError) before anything on disk changes
        self.checkpointer.remove_stale_temporaries()
        self.metrics = Metrics(self.run_dir, rank, self.step)
        self.validator = Validator(cfg, self.codebook_sizes, self.run_dir) if cfg.train.eval_every else None
        samples_log = None
        if cfg.train.log_samples:
            samples_log = os.path.join(self.run_dir, "samples", f"rank-{rank:05d}.jsonl")
            os.makedirs(os.path.dirname(samples_log), exist_ok=True)
            truncate_jsonl(samples_log, self.step)
        self.interval = Interval()
        self.train_step = TrainStep(cfg, self.engine, device, rank, world, self.generator, self.progress,
                                    self.metrics, self.interval, samples_log)

    def new_engine(self):
        """The engine at its initial state: the same weights on every rank, then each rank's dropout stream."""
        self.engine = None  # a failed load's engine goes before the clean one is built
        torch.manual_seed(self.cfg.train.seed)
        encoder = Encoder(self.cfg.model, checkpoint_activations=self.cfg.train.checkpoint_activations)
        self.warm_start(encoder)  # before DeepSpeed copies the weights into its optimizer
        model = OBJECTIVES[self.cfg.objective.kind](self.cfg.objective, encoder, self.codebook_sizes).to(self.device)
        engine = build_engine(model, self.cfg)
        torch.manual_seed(seed_of(self.cfg.train.seed, self.rank, 1))
        return engine

    def warm_start(self, encoder: Encoder) -> None:
        """train.init_from's weights into a fresh encoder (a resume then loads its checkpoint over them, so a
        run that holds checkpoints no longer needs the source)."""
        path = self.cfg.train.init_from
        if not path or (not os.path.exists(path) and checkpoint_names(os.path.join(self.run_dir, "checkpoints"))):
            return
        encoder.load_state_dict(initial_weights(path, encoder))
        if self.rank == 0:
            log.info("encoder initialised from %s (train.init_from)", path)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def audio_seconds(self) -> float:
        return self.progress.audio_seconds

    def request_stop(self, signum: int) -> None:
        """From a signal handler: every rank stops after the step in which all of them have heard of it."""
        self.train_step.stop_signal = signum

    def resume(self) -> None:
        """Loads the engine and the parts (trainer, rng, loader) from the newest good checkpoint, if any."""
        self.engine, step = self.checkpointer.resume(self.engine, self.new_engine,
                                                     partial(check_resumable, self.cfg, self.world),
                                                     restart=self.cfg.train.restart)
        if step is not None:
            if self.rank == 0:
                log.info("resumed from %s/step-%08d (step %d, %.2f h of audio seen)", self.checkpointer.root, step,
                         self.step, self.audio_seconds / 3600)

    def save(self) -> None:
        folder = self.checkpointer.save(self.engine, self.step, to_yaml(self.cfg))
        if self.rank == 0:
            log.info("checkpoint %s", folder)

    # -- training

    def fit(self) -> str:
        """Trains to train.steps (or until a stop signal); returns "finished" or "stopped"."""
        try:
            return self._fit()
        finally:
            self.loader.close()
            self.metrics.close()

    def _fit(self) -> str:
        cfg, step = self.cfg.train, self.train_step
        batches = iter(self.loader)
        self.interval.reset()
        started, start_step = time.perf_counter(), self.step
        self.bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=self.rank != 0 or not sys.stderr.isatty())
        if self.validator and self.step == 0:
            self.validate()  # the untrained encoder: the collapse alarm's reference
        while self.step < cfg.steps and not step.stop_agreed:  # agreed by every rank: all leave at the same step
            step(batches)
            self.bar.update()
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log((cfg.steps - self.step) * (time.perf_counter() - started) / (self.step - start_step))
                self.interval.reset()
            if self.validator and self.step % cfg.eval_every == 0:
                self.validate()  # before the save: a checkpoint's step has all its rows written
            if self.step % cfg.save_every == 0 or self.step == cfg.steps or step.stop_agreed:
                self.save()
        self.bar.close()
        return "stopped" if step.stop_agreed else "finished"

    def log(self, eta: float) -> None:
        """The interval's row (metrics.jsonl, TensorBoard) and console line; collective: every rank calls it."""
        scalars, interval = self.metrics.reduce(), self.interval
        elapsed = interval.elapsed()
        scalars.update({
            "lr": self.engine.get_lr()[0], "audio_seconds_per_second": interval.audio_seconds / elapsed,
            "data_wait_fraction": interval.data_wait / elapsed, "audio_hours": self.audio_seconds / 3600,
            "skipped_steps": float(self.engine.skipped_steps + self.progress.nonfinite),
        })
        for book, entropy in self.label_entropy.items():  # > 0: the masked predictions beat the label prior
            if f"loss/{book}" in scalars:
                scalars[f"prior_gap/{book}"] = entropy - scalars[f"loss/{book}"]
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            scalars["grad_norm"] = float(norm)
        scale = loss_scale(self.engine)
        if scale is not None:
            scalars["loss_scale"] = scale
        peak = self.peak_flops()
        if peak:
            flops = training_flops(self.cfg.model, self.cfg.data.crop_samples) * interval.crops / elapsed
            scalars["mfu"] = flops / (peak * self.world)
        self.metrics.write(self.step, scalars)
        self.say(console_line(self.step, self.cfg.train.steps, scalars, eta))

    def validate(self) -> None:
        """Rank 0 evaluates (eval/ and collapse/ rows; the same numbers at any world size), the others wait."""
        if self.rank == 0:
            scalars, lines = self.validator.run(self.engine, self.step)
            self.metrics.write(self.step, scalars)
            for line in lines:
                self.say(line)
        if torch.distributed.is_initialized():
            torch.distributed.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def peak_flops(self) -> float:
        if self.cfg.train.peak_tflops:
            return self.cfg.train.peak_tflops * 1e12
        return datasheet_flops(self.device)

    def say(self, text: str) -> None:
        """The console's progress lines (rank 0): the step line and the evaluation's; other messages are logged."""
        if self.rank == 0:
            bar = getattr(self, "bar", None)
            if bar is not None and not bar.disable:
                bar.write(text)
            else:
                print(text, flush=True)


def label_entropies(manifests: list[dict], folders) -> dict[str, float]:
    """{"TEACHER_BOOK": entropy of its codes, nats}: the masked cross-entropy of predicting the label prior."""
    out = {}
    for manifest, folder in zip(manifests, folders):
        for book, entropy in enumerate(label_entropy(manifest, folder) or []):
            out[f"{manifest['teacher']}_{book}"] = entropy
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a preset in configs/, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=1000 data.batch_size=4")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    setup_logging()
    warnings.filterwarnings("ignore", message=".*padding with reflection mode.*")  # nnAudio's CQT, every step
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    device = device_for_rank()
    rank, world = init_distributed(device)
    if rank == 0:
        print(f"# resolved config ({args.config}, {world} process(es) on {device.type})\n{to_yaml(cfg)}", flush=True)
    try:
        trainer = Trainer(cfg, device, rank, world)
        if rank == 0:  # only now: a refused start leaves the run directory as it was
            atomic_write_bytes(os.path.join(cfg.train.run_dir, "config.yaml"), to_yaml(cfg).encode())

        def request_stop(signum, frame):
            trainer.request_stop(signum)

        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, request_stop)
        state = trainer.fit()
    except (TrainingError, ConfigError, CheckpointError) as error:
        sys.exit(f"error (rank {rank}): {error}")
    if rank == 0:
        atomic_write_json(os.path.join(cfg.train.run_dir, "status.json"),
                          {"state": state, "step": trainer.step, "audio_hours": trainer.audio_seconds / 3600})
        print(f"{state} at step {trainer.step}: checkpoints in {trainer.checkpointer.root}, metrics in "
              f"{cfg.train.run_dir}/metrics.jsonl, TensorBoard: tensorboard --logdir {cfg.train.run_dir}/tensorboard", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
