"""The training step's pieces and GPU options, on CPU: batches crossing to the device as int16 (converted
there, the same numbers), torch's fused AdamW through DeepSpeed's config, activation checkpointing with
dropout (same losses and gradients, also end to end through the CLI and across a resume that flips it), the
resume-config check, and the interval bookkeeping."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch
from test_train import ENV, ROOT, command, final_weights, metrics, run

from data.stream import AudioLoader, StreamConfig, to_device
from pretrain.config import ConfigError, load_config, to_yaml
from pretrain.engine import deepspeed_config
from pretrain.metrics import Interval
from pretrain.model import Encoder
from pretrain.objectives.mert import MertObjective
from pretrain.resume_check import FREE_TO_CHANGE, check_resumable, flatten


# ---------------------------------------------------------------- the input path


def loader_cfg(train_data, **kw) -> StreamConfig:
    shards, labels = train_data
    return StreamConfig(shards, crop_seconds=1.0, batch_size=3, num_workers=1, shuffle_buffer=8, labels=(labels,), **kw)


def test_int16_batches_converted_on_the_device_equal_the_host_converted_ones(train_data):
    converted = [b for _, b in zip(range(4), AudioLoader(loader_cfg(train_data), 0, 1))]
    raw = [b for _, b in zip(range(4), AudioLoader(loader_cfg(train_data), 0, 1, convert=False))]
    for host, stored in zip(converted, raw):
        assert stored["audio"].dtype == torch.int16 and host["audio"].dtype == torch.float32  # half the bytes cross
        assert all(codes.dtype in (torch.int16, torch.int32) for codes in stored["labels"].values())
        audio, labels = to_device(stored, torch.device("cpu"))
        assert audio.dtype == torch.float32 and torch.equal(audio, host["audio"])  # bit for bit
        assert labels.keys() == host["labels"].keys()
        for name, codes in labels.items():
            assert codes.dtype == torch.int64 and torch.equal(codes, host["labels"][name])
        assert torch.equal(stored["lengths"], host["lengths"]) and stored["keys"] == host["keys"]
        moved, _ = to_device(host, torch.device("cpu"))  # an already converted batch is only moved
        assert torch.equal(moved, host["audio"])


def test_pin_memory_reaches_the_data_loader_and_changes_no_batch(train_data):
    pinned = AudioLoader(loader_cfg(train_data), 0, 1, convert=False, pin_memory=True)
    assert pinned.loader.pin_memory and not AudioLoader(loader_cfg(train_data), 0, 1).loader.pin_memory
    plain = AudioLoader(loader_cfg(train_data), 0, 1, convert=False)
    for a, b in zip(range(2), zip(pinned, plain)):  # without an accelerator torch does not pin: same batches
        assert torch.equal(b[0]["audio"], b[1]["audio"])


# ---------------------------------------------------------------- fused AdamW on CUDA

FUSED_CHECK = """
import torch, deepspeed
from pretrain.config import load_config
from pretrain.engine import deepspeed_config, init_distributed
init_distributed(torch.device("cpu"))
cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", "optim.warmup_steps=1"])
weights = {}
for kind in ("cpu", "cuda"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg, kind))
    adam = engine.optimizer.optimizer  # ZeRO stage 1 wraps torch's optimizer
    for _ in range(3):
        engine.backward(engine(torch.ones(4, 8)).pow(2).mean())
        engine.step()
    print(kind, type(adam).__name__, adam.defaults["fused"], adam.defaults["foreach"])
    weights[kind] = [p.detach().clone() for p in model.parameters()]
print("max difference", max((a - b).abs().max().item() for a, b in zip(weights["cpu"], weights["cuda"])))
"""


def run_alone(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh Python, a world of one (its own DeepSpeed process group); it must succeed."""
    env = {**ENV, "PYTHONPATH": ROOT}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_deepspeed_builds_torch_fused_adamw_from_the_cuda_config():
    """The CUDA config's "fused" goes through DeepSpeed's torch_adam path to torch.optim.AdamW(fused=True);
    torch's fused kernel also runs on CPU, so DeepSpeed's handling of it is checked here, without a GPU."""
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]"])
    assert "fused" not in deepspeed_config(cfg)["optimizer"]["params"]  # CPU: today's foreach AdamW
    assert deepspeed_config(cfg, "cuda")["optimizer"]["params"]["fused"] is True
    done = run_alone(FUSED_CHECK)
    lines = done.stdout.splitlines()
    assert "cpu AdamW None None" in lines and "cuda AdamW True None" in lines, done.stdout
    assert float(lines[-1].split()[-1]) < 1e-6  # the same update, fused or not


