"""Embedding extraction: pooled layers equal the encoder's own outputs, windows, resume, bad audio, shards, baselines."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import tone, write
from data.audio import SAMPLE_RATE
from pretrain.config import load_config
from pretrain.downstream.extract import example_name
from pretrain.downstream.extract import main as extract_main
from pretrain.model import Encoder, conv_frames


def run(tmp_path, *args) -> dict:
    out = str(tmp_path / "features")
    extract_main(["--random-init", "configs/tiny.yaml", "--out", out, *args])
    rows = [json.loads(line) for line in open(os.path.join(out, "index.jsonl"))]
    return {"out": out, "rows": rows, "info": json.load(open(os.path.join(out, "info.json")))}


@pytest.fixture
def clips(tmp_path):
    folder = tmp_path / "audio"
    write(folder / "a.wav", tone(3.0, SAMPLE_RATE, 440), SAMPLE_RATE, subtype="FLOAT")
    write(folder / "sub" / "b.flac", tone(1.5, 48000, 220, channels=2), 48000)
    return folder


def tiny_encoder() -> Encoder:
    torch.manual_seed(0)  # what --random-init configs/tiny.yaml builds (seed 0)
    return Encoder(load_config("configs/tiny.yaml").model).eval()


def test_clip_means_equal_the_encoders_layers_averaged_over_real_frames(clips, tmp_path):
    result = run(tmp_path, "--input", str(clips), "--window-seconds", "1.0")
    assert result["info"]["layer_names"] == ["embedding", "layer_1", "layer_2"]
    rows = {row["clip"]: row for row in result["rows"]}
    assert sorted(rows) == ["a.wav", "sub/b.flac"]
    got = np.load(os.path.join(result["out"], rows["a.wav"]["path"]))
    audio = torch.from_numpy(tone(3.0, SAMPLE_RATE, 440)).view(3, SAMPLE_RATE)  # three 1 s windows
    with torch.no_grad():
        out = tiny_encoder()(audio, all_layers=True)
    expected = torch.stack([layer.mean(dim=(0, 1)) for layer in out["layers"]]).numpy()
    assert got.shape == (3, 64) and np.allclose(got[1:], expected, atol=1e-5)
    short = np.load(os.path.join(result["out"], rows["sub/b.flac"]["path"]))  # 1.5 s: a full and a padded window
    assert np.isfinite(short).all() and rows["sub/b.flac"]["seconds"] == pytest.approx(1.5, abs=0.01)


def test_windows_as_examples_with_mean_and_std_and_frames(clips, tmp_path):
    result = run(tmp_path, "--input", str(clips), "--window-seconds", "1.0", "--unit", "window",
                 "--pooling", "mean_std", "--frames")
    keys = [row["key"] for row in result["rows"]]
    assert keys == ["a.wav#0000", "a.wav#0001", "a.wav#0002", "sub/b.flac#0000", "sub/b.flac#0001"]
    assert np.load(os.path.join(result["out"], result["rows"][0]["path"])).shape == (3, 128)
    frames = np.load(os.path.join(result["out"], "frames", example_name("a.wav")))
    assert frames.shape == (3, 3 * conv_frames(SAMPLE_RATE, load_config("configs/tiny.yaml").model), 64)


def test_a_killed_run_resumes_and_bad_audio_is_skipped(clips, tmp_path):
    (clips / "broken.wav").write_bytes(b"RIFF not really a wav file")
    first = run(tmp_path, "--input", str(clips), "--limit", "1")
    assert [row["clip"] for row in first["rows"]] == ["a.wav"]
    path = os.path.join(first["out"], first["rows"][0]["path"])
    stamp = os.stat(path).st_mtime_ns
    with open(os.path.join(first["out"], "index.jsonl"), "a") as file:
        file.write('{"key": "sub/b.flac", "clip": "sub/b.fl')  # a row torn by a kill
    again = run(tmp_path, "--input", str(clips))
    assert sorted(row["clip"] for row in again["rows"]) == ["a.wav", "sub/b.flac"]
    assert os.stat(path).st_mtime_ns == stamp  # not redone
    skipped = [json.loads(line) for line in open(os.path.join(again["out"], "skipped.jsonl"))]
    assert [s["clip"] for s in skipped] == ["broken.wav"] and skipped[0]["reason"].startswith("undecodable: ")
    assert "undecodable: undecodable" not in skipped[0]["reason"]  # the reason once, then the detail
    with pytest.raises(SystemExit, match="other settings"):
        run(tmp_path, "--input", str(clips), "--pooling", "mean_std")


def test_shards_baselines_and_patchout(train_data, tmp_path):
    shards, _ = train_data
    index = json.load(open(os.path.join(shards, "index.json")))
    out = str(tmp_path / "mfcc")
    extract_main(["--baseline", "mfcc", "--input", shards, "--out", out, "--pooling", "mean_std"])
    rows = [json.loads(line) for line in open(os.path.join(out, "index.jsonl"))]
    assert len(rows) == sum(s["samples"] for s in index["shards"])
    assert np.load(os.path.join(out, rows[0]["path"])).shape == (1, 78)  # 39-d MFCC: mean and std
    full = run(tmp_path / "full", "--input", shards, "--limit", "2")
    fast = run(tmp_path / "fast", "--input", shards, "--limit", "2", "--patchout", "3")
    a, b = (np.load(os.path.join(r["out"], r["rows"][0]["path"])) for r in (full, fast))
    assert a.shape == b.shape and not np.allclose(a, b) and fast["info"]["patchout"] == 3


def test_logmel_baseline_is_the_mean_and_std_of_log_mel_frames(clips, tmp_path):
    from data.features import FeatureConfig, FeatureExtractor

    out = str(tmp_path / "logmel")
    extract_main(["--baseline", "logmel", "--input", str(clips), "--out", out, "--pooling", "mean_std"])
    info = json.load(open(os.path.join(out, "info.json")))
    assert info["layer_names"] == ["logmel"] and info["dim"] == 229 and info["model"] == {"baseline": "logmel"}
    row = next(json.loads(line) for line in open(os.path.join(out, "index.jsonl")) if '"a.wav"' in line)
    got = np.load(os.path.join(out, row["path"]))
    audio = np.pad(tone(3.0, SAMPLE_RATE, 440), (0, 2 * SAMPLE_RATE))  # one 5 s window, 3 s real
    frames = FeatureExtractor(FeatureConfig(kind="logmel"))(torch.from_numpy(audio))[:3 * 75].double()
    expected = torch.cat([frames.mean(0), frames.std(0, unbiased=False)]).numpy()
    assert got.shape == (1, 458) and np.allclose(got[0], expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["mert", "bestrq"])
def test_random_init_uses_the_configs_train_seed_like_the_trainer(clips, tmp_path, kind):
    from omegaconf import OmegaConf

    raw = OmegaConf.load("configs/tiny.yaml")
    raw.train.seed = 7
    if kind == "bestrq":  # a BEST-RQ run's config.yaml: no labels
        raw.objective.kind, raw.data.labels = "bestrq", []
    config = str(tmp_path / "seeded.yaml")
    OmegaConf.save(raw, config)
    out = str(tmp_path / "seeded")
    extract_main(["--random-init", config, "--input", str(clips), "--out", out, "--window-seconds", "1.0", "--limit", "1"])
    assert json.load(open(os.path.join(out, "info.json")))["model"]["seed"] == 7
    got = np.load(os.path.join(out, json.loads(open(os.path.join(out, "index.jsonl")).readline())["path"]))
    torch.manual_seed(7)  # what pretrain.train does before building its model: its step-0 weights
    encoder = Encoder(load_config(config).model).eval()
    with torch.no_grad():
        out_layers = encoder(torch.from_numpy(tone(3.0, SAMPLE_RATE, 440)).view(3, SAMPLE_RATE), all_layers=True)["layers"]
    expected = torch.stack([layer.mean(dim=(0, 1)) for layer in out_layers]).numpy()
    assert np.allclose(got[1:], expected, atol=1e-5)


def test_a_float_wav_with_nan_or_inf_samples_is_skipped_with_the_sharders_reason(clips, tmp_path):
    for name, bad in (("nan.wav", np.nan), ("inf.wav", np.inf)):
        audio = tone(2.0, SAMPLE_RATE, 330)
        audio[1000] = bad
        write(clips / name, audio, SAMPLE_RATE, subtype="FLOAT")
    result = run(tmp_path, "--input", str(clips))
    assert sorted(row["clip"] for row in result["rows"]) == ["a.wav", "sub/b.flac"]
    skipped = {s["clip"]: s["reason"] for s in map(json.loads, open(os.path.join(result["out"], "skipped.jsonl")))}
    assert skipped == {"inf.wav": "non_finite: 1 NaN or Inf samples", "nan.wav": "non_finite: 1 NaN or Inf samples"}
