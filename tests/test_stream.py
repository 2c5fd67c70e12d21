"""The streaming loader: frame-aligned crops, short clips, epochs, exact resume across processes."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write
from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from data.shards import ShardConfig, build
from data.stream import AudioLoader, StreamConfig
from test_shards import read_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = [1.5, 2.5, 3.0, 4.0, 5.5, 6.0, 1.2, 7.0, 2.0, 3.3, 8.0, 1.8, 4.4, 2.2, 6.6, 3.9]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 noise clips (unique content, so a crop identifies where it came from) in 12 small shards."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i, seconds in enumerate(SECONDS):
        write(root / f"clip{i:02d}.wav", (0.3 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE)
    out = str(tmp_path_factory.mktemp("shards"))
    build(str(root), out, ShardConfig(shard_bytes=200_000))
    return out


def cfg(shards, **kw) -> StreamConfig:
    return StreamConfig(**{"shards": shards, "crop_seconds": 2.0, "batch_size": 3, "num_workers": 2, "shuffle_buffer": 4, **kw})


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def items(batches) -> list[tuple[str, int, int]]:
    return [(k, int(o), int(n)) for b in batches for k, o, n in zip(b["keys"], b["offsets"], b["lengths"])]


def test_crops_start_on_frames_and_match_the_stored_audio(shards):
    stored = read_shards(shards)
    batches = take(AudioLoader(cfg(shards)), 10)
    for batch in batches:
        assert batch["audio"].shape == (3, 2 * SAMPLE_RATE) and batch["audio"].dtype == torch.float32
        for audio, key, offset, length in zip(batch["audio"].numpy(), batch["keys"], batch["offsets"], batch["lengths"]):
            offset, length = int(offset), int(length)
            assert offset % FRAME_SAMPLES == 0
            source = stored[key][1]
            assert length == min(len(source) - offset, 2 * SAMPLE_RATE)
            np.testing.assert_array_equal(audio[:length], source[offset:offset + length])
            assert not audio[length:].any()
    assert len({o for b in batches for o in b["offsets"].tolist()}) > 5  # crops really are random


@pytest.mark.parametrize("short", ["pad", "drop"])
def test_evaluation_reads_each_sample_once_across_ranks_and_workers(shards, short):
    stored = read_shards(shards)
    seen = []
    for rank in range(2):
        loader = AudioLoader(cfg(shards, train=False, short=short), rank=rank, world=2)
        seen += items(loader)
        assert items(loader) == items(loader)  # evaluation crops are deterministic
    keys = Counter(key for key, _, _ in seen)
    assert max(keys.values()) == 1
    crop = 2 * SAMPLE_RATE
    expected = {k for k, (_, a) in stored.items() if len(a) >= SAMPLE_RATE and (short == "pad" or len(a) >= crop)}
    assert set(keys) == expected
    assert any(n < crop for _, _, n in seen) == (short == "pad")


def test_training_streams_forever_with_a_new_order_each_epoch(shards):
    samples = len(read_shards(shards))
    seen = items(take(AudioLoader(cfg(shards, num_workers=1)), 3 * samples // 3 + 2))
    assert len(seen) > 3 * samples
    first, second = [k for k, _, _ in seen[:samples]], [k for k, _, _ in seen[samples:2 * samples]]
    assert first != second


RESUME_SCRIPT = """
import sys, torch
from data.stream import AudioLoader, StreamConfig
shards, state_in, state_out, n, out = sys.argv[1:]
loader = AudioLoader(StreamConfig(shards, crop_seconds=2.0, batch_size=3, num_workers=2, shuffle_buffer=4))
if state_in != "-":
    loader.load_state_dict(torch.load(state_in, weights_only=False))
it = iter(loader)
batches = [next(it) for _ in range(int(n))]
torch.save(loader.state_dict(), state_out)
torch.save(batches, out)
"""


def run_resume_script(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, *map(str, args)], check=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_resume_in_a_fresh_process_continues_exactly(shards, tmp_path):
    whole = take(AudioLoader(cfg(shards)), 30)  # more than one epoch, so the restore crosses shards and epochs
    run_resume_script(shards, "-", tmp_path / "state", 11, tmp_path / "head")
    run_resume_script(shards, tmp_path / "state", tmp_path / "state2", 19, tmp_path / "tail")
    resumed = torch.load(tmp_path / "head", weights_only=False) + torch.load(tmp_path / "tail", weights_only=False)
    assert items(resumed) == items(whole)
    for a, b in zip(resumed, whole):
        assert torch.equal(a["audio"], b["audio"])


def test_resume_with_another_world_size_or_setting_is_refused(shards):
    loader = AudioLoader(cfg(shards), rank=0, world=1)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"world: saved 1, now 2.*same world size"):
        AudioLoader(cfg(shards), rank=0, world=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"config.seed: saved 0, now 1"):
        AudioLoader(cfg(shards, seed=1)).load_state_dict(state)


def test_bad_settings_and_missing_shards_say_what_to_do(shards, tmp_path):
    with pytest.raises(ValueError, match="whole number of 320-sample frames"):
        AudioLoader(cfg(shards, crop_seconds=1.001))
    with pytest.raises(ValueError, match="'pad' or 'drop'"):
        AudioLoader(cfg(shards, short="trim"))
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path)):
        AudioLoader(cfg(str(tmp_path)))
