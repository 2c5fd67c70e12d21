"""data2vec / Music2Vec (pretrain/objectives/data2vec.py): the EMA teacher follows the student by the annealed decay, is fp32
and outside the module tree, gives instance-normalised targets that padding does not change (with
objective.data2vec.target_norm=batch or both, targets that keep what is constant through a crop); a tiny model learns them; an
end-to-end run with objective.kind=data2vec and no data.labels trains, checkpoints (with its teacher) and resumes
exactly."""
from __future__ import annotations

import dataclasses
import os
import random
import sys

import pytest
import torch

from pretrain.checkpoint import rank_file
from pretrain.config import ConfigError, load_config
from pretrain.objectives.data2vec import (Data2VecObjective, clip_contrast, clip_means, ema_decay, normalise_both,
                                         normalise_batch)
from pretrain.export import load_encoder
from pretrain.model import Encoder
from pretrain.objectives.masked import normalise, variance_covariance
from pretrain.validate import collapse_stats
from test_bestrq import music
from test_model import TINY
from test_train import command, final_weights, kill_when_logged, metrics, run, samples, straight_and_resumed

CFG = load_config("configs/tiny.yaml", ["objective.kind=data2vec", "data.labels=[]", "objective.data2vec.top_k=2",
                                        "objective.cqt_weight=0", "objective.mixup_prob=0",
                                        "objective.data2vec.ema_all=false"]).objective  # fairseq's default


def with_own(cfg, **settings):
    """`cfg` with objective.data2vec.* settings and shared objective.* settings replaced."""
    own = {k: v for k, v in settings.items() if hasattr(cfg.data2vec, k)}
    shared = {k: v for k, v in settings.items() if k not in own}
    return dataclasses.replace(cfg, data2vec=dataclasses.replace(cfg.data2vec, **own), **shared)


def objective(seed: int = 0, cfg=CFG) -> Data2VecObjective:
    torch.manual_seed(seed)
    return Data2VecObjective(cfg, Encoder(TINY))


def test_the_decay_anneals_linearly_then_stays():
    own = with_own(CFG, ema_decay=0.99, ema_end_decay=0.999, ema_anneal_steps=0).data2vec
    assert ema_decay(own, 0, 100) == pytest.approx(0.99)
    assert ema_decay(own, 50, 100) == pytest.approx(0.9945)
    assert ema_decay(own, 100, 100) == ema_decay(own, 500, 100) == 0.999
    assert ema_decay(dataclasses.replace(own, ema_anneal_steps=10), 10, 100) == 0.999


def test_without_ema_all_the_teacher_follows_the_student_blocks_only_and_stays_out_of_the_module_tree():
    model = objective()
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())  # a copy at the start
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.after_update(1, 10)
    decay = ema_decay(CFG.data2vec, 1, 10)
    student = model.encoder.state_dict()
    for name, value in model.teacher.state_dict().items():
        if name.startswith(("norm.", "blocks.")):
            assert torch.allclose(value, decay * before[name] + (1 - decay) * student[name], atol=1e-6), name
        else:  # the conv extractor, projection and positional conv are not followed (the student's are used)
            assert torch.equal(value, before[name]), name
    # Not parameters, not buffers: not in the optimizer or DeepSpeed's files, and never cast to bf16.
    assert set(model.state_dict()) == ({f"encoder.{k}" for k in model.encoder.state_dict()}
                                       | {"final_proj.weight", "final_proj.bias"})
    model.to(torch.bfloat16)
    assert model.teacher.blocks[0].ffn[0].weight.dtype == torch.float32


def test_with_ema_all_the_teacher_follows_every_weight_and_reads_the_clean_audio():
    model = objective(cfg=with_own(CFG, ema_all=True))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.after_update(1, 10)
    decay, student = ema_decay(CFG.data2vec, 1, 10), model.encoder.state_dict()
    followed = {k for k, v in model.teacher.state_dict().items() if not torch.equal(v, before[k])}
    assert "extractor.blocks.0.0.weight" in followed and "projection.weight" in followed
    assert "mask_embedding" not in followed  # the teacher never sees a mask
    for name in followed:
        assert torch.allclose(model.teacher.state_dict()[name], decay * before[name] + (1 - decay) * student[name],
                              atol=1e-6), name
    audio, lengths = music(items=2), torch.tensor([48000, 48000])
    out = model.encoder(audio, lengths)
    with torch.no_grad():  # the student's projected features are not used: the teacher runs on the audio itself
        targets = model.targets(torch.zeros_like(out["projected"]), out["padding"], audio, lengths)
    assert targets.abs().sum() > 0 and targets[0].mean(0).abs().max() < 1e-4