# ---------------------------------------------------------------- host syncs and skipped updates


class PlainEngine:
    """DeepSpeed's engine as TrainStep uses it, without DeepSpeed (whose own step is not ours to count)."""

    def __init__(self, module):
        self.module, self.steps = module, 0

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1


def synthetic_batches(codebooks: list[int]):
    generator = torch.Generator().manual_seed(0)
    while True:
        codes = [torch.randint(0, k, (3, 75), generator=generator) for k in codebooks]
        yield {"audio": (3000 * torch.randn(3, 24000, generator=generator)).short(),
               "lengths": torch.tensor([24000, 24000, 18000]), "labels": {"km": torch.stack(codes, -1)} if codes else {},
               "keys": ["a", "b", "c"], "offsets": torch.zeros(3, dtype=torch.long)}


@pytest.mark.parametrize("kind", ["mert", "data2vec", "bestrq"])
def test_an_update_reads_the_device_once_whatever_its_micro_batches(kind, monkeypatch, tmp_path):
    """Three micro-batches (forward, backward, the EMA teacher's update for data2vec) and the update: the one
    value the host waits for is the all-ranks agreement on non-finite losses and stop signals."""
    import pretrain.step
    from host_syncs import HostSyncs
    from pretrain.metrics import Metrics
    from pretrain.objectives import OBJECTIVES
    from pretrain.step import Progress, TrainStep

    targets = {"mert": [], "data2vec": ["data.labels=[]", "objective.data2vec.top_k=2", "objective.data2vec.clip_weight=1"],
               "bestrq": ["data.labels=[]"]}
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", f"objective.kind={kind}",
                                            "objective.cqt_weight=1", "objective.vicreg_weight=1", "train.grad_accum=3",
                                            *targets[kind]])
    books = [16, 8] if kind == "mert" else []
    torch.manual_seed(0)
    model = OBJECTIVES[kind](cfg.objective, Encoder(cfg.model), {"km": books} if books else {})
    teacher = list(model.teacher.parameters()) if kind == "data2vec" else []
    syncs = HostSyncs(*model.parameters(), *model.buffers(), *teacher)

    def moved(batch, device):  # what crosses to the device is device data from here on
        audio, labels = to_device(batch, device)
        syncs.tag([audio, *labels.values()])
        return audio, labels

    monkeypatch.setattr(pretrain.step, "to_device", moved)
    engine = PlainEngine(model)
    step = TrainStep(cfg, engine, torch.device("cpu"), 1, 1, torch.Generator().manual_seed(1), Progress(),
                     Metrics(str(tmp_path), 1, 0), Interval())
    with syncs:
        step(synthetic_batches(books))
    assert step.progress.step == 1 and engine.steps == 3
    assert [what for what, where in syncs.found] == ["Tensor.tolist"], syncs.found
    assert syncs.found[0][1].startswith("pretrain/step.py:"), syncs.found


def test_the_sync_counter_sees_reads_and_value_sized_outputs_of_device_tensors_only():
    from host_syncs import HostSyncs

    device, host = torch.randn(4), torch.randn(4)
    with HostSyncs(device) as syncs:
        y = (device * 2).relu()
        host.sum().item(), host[host > 0], host.tolist()  # host tensors: free
        flag = torch.zeros(2)
        flag[0] = y.sum()  # written in place from device data: device data
        y.sum().item(), bool(y.max() > 0), y[y > 0], y.nonzero(), flag.tolist()
    assert [what for what, _ in syncs.found] == ["aten._local_scalar_dense", "aten._local_scalar_dense",
                                                 "aten.index (boolean index)", "aten.nonzero", "Tensor.tolist"]


