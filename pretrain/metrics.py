"""Training metrics: summed on the device between log steps, averaged over ranks once per log step,
written by rank 0 to TensorBoard (RUN/tensorboard/), to RUN/metrics.jsonl and as one console line.
`Interval` keeps the throughput between two log steps (data wait, audio, crops, wall time)."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch

from data.files import atomic_write_bytes


class Metrics:
    """Logs summed on the device per micro-batch (`add`), reduced over ranks at a log step (`reduce`) and written by
    rank 0 to RUN/metrics.jsonl and TensorBoard (`write`); with run_dir None (benchmarks) nothing is written."""

    def __init__(self, run_dir: str | None, rank: int, resumed_step: int):
        self.rank, self.sums, self.count = rank, {}, 0
        self.path = None if run_dir is None else os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if rank == 0 and run_dir is not None:
            # Rows after the checkpoint are about to be redone; without one, so is every row (step 0's eval too).
            redone_from = resumed_step + 1 if resumed_step else 0
            truncate_jsonl(self.path, redone_from - 1)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=redone_from)

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One micro-batch's detached logs; no device sync."""
        for name, value in logs.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def reduce(self) -> dict[str, float]:
        """Interval means over micro-batches and ranks (collective: every rank calls it), then reset."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.stack([self.sums[name] for name in names]) / self.count
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
            values /= torch.distributed.get_world_size()
        self.sums, self.count = {}, 0
        return dict(zip(names, values.tolist()))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        with open(self.path, "a") as file:
            file.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Interval:
    """Throughput since the last log step: time spent waiting for batches, audio-seconds and crops trained on
    (all ranks), and the wall time since `reset()`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started, self.data_wait, self.audio_seconds, self.crops = time.perf_counter(), 0.0, 0.0, 0

    @contextmanager
    def waiting(self):
        """Times a wait for the next batch."""
        started = time.perf_counter()
        yield
        self.data_wait += time.perf_counter() - started

    def add(self, audio_seconds: float, crops: int) -> None:
        self.audio_seconds += audio_seconds
        self.crops += crops

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def jsonl_rows(path: str):
    """(line, row) for each readable line of a JSON-lines file (a torn last line is skipped); none if it is missing."""
    if not os.path.exists(path):
        return
    with open(path) as file:
        for line in file:
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the rows of `path` whose "step" is at most `last_step` (atomically; a torn last line is dropped)."""
    if not os.path.exists(path):
        return
    kept = [line if line.endswith("\n") else line + "\n" for line, row in jsonl_rows(path) if row.get("step", 0) <= last_step]
    atomic_write_bytes(path, "".join(kept).encode())


def console_line(step: int, steps: int, scalars: dict[str, float], eta_seconds: float) -> str:
    """step 120/300 | loss 5.431 | cqt 0.812 | acc 0.214 | lr 1.2e-03 | 812 audio-s/s | data 3% | eta 2m10s"""
    accuracies = [v for k, v in scalars.items() if k.startswith("acc/")]
    parts = [f"step {step}/{steps}", f"loss {scalars.get('loss', float('nan')):.3f}"]
    if "loss/cqt" in scalars:
        parts.append(f"cqt {scalars['loss/cqt']:.3f}")
    if accuracies:
        parts.append(f"acc {sum(accuracies) / len(accuracies):.3f}")
    parts += [f"lr {scalars.get('lr', 0):.1e}", f"{scalars.get('audio_seconds_per_second', 0):.0f} audio-s/s",
              f"data {100 * scalars.get('data_wait_fraction', 0):.0f}%"]
    if "mfu" in scalars:
        parts.append(f"mfu {100 * scalars['mfu']:.1f}%")
    if scalars.get("skipped_steps"):
        parts.append(f"skipped {scalars['skipped_steps']:.0f}")
    minutes, seconds = divmod(int(eta_seconds), 60)
    parts.append(f"eta {minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"eta {minutes}m{seconds:02d}s")
    return " | ".join(parts)
