"""The streaming loader: frame-aligned crops, short clips, epochs, exact resume across processes."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write
from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from data.shards import ShardConfig, build
from data.stream import AudioLoader, StreamConfig, read_wav_crop, wav_layout
from data.tar import Member, OpenFiles
from test_shards import read_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = [1.5, 2.5, 3.0, 4.0, 5.5, 6.0, 1.2, 7.0, 2.0, 3.3, 8.0, 1.8, 4.4, 2.2, 6.6, 3.9]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 noise clips (unique content, so a crop identifies where it came from)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i, seconds in enumerate(SECONDS):
        write(root / f"clip{i:02d}.wav", (0.3 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32), SAMPLE_RATE)
    return root


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """The corpus in 12 small FLAC shards."""
    out = str(tmp_path_factory.mktemp("shards"))
    build(str(corpus), out, ShardConfig(shard_bytes=200_000))
    return out


@pytest.fixture(scope="module")
def wav_shards(corpus, tmp_path_factory):
    """The corpus in WAV shards of the same plan (shard sizes are planned per codec: the same bytes budget
    per shard as FLAC's estimate, so the same files land in the same shards)."""
    out = str(tmp_path_factory.mktemp("wav_shards"))
    build(str(corpus), out, ShardConfig(shard_bytes=300_000, codec="wav"))
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


@pytest.mark.parametrize("train", [True, False])
def test_wav_shards_give_the_batches_of_flac_shards(shards, wav_shards, train):
    """WAV crops are read without soundfile (one pread); they must equal FLAC's decoded crops, batch for batch."""
    from_flac = take(AudioLoader(cfg(shards, train=train, num_workers=0)), 6)
    from_wav = take(AudioLoader(cfg(wav_shards, train=train, num_workers=0)), 6)
    assert shard_plan(shards) == shard_plan(wav_shards)
    for a, b in zip(from_flac, from_wav):
        assert a["keys"] == b["keys"] and a["offsets"].tolist() == b["offsets"].tolist()
        assert a["lengths"].tolist() == b["lengths"].tolist()
        torch.testing.assert_close(a["audio"], b["audio"], rtol=0, atol=0)


def shard_plan(folder) -> list[list[str]]:
    """Which source files went into which shard."""
    with open(os.path.join(folder, "plan.json")) as f:
        return [[entry["path"] for entry in shard] for shard in json.load(f)["shards"]]


def test_wav_crops_read_plain_pcm_directly_and_anything_else_through_soundfile(tmp_path):
    plain, wide = io.BytesIO(), io.BytesIO()
    audio = (np.arange(5000) % 200 - 100).astype(np.int16)
    sf.write(plain, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    sf.write(wide, audio / 32768, SAMPLE_RATE, format="WAV", subtype="PCM_24")
    assert wav_layout(plain.getvalue()[:512]) == (44, 10_000) and wav_layout(wide.getvalue()[:512]) is None
    path = tmp_path / "members"
    path.write_bytes(b"x" * 100 + plain.getvalue() + wide.getvalue())
    files = OpenFiles(keep=1)
    wav = Member(str(path), 100, len(plain.getvalue()))
    crop, length = read_wav_crop(wav, 4800, 640, files)  # past the end: zero-padded, the real length told
    assert length == 200 and (crop[:200] == audio[4800:]).all() and not crop[200:].any()
    crop, length = read_wav_crop(Member(str(path), 100 + wav.size, len(wide.getvalue())), 320, 320, files)
    assert length == 320 and (crop == audio[320:640]).all()  # 24-bit: decoded by soundfile
    cut = Member(str(path), 100, 44 + 2 * 1000)  # the header says 5000 samples, the member holds 1000
    assert read_wav_crop(cut, 640, 640, files)[1] == 360
    short = tmp_path / "short"  # a shard cut inside a member's samples
    short.write_bytes(path.read_bytes()[: 100 + 44 + 600])
    with pytest.raises(ValueError, match="ends early"):
        read_wav_crop(Member(str(short), 100, wav.size), 0, 640, files)
    files.close()


def test_training_streams_forever_with_a_new_order_each_epoch(shards):
    samples = len(read_shards(shards))
    seen = items(take(AudioLoader(cfg(shards, num_workers=1)), 3 * samples // 3 + 2))
    assert len(seen) > 3 * samples
    first, second = [k for k, _, _ in seen[:samples]], [k for k, _, _ in seen[samples:2 * samples]]
    assert first != second


RESUME_SCRIPT = """
import sys, torch
from data.stream import AudioLoader, StreamConfig, read_wav_crop, wav_layout
from data.tar import Member, OpenFiles
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
