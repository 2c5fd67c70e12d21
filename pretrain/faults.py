"""Fault injection for tests, off unless the environment asks for it.

`MUSICPT_FAULTS` holds `;`-separated faults:

    nonfinite@RANK:STEP    the loss of rank RANK's first micro-batch for update STEP is replaced by NaN (once)
    nonfinite@RANK:STEP+   ... and of every micro-batch tried for update STEP (it never completes)
    pause@POINT:STEP       rank 0 stops at save point POINT of step STEP's save (see checkpoint.SAVE_POINTS),
                           touches the file named by MUSICPT_PAUSED (if set) and sleeps there until killed

A test uses `pause` to SIGKILL the whole process tree at a chosen moment inside a save, and `nonfinite` to
exercise the non-finite-loss path without hunting for a diverging configuration.
"""
from __future__ import annotations

import functools
import os
import time

import torch


@functools.cache  # read once per process: the step asks on every micro-batch
def _faults() -> frozenset[str]:
    return frozenset(item.strip() for item in os.environ.get("MUSICPT_FAULTS", "").split(";") if item.strip())


_fired: set[str] = set()  # one-shot faults already injected in this process


def nonfinite_loss(loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """`loss`, or NaN where MUSICPT_FAULTS asks for it (STEP: the update being made, from 1)."""
    once, always = f"nonfinite@{rank}:{step}", f"nonfinite@{rank}:{step}+"
    wanted = _faults()
    if always in wanted or (once in wanted and once not in _fired):
        _fired.add(once)
        return loss * float("nan")
    return loss


def pause_at(point: str, step: int) -> None:
    """Sleeps forever (until killed) where MUSICPT_FAULTS asks for `pause@POINT:STEP`."""
    if f"pause@{point}:{step}" not in _faults():
        return
    marker = os.environ.get("MUSICPT_PAUSED")
    if marker:
        with open(marker, "w") as file:
            file.write(f"{point}:{step}\n")
    while True:
        time.sleep(60)
