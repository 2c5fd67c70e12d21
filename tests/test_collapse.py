"""What made training collapse the tiny encoder, each pinned by a test that failed before the fix:
the feature penalty counted padded frames and, at the tiny preset's scale, shrank the conv features until the
feature LayerNorm stopped normalising; PyTorch's default conv init left a GroupNorm-first stack (MERT-95M) with
near-zero features at init; the transformer lacked fairseq's BERT init."""
from __future__ import annotations

import pytest
import torch

from data.stream import AudioLoader
from pretrain.config import load_config
from pretrain.engine import _free_port, build_engine, init_distributed
from pretrain.metrics import Interval, Metrics
from pretrain.model import Encoder, EncoderConfig
from pretrain.objectives.masked import feature_penalty
from pretrain.objectives.mert import MertObjective
from pretrain.step import Progress, TrainStep
from pretrain.validate import collapse_stats

MERT_CONVS = EncoderConfig().conv_layers  # the real 512-channel stack, GroupNorm on the first conv only


def frame_variance(features: torch.Tensor) -> float:
    """Mean over frames of the variance over channels: what the feature LayerNorm divides by (plus its eps)."""
    return features.float().var(dim=-1, unbiased=False).mean().item()


def test_feature_penalty_counts_real_frames_only():
    features = torch.ones(2, 10, 4)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 6:] = True
    padded = features.clone()
    padded[1, 6:] = 100.0  # whatever the convs make of the zero padding
    assert feature_penalty(padded, padding).item() == pytest.approx(1.0)
    assert feature_penalty(features, None).item() == pytest.approx(1.0)


def test_conv_stack_keeps_its_scale_at_init():
    """fairseq's kaiming_normal_ init: the 7th conv of MERT-95M's stack is not orders of magnitude below the eps."""
    torch.manual_seed(0)
    cfg = EncoderConfig(layers=1, dim=64, heads=4, ffn_dim=64, pos_conv_kernel=16, pos_conv_groups=4)
    assert cfg.conv_layers == MERT_CONVS and cfg.conv_norm == "group"
    encoder = Encoder(cfg).eval()
    with torch.no_grad():
        features = encoder(0.1 * torch.randn(2, 24000))["features"]
    eps = encoder.feature_norm.eps
    assert frame_variance(features) > 100 * eps, frame_variance(features)
    normed = encoder.feature_norm(features)
    assert normed.var(dim=-1, unbiased=False).mean().item() > 0.9  # the LayerNorm really normalises


def test_transformer_blocks_have_bert_init():
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4 + ((16, 2, 2),) * 2, dim=256,
                                    layers=2, heads=4, ffn_dim=512, pos_conv_kernel=16, pos_conv_groups=4))
    for name, module in encoder.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - 0.02) < 0.002, name
            assert not module.bias.any(), name


@pytest.fixture
def world_of_one(monkeypatch):
    """A process group of one in this process for the test, then gone with its environment: later tests start
    trainers that would otherwise inherit RANK and MASTER_PORT and find the port taken."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    init_distributed(torch.device("cpu"))
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tiny_preset_training_keeps_its_features_and_output_from_collapsing(train_data, world_of_one):
    """100 steps of the tiny preset as configured: the conv features keep their scale and the output frames their
    rank. With HuBERT's penalty at weight 10 the conv features' variance fell ~100x within 100 steps (0.005, a few
    hundred times the LayerNorm eps; 0.45 without the penalty), and over 1,500 steps on real music the clip
    embeddings collapsed onto one direction. Without VICReg's terms (objective.vicreg_weight: 0, MERT's setting)
    the output frames' effective rank on a held-out batch fell from 35 at init to 13 within these 100 steps (with
    them: 37); in the learning benchmark the masked predictions then hardly beat the label prior and every probe's
    clip rank ended at 1 (docs/learning.md)."""
    shards, labels = train_data
    cfg = load_config("configs/tiny.yaml", [f"data.shards={shards}", f"data.labels=[{labels}]", "data.crop_seconds=1.0",
                                            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8",
                                            "train.steps=1000"])
    loader = AudioLoader(cfg.data, 0, 1)
    batches = iter(loader)
    held_out = next(batches)
    torch.manual_seed(0)
    encoder = Encoder(cfg.model)
    objective = MertObjective(cfg.objective, encoder, {m["teacher"]: m["codebook_sizes"] for m in loader.manifests})
    with torch.no_grad():
        initial = frame_variance(encoder.eval()(held_out["audio"], held_out["lengths"])["features"])
    initial_rank = collapse_stats(encoder, held_out["audio"], held_out["lengths"])["collapse/effective_rank"]
    objective.train()
    update = TrainStep(cfg, build_engine(objective, cfg), torch.device("cpu"), 0, 1, torch.Generator().manual_seed(0),
                       Progress(), Metrics(None, 0, 0), Interval())  # the trainer's update, as pretrain.train runs it
    for _ in range(100):
        update(batches)
    loader.close()
    with torch.no_grad():
        features = encoder.eval()(held_out["audio"], held_out["lengths"])["features"]
    assert frame_variance(features) > 0.1 * initial, (frame_variance(features), initial)
    rank = collapse_stats(encoder, held_out["audio"], held_out["lengths"])["collapse/effective_rank"]
    assert rank >= 0.7 * initial_rank, (rank, initial_rank)
