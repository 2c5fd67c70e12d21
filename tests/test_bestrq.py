"""BEST-RQ targets (pretrain/objectives/bestrq.py): deterministic from the seed, the same for every Objective built (every rank),
outside the module tree, local to the audio they describe; a tiny model learns them; an end-to-end run with
objective.kind=bestrq and no data.labels trains, checkpoints and resumes exactly."""
from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from data.audio import FRAME_SAMPLES
from pretrain.objectives.bestrq import BestRQObjective, RandomProjectionQuantizer
from pretrain.objectives.masked import normalise
from pretrain.config import load_config
from pretrain.export import load_encoder
from pretrain.model import Encoder
from test_model import TINY
from test_train import run, straight_and_resumed

CFG = load_config("configs/tiny.yaml", ["objective.kind=bestrq", "data.labels=[]", "objective.bestrq.codebooks=2",
                                        "objective.bestrq.codebook_size=256", "objective.cqt_weight=0"]).objective


def music(seconds: float = 2.0, seed: int = 0, items: int = 2) -> torch.Tensor:
    """Notes of random pitch every 0.25 s with a little noise: audio whose spectrum changes over time."""
    g = torch.Generator().manual_seed(seed)
    samples = int(seconds * 24000)
    t = torch.arange(samples) / 24000
    note = (t * 4).long()  # a new note every 0.25 s
    pitch = 110 * 2 ** (torch.randint(0, 36, (items, int(note.max()) + 1), generator=g) / 12)
    phase = 2 * math.pi * torch.cumsum(pitch[:, note] / 24000, dim=1)
    return 0.3 * torch.sin(phase) + 0.3 * torch.sin(2 * phase) / 2 + 0.01 * torch.randn(items, samples, generator=g)


def objective(seed: int = 0, cfg=CFG) -> BestRQObjective:
    torch.manual_seed(seed)
    return BestRQObjective(cfg, Encoder(TINY))


