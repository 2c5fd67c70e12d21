"""Teachers: bounded frame sampling, k-means fit/dump, EnCodec dump, resume, manifest checks, label alignment."""
from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import write
from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from data.labels import LabelError, label_entropy, sidecar_path, write_sidecar
from data.shards import ShardConfig, build
from data.stream import AudioLoader, StreamConfig
from teachers import TeacherError, dump as dump_stage
from teachers.encodec import EncodecTeacher
from teachers.encodec import main as encodec_main
from teachers.kmeans import KMeansConfig, KMeansTeacher, StreamSpec, fit
from teachers.reservoir import Reservoir

LEVELS = 7


def level_signal(frames: int, start: int) -> np.ndarray:
    """Frame i (320 samples) is a +-a square wave with a = 0.1 * (1 + (start + i) % LEVELS): its label is known."""
    levels = 0.1 * (1 + (start + np.arange(frames)) % LEVELS)
    signs = np.where(np.arange(FRAME_SAMPLES) % 2 == 0, 1.0, -1.0)
    return (levels[:, None] * signs).reshape(-1).astype(np.float32)


class LevelTeacher:
    """Labels each frame by its RMS level: the label a perfectly aligned pipeline must reproduce."""

    name, codebooks, cardinality, config_hash = "level", 1, LEVELS, "level-v1"

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        frames = wave[: len(wave) // FRAME_SAMPLES * FRAME_SAMPLES].view(-1, FRAME_SAMPLES)
        rms = frames.pow(2).mean(1).sqrt()
        return (rms * 10).round().long().sub(1).clamp(0, LEVELS - 1)[:, None]


def level_shards(tmp_path_factory, codec: str) -> str:
    """Eight clips of 1.1-4.1 s in six shards; clip c starts at level c."""
    root = tmp_path_factory.mktemp("levels")
    for clip, seconds in enumerate([3.0, 1.5, 4.1, 2.2, 1.1, 3.3, 2.7, 1.9]):
        write(root / f"clip{clip}.wav", level_signal(int(seconds * 75), clip), SAMPLE_RATE, subtype="PCM_16")
    out = str(tmp_path_factory.mktemp("shards"))
    build(str(root), out, ShardConfig(shard_bytes=150_000 * (3 if codec == "wav" else 2) // 2, codec=codec))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return level_shards(tmp_path_factory, "flac")


@pytest.fixture(scope="module")
def wav_shards(tmp_path_factory):
    return level_shards(tmp_path_factory, "wav")


def test_reservoir_is_bounded_and_uniform():
    counts = np.zeros(10)
    for seed in range(20):
        r = Reservoir(capacity=500, dim=1, seed=seed)
        for start in range(0, 10_000, 333):
            r.add(np.arange(start, min(start + 333, 10_000))[:, None])
            assert len(r.sample) <= 500
        assert r.seen == 10_000 and len(np.unique(r.sample)) == 500
        counts += np.bincount((r.sample[:, 0] // 1000).astype(int), minlength=10)
    assert np.all(np.abs(counts / counts.sum() - 0.1) < 0.02), counts  # every tenth of the stream kept alike
    small = Reservoir(capacity=50, dim=2)
    small.add(np.ones((20, 2)))
    assert small.sample.shape == (20, 2)


@pytest.mark.parametrize("codec", ["flac", "wav"])
def test_labels_stay_aligned_with_crops_at_every_offset(request, codec):
    shards = request.getfixturevalue({"flac": "shards", "wav": "wav_shards"}[codec])
    report = dump_stage.dump(LevelTeacher, shards, os.path.join(shards, "labels", "level"))
    assert report["manifest"] and report["usage"][0]["used"] == LEVELS
    cfg = StreamConfig(shards, crop_seconds=1.28, batch_size=4, num_workers=2, shuffle_buffer=3,
                       labels=(os.path.join(shards, "labels", "level"),))
    batches = [b for _, b in zip(range(40), AudioLoader(cfg))]
    offsets = {int(o) for b in batches for o in b["offsets"]}
    assert len(offsets) > 20  # many different offsets were exercised
    for batch in batches:
        labels = batch["labels"]["level"]
        assert labels.shape == (4, 96, 1) and labels.dtype == torch.int64
        expected = LevelTeacher().encode(batch["audio"].reshape(-1))[:, 0].view(4, 96)
        for b, length in enumerate(batch["lengths"].tolist()):
            real = length // FRAME_SAMPLES
            assert torch.equal(labels[b, :real, 0], expected[b, :real])
            assert (labels[b, real:] == -1).all()


def kmeans_config(shards, tmp_path, **kw) -> KMeansConfig:
    streams = [StreamSpec("logmel", 6, {"kind": "logmel", "n_mels": 32}), StreamSpec("chroma", 4, {"kind": "chroma"})]
    return KMeansConfig(**{"name": "lc", "shards": shards, "out": str(tmp_path / "model"),
                           "labels": str(tmp_path / "labels"), "streams": streams, "max_frames": 300, **kw})


def test_kmeans_fit_samples_a_bounded_number_of_frames_and_dump_resumes(shards, tmp_path, monkeypatch):
    cfg = kmeans_config(shards, tmp_path)
    record = fit(cfg)
    index = json.load(open(os.path.join(shards, "index.json")))
    assert [s["frames_sampled"] for s in record["streams"]] == [300, 300]
    assert [s["frames_seen"] for s in record["streams"]] == [round(index["hours"] * 3600 * 75)] * 2
    assert fit(cfg) == record  # a second fit with the same settings is a no-op
    with pytest.raises(TeacherError, match="other settings"):
        fit(kmeans_config(shards, tmp_path, iterations=3))

    real_label_shard, calls = dump_stage.label_shard, []

    def dies_on_third_shard(*args):
        calls.append(args[-1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real_label_shard(*args)

    monkeypatch.setattr(dump_stage, "label_shard", dies_on_third_shard)
    make = lambda: KMeansTeacher(cfg.out)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        dump_stage.dump(make, shards, cfg.labels)
    done = sorted(glob.glob(os.path.join(cfg.labels, "*.npz")))
    assert len(done) == 2 and not os.path.exists(os.path.join(cfg.labels, "teacher.json"))
    assert not glob.glob(os.path.join(cfg.labels, "*.tmp"))
    stamps = {path: os.stat(path).st_mtime_ns for path in done}
    monkeypatch.setattr(dump_stage, "label_shard", real_label_shard)
    report = dump_stage.dump(make, shards, cfg.labels)
    assert report["shards_done_now"] == len(index["shards"]) - 2 and report["manifest"]
    assert {path: os.stat(path).st_mtime_ns for path in done} == stamps  # finished shards were not redone
    manifest = json.load(open(os.path.join(cfg.labels, "teacher.json")))
    assert manifest["codebooks"] == 2 and manifest["codebook_sizes"] == [6, 4]
    batch = next(iter(AudioLoader(StreamConfig(shards, crop_seconds=0.64, batch_size=2, num_workers=0, labels=(cfg.labels,)))))
    assert batch["labels"]["lc"].shape == (2, 48, 2)
    assert batch["labels"]["lc"][..., 0].max() < 6 and batch["labels"]["lc"][..., 1].max() < 4


def test_a_rerun_dump_removes_the_temporaries_a_kill_left(shards, tmp_path):
    """Killed inside an atomic write, a dump leaves `shard-N.npz.XXXX.tmp`; the rerun redoes that shard and removes it."""
    folder = tmp_path / "labels"
    dump_stage.dump(LevelTeacher, shards, str(folder))
    sidecar = sorted(folder.glob("shard-*.npz"))[0]
    sidecar.unlink()
    leftover = folder / (sidecar.name + ".k1ll3d.tmp")
    leftover.write_bytes(b"partial")
    report = dump_stage.dump(LevelTeacher, shards, str(folder))
    assert sidecar.exists() and not list(folder.glob("*.tmp")), report


def test_the_manifest_holds_the_code_histogram_whose_entropy_is_the_label_priors(shards, tmp_path):
    folder = tmp_path / "labels"
    dump_stage.dump(LevelTeacher, shards, str(folder))
    manifest = json.load(open(folder / "teacher.json"))
    codes = np.concatenate([z[k][:, 0] for f in sorted(folder.glob("*.npz")) for z in [np.load(f)] for k in z.files])
    p = np.bincount(codes) / len(codes)
    expected = -(p[p > 0] * np.log(p[p > 0])).sum()
    assert manifest["histogram"][0][:len(p)] == np.bincount(codes).tolist() and sum(manifest["histogram"][0]) == len(codes)
    assert label_entropy(manifest) == pytest.approx([expected])
    older = {k: v for k, v in manifest.items() if k != "histogram"}  # written before manifests had it
    assert label_entropy(older, str(folder)) == pytest.approx([expected]) and label_entropy(older) is None


def test_a_labels_folder_refuses_another_teacher(shards, tmp_path):
    folder = str(tmp_path / "labels")
    dump_stage.dump(LevelTeacher, shards, folder)

    class Other(LevelTeacher):
        config_hash = "level-v2"

    with pytest.raises(TeacherError, match="config_hash"):
        dump_stage.dump(Other, shards, folder)


def test_loader_refuses_missing_stale_and_misaligned_labels(shards, tmp_path):
    folder = str(tmp_path / "labels")
    cfg = StreamConfig(shards, crop_seconds=0.64, batch_size=2, num_workers=0, labels=(folder,))
    with pytest.raises(FileNotFoundError, match="teacher.json"):
        AudioLoader(cfg)
    dump_stage.dump(LevelTeacher, shards, folder)
    index = json.load(open(os.path.join(shards, "index.json")))
    first = index["shards"][0]["name"]

    manifest_path = os.path.join(folder, "teacher.json")
    manifest = json.load(open(manifest_path))
    json.dump({**manifest, "shards_content_hash": "0" * 64}, open(manifest_path, "w"))
    with pytest.raises(ValueError, match="teacher level .* stale"):
        AudioLoader(cfg)
    json.dump(manifest, open(manifest_path, "w"))

    sidecar = sidecar_path(folder, first)
    codes = dict(np.load(sidecar))
    os.remove(sidecar)
    with pytest.raises(FileNotFoundError, match=f"no labels for shard {first}"):
        AudioLoader(cfg)
    write_sidecar(sidecar, {key: value[:-1] for key, value in codes.items()})  # one frame short: misaligned
    with pytest.raises(LabelError, match="teacher level .* misaligned"):
        for _ in AudioLoader(StreamConfig(shards, crop_seconds=0.64, batch_size=1, num_workers=0, train=False, labels=(folder,))):
            pass


def test_encodec_dump_random_init(shards, tmp_path, caplog):
    folder = str(tmp_path / "encodec")
    with caplog.at_level(logging.WARNING, logger="musicpt.teachers.encodec"):
        encodec_main(["dump", "--shards", shards, "--labels", folder, "--random-init", "--device", "cpu"])
    manifest = json.load(open(os.path.join(folder, "teacher.json")))
    assert manifest["random_init"] is True and manifest["codebooks"] == 8 and manifest["cardinality"] == 1024
    assert any("random-init EnCodec" in r.getMessage() and folder in r.getMessage() for r in caplog.records)
    index = json.load(open(os.path.join(shards, "index.json")))
    for shard in index["shards"]:
        for key, codes in np.load(sidecar_path(folder, shard["name"])).items():
            assert codes.shape[1] == 8 and codes.dtype == np.int16 and codes.min() >= 0
    wave = torch.from_numpy(level_signal(100, 0))
    assert torch.equal(EncodecTeacher(random_init=True).encode(wave), EncodecTeacher(random_init=True).encode(wave))
    assert EncodecTeacher(random_init=True).encode(wave).shape == (100, 8)


def test_a_batched_encodec_dump_labels_each_segment_as_one_at_a_time(shards, tmp_path):
    """--batch encodes several segments of a shard together, zero-padded to the longest (the 24 kHz model is
    causal, so padding after a segment cannot change its codes); only float rounding of the batched kernels
    may flip a near-tied code, as another device would."""
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    encodec_main(["dump", "--shards", shards, "--labels", one, "--random-init", "--device", "cpu", "--batch", "1"])
    encodec_main(["dump", "--shards", shards, "--labels", four, "--random-init", "--device", "cpu", "--batch", "4"])
    same = total = 0
    for shard in json.load(open(os.path.join(shards, "index.json")))["shards"]:
        alone, batched = np.load(sidecar_path(one, shard["name"])), np.load(sidecar_path(four, shard["name"]))
        assert sorted(alone) == sorted(batched)
        for key in alone:
            assert batched[key].shape == alone[key].shape
            same, total = same + (batched[key] == alone[key]).sum(), total + alone[key].size
    assert same / total >= 0.99, same / total
    with pytest.raises(SystemExit):
        encodec_main(["dump", "--shards", shards, "--labels", str(tmp_path / "zero"), "--random-init", "--device", "cpu",
                      "--batch", "0"])


def test_the_dump_gives_batches_only_to_teachers_that_take_them(shards, tmp_path):
    class Batched(LevelTeacher):
        calls: list[int] = []

        def encode_batch(self, waves):
            Batched.calls.append(len(waves))
            return [self.encode(wave) for wave in waves]

    dump_stage.dump(Batched, shards, str(tmp_path / "batched"), batch=2)  # shards hold 1-2 segments
    dump_stage.dump(LevelTeacher, shards, str(tmp_path / "single"), batch=2)  # no encode_batch: one at a time
    assert max(Batched.calls) == 2 and sum(Batched.calls) == 8
    for shard in json.load(open(os.path.join(shards, "index.json")))["shards"]:
        a, b = np.load(sidecar_path(str(tmp_path / "batched"), shard["name"])), np.load(sidecar_path(str(tmp_path / "single"), shard["name"]))
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_encodec_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(TeacherError, match="missing.th: no such EnCodec weights file; download https://"):
        EncodecTeacher(weights=str(tmp_path / "missing.th"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)  # as on a machine without internet
    with pytest.raises(TeacherError, match="network is unreachable.*pass --weights PATH"):
        EncodecTeacher()


def test_random_init_encodec_has_the_same_hash_at_any_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = EncodecTeacher(random_init=True).config_hash
        torch.set_num_threads(2)
        assert EncodecTeacher(random_init=True).config_hash == one  # so a re-run can finish its labels folder
    finally:
        torch.set_num_threads(threads)
    assert EncodecTeacher(random_init=True, seed=1).config_hash != one


def test_dump_processes_on_a_node_with_several_gpus_take_one_each(monkeypatch):
    from data.cluster import local_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device("cuda") == "cuda"  # not one of several processes: torch's current device
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert local_device("cuda") == "cuda:2" and local_device("cpu") == "cpu" and local_device("cuda:3") == "cuda:3"
    monkeypatch.setenv("LOCAL_RANK", "5")  # torchrun's wins; more processes than GPUs share them in turn
    assert local_device("cuda") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM gave this task its own GPU
    assert local_device("cuda") == "cuda"
