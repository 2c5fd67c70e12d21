"""The trainer: exact resume after SIGKILL under 2 processes and from a checkpoint written before named parts,
checkpoint fallback and refusal, preemption signals, export. Each run is the real CLI (`python -m pretrain.train`, `torchrun`) on the tiny preset over a
one-minute demo corpus with k-means log-mel+chroma labels."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from data.labels import label_entropy
from pretrain.checkpoint import module_weights
from pretrain.config import load_config
from pretrain.engine import deepspeed_config, lr_factor
from pretrain.export import load_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data(train_data):
    return train_data


def overrides(data, run_dir, *extra) -> list[str]:
    shards, labels = data
    return [f"data.shards={shards}", f"data.labels=[{labels}]", "data.crop_seconds=1.0", "data.batch_size=2",
            "data.shuffle_buffer=8", f"train.run_dir={run_dir}", "train.log_every=1", *extra]


def command(data, run_dir, *extra, procs: int = 1) -> list[str]:
    if procs == 1:
        launcher = [sys.executable, "-m", "pretrain.train"]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                    f"--master_port={port}", "-m", "pretrain.train"]
    return launcher + ["--config", "configs/tiny.yaml"] + overrides(data, run_dir, *extra)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(cmd: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if expect_ok and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def metrics(run_dir) -> list[dict]:
    """The rows of training steps: step 0's, the untrained encoder's eval, is test_validate.py's."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:  # a line still being written is not read
        rows = [json.loads(line) for line in file if line.endswith("\n")]
    return [row for row in rows if row["step"] > 0]


def samples(run_dir, rank: int) -> list[dict]:
    with open(os.path.join(run_dir, "samples", f"rank-{rank:05d}.jsonl")) as file:
        return [json.loads(line) for line in file]


def final_weights(run_dir, step: int) -> dict:
    return module_weights(os.path.join(run_dir, "checkpoints", f"step-{step:08d}"))


