"""A uniform random sample of at most `capacity` rows from a stream of any length, in fixed memory."""
from __future__ import annotations

import numpy as np


class Reservoir:
    """Algorithm R over row batches: after n rows seen, each is kept with probability min(1, capacity / n)."""

    def __init__(self, capacity: int, dim: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.rows = np.empty((capacity, dim), dtype=np.float32)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float32)
        capacity = len(self.rows)
        fill = max(0, min(capacity - self.seen, len(batch)))
        self.rows[self.seen:self.seen + fill] = batch[:fill]
        rest = batch[fill:]
        if len(rest):
            positions = self.seen + fill + np.arange(len(rest))  # 0-based index of each row in the stream
            slots = self.rng.integers(0, positions + 1)
            keep = slots < capacity
            self.rows[slots[keep]] = rest[keep]  # repeated slots: the later row wins, as in the sequential algorithm
        self.seen += len(batch)

    @property
    def sample(self) -> np.ndarray:
        return self.rows[: min(self.seen, len(self.rows))]
