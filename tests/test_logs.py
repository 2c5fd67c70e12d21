"""data.logs: the CLIs' rank-prefixed console handler, MUSICPT_LOG_LEVEL, and throttled per-sample warnings."""
from __future__ import annotations

import logging

import pytest

from data.logs import ConsoleHandler, Throttled, logger, setup_logging


@pytest.fixture
def musicpt_logger():
    root = logging.getLogger("musicpt")
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:], root.level = handlers, level


def test_setup_prefixes_the_rank_writes_to_stderr_and_replaces_its_own_handler(musicpt_logger, capsys, monkeypatch):
    monkeypatch.setenv("MUSICPT_LOG_LEVEL", "info")
    setup_logging(rank=3)
    setup_logging(rank=1)  # a second call replaces the handler: one line per message
    logger("pretrain.train").info("resumed from %s", "run/checkpoints/step-00000004")
    logger("pretrain.train").debug("not shown at INFO")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "rank 1 INFO musicpt.pretrain.train: resumed from run/checkpoints/step-00000004" in captured.err
    assert sum(isinstance(h, ConsoleHandler) for h in musicpt_logger.handlers) == 1


def test_the_rank_comes_from_the_launcher_when_not_given(musicpt_logger, capsys, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    setup_logging()
    logger("data.stream").warning("a shard is missing")
    assert "rank 2 WARNING musicpt.data.stream: a shard is missing" in capsys.readouterr().err


def test_a_bad_level_says_which_ones_exist(musicpt_logger, monkeypatch):
    monkeypatch.setenv("MUSICPT_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="MUSICPT_LOG_LEVEL='LOUD': use DEBUG, INFO, WARNING or ERROR"):
        setup_logging()


def test_throttled_logs_the_first_few_of_a_kind_then_one_in_every_with_the_count(caplog):
    throttle = Throttled(logger("data.stream"), first=3, every=10)
    with caplog.at_level(logging.WARNING, logger="musicpt.data.stream"):
        logged = [throttle.warning("samples skipped", f"sample {n} skipped") for n in range(1, 31)]
        throttle.warning("shards skipped", "shard 1 skipped")  # another kind has its own count
    assert [n for n, shown in enumerate(logged, 1) if shown] == [1, 2, 3, 10, 20, 30]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["sample 1 skipped", "sample 2 skipped",
                            "sample 3 skipped [3 samples skipped so far; from now on one in 10 is logged]"]
    assert messages[3:] == ["sample 10 skipped [10 samples skipped so far; one in 10 is logged]",
                            "sample 20 skipped [20 samples skipped so far; one in 10 is logged]",
                            "sample 30 skipped [30 samples skipped so far; one in 10 is logged]", "shard 1 skipped"]
