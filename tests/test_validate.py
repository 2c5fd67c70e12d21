"""Validation during training: effective rank, the collapse alarm, eval/ and collapse/ rows from a real run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.model import Encoder, EncoderConfig
from pretrain.objectives import ObjectiveConfig
from pretrain.objectives.mert import MertObjective, MertSettings
from pretrain.validate import collapse_stats, collapse_warning, effective_rank, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = EncoderConfig(conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2, dim=48, layers=2, heads=4,
                     ffn_dim=96, pos_conv_kernel=16, pos_conv_groups=4, conv_norm="layer",
                     dropout=0.1, attention_dropout=0.1, layerdrop=0.5)


def music(items: int = 4, samples: int = 24000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tones of different pitches plus a little noise; the last item is shorter (padding)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 24000
    audio = torch.stack([0.3 * torch.sin(2 * torch.pi * 110 * (i + 1) * t) + 0.05 * torch.randn(samples, generator=g)
                         for i in range(items)])
    return audio, torch.tensor([samples] * (items - 1) + [samples * 2 // 3])


def test_effective_rank_of_synthetic_data():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(2000, 1, generator=g) * torch.randn(1, 64, generator=g) + 5.0  # rank 1, off the origin
    assert effective_rank(line) == 1
    plane = torch.randn(2000, 2, generator=g) @ torch.randn(2, 64, generator=g)
    assert effective_rank(plane) == 2
    isotropic = torch.randn(4000, 64, generator=g)
    assert 0.9 * 64 <= effective_rank(isotropic) <= 64
    assert effective_rank(torch.full((100, 64), 0.7)) == 0  # constant: nothing varies
    assert effective_rank(torch.zeros(100, 64)) == 0


def test_random_init_encoder_raises_no_alarm():
    torch.manual_seed(0)
    encoder = Encoder(TINY).eval()
    stats = collapse_stats(encoder, *music())
    assert stats["collapse/effective_rank"] >= 8 and stats["collapse/conv_effective_rank"] >= 4
    assert stats["collapse/dead_dims"] == 0 and stats["collapse/dim_std_mean"] > 0.1
    assert collapse_warning(stats, 100) is None
    assert collapse_warning(stats, 200, reference={"step": 100, **stats}) is None


def test_constant_output_and_squashed_conv_features_raise_the_alarm():
    torch.manual_seed(0)
    encoder = Encoder(TINY).eval()
    healthy = {"step": 50, **collapse_stats(encoder, *music())}
    with torch.no_grad():
        encoder.blocks[-1].ln2.weight.zero_()  # Post-LN: the output is the last norm's bias, the same for every frame
    stats = collapse_stats(encoder, *music())
    assert stats["collapse/effective_rank"] == 0 and stats["collapse/dead_dims"] == 1.0
    warning = collapse_warning(stats, 300, healthy)
    assert warning.startswith("WARNING") and "step 300" in warning and "encoder output effective rank 0" in warning
    assert "objective.vicreg_weight" in warning and "optim.lr" in warning and "targets" in warning
    assert "conv features" not in warning

    with torch.no_grad():
        encoder.extractor.blocks[-1][0].weight.zero_()  # conv features squashed to a constant
    warning = collapse_warning(collapse_stats(encoder, *music()), 400, healthy)
    assert "conv features effective rank 0" in warning and "objective.feature_penalty=0" in warning

    # Relative alarm: far fewer components than at the first eval, though above train.collapse_rank.
    partial = {**healthy, "collapse/effective_rank": healthy["collapse/effective_rank"] * 0.2}
    warning = collapse_warning(partial, 500, healthy, min_rank=2, fraction=0.25)
    assert warning and "at step 50" in warning
    assert collapse_warning(partial, 500, healthy, min_rank=2, fraction=0.0) is None


def test_evaluate_leaves_the_training_rng_streams_and_mode_alone():
    torch.manual_seed(0)
    objective = MertObjective(ObjectiveConfig(mert=MertSettings(proj_dim=16), cqt_bins=48, cqt_bins_per_octave=12), Encoder(TINY),
                          {"km": [16, 8]}).train()
    audio, lengths = music()
    labels = {"km": torch.randint(0, 8, (4, 75, 2))}
    batches = [{"audio": audio, "lengths": lengths, "labels": labels}] * 2
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate(objective, batches)
    assert torch.equal(torch.get_rng_state(), before) and objective.training
    assert evaluate(objective, batches) == first  # fixed masks, no dropout: the same numbers every time
    assert {"eval/loss", "eval/loss/km_0", "eval/acc/km_1", "eval/loss/cqt", "eval/batches",
            "collapse/effective_rank", "collapse/conv_effective_rank", "collapse/dead_dims"} <= set(first)
    assert first["eval/batches"] == 2


def test_eval_config_is_checked():
    base = ["data.shards=s", "data.labels=[s/labels/km]"]
    cfg = load_config(None, base)  # the schema defaults: off
    assert cfg.train.eval_every == 0 and cfg.train.eval_shards == "" and cfg.train.eval_batches == 8
    with pytest.raises(ConfigError, match="train.eval_labels is set"):
        load_config("configs/tiny.yaml", base + ["train.eval_labels=[x]"])
    with pytest.raises(ConfigError, match="train.eval_batches"):
        load_config("configs/tiny.yaml", base + ["train.eval_batches=0"])
    with pytest.raises(ConfigError, match="train.collapse_fraction"):
        load_config("configs/tiny.yaml", base + ["train.collapse_fraction=1.5"])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train(train_data, run_dir, *extra) -> subprocess.CompletedProcess:
    shards, labels = train_data
    cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/tiny.yaml", f"data.shards={shards}",
           f"data.labels=[{labels}]", "data.crop_seconds=1.0", "data.batch_size=2", "data.shuffle_buffer=8",
           f"train.run_dir={run_dir}", "train.log_every=1", *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


@pytest.mark.slow
def test_a_run_writes_eval_and_collapse_rows(train_data, tmp_path):
    shards, _ = train_data  # the training shards double as eval shards; their labels are at SHARDS/labels/km
    done = train(train_data, tmp_path / "run", "train.steps=4", "train.eval_every=2", f"train.eval_shards={shards}",
                 "train.eval_batches=2")
    evals = [r for r in rows(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # step 0: the untrained encoder, the alarm's reference
    for row in evals:
        assert row["eval/batches"] == 2 and {"eval/acc/logmel_chroma_0", "eval/loss/cqt"} <= set(row)
        assert row["collapse/effective_rank"] >= 2 and row["collapse/alarm"] == 0
    assert [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    assert "eval step 2 | loss" in done.stdout and "representation collapse" not in done.stdout

    # Without eval shards: collapse signals only, on a fixed batch of the training shards.
    train(train_data, tmp_path / "bare", "train.steps=2", "train.eval_every=1")
    bare = [r for r in rows(tmp_path / "bare") if "collapse/effective_rank" in r]
    assert [r["step"] for r in bare] == [0, 1, 2] and not any(k.startswith("eval/loss") for r in bare for k in r)

    # A start killed before its first checkpoint left rows, step 0's eval among them: all are redone, once.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 0, "collapse/effective_rank": 1.0}\n{"step": 1, "loss": 9.0}\n')
    train(train_data, killed, "train.steps=2", "train.eval_every=1")
    assert [r["step"] for r in rows(killed) if "collapse/effective_rank" in r] == [0, 1, 2]
    assert rows(killed)[0]["collapse/effective_rank"] == bare[0]["collapse/effective_rank"]
