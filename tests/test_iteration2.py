"""HuBERT's second iteration (MusicHuBERT's too): k-means over a trained encoder's layer
(teachers/encoder_features.py, `features: {kind: encoder, ckpt: RUN, layer: L}`), dumped as labels a run reads."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from data.audio import FRAME_SAMPLES
from data.stream import AudioLoader, StreamConfig
from pretrain.export import FORMAT
from pretrain.model import Encoder
from teachers import TeacherError, dump as dump_stage
from teachers.encoder_features import EncoderFeatureConfig, EncoderFeatures
from data.files import fingerprint
from teachers.kmeans import KMeansConfig, KMeansTeacher, StreamSpec, fit, load_config
from teachers.kmeans import main as kmeans_main
from test_bestrq import music
from test_model import TINY
from test_train import metrics, run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """A tiny encoder (random init, as a trained one would be saved) in pretrain.export's format."""
    torch.manual_seed(0)
    encoder = Encoder(TINY)
    path = str(tmp_path_factory.mktemp("encoder") / "encoder.pt")
    torch.save({"format": FORMAT, "config": json.dumps(asdict(TINY)), "step": 0, "state_dict": encoder.state_dict()},
               path)
    return path


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_features_are_the_encoders_layer_at_the_label_rate(exported, layer):
    audio = music(seconds=1.0, items=2)
    extractor = EncoderFeatures(EncoderFeatureConfig(ckpt=exported, layer=layer))
    features = extractor(audio)
    frames = audio.shape[1] // FRAME_SAMPLES
    assert features.shape == (2, frames, TINY.dim) and features.dtype == torch.float32
    encoder = extractor.encoder
    captured = []
    hook = encoder.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        out = encoder(audio, all_layers=True)
    hook.remove()
    expected = [captured[0], *out["layers"][:-1], out["x"]][layer]  # pretrain.downstream.extract's layers
    real = expected.shape[1]
    assert real < frames and torch.equal(features[:, :real], expected)
    assert torch.equal(features[:, real:], expected[:, -1:].expand(-1, frames - real, -1))  # last frame repeated
    assert torch.allclose(extractor(audio[0]), features[0], atol=1e-5)  # one clip [N] as a batch of one


def test_a_missing_encoder_or_layer_is_refused_naming_it(exported, tmp_path):
    (tmp_path / "t.yaml").write_text(f"name: it2\nshards: {tmp_path}\nout: {tmp_path}/m\nstreams:\n"
                                     f"  - {{name: l3, k: 4, features: {{kind: encoder, ckpt: {exported}, layer: 3}}}}\n")
    with pytest.raises(TeacherError, match="layer=3.*layers 0 \\(embedding\\) to 2"):
        load_config(str(tmp_path / "t.yaml"))
    with pytest.raises(TeacherError, match="nowhere.*python -m pretrain.train"):
        load_config(str(tmp_path / "t.yaml"), ["streams=[{name: l1, k: 4, features: {kind: encoder, "
                                               f"ckpt: {tmp_path}/nowhere, layer: 1}}}}]"])


