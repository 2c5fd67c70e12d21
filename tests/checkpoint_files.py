"""Checkpoint folders made by hand, as the trainer lays them out: for tests that need one without training."""
from __future__ import annotations

import os

import torch

from data.files import atomic_write_json
from pretrain.checkpoint import MANIFEST, MODEL_STATES, file_records


def write_module_weights(folder: str, module: dict[str, torch.Tensor]) -> None:
    """A checkpoint's module file as DeepSpeed lays it out."""
    torch.save({"module": module}, os.path.join(folder, MODEL_STATES))


def seal(folder: str, step: int, world: int) -> None:
    """Writes `folder`'s complete.json with every file's size and crc32 (one process)."""
    names = sorted(n for n in os.listdir(folder) if n != MANIFEST)
    atomic_write_json(os.path.join(folder, MANIFEST),
                      {"step": step, "world": world, "hash": "crc32", "files": file_records(folder, names, False)})