def test_targets_are_instance_normalised_over_real_frames_and_padding_changes_none():
    model = objective().eval()
    audio = music(items=2)
    audio[1, 36000:] = 0
    lengths = torch.tensor([48000, 36000])
    out = model.encoder(audio, lengths)
    targets = model.targets(out["projected"], out["padding"], audio, lengths)
    real = int((~out["padding"][1]).sum())
    assert targets.shape == out["x"].shape and targets.dtype == torch.float32
    # each of the top-k layers has mean 0 and std 1 per channel over the real frames: so has their mean's mean
    assert targets[1, :real].mean(0).abs().max() < 1e-4 and (targets[1, real:] == 0).all()
    alone = model.encoder(audio[1:, :36000], lengths[1:])
    alone_targets = model.targets(alone["projected"], alone["padding"], audio[1:, :36000], lengths[1:])
    assert torch.allclose(alone_targets[0, :real], targets[1, :real], atol=1e-4)


def test_batch_norm_targets_keep_what_is_constant_through_a_crop_and_ignore_padding():
    feats = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(0))
    feats[1] += 5.0  # crop 1 sits apart through all of its frames (a timbre, say)
    real = torch.ones(3, 20, dtype=torch.bool)
    real[2, 15:] = False
    feats[2, 15:] = 1e6  # padding
    batch = normalise_batch(feats, real)
    assert torch.allclose(batch[real].mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(batch[real].std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert (batch[2, 15:] == 0).all()
    assert (batch[1].mean(0) - batch[0].mean(0)).min() > 1.5  # crop 1's offset survives, in std units
    instance = normalise(feats, real)
    assert instance[1].mean(0).abs().max() < 1e-5  # the instance norm takes it away
    assert torch.allclose(normalise_both(feats, real), (instance + batch) / 2)  # "both": half of the offset
    model = objective(cfg=with_own(CFG, target_norm="batch")).eval()
    audio, lengths = music(items=2), torch.full((2,), 48000)
    out = model.encoder(audio, lengths)
    targets = model.targets(out["projected"], out["padding"], audio, lengths)
    assert targets.flatten(0, 1).mean(0).abs().max() < 1e-4 and targets[0].mean(0).abs().max() > 1e-2


def test_the_clip_term_asks_each_crop_to_pick_out_its_own_teacher_mean():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 16, generator=gen) + 10.0  # a large part shared by every crop: centred away
    own = clip_contrast(teacher * 3 - 5.0, teacher, 0.1)  # cosine of centred vectors: scale and offset do not matter
    shuffled = clip_contrast(teacher[torch.tensor([1, 2, 3, 4, 5, 0])], teacher, 0.1)
    assert own < 0.5 < torch.log(torch.tensor(6.0)) < shuffled
    assert clip_contrast(teacher[:1], teacher[:1], 0.1) == 0  # one crop: nothing to tell apart
    x, real = torch.randn(2, 5, 3, generator=gen), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    x[1, 2:] = 1e6  # padding stays out of the mean
    assert torch.allclose(clip_means(x, real), torch.stack([x[0].mean(0), x[1, :2].mean(0)]))


def train_tiny(cfg, steps: int) -> tuple[list[dict], Data2VecObjective]:
    """A tiny encoder trained `steps` updates on 4 fixed music crops with `cfg`: each update's logs, and the model."""
    torch.manual_seed(0)
    model = Data2VecObjective(cfg, Encoder(dataclasses.replace(TINY, dropout=0.0, attention_dropout=0.0)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    audio, lengths, history = music(items=4), torch.full((4,), 48000), []
    for step in range(steps):
        loss, logs = model(audio, lengths, {}, torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_update(step + 1, steps)
        history.append({name: value.item() for name, value in logs.items()})
    return history, model


def test_the_clip_term_is_learned_and_off_by_default():
    assert objective().clip_head is None and "clip_head.weight" not in objective().state_dict()  # checkpoints as before
    history, _ = train_tiny(with_own(CFG, clip_weight=1.0, ema_all=True), 30)
    clips = [logs["loss/clip"] for logs in history]
    assert sum(clips[-5:]) / 5 < 0.3 * sum(clips[:5]) / 5 and clips[-1] < 0.5, clips  # chance: ln 4 = 1.39
    with pytest.raises(ConfigError, match="objective.data2vec.clip_weight=-1"):
        load_config("configs/tiny.yaml", ["objective.kind=data2vec", "data.shards=x", "data.labels=[]",
                                          "objective.data2vec.top_k=2", "objective.data2vec.clip_weight=-1"])


@pytest.mark.parametrize("ema_all", [True, False])
def test_a_tiny_model_learns_the_targets(ema_all):
    history, _ = train_tiny(with_own(CFG, ema_decay=0.999, ema_end_decay=0.999,
                                                ema_all=ema_all), 40)
    losses, logs = [logs["loss/data2vec"] for logs in history], history[-1]
    assert losses[-1] < 0.65 * losses[0], losses  # a fixed teacher's (ema_all) targets fall slower: ~0.57 here
    assert logs["var/prediction"] > 0.05 and logs["var/target"] > 0.5  # learned, not collapsed onto a constant


def test_the_music2vec_preset_is_the_95m_encoder_on_data2vec_base_settings():
    cfg = load_config("configs/music2vec_95m.yaml", ["data.shards=/data/shards"])
    o = cfg.objective
    assert (o.kind, o.data2vec.top_k, o.mask_prob, o.mask_length, o.feature_penalty) == ("data2vec", 8, 0.65, 10, 0)
    assert o.data2vec.ema_all  # our default, not fairseq's (README)
    assert (cfg.model.dim, cfg.model.layers, cfg.model.conv_norm, cfg.data.labels) == (768, 12, "layer", ())


def test_smooth_l1_is_the_loss_with_a_beta():
    audio, lengths = music(items=2), torch.full((2,), 48000)
    losses = {}
    for beta in (0.0, 0.25, 1000.0):
        model = objective(cfg=with_own(CFG, loss_beta=beta)).eval()
        losses[beta] = model(audio, lengths, {}, torch.Generator().manual_seed(0))[1]["loss/data2vec"].item()
    assert losses[1000.0] * 2 * 1000.0 == pytest.approx(losses[0.0], rel=1e-4)  # errors < beta: 0.5 e^2 / beta
    assert losses[0.25] != pytest.approx(losses[0.0], rel=1e-2)
    with pytest.raises(ConfigError, match="objective.data2vec.loss_beta=-1"):
        load_config("configs/tiny.yaml", ["objective.kind=data2vec", "data.shards=x", "data.labels=[]",
                                          "objective.data2vec.top_k=2", "objective.data2vec.loss_beta=-1"])


def test_labels_and_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="data.labels"):
        Data2VecObjective(CFG, Encoder(TINY), {"km": [8]})
    base = ["objective.kind=data2vec", "data.shards=x"]
    with pytest.raises(ConfigError, match="data.labels"):
        load_config("configs/tiny.yaml", base + ["data.labels=[x/labels/km]"])
    with pytest.raises(ConfigError, match="objective.data2vec.top_k=9"):
        load_config("configs/tiny.yaml", base + ["data.labels=[]", "objective.data2vec.top_k=9"])
    with pytest.raises(ConfigError, match="objective.data2vec.ema_decay=1.5"):
        load_config("configs/tiny.yaml", base + ["data.labels=[]", "objective.data2vec.top_k=2",
                                                 "objective.data2vec.ema_decay=1.5"])
    with pytest.raises(ConfigError, match=r"objective.data2vec.target_norm='layer'; use one of \('instance', 'batch', 'both'\)"):
        load_config("configs/tiny.yaml", base + ["data.labels=[]", "objective.data2vec.top_k=2",
                                                 "objective.data2vec.target_norm=layer"])


def data2vec_command(shards: str, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml", "objective.kind=data2vec",
            "data.labels=[]", "objective.data2vec.top_k=2", "objective.data2vec.ema_decay=0.9",
            "objective.data2vec.ema_end_decay=0.99", "objective.data2vec.ema_anneal_steps=6",
            "objective.mask_length=10", f"data.shards={shards}",
            "data.crop_seconds=1.0", "data.batch_size=2", "data.shuffle_buffer=8", f"train.run_dir={run_dir}",
            "train.log_every=1", "train.log_samples=true", *extra]


def teacher_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    path = os.path.join(run_dir, "checkpoints", f"step-{step:08d}", rank_file(0))
    return torch.load(path, weights_only=True)["parts"]["teacher"]


@pytest.mark.slow
def test_data2vec_run_without_labels_resumes_exactly_with_its_teacher(train_data, tmp_path):
    shards = train_data[0]  # audio only: the k-means labels beside it are not read
    a, wb = straight_and_resumed(data2vec_command, shards, tmp_path, tolerance=1e-5)
    assert {"loss/data2vec", "var/target", "eval/loss/data2vec", "collapse/effective_rank"} <= set().union(*a)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ta, tb = teacher_weights(straight, 6), teacher_weights(resumed, 6)
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6) for k in ta)
    assert not torch.equal(ta["blocks.0.ffn.0.weight"], teacher_weights(straight, 3)["blocks.0.ffn.0.weight"])
    out = tmp_path / "encoder.pt"  # the export holds the student encoder only
    run([sys.executable, "-m", "pretrain.export", "--ckpt", str(resumed), "--out", str(out)])
    encoder = load_encoder(str(out))
    assert all(torch.equal(wb[f"encoder.{k}"], v) for k, v in encoder.state_dict().items())
    assert not torch.equal(encoder.state_dict()["blocks.0.ffn.0.weight"], tb["blocks.0.ffn.0.weight"])


@pytest.mark.slow
def test_sigkill_of_a_two_process_data2vec_run_then_resume_matches_the_uninterrupted_one(train_data, tmp_path):
    """The teacher is the state a kill can lose that no other objective has: after a SIGKILL at a random step the
    resumed run ends with the straight run's losses, student and teacher."""
    steps = 8
    extra = ("objective.kind=data2vec", "data.labels=[]", "objective.data2vec.top_k=2", "objective.data2vec.ema_decay=0.9",
             "objective.data2vec.ema_end_decay=0.99", f"objective.data2vec.ema_anneal_steps={steps}",
             f"train.steps={steps}", "train.save_every=2", "train.log_samples=true")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(command(train_data, straight, *extra, procs=2))
    kill_at = random.Random().randint(3, 6)
    kill_when_logged(command(train_data, interrupted, *extra, procs=2), interrupted, kill_at)
    resumed = run(command(train_data, interrupted, *extra, procs=2))
    assert "resumed from" in resumed.stderr, f"killed at step {kill_at}"
    a, b = metrics(straight), metrics(interrupted)
    assert [r["step"] for r in b if "loss" in r] == list(range(1, steps + 1))
    assert all(abs(x[k] - y[k]) <= 1e-5 for x, y in zip(a, b) for k in x if "loss" in k), kill_at
    wa, wb = final_weights(straight, steps), final_weights(interrupted, steps)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa), kill_at
    for rank in (0, 1):
        ta, tb = (torch.load(os.path.join(d, "checkpoints", f"step-{steps:08d}", rank_file(rank)),
                             weights_only=True)["parts"]["teacher"] for d in (straight, interrupted))
        assert all(torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6) for k in ta), kill_at
        assert samples(straight, rank) == samples(interrupted, rank)