def straight_and_resumed(command, shards: str, tmp_path, tolerance: float = 1e-6) -> tuple[list, dict]:
    """A run of `command(shards, run_dir, *extra)` (an objective's tiny run) for 6 steps straight, and again stopped
    after 3 and resumed, saving and evaluating every 3: both log every step with the same scalars (within
    `tolerance`), end with the same weights and draw the same samples. Returns (straight's metrics rows, resumed's
    final weights); `tmp_path`/straight and /resumed hold the runs."""
    extra = ("train.save_every=3", "train.eval_every=3", f"train.eval_shards={shards}", "train.eval_batches=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command(shards, straight, "train.steps=6", *extra))
    run(command(shards, resumed, "train.steps=3", *extra))
    done = run(command(shards, resumed, "train.steps=6", *extra))
    assert "resumed from" in done.stderr and "step-00000003" in done.stderr
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in a if "loss" in r] == [r["step"] for r in b if "loss" in r] == list(range(1, 7))
    for row_a, row_b in zip(a, b):
        assert row_a["step"] == row_b["step"] and row_a.keys() == row_b.keys()
        learned = [k for k in row_a if k.removeprefix("eval/").split("/")[0] in ("loss", "acc", "var")]  # not timings
        assert all(abs(row_a[k] - row_b[k]) <= tolerance for k in learned), row_a["step"]
    wa, wb = final_weights(straight, 6), final_weights(resumed, 6)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    assert samples(straight, 0) == samples(resumed, 0)
    return a, wb


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in sessions of their own,
    so killing its process group alone would leave them running; a cluster kills the whole job like this)."""
    parents = {}
    for stat in os.listdir("/proc"):
        try:
            with open(f"/proc/{stat}/stat") as file:
                parents[int(stat)] = int(file.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | more, bool(more)
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_step(run_dir, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        exited = process.poll() is not None  # before the look: a run that logs the step and exits still counts
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and any(r["step"] >= step for r in metrics(run_dir)):
            return
        if exited:
            break
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: never reached step {step} (exit code {process.poll()})")


def kill_when_logged(argv: list[str], run_dir, step: int) -> None:
    """Starts the run and SIGKILLs its whole process tree once it has logged `step`."""
    process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, step, process)
    finally:
        kill_tree(process.pid)
        process.wait()


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(data, tmp_path):
    steps, extra = 12, ("train.steps=12", "train.save_every=3", "train.log_samples=true",  # and evals, which must
                        "train.eval_every=4", f"train.eval_shards={data[0]}", "train.eval_batches=2")  # not disturb it
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run(command(data, straight, *extra, procs=2))

    kill_at = random.Random().randint(4, 10)
    print(f"killing the second run at step {kill_at}")
    kill_when_logged(command(data, interrupted, *extra, procs=2), interrupted, kill_at)
    resumed = run(command(data, interrupted, *extra, procs=2))
    resumed_at = int(re.search(r"resumed from \S+step-(\d+)", resumed.stderr).group(1))  # logged
    assert resumed_at < steps  # the kill landed before the end

    a, b = metrics(straight), metrics(interrupted)
    manifest = json.load(open(os.path.join(data[1], "teacher.json")))
    entropy = label_entropy(manifest)  # the masked CE of predicting the label prior, logged as the gap below it
    assert all(abs(r[f"prior_gap/logmel_chroma_{book}"] - (h - r[f"loss/logmel_chroma_{book}"])) < 1e-6
               for r in a if "loss" in r for book, h in enumerate(entropy))
    assert [r["step"] for r in a if "loss" in r] == [r["step"] for r in b if "loss" in r] == list(range(1, steps + 1))
    for row_a, row_b in zip(a, b):
        assert row_a["step"] == row_b["step"] and row_a.keys() == row_b.keys()
        assert all(abs(row_a[k] - row_b[k]) <= 1e-6 for k in row_a if "loss" in k or k.startswith("collapse/")), row_a["step"]
    assert [r["step"] for r in a if "eval/loss" in r] == [4, 8, 12] and len(a) == len(b)
    wa, wb = final_weights(straight, steps), final_weights(interrupted, steps)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    for rank in (0, 1):  # the data stream neither repeats nor skips samples
        assert samples(straight, rank) == samples(interrupted, rank)
    keys = [tuple(row["keys"]) for rank in (0, 1) for row in samples(straight, rank)]
    assert len(keys) == steps * 2


def test_preemption_signal_saves_then_a_corrupt_newest_checkpoint_falls_back(data, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(data, run_dir, "train.steps=200", "train.save_every=100"), cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
    output, _ = process.communicate(timeout=120)
    status = json.load(open(run_dir / "status.json"))
    assert process.returncode == 0 and status["state"] == "stopped" and 3 <= status["step"] < 200, output
    stopped_at = status["step"]
    assert os.path.isdir(run_dir / "checkpoints" / f"step-{stopped_at:08d}")

    # Two more steps and a save, then damage that newest checkpoint: the run falls back to the previous one.
    run(command(data, run_dir, f"train.steps={stopped_at + 2}", "train.save_every=100"))
    newest = run_dir / "checkpoints" / f"step-{stopped_at + 2:08d}"
    optim = next(p for p in newest.iterdir() if p.name.endswith("optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])
    os.makedirs(run_dir / "checkpoints" / ".tmp-step-99999999")  # what a save killed half-way leaves
    again = run(command(data, run_dir, f"train.steps={stopped_at + 3}", "train.save_every=100"))
    assert f"step-{stopped_at + 2:08d} skipped" in again.stderr and f"step {stopped_at}," in again.stderr  # logged
    assert not os.path.exists(run_dir / "checkpoints" / ".tmp-step-99999999")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 4))

    refused = run(command(data, run_dir, "train.steps=50", "model.layers=3"), expect_ok=False)
    assert refused.returncode and "model.layers: 2 then, 3 now" in refused.stderr

    out = tmp_path / "encoder.pt"
    run([sys.executable, "-m", "pretrain.export", "--ckpt", str(run_dir), "--out", str(out)])
    encoder = load_encoder(str(out)).eval()
    saved = final_weights(run_dir, stopped_at + 3)
    assert all(torch.equal(saved[f"encoder.{k}"], v) for k, v in encoder.state_dict().items())
    assert encoder(torch.randn(1, 24000))["x"].shape == (1, 74, 64)


def test_learning_rate_warms_up_then_decays_to_the_end_value():
    cfg = load_config("configs/tiny.yaml", ["optim.warmup_steps=10", "optim.end_lr=1e-4", "optim.lr=1e-3"])
    factors = [lr_factor(step, cfg.optim, 100) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[100] == pytest.approx(0.1)
    cosine = load_config("configs/tiny.yaml", ["optim.warmup_steps=10", "optim.decay=cosine"]).optim
    assert lr_factor(55, cosine, 100) == pytest.approx(0.5) and lr_factor(100, cosine, 100) == pytest.approx(0.0)


def test_deepspeed_config_follows_the_run_config():
    cfg = load_config("configs/tiny.yaml", ["train.precision=fp16", "train.min_loss_scale=0.25", "train.grad_accum=3"])
    ds = deepspeed_config(cfg)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["fp16"]["min_loss_scale"] == 0.25
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["optimizer"]["params"]["torch_adam"] and ds["gradient_clipping"] == cfg.optim.clip


@pytest.mark.slow
def test_bf16_zero2_run_exports_its_fp32_master_weights(data, tmp_path):
    run_dir, out = tmp_path / "bf16", tmp_path / "encoder.pt"
    run(command(data, run_dir, "train.steps=2", "train.precision=bf16", "train.zero_stage=2"))
    run([sys.executable, "-m", "pretrain.export", "--ckpt", str(run_dir), "--out", str(out)])
    exported = load_encoder(str(out)).state_dict()
    module = final_weights(run_dir, 2)  # what the engine computes with: bf16
    assert all(module[f"encoder.{k}"].dtype == torch.bfloat16 and v.dtype == torch.float32 for k, v in exported.items())
    assert all(torch.equal(v.bfloat16(), module[f"encoder.{k}"]) for k, v in exported.items())  # same weights, rounded
    assert any(not torch.equal(v, v.bfloat16().float()) for v in exported.values())  # and more precise than bf16
