"""Spectrogram front ends (model.frontend logmel | cqt): label-rate frames aligned with the teachers', fp32
spectrograms whatever the model's precision, and the same encoder through training, resume, extraction, the
weights-only export, the remote-code Hugging Face export and train.init_from."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import tone, write
from data.audio import SAMPLE_RATE
from pretrain.config import ConfigError, load_config
from pretrain.downstream.export_hf import export_hf
from pretrain.downstream.extract import main as extract_main
from pretrain.export import export, load_encoder
from pretrain.init_from import initial_weights
from pretrain.model import Encoder, EncoderConfig
from data.features import FeatureConfig, FeatureExtractor
from test_train import command, final_weights, run

SMALL = dict(dim=48, layers=2, heads=4, ffn_dim=96, pos_conv_kernel=16, pos_conv_groups=4, dropout=0.0,
             attention_dropout=0.0, layerdrop=0.0, stem_channels=8)
FRONTENDS = ["logmel", "cqt"]


def encoder(frontend: str, seed: int = 0, **changes) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(EncoderConfig(frontend=frontend, **{**SMALL, **changes})).eval()


@pytest.mark.parametrize("frontend, stem, features", [("logmel", "conv2d", 8 * 32), ("cqt", "conv2d", 8 * 42),
                                                      ("logmel", "conv1d", 8)])
def test_one_frame_per_label_frame_and_padding_from_lengths(frontend, stem, features):
    model = encoder(frontend, stem=stem)
    audio = 0.1 * torch.randn(2, SAMPLE_RATE)
    with torch.no_grad():
        out = model(audio, torch.tensor([SAMPLE_RATE, 10_000]))
    assert out["x"].shape[1] == model.frames(SAMPLE_RATE) == SAMPLE_RATE // 320 == 75
    assert out["features"].shape[2] == model.cfg.feature_dim == features  # 128 mel / 168 CQT bins, halved twice
    assert out["padding"].sum(1).tolist() == [0, 75 - 10_000 // 320]


def test_logmel_is_the_teachers_log_mel_on_the_same_frames_then_standardised_per_clip():
    """Frame t's window is centred on sample 320 t + 160 as the k-means teachers' features are (data/features.py):
    away from the clip's edges (where we pad with zeros and they reflect) the log-mel bands are theirs."""
    model = encoder("logmel")
    audio = torch.from_numpy(tone(2.0, SAMPLE_RATE, 330.0) + tone(2.0, SAMPLE_RATE, 1234.0, amp=0.1))[None]
    theirs = FeatureExtractor(FeatureConfig(kind="logmel", n_mels=128, f_min=0.0))(audio)[0].T  # [128, 150]
    ours = model.spectrogram.log_power(audio)[0]
    assert ours.shape == theirs.shape == (128, 150)
    assert torch.allclose(ours[:, 4:-4], theirs[:, 4:-4], atol=1e-3)
    normalised = model.spectrogram(audio)[0]
    assert abs(float(normalised.mean())) < 1e-4 and float(normalised.std(correction=0)) == pytest.approx(1.0, abs=1e-3)


def test_cqt_puts_a_tone_on_its_pitchs_bin():
    model = encoder("cqt")
    a4 = torch.from_numpy(tone(2.0, SAMPLE_RATE, 440.0))[None]
    peak = model.spectrogram.log_power(a4)[0, :, 10:-10].argmax(0)
    assert (peak == round(24 * np.log2(440.0 / 32.7))).all()  # 24 bins per octave from C1: A4 is bin 90


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_padded_clip_sees_the_spectrogram_it_has_alone(frontend):
    model = encoder(frontend)
    audio = 0.1 * torch.randn(2, SAMPLE_RATE)
    audio[1, 10_000:] = 0
    lengths = torch.tensor([SAMPLE_RATE, 10_000])
    batched = model.spectrogram(audio, model.frames(lengths))[1]
    alone = model.spectrogram(audio[1:, :10_000], model.frames(lengths[1:]))[0]
    # nnAudio's CQT low-passes and halves the whole input once per octave, so the zeros after a clip move its
    # values slightly (up to ~0.05 of the log magnitude in its last frames)
    assert torch.allclose(batched[:, : alone.shape[1]], alone, atol=1e-5 if frontend == "logmel" else 0.1)
    assert (batched[:, alone.shape[1]:] == 0).all()


def test_a_bf16_model_computes_its_spectrogram_in_fp32_and_every_parameter_learns():
    model = encoder("logmel").train()
    audio = 0.1 * torch.randn(2, 16_000)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, 10:20] = True
    out = model(audio, torch.tensor([16_000, 12_000]), mask)
    (out["x"].square().mean() + out["features"].square().mean()).backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    half = encoder("logmel").to(torch.bfloat16)
    spectrogram = half.spectrogram(audio.to(torch.bfloat16))
    assert spectrogram.dtype == torch.float32
    assert torch.allclose(spectrogram, encoder("logmel").spectrogram(audio), atol=0.05)
    assert half(audio)["x"].dtype == torch.bfloat16