SKIP_CHECK = """
import torch
from pretrain.config import load_config
from pretrain.engine import build_engine, init_distributed, skipped_update
init_distributed(torch.device("cpu"))

def engine_for(stage, precision):
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", "optim.warmup_steps=4", "train.steps=10",
                                            "train.grad_accum=2", f"train.zero_stage={stage}", f"train.precision={precision}"])
    torch.manual_seed(0)
    return build_engine(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)), cfg)

def update(engine, scale, skip=False):
    for micro in range(2):
        x = torch.full((4, 8), 1.0 + micro, dtype=next(engine.module.parameters()).dtype)
        engine.backward(engine(x).float().pow(2).mean() * scale)
        if micro == 0 or not skip:
            engine.step()
    if skip:
        skipped_update(engine)

def weights(engine):
    return [p.detach().float().clone() for p in engine.module.parameters()]

for stage in (0, 1, 2):
    for precision in ("fp32", "bf16"):
        skipping, plain = engine_for(stage, precision), engine_for(stage, precision)
        update(skipping, 1.0), update(plain, 1.0)
        before, lr = weights(skipping), skipping.get_lr()[0]
        update(skipping, float("nan"), skip=True)  # NaN gradients
        kept = all(torch.equal(a, b) for a, b in zip(before, weights(skipping))) and skipping.get_lr()[0] == lr
        update(skipping, 1.0), update(plain, 1.0)  # the same update from the same state: optimizer state kept too
        difference = max((a - b).abs().max().item() for a, b in zip(weights(skipping), weights(plain)))
        print(stage, precision, kept, difference, skipping.get_lr()[0] == plain.get_lr()[0], skipping.skipped_steps)
"""


def test_a_skipped_update_keeps_weights_optimizer_state_and_schedule_at_every_zero_stage():
    """NaN gradients at the accumulation boundary, then `skipped_update`: nothing the update would change has
    changed (the next update equals that of an engine that never saw the NaN batch) and DeepSpeed's skip counter
    stays 0 (the trainer counts these itself). ZeRO 1-2 in fp32 skip non-finite gradients on their own, ZeRO 0
    and bf16 would apply them."""
    done = run_alone(SKIP_CHECK)
    rows = [line.split() for line in done.stdout.splitlines() if line[:1] in "012"]
    assert [row[:2] for row in rows] == [[s, p] for s in "012" for p in ("fp32", "bf16")], done.stdout
    for stage, precision, kept, difference, same_lr, skipped in rows:
        assert kept == "True" and float(difference) == 0.0 and same_lr == "True" and skipped == "0", (stage, precision)


# ---------------------------------------------------------------- activation checkpointing

DROPOUT = ["model.dropout=0.1", "model.attention_dropout=0.1", "model.activation_dropout=0.1"]


def loss_and_grads(checkpoint_activations: bool):
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", *DROPOUT])
    torch.manual_seed(0)
    model = MertObjective(cfg.objective, Encoder(cfg.model, checkpoint_activations=checkpoint_activations),
                      {"km": [16, 8]}).train()
    audio = 0.1 * torch.randn(3, 24000, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([24000, 24000, 15000])
    codes = torch.stack([torch.randint(0, k, (3, 75), generator=torch.Generator().manual_seed(k)) for k in (16, 8)], -1)
    torch.manual_seed(5)  # the dropout stream
    loss, _ = model(audio, lengths, {"km": codes}, torch.Generator().manual_seed(2))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_dropout(monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    calls = []
    real = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    plain_loss, plain_grads = loss_and_grads(False)
    assert not calls
    loss, grads = loss_and_grads(True)
    assert len(calls) == 2 and all(not k["use_reentrant"] and k["preserve_rng_state"] for k in calls)  # 2 blocks
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=0, msg=name)
    # Dropout is really on: another dropout stream gives another loss (so equality above means the same bits).
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", *DROPOUT])
    encoder = Encoder(cfg.model, checkpoint_activations=True).train()
    audio = torch.randn(1, 8000)
    torch.manual_seed(1)
    a = encoder(audio)["x"]
    torch.manual_seed(2)
    assert not torch.equal(a, encoder(audio)["x"])


def test_checkpointing_is_off_in_evaluation_and_without_gradients(monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    calls = []
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda *a, **k: calls.append(1))
    cfg = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]"])
    encoder = Encoder(cfg.model, checkpoint_activations=True)
    encoder.eval()(torch.randn(1, 8000))
    with torch.no_grad():
        encoder.train()(torch.randn(1, 8000))
    assert not calls