def test_targets_depend_only_on_the_seed_and_stay_out_of_the_module_tree():
    audio, lengths = music(), torch.tensor([48000, 36000])
    a, b = objective(seed=1), objective(seed=2)  # two ranks (or a resumed run): other torch RNG states, same targets
    assert not torch.equal(a.heads["bestrq_0"].weight, b.heads["bestrq_0"].weight)
    codes = a.targets(audio, lengths)
    assert codes.shape == (2, 48000 // FRAME_SAMPLES, 2) and codes.dtype == torch.int64
    assert torch.equal(codes, b.targets(audio, lengths))
    assert (codes[1, 36000 // FRAME_SAMPLES:] == -1).all() and (codes[1, :36000 // FRAME_SAMPLES] >= 0).all()
    other = objective(cfg=dataclasses.replace(CFG, bestrq=dataclasses.replace(CFG.bestrq, seed=1))).targets(audio, lengths)
    assert (other != codes).float().mean() > 0.5  # another seed, another quantizer
    assert not torch.equal(codes[..., 0], codes[..., 1])  # each codebook has its own projection
    # Not parameters, not buffers: not in the optimizer, the checkpoint or the export, and never cast to bf16.
    keys = set(a.state_dict())
    assert keys == {f"encoder.{k}" for k in a.encoder.state_dict()} | {f"heads.bestrq_{i}.{p}" for i in (0, 1)
                                                                        for p in ("weight", "bias")}
    a.to(torch.bfloat16)
    assert a._quantizer.projection.dtype == torch.float32 and torch.equal(a.targets(audio, lengths), codes)


def test_codes_are_spread_and_change_where_the_audio_changes():
    q = RandomProjectionQuantizer(CFG.bestrq)
    audio, lengths = music(items=1), torch.tensor([48000])
    codes = q.codes(audio, lengths)[0, :, 0]
    assert len(codes.unique()) >= 20, codes.unique()  # normalised frames do not all fall on a few codes
    changed = audio.clone()
    changed[0, 24000:30000] = music(seconds=0.25, seed=7, items=1)[0]  # one note replaced by another
    new = q.codes(changed, lengths)[0, :, 0]
    inside = slice(24000 // 320 + 4, 30000 // 320 - 4)  # frames whose whole window lies in the new note
    assert (new[inside] != codes[inside]).float().mean() > 0.8


def test_instance_norm_uses_real_frames_only_and_stacking_keeps_the_sub_frames_in_order():
    feats, real = torch.randn(2, 10, 3) * 5 + 3, torch.ones(2, 10, dtype=torch.bool)
    real[1, 6:] = False
    out = normalise(feats, real)
    assert torch.allclose(out[0].mean(0), torch.zeros(3), atol=1e-5) and torch.allclose(out[0].std(0, correction=0), torch.ones(3))
    assert torch.allclose(out[1, :6], normalise(feats[1:, :6], real[1:, :6])[0], atol=1e-5) and not out[1, 6:].any()
    q = RandomProjectionQuantizer(dataclasses.replace(CFG.bestrq, stack=4, n_mels=16))
    audio = music(seconds=1.0, items=1)
    stacked = q.stacked_features(audio, torch.tensor([24000]))
    fine = q.features(audio)[:, :75 * 4]  # log-mel at hop 80: 4 per label frame
    assert stacked.shape == (1, 75, 64)
    assert torch.allclose(stacked[0, 10].view(4, 16), normalise(fine, torch.ones(1, 300, dtype=torch.bool))[0, 40:44])


def held_note(hz: float, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * 24000)) / 24000
    return 0.3 * torch.sin(2 * math.pi * hz * t) + 0.1 * torch.sin(4 * math.pi * hz * t)


def test_clip_norm_keeps_a_held_note_in_the_codes_and_bin_norm_takes_it_out():
    notes = torch.stack([held_note(220.0), held_note(330.0)])  # two crops, each one note held throughout
    g = torch.Generator().manual_seed(0)
    notes = notes + 1e-3 * torch.randn(notes.shape, generator=g)
    lengths = torch.tensor([24000, 24000])
    middle = slice(10, 65)  # 55 frames whose window lies inside the crop
    for norm, most_codes in (("bin", None), ("clip", 8)):
        codes = RandomProjectionQuantizer(dataclasses.replace(CFG.bestrq, norm=norm)).codes(notes, lengths)[:, middle]
        for book in range(CFG.bestrq.codebooks):
            first, second = (set(codes[i, :, book].tolist()) for i in range(2))
            if norm == "bin":  # a held note is its crop's average: what is left, and coded, is the noise
                assert min(len(first), len(second)) > 25 and first & second, (first, second)
            else:  # one mean and std per crop: the note's harmonics stay, and each crop keeps to its own few codes
                assert max(len(first), len(second)) <= most_codes and not first & second, (first, second)


def test_clip_norm_is_one_mean_and_std_over_the_real_frames():
    feats, real = torch.randn(2, 10, 3) * 5 + 3, torch.ones(2, 10, dtype=torch.bool)
    real[1, 6:] = False
    out = normalise(feats, real, (1, 2))
    assert torch.allclose(out[0].mean(), torch.tensor(0.0), atol=1e-5) and torch.allclose(out[0].std(correction=0), torch.tensor(1.0))
    assert torch.allclose(out[1, :6], normalise(feats[1:, :6], real[1:, :6], (1, 2))[0], atol=1e-5) and not out[1, 6:].any()
    assert not torch.allclose(out[0].mean(0), torch.zeros(3), atol=1e-2)  # the bins keep their differences


def test_a_tiny_model_learns_the_codes_of_masked_frames():
    model = objective().train()
    audio, lengths = music(seconds=1.5), torch.tensor([36000, 30000])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, logs = model(audio, lengths, {}, torch.Generator().manual_seed(0))  # fixed batch, fixed mask
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert not [n for n, p in model.named_parameters() if p.grad is None]
            assert {"loss/bestrq_0", "loss/bestrq_1", "acc/bestrq_0", "acc/bestrq_1", "masked_frames"} <= set(logs)
            assert "loss/cqt" not in logs and logs["loss/bestrq_0"] == pytest.approx(math.log(256), abs=0.5)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_making_the_targets_needs_no_host_sync():
    """As test_objective's check: on the `meta` device any read of a device value on the host raises."""
    model = objective().train().to("meta")
    loss, logs = model(music().to("meta"), torch.tensor([48000, 36000]), {}, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.device.type == "meta" and all(p.grad is not None for p in model.heads.parameters())
    assert {"loss/bestrq_1", "acc/bestrq_1"} <= set(logs)


def test_teacher_labels_are_refused():
    with pytest.raises(ValueError, match="data.labels"):
        BestRQObjective(CFG, Encoder(TINY), {"km": [8]})


def bestrq_command(shards: str, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml", "objective.kind=bestrq",
            "data.labels=[]", "objective.bestrq.codebook_size=256", "objective.bestrq.codebooks=2",
            "objective.mask_length=10", f"data.shards={shards}", "data.crop_seconds=1.0", "data.batch_size=2",
            "data.shuffle_buffer=8", f"train.run_dir={run_dir}", "train.log_every=1", "train.log_samples=true", *extra]


@pytest.mark.slow
def test_bestrq_run_without_labels_resumes_exactly(train_data, tmp_path):
    shards = train_data[0]  # audio only: the k-means labels beside it are not read
    a, wb = straight_and_resumed(bestrq_command, shards, tmp_path)
    assert {"loss/bestrq_0", "acc/bestrq_1", "eval/loss/bestrq_0", "collapse/effective_rank"} <= set().union(*a)
    assert not any("quantizer" in k or "codebooks" in k for k in wb)  # regenerated from the seed, not saved

    resumed = tmp_path / "resumed"
    refused = run(bestrq_command(shards, resumed, "train.steps=7", "objective.bestrq.seed=1"), expect_ok=False)
    assert refused.returncode and "objective.bestrq.seed: 0 then, 1 now" in refused.stderr
    out = tmp_path / "encoder.pt"
    run([sys.executable, "-m", "pretrain.export", "--ckpt", str(resumed), "--out", str(out)])
    encoder = load_encoder(str(out))
    assert all(torch.equal(wb[f"encoder.{k}"], v) for k, v in encoder.state_dict().items())
