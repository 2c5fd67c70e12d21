"""The sharder: bad inputs, segment boundaries, resampling, atomic resume, rank split."""
from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from conftest import tone, write
from data.audio import SAMPLE_RATE, stream_mono
from data.index import read_index
from data.shards import ShardError, ShardConfig, audio_part, build, segment_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_shards(out) -> dict[str, tuple[dict, np.ndarray]]:
    """Every sample, read back with the webdataset library (our shards are plain WebDataset)."""
    urls = sorted(glob.glob(os.path.join(out, "shard-*.tar")))
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        audio, rate = sf.read(io.BytesIO(audio_part(s)), dtype="float32")
        assert rate == SAMPLE_RATE and audio.ndim == 1
        samples[s["__key__"]] = (json.loads(s["json"]), audio)
    return samples


def test_bad_inputs_are_skipped_counted_and_never_sharded(tmp_path, good_corpus):
    root = good_corpus
    (root / "empty.wav").write_bytes(b"")
    (root / "junk.flac").write_bytes(os.urandom(4000))
    (root / "text.mp3").write_text("not audio at all\n" * 100)
    flac = (root / "sub" / "b.flac").read_bytes()
    (root / "truncated.flac").write_bytes(flac[: len(flac) // 3])
    nan = tone(3, 16000)
    nan[5000] = np.nan
    write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = tone(3, 16000)
    inf[100] = np.inf
    write(root / "inf.wav", inf, 16000, subtype="FLOAT")
    write(root / "silence.flac", np.zeros(3 * 16000, np.float32), 16000)
    write(root / "lowrate.wav", tone(3, 4000, freq=300), 4000)
    os.symlink(root / "missing.wav", root / "dangling.wav")
    os.mkdir(root / "folder.wav")

    report = build(str(root), str(tmp_path / "out"), ShardConfig(shard_bytes=400_000), workers=2)

    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons == {
        "empty.wav": "empty_file", "junk.flac": "undecodable", "text.mp3": "undecodable",
        "truncated.flac": "decode_error", "nan.wav": "non_finite", "inf.wav": "non_finite",
        "silence.flac": "silent", "lowrate.wav": "low_sample_rate", "dangling.wav": "unreadable",
    }  # folder.wav is a folder, not a file: not listed, and no crash
    samples = read_shards(tmp_path / "out")
    sources = {meta["source"] for meta, _ in samples.values()}
    assert sources == {"long.wav", "sub/b.flac", "c.ogg", "six.wav"}
    for meta, audio in samples.values():
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0.1
        assert len(audio) == meta["samples"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(on_disk["skipped"]) == 9
    index = read_index(str(tmp_path / "out"))
    assert index["skipped"]["non_finite"] == 2 and index["samples"] == len(samples)


def test_long_tracks_split_into_equal_frame_aligned_contiguous_segments(tmp_path, good_corpus):
    build(str(good_corpus), str(tmp_path / "out"), ShardConfig(segment_seconds=30), workers=1)
    samples = read_shards(tmp_path / "out")
    long = sorted((m["segment"], m, a) for m, a in samples.values() if m["source"] == "long.wav")
    assert [m["samples"] for _, m, _ in long] == [520_000, 520_000, 520_000]  # 65 s -> 3 x 21.67 s, not 30+30+5
    assert all(m["offset_samples"] % 320 == 0 for _, m, _ in long)
    assert [m["offset_samples"] for _, m, _ in long] == [0, 520_000, 1_040_000]
    joined = np.concatenate([a for _, _, a in long])
    reference = np.concatenate(list(stream_mono(str(good_corpus / "long.wav"))))
    np.testing.assert_allclose(joined, reference, atol=1 / 32768 + 1e-6)  # 16-bit FLAC rounding only
    assert segment_samples(65 * 24000, ShardConfig(segment_seconds=30)) == 520_000
    assert segment_samples(10 * 24000, ShardConfig(segment_seconds=30)) == 240_000


@pytest.mark.parametrize("rate,channels", [(11025, 6), (22050, 2), (44100, 1), (48000, 2), (8000, 1)])
def test_resampling_keeps_pitch_and_length(tmp_path, rate, channels):
    write(tmp_path / "in" / "x.wav", tone(3, rate, freq=441.0, channels=channels), rate)
    build(str(tmp_path / "in"), str(tmp_path / "out"), ShardConfig(), workers=1)
    ((meta, audio),) = read_shards(tmp_path / "out").values()
    assert meta["source_sample_rate"] == rate and meta["source_channels"] == channels
    assert abs(len(audio) - 3 * SAMPLE_RATE) <= 1
    expected = tone(3, SAMPLE_RATE, freq=441.0)
    gain = 1 if channels == 1 else np.mean([1 - 0.1 * c for c in range(channels)])  # downmix = channel mean
    middle = slice(2400, -2400)  # away from the resampler's edges
    np.testing.assert_allclose(audio[middle], gain * expected[middle], atol=3e-3)


def test_huge_files_are_streamed_in_bounded_blocks(tmp_path):
    path = write(tmp_path / "long.flac", tone(95, 44100), 44100)
    blocks = [len(b) for b in stream_mono(path, block_seconds=10)]
    assert max(blocks) <= 10 * SAMPLE_RATE + 1024  # never the whole file at once
    assert abs(sum(blocks) - 95 * SAMPLE_RATE) <= 1


def test_manifest_inputs(tmp_path, good_corpus):
    listing = tmp_path / "list.txt"
    listing.write_text("# my corpus\naudio/c.ogg\naudio/sub/b.flac\n")
    report = build(str(listing), str(tmp_path / "out1"), ShardConfig(), workers=1)
    assert report["files_listed"] == 2 and report["samples"] == 2
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{good_corpus}\nc.ogg\t110250\nsix.wav\t44100\n")
    report = build(str(tsv), str(tmp_path / "out2"), ShardConfig(), workers=1)
    assert report["samples"] == 2 and {m["source"] for m, _ in read_shards(tmp_path / "out2").values()} == {"c.ogg", "six.wav"}


def test_rerun_with_other_settings_or_inputs_is_refused(tmp_path, good_corpus):
    out = str(tmp_path / "out")
    build(str(good_corpus), out, ShardConfig(), workers=1)
    with pytest.raises(ShardError, match="segment_seconds=30.0"):
        build(str(good_corpus), out, ShardConfig(segment_seconds=10), workers=1)
    write(good_corpus / "new.wav", tone(2, 16000), 16000)
    with pytest.raises(ShardError, match="input files differ"):
        build(str(good_corpus), out, ShardConfig(), workers=1)


def test_wav_shards_hold_the_same_samples_as_flac_shards(tmp_path, good_corpus):
    flac = build(str(good_corpus), str(tmp_path / "flac"), ShardConfig(shard_bytes=300_000), workers=1)
    wav = build(str(good_corpus), str(tmp_path / "wav"), ShardConfig(shard_bytes=300_000, codec="wav"), workers=1)
    assert wav["samples"] == flac["samples"] and wav["hours"] == flac["hours"]
    names = [n for t in glob.glob(str(tmp_path / "wav" / "shard-*.tar")) for n in wds.tariterators.tar_file_iterator(open(t, "rb"))]
    assert {n["fname"].rsplit(".", 1)[1] for n in names} == {"wav", "json"}
    from_flac, from_wav = read_shards(str(tmp_path / "flac")), read_shards(str(tmp_path / "wav"))
    assert from_flac.keys() == from_wav.keys()
    for key, (meta, audio) in from_flac.items():
        assert from_wav[key][0] == meta
        np.testing.assert_array_equal(from_wav[key][1], audio)  # both 16-bit: the same samples exactly
    assert sum(s["bytes"] for s in read_index(str(tmp_path / "wav"))["shards"]) > sum(
        s["bytes"] for s in read_index(str(tmp_path / "flac"))["shards"])


def test_another_codec_is_refused(tmp_path, good_corpus):
    out = tmp_path / "out"
    build(str(good_corpus), str(out), ShardConfig(), workers=1)
    with pytest.raises(ShardError, match="codec=flac"):
        build(str(good_corpus), str(out), ShardConfig(codec="wav"), workers=1)
    with pytest.raises(ValueError, match="codec='mp3'"):
        ShardConfig(codec="mp3")


def test_rank_split_gives_the_same_shards_as_one_machine(tmp_path, good_corpus):
    cfg = ShardConfig(shard_bytes=300_000)
    single = build(str(good_corpus), str(tmp_path / "one"), cfg, workers=1)
    part0 = build(str(good_corpus), str(tmp_path / "two"), cfg, workers=1, rank=0, world=2)
    assert part0["index"] is None and 0 < part0["shards_mine"] < single["shards_mine"]
    part1 = build(str(good_corpus), str(tmp_path / "two"), cfg, workers=1, rank=1, world=2)
    assert part1["content_hash"] == single["content_hash"]
    assert os.path.exists(tmp_path / "two" / "report.rank0.json")


class AnswersInReverse:
    """A worker pool whose answers come back in another order than asked, as imap_unordered's may."""

    def imap_unordered(self, fn, jobs, chunksize=1):
        return reversed([fn(job) for job in list(jobs)])


def test_every_rank_plans_the_same_shards_whatever_order_its_workers_answer_in(tmp_path, good_corpus):
    from data.shards import list_sources, make_plan

    root, rels = list_sources(str(good_corpus))
    cfg = ShardConfig(shard_bytes=300_000)
    in_order, reversed_answers = make_plan(root, rels, cfg, None), make_plan(root, rels, cfg, AnswersInReverse())
    assert len(in_order["shards"]) > 1 and reversed_answers == in_order


def _corpus_of_many_files(root, count=12):
    for i in range(count):
        write(root / f"t{i:02d}.wav", tone(6, 48000, freq=200 + 20 * i), 48000)


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_shards(tmp_path):
    _corpus_of_many_files(tmp_path / "in")
    args = [sys.executable, "-m", "data.shards", "build", "--input", str(tmp_path / "in"), "--workers", "1", "--shard-size", "150K"]
    clean = subprocess.run(args + ["--out", str(tmp_path / "clean")], cwd=REPO, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while len(glob.glob(str(out / "shard-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = glob.glob(str(out / "shard-*.json"))
    assert 2 <= len(done) < 12 and not (out / "index.json").exists()
    for tar in glob.glob(str(out / "shard-*.tar")):  # any tar with the final name is complete
        with open(tar, "rb") as f:
            assert len(list(wds.tariterators.tar_file_iterator(f))) % 2 == 0
    resumed = subprocess.run(args + ["--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} already done" in resumed.stderr
    assert read_index(str(out))["content_hash"] == read_index(str(tmp_path / "clean"))["content_hash"]
    assert not glob.glob(str(out / "*.tmp"))


def test_rerun_removes_the_temporaries_a_killed_build_left(tmp_path, good_corpus):
    """A kill between a summary's temporary write and its rename leaves `shard-N.json.XXXX.tmp`: the rerun
    writes that shard again and removes the leftover (another rank's temporaries are not touched)."""
    cfg, out = ShardConfig(shard_bytes=300_000), tmp_path / "out"
    build(str(good_corpus), str(out), cfg, workers=1)
    os.remove(out / "shard-000000.json")
    for leftover in ("shard-000000.json.k1ll3d.tmp", "shard-000000.tar.tmp", "report.json.x7.tmp"):
        (out / leftover).write_bytes(b"partial")
    other_rank = out / "report.rank1.json.live.tmp"
    other_rank.write_bytes(b"being written")
    report = build(str(good_corpus), str(out), cfg, workers=1)
    assert report["shards_written_now"] == 1 and (out / "shard-000000.json").exists()
    assert sorted(p.name for p in out.glob("*.tmp")) == [other_rank.name]