@pytest.mark.slow
def test_checkpoint_activations_run_equals_the_plain_run(train_data, tmp_path):
    extra = ("train.steps=3", "train.save_every=3", "train.eval_every=0", *DROPOUT)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    run(command(train_data, plain, *extra))
    run(command(train_data, checkpointed, *extra, "train.checkpoint_activations=true"))
    a, b = metrics(plain), metrics(checkpointed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert all(x["loss"] == y["loss"] for x, y in zip(a, b)), (a, b)
    wa, wb = final_weights(plain, 3), final_weights(checkpointed, 3)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_with_dropout_a_resumed_run_equals_the_uninterrupted_one_also_flipping_checkpoint_activations(
        train_data, tmp_path):
    """Dropout draws from torch's default generator, saved with each checkpoint; nothing else may draw from it
    (the data loader's iter() did, once per start, so with dropout > 0 a resumed run drifted)."""
    extra = ("train.steps=3", "train.save_every=2", "train.eval_every=0", *DROPOUT)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command(train_data, straight, *extra))
    run(command(train_data, resumed, *extra, "train.steps=2", "train.checkpoint_activations=true"))
    again = run(command(train_data, resumed, *extra))  # train.checkpoint_activations is free to change
    assert "resumed from" in again.stderr
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(a, b)), (a, b)
    wa, wb = final_weights(straight, 3), final_weights(resumed, 3)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


def test_iterating_the_loader_leaves_the_default_generator_alone(train_data):
    state = torch.get_rng_state()
    next(iter(AudioLoader(loader_cfg(train_data), 0, 1)))
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_activations_must_be_a_boolean():
    with pytest.raises(ConfigError, match="checkpoint_activations"):
        load_config("configs/tiny.yaml", ["train.checkpoint_activations=sometimes"])


# ---------------------------------------------------------------- the resume-config check


def test_resume_check_names_what_may_not_change_and_lets_free_settings_pass(tmp_path):
    saved = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]"])
    free = load_config("configs/tiny.yaml", ["data.shards=y", "data.labels=[x]", "train.steps=9", "optim.lr=1e-4",
                                             "train.compile=true", "train.checkpoint_activations=true"])
    check_resumable(free, 1, to_yaml(saved), {"world": 1})
    changed = load_config("configs/tiny.yaml", ["data.shards=x", "data.labels=[x]", "model.layers=3"])
    with pytest.raises(ConfigError, match=r"model.layers: 2 then, 3 now; world size: 2 then, 1 now\).*force_resume"):
        check_resumable(changed, 1, to_yaml(saved), {"world": 2})
    forced = dataclasses.replace(changed, train=dataclasses.replace(changed.train, force_resume=True))
    check_resumable(forced, 1, to_yaml(saved), {"world": 2})
    # A checkpoint from before train.checkpoint_activations existed: its config reads with the default.
    old_yaml = to_yaml(saved).replace("  checkpoint_activations: false\n", "")
    assert "checkpoint_activations" not in old_yaml
    check_resumable(saved, 1, old_yaml, {"world": 1})
    assert flatten({"a": {"b": (1, 2)}, "c": 3}) == {"a.b": [1, 2], "c": 3}
    assert "train.checkpoint_activations" in FREE_TO_CHANGE


def test_interval_times_waits_and_counts_between_resets():
    interval = Interval()
    with interval.waiting():
        time.sleep(0.02)
    interval.add(2.5, 4)
    interval.add(1.0, 2)
    assert interval.data_wait >= 0.02 and interval.elapsed() >= interval.data_wait
    assert (interval.audio_seconds, interval.crops) == (3.5, 6)
    interval.reset()
    assert (interval.data_wait, interval.audio_seconds, interval.crops) == (0.0, 0.0, 0) and interval.elapsed() < 0.02