def test_kmeans_over_a_layer_dumps_labels_the_loader_reads(exported, train_data, tmp_path):
    shards = train_data[0]
    cfg = KMeansConfig(name="it2", shards=shards, out=str(tmp_path / "model"), labels=str(tmp_path / "labels"),
                       streams=[StreamSpec("layer1", 8, {"kind": "encoder", "ckpt": exported, "layer": 1})],
                       max_frames=2000, normalize=False)
    record = fit(cfg)
    assert record["settings"]["streams"][0]["features"] == {"kind": "encoder", "ckpt": os.path.abspath(exported),
                                                            "layer": 1, "fingerprint": fingerprint(exported)}
    report = dump_stage.dump(lambda: KMeansTeacher(cfg.out), shards, cfg.labels)
    assert report["manifest"] and report["usage"][0]["used"] > 1
    loader = AudioLoader(StreamConfig(shards, crop_seconds=1.0, batch_size=2, num_workers=0, labels=(cfg.labels,)))
    batch = next(iter(loader))
    codes = batch["labels"]["it2"]
    assert codes.shape == (2, 75, 1) and 0 <= int(codes.min()) and int(codes.max()) < 8
    teacher = KMeansTeacher(cfg.out)  # the codes are the nearest centroids of the encoder's layer 1
    for item, length in enumerate(batch["lengths"].tolist()):
        expected = teacher.encode(batch["audio"][item, :length])[:, 0]
        # a crop's frames see the same samples as the segment's only away from its edges (the encoder's context)
        agree = (codes[item, :length // FRAME_SAMPLES, 0] == expected).float().mean()
        assert agree > 0.5, agree


def test_labels_of_a_checkpoint_that_changed_are_refused_by_the_dump_and_the_loader(train_data, tmp_path):
    shards = train_data[0]
    source = str(tmp_path / "encoder.pt")
    torch.save({"format": FORMAT, "config": json.dumps(asdict(TINY)), "step": 0, "state_dict": Encoder(TINY).state_dict()},
               source)
    (tmp_path / "it2.yaml").write_text(
        f"name: it2\nshards: {shards}\nout: {tmp_path}/kmeans\nlabels: {tmp_path}/labels\nmax_frames: 500\n"
        f"streams:\n  - {{name: layer1, k: 4, features: {{kind: encoder, ckpt: {source}, layer: 1}}}}\n")
    for stage in ("fit", "dump"):
        kmeans_main([stage, "--config", str(tmp_path / "it2.yaml")])
    manifest = json.load(open(tmp_path / "labels" / "teacher.json"))
    assert manifest["sources"] == [{"path": source, "fingerprint": fingerprint(source), "layer": 1}]
    config = StreamConfig(shards, crop_seconds=1.0, batch_size=2, num_workers=0, labels=(str(tmp_path / "labels"),))
    AudioLoader(config)  # the same checkpoint: the labels load
    torch.manual_seed(1)  # another checkpoint under the same path (an iteration-1 run saved again, say)
    torch.save({"format": FORMAT, "config": json.dumps(asdict(TINY)), "step": 9, "state_dict": Encoder(TINY).state_dict()},
               source)
    with pytest.raises(ValueError, match="encoder.pt, which has changed since"):
        AudioLoader(config)
    with pytest.raises(SystemExit, match="has changed since the k-means fit"):
        kmeans_main(["dump", "--config", str(tmp_path / "it2.yaml"), f"labels={tmp_path}/labels2"])


@pytest.mark.slow
def test_a_run_trains_on_its_own_second_iteration_labels(train_data, tmp_path):
    """Iteration 1 (the k-means labels), then k-means over its layer 1, then iteration 2 on those labels."""
    shards, labels = train_data
    first, second = tmp_path / "iteration1", tmp_path / "iteration2"
    common = ["--config", "configs/tiny.yaml", f"data.shards={shards}", "data.crop_seconds=1.0", "data.batch_size=2",
              "data.shuffle_buffer=8", "train.steps=2", "train.log_every=1"]
    run([sys.executable, "-m", "pretrain.train", *common, f"data.labels=[{labels}]", f"train.run_dir={first}"])
    (tmp_path / "it2.yaml").write_text(
        f"name: it2\nshards: {shards}\nout: {tmp_path}/kmeans\nlabels: {tmp_path}/labels\nnormalize: false\n"
        f"max_frames: 2000\nstreams:\n  - {{name: layer1, k: 8, features: {{kind: encoder, ckpt: {first}, layer: 1}}}}\n")
    for stage in ("fit", "dump"):
        run([sys.executable, "-m", "teachers.kmeans", stage, "--config", str(tmp_path / "it2.yaml")])
    run([sys.executable, "-m", "pretrain.train", *common, f"data.labels=[{tmp_path}/labels]", f"train.run_dir={second}"])
    rows = metrics(second)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and "acc/it2_0" in rows[-1]
    assert np.isfinite(rows[-1]["loss/it2_0"])
