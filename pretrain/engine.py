"""The DeepSpeed side of training: process group, engine config, learning-rate schedule.

One process per device. Under `torchrun` or the `deepspeed` launcher the
environment names the rank and world; a plain `python -m pretrain.train`
is a world of one. Adam is always torch's AdamW (`torch_adam`: DeepSpeed's
own fused Adam would compile for minutes): on CPU with its default
(foreach) implementation and a gloo process group; on GPU with NCCL and
`fused=True` (one kernel for every parameter's update; DeepSpeed hands the
optimizer's params on to `torch.optim.AdamW`). With `train.compile=true` the engine's module (the objective:
encoder and heads) goes through DeepSpeed's `engine.compile()`, which is
`nn.Module.compile` in place: parameter names, so checkpoints, are the same
compiled or not; `graph_breaks()` reports where Dynamo had to split the step.
"""
from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import torch

from pretrain.config import OptimConfig, RunConfig


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Joins (or, alone, creates) the process group; returns (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:  # a single process without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a g++ build on first use
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=timedelta(minutes=30), verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(cfg: RunConfig, device_type: str = "cpu") -> dict:
    """DeepSpeed's config for `cfg` on a device of `device_type` ("cuda": torch's fused AdamW)."""
    train, optim = cfg.train, cfg.optim
    adam = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "adam_w_mode": True, "torch_adam": True}
    if device_type == "cuda":
        adam["fused"] = True  # -> torch.optim.AdamW(..., fused=True, foreach=None)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": optim.clip,
        "optimizer": {"type": "Adam", "params": adam},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": train.initial_scale_power,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": train.min_loss_scale},
        "steps_per_print": 2 ** 62,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` updates: linear warmup, then poly or cosine decay to end_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = (1 - progress) ** cfg.power if cfg.decay == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
    end = cfg.end_lr / cfg.lr
    return end + (1 - end) * shape


def build_engine(model: torch.nn.Module, cfg: RunConfig, compile_backend: str = "inductor"):
    """The DeepSpeed engine around `model`; compiled (torch.compile with `compile_backend`) when train.compile."""
    import deepspeed

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.optim, cfg.train.steps))

    device_type = next(model.parameters()).device.type
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, device_type), lr_scheduler=schedule)
    if cfg.train.compile:
        engine.compile(backend=compile_backend)  # compiles lazily, on the first forward
    return engine


def skipped_update(engine) -> None:
    """The accumulation boundary's `engine.step()` without an update (an update with a non-finite loss): DeepSpeed
    counts the micro-batch and clears the gradients, while the weights, the optimizer's state, the schedule and
    DeepSpeed's skip counter stay as they were. Torch's optimizer inside DeepSpeed's wrappers (ZeRO, bf16, fp16)
    has its `step` shadowed for the call; where DeepSpeed itself finds the gradients non-finite (ZeRO 1-3 in fp32
    or fp16) it skips on its own and lowers an fp16 loss scale, as on any overflow."""
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    schedule, skipped = engine.lr_scheduler.state_dict(), engine.skipped_steps
    optimizer.step = lambda closure=None: None
    try:
        engine.step()
    finally:
        del optimizer.step
    engine.lr_scheduler.load_state_dict(schedule)
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.skipped_steps = skipped


def graph_breaks() -> dict:
    """Dynamo's graph breaks in this process since `torch._dynamo.reset()` / counters.clear():
    {"count": n, "graphs": graphs compiled, "reasons": {short reason: count}}."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
        context = next((line for line in lines if line.startswith("Developer debug context")), "")
        short = lines[0] + (f" ({context.removeprefix('Developer debug context:').strip()[:120]})" if context else "")
        reasons[short] = reasons.get(short, 0) + count
    return {"count": sum(reasons.values()), "graphs": int(counters["stats"]["unique_graphs"]), "reasons": reasons}


def loss_scale(engine) -> float | None:
    """The fp16 dynamic loss scale, None in fp32/bf16."""
    if not engine.fp16_enabled():
        return None
    return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 0.0)))
