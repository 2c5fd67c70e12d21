"""train.init_from (pretrain/init_from.py): a warm start from our own export or a Hugging Face HubertModel folder
gives the encoder those weights at step 0; misfits are refused naming the setting; a resume does not need it."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

from pretrain.export import FORMAT
from pretrain.downstream.export_hf import export_hf
from pretrain.init_from import initial_weights
from pretrain.model import Encoder
from test_model import TINY
from test_train import final_weights, run


def source_encoder(seed: int = 3) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(TINY)


@pytest.fixture
def exported(tmp_path) -> str:
    path = str(tmp_path / "encoder.pt")
    torch.save({"format": FORMAT, "config": json.dumps(asdict(TINY)), "step": 7,
                "state_dict": source_encoder().state_dict()}, path)
    return path


def test_weights_come_from_our_export_and_from_its_hugging_face_folder(exported, tmp_path):
    expected = source_encoder().state_dict()
    fresh = Encoder(TINY)
    from_ours = initial_weights(exported, fresh)
    assert all(torch.equal(from_ours[k], v) for k, v in expected.items()) and from_ours.keys() == expected.keys()
    export_hf(exported, str(tmp_path / "hf"))
    from_hf = initial_weights(str(tmp_path / "hf"), fresh)  # q/k/v fused back, every name mapped back
    assert from_hf.keys() == expected.keys() and all(torch.equal(from_hf[k], v) for k, v in expected.items())


def test_a_source_of_another_architecture_is_refused_naming_the_setting(exported, tmp_path):
    with pytest.raises(ValueError, match="model.pre_ln: False there, True here"):
        initial_weights(exported, Encoder(dataclasses.replace(TINY, pre_ln=True)))
    with pytest.raises(ValueError, match=r"blocks.0.ffn.0.weight \(96, 48\) \(the run's model: \(64, 48\)\)"):
        initial_weights(exported, Encoder(dataclasses.replace(TINY, ffn_dim=64)))
    export_hf(exported, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="model.conv_norm: 'layer' there, 'group' here"):
        initial_weights(str(tmp_path / "hf"), Encoder(dataclasses.replace(TINY, conv_norm="group")))
    with pytest.raises(FileNotFoundError, match="nowhere: no such file"):
        initial_weights(str(tmp_path / "nowhere"), Encoder(TINY))


TINY_RUN = ["model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]", "model.dim=48",
            "model.layers=2", "model.heads=4", "model.ffn_dim=96", "model.pos_conv_kernel=16", "model.pos_conv_groups=4",
            "model.conv_norm=layer", "model.dropout=0.0", "model.attention_dropout=0.0", "model.layerdrop=0.0"]


@pytest.mark.slow
def test_a_run_starts_from_the_source_and_resumes_without_it(exported, train_data, tmp_path):
    shards, labels = train_data
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml", *TINY_RUN,
               f"data.shards={shards}", f"data.labels=[{labels}]", "data.crop_seconds=1.0", "data.batch_size=2",
               "data.shuffle_buffer=8", f"train.run_dir={run_dir}", "train.log_every=1", "optim.lr=1e-9"]
    done = run([*command, "train.steps=1", f"train.init_from={exported}"])
    assert "encoder initialised from" in done.stderr
    weights, source = final_weights(run_dir, 1), source_encoder().state_dict()
    assert all(torch.allclose(weights[f"encoder.{k}"], v, atol=1e-6) for k, v in source.items())  # lr ~0: the source
    os.remove(exported)  # a resume takes its checkpoint's weights and no longer needs the source
    resumed = run([*command, "train.steps=2", f"train.init_from={exported}"])
    assert "resumed from" in resumed.stderr and "initialised from" not in resumed.stderr


def test_a_randomly_initialised_transformers_hubert_folder_warm_starts_an_equal_encoder(tmp_path):
    """The released MERT-style checkpoints are HuBERT-shaped: a HubertModel saved by transformers (random init here,
    no download) loads into our encoder, whose hidden states then equal the model's."""
    transformers = pytest.importorskip("transformers")
    from pretrain.downstream.export_hf import hubert_config
    from test_export_hf import TOLERANCE, differences

    settings = {k: v for k, v in hubert_config(TINY).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(5)
    model = transformers.HubertModel(transformers.HubertConfig(**settings)).eval()
    model.save_pretrained(str(tmp_path / "hubert"))
    encoder = Encoder(TINY)
    encoder.load_state_dict(initial_weights(str(tmp_path / "hubert"), encoder))
    audio = 0.3 * torch.randn(2, 16000)
    assert max(differences(encoder.eval(), model, audio)) < TOLERANCE
