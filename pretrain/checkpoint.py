"""Checkpoints of a run: one directory per save, written under a temporary name, renamed when complete.

    RUN/checkpoints/step-00001200/
        mp_rank_00_model_states.pt, *optim_states.pt  DeepSpeed's engine (model, optimizer, scheduler, scaler)
        rank-00000.pt ...                              per rank: trainer counters, RNG states, data stream state
        config.yaml                                    the resolved run config
        complete.json                                  written last: step, world, every file and its size
    RUN/checkpoints/latest                             the newest complete one's name (for people and tools)

A save goes to `.tmp-step-N/` and is renamed by rank 0 once every rank has
written its part, so a kill at any moment leaves either a complete
checkpoint or a temporary folder that the next start deletes. Loading takes
the newest checkpoint whose files all have their recorded sizes and load
without error, warning about each one it passes over. Everything that is
not DeepSpeed's own is read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import warnings

import torch

from data.files import atomic_write_bytes, atomic_write_json, read_json

PATTERN = re.compile(r"^step-(\d{8})$")


def tag(step: int) -> str:
    return f"step-{step:08d}"


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class Checkpointer:
    def __init__(self, run_dir: str, rank: int, world: int, keep: int):
        self.root = os.path.join(run_dir, "checkpoints")
        self.rank, self.world, self.keep = rank, world, keep
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for stale in glob.glob(os.path.join(self.root, ".tmp-*")):  # a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # -- saving

    def save(self, engine, step: int, rank_state: dict, config_yaml: str) -> str:
        """Collective: every rank calls it. Returns the checkpoint's directory."""
        temporary = f".tmp-{tag(step)}"
        engine.save_checkpoint(self.root, tag=temporary, save_latest=False)
        folder = os.path.join(self.root, temporary)
        torch.save(rank_state, os.path.join(folder, f"rank-{self.rank:05d}.pt"))
        barrier()
        final = os.path.join(self.root, tag(step))
        if self.rank == 0:
            atomic_write_bytes(os.path.join(folder, "config.yaml"), config_yaml.encode())
            files = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
            atomic_write_json(os.path.join(folder, "complete.json"), {"step": step, "world": self.world, "files": files})
            if os.path.exists(final):  # the same step saved again (a signal right after a scheduled save)
                shutil.rmtree(final)
            os.rename(folder, final)
            atomic_write_bytes(os.path.join(self.root, "latest"), tag(step).encode() + b"\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for name in self.complete()[self.keep:]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # -- finding and loading

    def complete(self) -> list[str]:
        return checkpoint_names(self.root)

    def load_newest(self, engine, check_config) -> tuple[int, dict] | None:
        """Loads the newest valid checkpoint into `engine`; returns (step, this rank's state) or None if
        there is none. `check_config(saved_yaml, manifest)` raises when the run may not resume from it."""
        for name in self.complete():
            folder = os.path.join(self.root, name)
            problem = find_problem(folder)
            if problem is None:
                manifest = read_json(os.path.join(folder, "complete.json"), "the checkpoint manifest")
                with open(os.path.join(folder, "config.yaml")) as file:
                    check_config(file.read(), manifest)
                try:
                    state = self._load(engine, name)
                except Exception as error:  # noqa: BLE001: any failure to read means: try the previous one
                    problem, state = f"loading failed: {type(error).__name__}: {error}", None
            if not self._everyone_ok(problem is None):
                problem = problem or "another rank could not load it"
                warnings.warn(f"{folder}: skipped, {problem}; trying the previous checkpoint")
                if self.rank == 0:
                    print(f"warning: checkpoint {folder} skipped: {problem}", flush=True)
                continue
            return int(PATTERN.match(name).group(1)), state
        return None

    def _load(self, engine, name: str) -> dict:
        path, _ = engine.load_checkpoint(self.root, tag=name, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError("DeepSpeed found no checkpoint files")
        return torch.load(os.path.join(self.root, name, f"rank-{self.rank:05d}.pt"), weights_only=True)

    def _everyone_ok(self, ok: bool) -> bool:
        if not torch.distributed.is_initialized():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())


def checkpoint_names(root: str) -> list[str]:
    """The renamed (finished) checkpoint folders under `root`, newest first."""
    names = [n for n in os.listdir(root) if PATTERN.match(n)] if os.path.isdir(root) else []
    return sorted(names, reverse=True)


def find_problem(folder: str) -> str | None:
    """Why the checkpoint in `folder` cannot be loaded (unfinished, missing or truncated files), or None."""
    try:
        manifest = read_json(os.path.join(folder, "complete.json"), "the checkpoint manifest")
    except (OSError, ValueError) as error:
        return f"complete.json unreadable ({error})"
    for file, size in manifest["files"].items():
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            return f"{file} is missing"
        if os.path.getsize(path) != size:
            return f"{file} has {os.path.getsize(path)} bytes, {size} when saved (truncated or overwritten)"
    return None


def newest(run_dir: str) -> str:
    """The newest complete checkpoint folder of a run (for export and extraction), or an error that says why."""
    root = os.path.join(run_dir, "checkpoints")
    for name in checkpoint_names(root):
        if find_problem(os.path.join(root, name)) is None:
            return os.path.join(root, name)
    raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {root}; train first (python -m pretrain.train)")
