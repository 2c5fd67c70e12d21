"""Which part of a job this process is: --rank/--world, else SLURM, else torchrun, else 0 of 1; and its GPU."""
from __future__ import annotations

import os


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Explicit values win; then a SLURM array task, then SLURM tasks, then RANK/WORLD_SIZE."""
    env = os.environ
    if rank is None and world is None:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            rank, world = int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        elif "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    rank = 0 if rank is None else rank
    world = 1 if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} / world {world} is not a valid split: need world >= 1 and 0 <= rank < world")
    return rank, world


def local_device(device: str) -> str:
    """`cuda` -> `cuda:I` for the I-th process on a node that shows it several GPUs (LOCAL_RANK from torchrun,
    else SLURM_LOCALID), so one dump process per GPU each takes its own; any other device as given."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if device != "cuda" or local is None:
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{int(local) % count}" if count > 1 else device