def test_config_names_a_bad_frontend_and_a_hop_off_the_label_rate():
    with pytest.raises(ConfigError, match="model.frontend='mel'"):
        load_config("configs/tiny.yaml", ["model.frontend=mel"])
    with pytest.raises(ConfigError, match="model.hop=160"):
        load_config("configs/tiny.yaml", ["model.frontend=logmel", "model.hop=160"])
    assert load_config("configs/tiny.yaml", ["model.frontend=cqt"]).model.stride == 320


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_remote_code_hugging_face_export_equals_ours_and_warm_starts_an_equal_encoder(frontend, tmp_path):
    transformers = pytest.importorskip("transformers")
    source = encoder(frontend, seed=3)
    path = str(tmp_path / "encoder.pt")
    torch.save({"format": "musicpt-encoder-v1", "config": json.dumps(dataclasses.asdict(source.cfg)), "step": 7,
                "state_dict": source.state_dict()}, path)
    assert load_encoder(path).cfg == source.cfg
    report = export_hf(path, str(tmp_path / "hf"))
    assert report["remote_code"] and {"modeling_musicpt.py", "musicpt_encoder.py"} <= set(os.listdir(tmp_path / "hf"))
    model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    audio = 0.1 * torch.randn(2, 20_000)
    audio[1, 14_000:] = 0
    mask = (torch.arange(20_000)[None] < torch.tensor([[20_000], [14_000]])).long()
    with torch.no_grad():
        theirs = model(audio, attention_mask=mask, output_hidden_states=True)
        ours = source(audio, mask.sum(1), all_layers=True)
    assert torch.allclose(theirs.last_hidden_state, ours["x"], atol=1e-5)
    assert all(torch.allclose(t, o, atol=1e-5) for t, o in zip(theirs.hidden_states, [ours["embedding"], *ours["layers"]]))
    for start in (path, str(tmp_path / "hf")):  # train.init_from: our export and its Hugging Face folder
        weights = initial_weights(start, encoder(frontend, seed=9))
        assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match=f"model.frontend: '{frontend}' there, 'waveform' here"):
        initial_weights(str(tmp_path / "hf"), Encoder(dataclasses.replace(source.cfg, frontend="waveform")))


def test_extraction_pools_the_spectrogram_encoders_layers(tmp_path):
    write(tmp_path / "audio" / "a.wav", tone(2.0, SAMPLE_RATE, 440), SAMPLE_RATE, subtype="FLOAT")
    config = tmp_path / "logmel.yaml"
    config.write_text(open("configs/tiny.yaml").read().replace("model:\n", "model:\n  frontend: logmel\n", 1))
    out = str(tmp_path / "features")
    extract_main(["--random-init", str(config), "--input", str(tmp_path / "audio"), "--out", out,
                  "--window-seconds", "1.0"])
    row = json.loads(open(os.path.join(out, "index.jsonl")).readline())
    got = np.load(os.path.join(out, row["path"]))
    torch.manual_seed(0)  # --random-init: the trainer's step-0 weights for the config's train.seed (0)
    model = Encoder(load_config(str(config)).model).eval()
    with torch.no_grad():
        out_ = model(torch.from_numpy(tone(2.0, SAMPLE_RATE, 440)).view(2, SAMPLE_RATE), all_layers=True)
    expected = torch.stack([out_["embedding"].mean((0, 1))] + [layer.mean((0, 1)) for layer in out_["layers"]]).numpy()
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_a_logmel_run_trains_resumes_exports_and_warm_starts_another(train_data, tmp_path):
    run_dir, extra = tmp_path / "run", ["model.frontend=logmel", "model.stem_channels=8", "optim.lr=1e-3"]
    run(command(train_data, run_dir, *extra, "train.steps=2", "train.save_every=2"))
    resumed = run(command(train_data, run_dir, *extra, "train.steps=3", "train.save_every=1"))
    assert "resumed from" in resumed.stderr
    report = export(str(run_dir), str(tmp_path / "model.pt"))
    assert report["step"] == 3
    trained = {k.removeprefix("encoder."): v for k, v in final_weights(run_dir, 3).items() if k.startswith("encoder.")}
    assert all(torch.equal(load_encoder(str(tmp_path / "model.pt")).state_dict()[k], v) for k, v in trained.items())
    warm = tmp_path / "warm"
    done = run(command(train_data, warm, *extra, "train.steps=1", f"train.init_from={tmp_path / 'model.pt'}",
                       "optim.lr=1e-9"))
    assert "encoder initialised from" in done.stderr


def test_the_95m_log_mel_preset_is_mert_95m_with_the_log_mel_front_end():
    waveform = load_config("configs/mert_95m.yaml", ["data.shards=x", "data.labels=[x]"])
    logmel = load_config("configs/mert_logmel_95m.yaml", ["data.shards=x", "data.labels=[x]"])
    differ = {k for k, v in dataclasses.asdict(logmel.model).items() if dataclasses.asdict(waveform.model)[k] != v}
    assert differ == {"frontend", "stem_channels"} and logmel.model.frontend == "logmel"
    assert (logmel.objective, logmel.optim, logmel.data) == (waveform.objective, waveform.optim, waveform.data)
    with torch.device("meta"):
        count = sum(p.numel() for p in Encoder(logmel.model).parameters())
    assert 85e6 < count < 95e6  # the conv extractor's 4.2M out, the stem and a wider projection in
