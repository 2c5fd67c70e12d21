"""Operational messages: library code logs through `logger(__name__)`; each CLI calls `setup_logging()` once.

    log = logger(__name__)                 # "musicpt.data.stream", "musicpt.pretrain.train", ...
    log.warning("%s: missing; skipped", path)
    setup_logging()                        # in a CLI's main(): one handler on "musicpt", rank-prefixed

Lines go to stderr, through tqdm so that they do not break a progress bar:
`2026-12-01 12:00:00 rank 1 WARNING musicpt.pretrain.train: step 3: ...`.
MUSICPT_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO) sets the level.
Without `setup_logging()` (library use, tests) Python's defaults apply: warnings and
errors reach stderr, and pytest's caplog sees every record. A per-sample
warning that may repeat thousands of times (loader workers) goes through
`Throttled`: the first few of each kind, then one summary in every so many.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter

from tqdm import tqdm

from data.cluster import rank_world

ROOT = "musicpt"
LEVEL_VARIABLE = "MUSICPT_LOG_LEVEL"
FORMAT = "%(asctime)s rank %(rank)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def logger(module: str) -> logging.Logger:
    """The logger of a module of ours (`__name__`, e.g. "data.stream" -> "musicpt.data.stream"; a module run
    with `python -m pretrain.train` is named as imported, not "__main__")."""
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return logging.getLogger(f"{ROOT}.{module}")


class RankFilter(logging.Filter):
    """Gives every record the process's rank, for the format's prefix."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class ConsoleHandler(logging.Handler):
    """Writes to the current sys.stderr (as captured or redirected now) through tqdm, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001: logging must never stop the program
            self.handleError(record)


def level_from_env() -> int:
    name = os.environ.get(LEVEL_VARIABLE, "INFO").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_VARIABLE}={name!r}: use DEBUG, INFO, WARNING or ERROR")
    return level


def process_rank() -> int:
    """This process's rank as the launcher tells it (SLURM, torchrun), 0 when it says nothing usable."""
    try:
        return rank_world()[0]
    except ValueError:
        return 0


def setup_logging(rank: int | None = None) -> logging.Logger:
    """Configures the "musicpt" logger for a CLI process: one console handler, rank-prefixed, level from
    MUSICPT_LOG_LEVEL. Calling it again replaces the handler (e.g. with the rank known later)."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(RankFilter(process_rank() if rank is None else rank))
    root.addHandler(handler)
    root.setLevel(level_from_env())
    return root


class Throttled:
    """Warnings of one kind that may repeat per sample: the first `first` are logged, then one in `every`
    with the count so far (counted per instance, i.e. per loader worker)."""

    def __init__(self, log: logging.Logger, first: int = 10, every: int = 100):
        self.log, self.first, self.every = log, first, every
        self.counts: Counter[str] = Counter()

    def warning(self, kind: str, message: str) -> bool:
        """Logs `message` if its turn has come; returns whether it did."""
        self.counts[kind] += 1
        seen = self.counts[kind]
        if seen < self.first:
            self.log.warning(message)
        elif seen == self.first:
            self.log.warning("%s [%d %s so far; from now on one in %d is logged]", message, seen, kind, self.every)
        elif seen % self.every == 0:
            self.log.warning("%s [%d %s so far; one in %d is logged]", message, seen, kind, self.every)
        else:
            return False
        return True
