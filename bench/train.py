"""The trainer's overhead: its own update (pretrain.step.TrainStep under the DeepSpeed engine) against the same
model in a plain PyTorch loop (AdamW, the same lr schedule and gradient clipping), same batches, same process.

    python bench/train.py [--config configs/tiny.yaml] [--steps 20] [--rounds 5] [key=value ...]
    python bench/train.py --config configs/mert_95m.yaml train.precision=bf16 data.batch_size=16   # on a GPU

Batches are random audio and labels held in memory, shaped as the loader
delivers them, so the loader is not timed (bench/data_throughput.py does
that) but the copy to the device is. Rounds alternate between the two
loops; the medians of steps per second, audio-seconds per second, the
ratio trainer / plain (1.0: no overhead) and, on a GPU, peak memory and
model FLOPs utilisation are printed. The plain loop runs in fp32, or under
autocast for bf16/fp16 (with a GradScaler for fp16).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from data.stream import to_device  # noqa: E402
from pretrain.engine import build_engine, device_for_rank, init_distributed, lr_factor  # noqa: E402
from pretrain.metrics import Interval, Metrics  # noqa: E402
from pretrain.model import Encoder, training_flops  # noqa: E402
from pretrain.objectives.mert import MertObjective  # noqa: E402
from pretrain.step import Progress, TrainStep  # noqa: E402
from pretrain.train import datasheet_flops  # noqa: E402

SIZES = {"km": [300, 200]}  # the log-mel + chroma k-means teacher's codebooks


def batches(cfg, count: int, sizes: dict[str, list[int]] = SIZES) -> list[dict]:
    """`count` batches of random audio and labels (codebook sizes `sizes`, one stream), on the host as the loader
    delivers them (data.stream: int16 audio, labels, lengths, keys and offsets)."""
    (stream, books), = sizes.items()
    g = torch.Generator().manual_seed(0)
    size, samples = cfg.data.batch_size, cfg.data.crop_samples
    out = []
    for index in range(count):
        audio = (3000 * torch.randn(size, samples, generator=g)).short()
        codes = torch.stack([torch.randint(0, k, (size, samples // 320), generator=g) for k in books], dim=-1)
        out.append({"audio": audio, "lengths": torch.full((size,), samples), "labels": {stream: codes},
                    "keys": [f"batch{index}-{item}" for item in range(size)], "offsets": torch.zeros(size, dtype=torch.long)})
    return out


def forward_inputs(batch: dict, device) -> tuple:
    """(audio, lengths, labels) of a loader batch on `device`: the objective's forward arguments."""
    audio, labels = to_device(batch, device)
    return audio, batch["lengths"], labels


def trainer_step(model, cfg, device, compile_backend: str = "inductor"):
    """The trainer's update (pretrain.step.TrainStep: forward, backward and DeepSpeed's step, the non-finite check,
    the logs) on one process; step(batch) trains one micro-batch, and every train.grad_accum-th makes the update."""
    engine = build_engine(model, cfg, compile_backend)
    update = TrainStep(cfg, engine, device, 0, 1, torch.Generator().manual_seed(1), Progress(), Metrics(None, 0, 0),
                       Interval())
    waiting: list[dict] = []

    def step(batch: dict) -> None:
        waiting.append(batch)
        if len(waiting) == cfg.train.grad_accum:
            update(iter(waiting))
            waiting.clear()
    return step


def plain_loop(model, cfg, device):
    optim = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim, cfg.train.steps))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    generator = torch.Generator().manual_seed(1)

    def step(batch):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = model(*forward_inputs(batch, device), generator)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return step


def timed(step, data, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in data:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20, help="steps per round per loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.shards=unused", "data.labels=[unused]", *args.overrides])
    device = device_for_rank()
    init_distributed(device)
    torch.manual_seed(0)
    model = MertObjective(cfg.objective, Encoder(cfg.model), SIZES).to(device).train()
    loops = {"trainer": trainer_step(copy.deepcopy(model), cfg, device), "plain": plain_loop(model, cfg, device)}
    data = batches(cfg, args.steps * cfg.train.grad_accum)
    for step in loops.values():  # warm-up
        timed(step, data[:2], device)
    times = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            times[name].append(timed(step, data, device))
    audio = cfg.data.batch_size * cfg.data.crop_seconds
    print(f"{args.config} {cfg.train.precision} ZeRO-{cfg.train.zero_stage} on {device.type}, batch "
          f"{cfg.data.batch_size} x {cfg.data.crop_seconds} s, {args.rounds} rounds of {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for name in loops:
        median = statistics.median(times[name])
        print(f"{name:10s} {1 / median:8.2f} steps/s {audio / median:9.1f} audio-s/s")
    ratio = statistics.median(times["trainer"]) / statistics.median(times["plain"])
    print(f"step time trainer / plain: {ratio:.3f} (1.0: no overhead from DeepSpeed and the trainer's step)")
    if device.type == "cuda":
        name, peak = torch.cuda.get_device_name(device), datasheet_flops(device)
        flops = training_flops(cfg.model, cfg.data.crop_samples) * cfg.data.batch_size
        for loop in loops:
            mfu = flops / statistics.median(times[loop]) / peak if peak else float("nan")
            print(f"{loop}: MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOPS ({name})")
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
