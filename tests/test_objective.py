"""The objective: span masking, mixup, loss on masked frames only, CQT alignment, a tiny model that learns."""
from __future__ import annotations

import dataclasses

import torch

from pretrain.model import Encoder, conv_frames
from pretrain.objectives import ObjectiveConfig
from pretrain.objectives.masked import noise_mixup, span_mask
from pretrain.objectives.mert import MertObjective
from test_model import TINY

SIZES = {"km": [7, 5]}


def batch(seed: int = 0, items: int = 2, samples: int = 16000):
    g = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(items, samples, generator=g)
    lengths = torch.tensor([samples] + [samples * 3 // 4] * (items - 1))
    codes = torch.stack([torch.randint(0, 5, (items, samples // 320), generator=g) for _ in range(2)], dim=-1)
    return audio, lengths, {"km": codes}


def test_span_masking_statistics_and_padding():
    g = torch.Generator().manual_seed(0)
    mask = span_mask(torch.tensor([1000] * 50 + [600] * 50), 1000, 0.8, 5, g)
    fraction = mask[:50].float().mean().item()
    assert 0.5 < fraction < 0.66, fraction  # 160 spans of 5 over 1000 frames, overlapping: ~58%
    assert not mask[50:, 600:].any() and 0.5 < mask[50:, :600].float().mean() < 0.66
    assert not span_mask(torch.tensor([3]), 10, 0.8, 5).any()  # shorter than a span: nothing to mask


def test_mixup_respects_its_probability_and_lengths():
    audio, lengths = torch.randn(8, 24000), torch.tensor([24000] * 4 + [12000] * 4)
    cfg = ObjectiveConfig()
    assert torch.equal(noise_mixup(audio, lengths, dataclasses.replace(cfg, mixup_prob=0.0)), audio)
    always = noise_mixup(audio, lengths, dataclasses.replace(cfg, mixup_prob=1.0))
    assert all(not torch.equal(always[i], audio[i]) for i in range(8))
    assert torch.equal(always[4:, 12000:], audio[4:, 12000:])  # nothing added to padding
    g = torch.Generator().manual_seed(0)
    changed = sum(int(not torch.equal(noise_mixup(audio, lengths, cfg, g)[i], audio[i])) for _ in range(50) for i in range(8))
    assert 0.4 < changed / 400 < 0.6


def objective(seed: int = 0, **kw) -> MertObjective:
    torch.manual_seed(seed)
    return MertObjective(ObjectiveConfig(**kw), Encoder(TINY), SIZES)


def test_loss_only_depends_on_masked_frames():
    model = objective().eval()
    audio, lengths, labels = batch()
    loss, logs = model(audio, lengths, labels, torch.Generator().manual_seed(1))
    mask = span_mask(model.encoder.frames(lengths), conv_frames(16000, TINY), 0.8, 5, torch.Generator().manual_seed(1))
    changed = labels["km"].clone()
    frames = mask.shape[1]
    changed[:, :frames][~mask] = (changed[:, :frames][~mask] + 1) % 5
    changed[:, frames:] = 0
    loss_changed, _ = model(audio, lengths, {"km": changed}, torch.Generator().manual_seed(1))
    assert torch.equal(loss, loss_changed) and logs["masked_frames"] == mask.sum()
    changed[:, :frames][mask] = (changed[:, :frames][mask] + 1) % 5
    assert not torch.equal(loss, model(audio, lengths, {"km": changed}, torch.Generator().manual_seed(1))[0])
    assert {"loss/km_0", "loss/km_1", "acc/km_0", "loss/cqt", "feature_penalty"} <= set(logs)


def test_cqt_target_frame_is_centred_inside_the_encoder_frame():
    model = objective()
    samples, t = 16000, 20
    click = torch.zeros(1, samples)
    click[0, 320 * t + 320] = 1.0  # the centre of CQT frame t + 1
    cqt = model.cqt(click)[0].sum(0)  # energy per CQT frame
    assert int(cqt[1:].argmax()) == t  # after dropping frame 0, index t is the frame aligned with encoder frame t


def test_every_parameter_learns_and_a_tiny_model_overfits_a_batch():
    model = objective(mixup_prob=0.0).train()
    audio, lengths, labels = batch(items=2, samples=9600)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss, _ = model(audio, lengths, labels, torch.Generator().manual_seed(0))  # fixed batch, fixed mask
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert not [n for n, p in model.named_parameters() if p.grad is None]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_seed_same_loss():
    audio, lengths, labels = batch()
    a = objective(seed=3).train()(audio, lengths, labels, torch.Generator().manual_seed(5))[0]
    b = objective(seed=3).train()(audio, lengths, labels, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_mixup_adds_one_contiguous_segment_of_another_item():
    cfg = dataclasses.replace(ObjectiveConfig(), mixup_prob=1.0, mixup_segments=(1, 1), mixup_seconds=(0.5, 1.0))
    audio = torch.arange(1.0, 5.0)[:, None].repeat(1, 48000)  # item i is the constant i + 1
    mixed = noise_mixup(audio, torch.full((4,), 48000), cfg, torch.Generator().manual_seed(3))
    for i in range(4):
        added = mixed[i] - audio[i]
        where = added.nonzero().flatten()
        assert 12000 <= len(where) <= 24000 and int(where[-1] - where[0]) + 1 == len(where)
        assert len(added[where].unique()) == 1 and float(added[where][0]) in {1.0, 2.0, 3.0, 4.0} - {i + 1.0}


def test_a_training_step_needs_no_host_sync():
    """Forward and backward on the `meta` device, where tensors hold no values: anything that reads a device
    value on the host (`.item()`, boolean-mask indexing, `nonzero`) raises there. Lengths and the mask
    generator stay on the host, as the trainer passes them; layerdrop, mixup, labels and the CQT head are on."""
    model = objective(mixup_prob=1.0).train()
    model.encoder.cfg = dataclasses.replace(model.encoder.cfg, layerdrop=0.5)
    audio, lengths, labels = batch(items=3)
    labels["km"][1, :10] = -1  # frames without a label
    model.to("meta")
    loss, logs = model(audio.to("meta"), lengths, {k: v.to("meta") for k, v in labels.items()}, torch.Generator().manual_seed(0))
    loss.backward()
    reached = [model.encoder.extractor, model.encoder.projection, model.heads, model.cqt_head]  # (skipped blocks: none)
    assert loss.device.type == "meta" and all(p.grad is not None for part in reached for p in part.parameters())
    assert {"acc/km_0", "loss/cqt", "masked_frames"} <= set(logs)