def test_vicreg_terms_keep_a_tiny_model_from_dimensional_collapse():
    gen = torch.Generator().manual_seed(0)
    white, low_rank = torch.randn(800, 32, generator=gen), torch.randn(800, 2, generator=gen) @ torch.randn(2, 32, generator=gen)
    every = torch.ones(800, dtype=torch.bool)
    assert max(variance_covariance(white, every)) < 0.1 < variance_covariance(low_rank, every)[1]  # rank 2: co-varying
    assert variance_covariance(torch.zeros(10, 32), every[:10])[0] > 0.98  # nothing varies: the full variance hinge
    padded, real = torch.cat([white, torch.full((100, 32), 1e6)]), torch.arange(900) < 800
    assert torch.allclose(torch.stack(variance_covariance(padded, real)), torch.stack(variance_covariance(white, every)))
    ranks = {}
    for weight in (0.0, 1.0):
        _, model = train_tiny(with_own(CFG, ema_all=True, vicreg_weight=weight), 30)
        with torch.no_grad():
            ranks[weight] = collapse_stats(model.encoder.eval(), music(items=4), torch.full((4,), 48000))["collapse/effective_rank"]
    assert ranks[1.0] >= 1.3 * ranks[0.0], ranks  # measured: 29 against 19
    with pytest.raises(ConfigError, match="vicreg_weight=-1"):
        load_config("configs/tiny.yaml", ["objective.kind=data2vec", "data.shards=x", "data.labels=[]",
                                          "objective.data2vec.top_k=2", "objective.vicreg_weight=-1"])
