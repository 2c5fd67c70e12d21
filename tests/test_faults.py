"""Fault injection on the real trainer CLI (tiny preset, demo corpus): every checkpoint broken, SIGKILL of the
whole process tree inside a save and at random moments, non-finite losses; on the loader: shards missing or
truncated after the index was written, a label sidecar deleted mid-run; and SIGKILL at random moments of the
offline stages (data.shards build, teachers.kmeans dump, teachers.encodec dump). MUSICPT_FAULT_KILLS and
MUSICPT_FAULT_STAGE_KILLS set the number of random kills (CI: 1 and 1; the issue's counts are 20 and 5). The checkpointer's own faults (pruning around broken
checkpoints, checksums, a full disk, a load failing midway) are in tests/test_checkpoint.py."""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import tone, write
from test_checkpoint import snapshot
from test_train import ENV, ROOT, command, final_weights, kill_tree, metrics, run, samples, wait_for_step

from data.labels import LabelError
from data.shards import ShardConfig, build
from data.stream import AudioLoader, StreamConfig
from checkpoint_files import seal
from pretrain.checkpoint import MODEL_STATES, RUN_FILES, checkpoint_names, step_of


@pytest.fixture
def data(train_data):
    return train_data


@pytest.mark.slow
def test_every_checkpoint_broken_is_refused_leaving_the_run_as_it_was_then_restart_keeps_the_old_run(data, tmp_path):
    run_dir = tmp_path / "run"
    run(command(data, run_dir, "train.steps=6", "train.save_every=2", procs=2))
    for step in (2, 4, 6):  # the scenario: every model file unreadable
        path = run_dir / "checkpoints" / f"step-{step:08d}" / MODEL_STATES
        path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run_dir)

    refused = run(command(data, run_dir, "train.steps=8", "train.save_every=2", procs=2), expect_ok=False)
    assert refused.returncode != 0 and "none of them loads" in refused.stderr, refused.stderr[-2000:]
    for rank in (0, 1):  # each rank checked half of the files; both know every problem and stop
        assert all(f"error (rank {rank}):" in refused.stderr and f"step-{step:08d}: {MODEL_STATES} has 1000 bytes"
                   in refused.stderr for step in (2, 4, 6))
    assert "train.restart=true" in refused.stderr and "step 1/" not in refused.stdout
    assert snapshot(run_dir) == before  # same files, same bytes

    restarted = run(command(data, run_dir, "train.steps=8", "train.save_every=2", "train.restart=true", procs=2))
    assert "starting from step 0" in restarted.stderr  # logged
    (previous,) = os.listdir(run_dir / "previous")
    kept = snapshot(run_dir / "previous" / previous)  # the old run, every byte of it
    assert kept == {name: data for name, data in before.items() if name.split(os.sep)[0] in RUN_FILES}
    assert len(kept["metrics.jsonl"].splitlines()) == 7 and "tensorboard" in kept  # step 0's eval and 6 steps
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))  # a requeue then resumes: test_checkpoint.py


def run_until_paused(data, run_dir, extra, fault: str, marker) -> None:
    """Starts the 2-process run with MUSICPT_FAULTS=`fault` (a pause), waits until it pauses there, then
    SIGKILLs its whole process tree at once."""
    env = {**ENV, "MUSICPT_FAULTS": fault, "MUSICPT_PAUSED": str(marker)}
    process = subprocess.Popen(command(data, run_dir, *extra, procs=2), cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        kill_tree(process.pid)
        output, _ = process.communicate()
    assert marker.exists(), f"the run never reached {fault} (exit code {process.returncode}):\n{output[-3000:]}"
    marker.unlink()
    return output


def resumed_step(output: str) -> int | None:
    found = re.search(r"resumed from \S+step-(\d+)", output)
    return int(found.group(1)) if found else None


def break_inside_deepspeed(folder) -> None:
    """Replaces rank 0's optimizer file with another valid torch file and re-seals the checkpoint: its sizes and
    checksums pass, and DeepSpeed fails after it has loaded the module."""
    optim = next(p for p in sorted(folder.iterdir()) if p.name.endswith("optim_states.pt"))
    torch.save({"not": "an optimizer state"}, optim)
    seal(str(folder), step_of(folder.name), world=2)


@pytest.mark.slow
def test_sigkill_inside_saves_and_a_load_failing_inside_deepspeed_then_the_run_ends_as_the_uninterrupted_one(
        data, tmp_path):
    steps, extra = 8, ("train.steps=8", "train.save_every=2", "train.keep=1", "train.grad_accum=2",
                       "train.log_samples=true")
    straight, interrupted, marker = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "paused"
    run(command(data, straight, *extra, procs=2))
    # One run killed four times, each time inside a save: after DeepSpeed's files, after complete.json, after
    # the rename (before `latest`), while pruning. Before the rename the previous checkpoint is resumed.
    outputs = [run_until_paused(data, interrupted, extra, fault, marker)
               for fault in ("pause@written:4", "pause@sealed:4", "pause@renamed:4")]
    break_inside_deepspeed(interrupted / "checkpoints" / "step-00000004")  # then step-2 in a freshly built engine
    outputs.append(run_until_paused(data, interrupted, extra, "pause@pruning:6", marker))
    outputs.append(run(command(data, interrupted, *extra, procs=2)).stderr)  # logged
    assert [resumed_step(output) for output in outputs] == [None, 2, 2, 2, 6]
    assert "step-00000004 skipped: loading failed on rank 0" in outputs[3]

    a, b = metrics(straight), metrics(interrupted)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(a, b))
    wa, wb = final_weights(straight, steps), final_weights(interrupted, steps)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    for rank in (0, 1):  # two micro-batches per step: the stream neither repeats nor skips one
        assert samples(straight, rank) == samples(interrupted, rank)
    names = os.listdir(interrupted / "checkpoints")
    assert checkpoint_names(str(interrupted / "checkpoints")) == ["step-00000008"], names
    assert not [n for n in names if n.startswith(".tmp")], names
    assert sorted(os.listdir(interrupted / "checkpoints" / "broken")) == ["step-00000004", "step-00000004.txt"]


KILLS = int(os.environ.get("MUSICPT_FAULT_KILLS", "1"))  # random SIGKILLs of the training run; the issue asks 20


def last_logged_step(run_dir) -> int:
    return max((r["step"] for r in metrics(run_dir)), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def kill_after_progress(data, run_dir, extra, delay: float) -> None:
    """Starts the 2-process run, waits until it logs a step past the last one logged so far (so every kill
    makes progress), then SIGKILLs the whole tree `delay` seconds later (inside a step or a save), or as soon
    as it logs two more steps, whichever comes first: each kill advances the run by at most three steps."""
    target = last_logged_step(run_dir) + 1
    process = subprocess.Popen(command(data, run_dir, *extra, procs=2), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, target, process)
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and last_logged_step(run_dir) < target + 2:
            time.sleep(0.01)
    finally:
        kill_tree(process.pid)
        process.wait()


def timed_straight_run(data, run_dir, extra, steps: int) -> float:
    """Runs to the end; returns the seconds per step (with its save) between the first and the last logged
    step (not up to the exit: the teardown of the process group would count as steps)."""
    process = subprocess.Popen(command(data, run_dir, *extra, procs=2), cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run_dir, 1, process)
    first = time.perf_counter()
    wait_for_step(run_dir, steps, process)
    seconds = (time.perf_counter() - first) / (steps - 1)
    assert process.wait(timeout=600) == 0
    return seconds


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_run_ends_as_the_uninterrupted_one(data, tmp_path):
    """KILLS kills of the whole 2-process tree at random moments of a run that saves every step (so many land
    inside a save), each followed by a restart; then a last run to the end."""
    steps = 3 * KILLS + 4
    extra = (f"train.steps={steps}", "train.save_every=1", "train.keep=2", "train.log_samples=true")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    step_seconds = timed_straight_run(data, straight, extra, steps)
    seed = random.randrange(2 ** 32)
    delays = [random.Random(seed + i).uniform(0.0, 2 * step_seconds) for i in range(KILLS)]
    print(f"seed {seed}: {KILLS} kills, each {[round(d, 2) for d in delays]} s after a new step is logged "
          f"(a step and its save take {step_seconds:.2f} s)")
    for delay in delays:
        kill_after_progress(data, interrupted, extra, delay)
    assert last_logged_step(interrupted) < steps, "the kills came too late: the run had finished"
    run(command(data, interrupted, *extra, procs=2))

    a, b = metrics(straight), metrics(interrupted)  # training rows, and collapse/ rows every 50 steps
    assert [r["step"] for r in b if "loss" in r] == list(range(1, steps + 1)) and len(a) == len(b), seed
    assert all(x.keys() == y.keys() for x, y in zip(a, b)), seed
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(a, b) if "loss" in x), seed
    wa, wb = final_weights(straight, steps), final_weights(interrupted, steps)
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa), seed
    for rank in (0, 1):
        assert samples(straight, rank) == samples(interrupted, rank), seed
    assert checkpoint_names(str(interrupted / "checkpoints")) == [f"step-{steps:08d}", f"step-{steps - 1:08d}"], seed


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank_and_is_counted(data, tmp_path, accum):
    run_dir = tmp_path / "run"
    env = {**ENV, "MUSICPT_FAULTS": "nonfinite@1:3"}
    done = subprocess.run(command(data, run_dir, "train.steps=4", "train.log_samples=true", f"train.grad_accum={accum}",
                                  procs=2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"rank 1 WARNING musicpt.pretrain.train: step 3: non-finite loss (rank 1, micro-batch 1 of {accum}, keys ['"
            in done.stderr), done.stderr[-3000:]
    assert ("rank 0 WARNING musicpt.pretrain.train: step 3: non-finite loss (on another rank); update skipped on every "
            "rank") in done.stderr
    rows = metrics(run_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1] and all(r["loss"] == r["loss"] for r in rows)
    for rank in (0, 1):  # both ranks drew the batches of a second update for step 3: the first was dropped on both
        assert [r["step"] for r in samples(run_dir, rank)] == [step for step in (1, 2, 3, 3, 4) for _ in range(accum)]


@pytest.mark.slow
def test_max_nonfinite_in_a_row_stops_the_run_naming_the_step_and_the_keys(data, tmp_path):
    run_dir = tmp_path / "run"
    env = {**ENV, "MUSICPT_FAULTS": "nonfinite@0:2+"}
    done = subprocess.run(command(data, run_dir, "train.steps=4", "train.max_nonfinite=3"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "step 2: 3 updates in a row had a non-finite loss (the last: rank 0, micro-batch 1 of 1, keys ['" in \
        done.stderr, done.stderr
    assert "resume from the last checkpoint" in done.stderr


@pytest.fixture
def copied(train_data, tmp_path):
    """A copy of the training shards and their labels that a test may damage: (shards, labels)."""
    shards = tmp_path / "shards"
    shutil.copytree(train_data[0], shards)
    return str(shards), str(shards / os.path.relpath(train_data[1], train_data[0]))


def loader(shards, labels, **kw) -> AudioLoader:
    cfg = StreamConfig(shards=shards, labels=(labels,), crop_seconds=1.0, batch_size=2, shuffle_buffer=0, **kw)
    return AudioLoader(cfg, rank=0, world=1)


def keys_by_shard(stream: AudioLoader) -> dict[str, set]:
    found = {}
    for batch in stream:
        for key, shard in zip(batch["keys"], batch["shards"]):
            found.setdefault(shard, set()).add(key)
    return found


def test_a_shard_truncated_or_deleted_after_indexing_is_skipped_with_a_counted_warning(copied, caplog):
    shards, labels = copied
    intact = keys_by_shard(loader(shards, labels, train=False, num_workers=0))
    assert sorted(intact) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    stream = loader(shards, labels, train=False, num_workers=0)  # started, then the shards are damaged
    truncated = os.path.join(shards, "shard-000001.tar")
    with open(truncated, "r+b") as file:
        file.truncate(os.path.getsize(truncated) * 2 // 3)  # mid-sample: its last FLAC would decode short
    os.unlink(os.path.join(shards, "shard-000002.tar"))
    with caplog.at_level(logging.WARNING, logger="musicpt.data.stream"):
        damaged = keys_by_shard(stream)
    assert damaged == {"shard-000000.tar": intact["shard-000000.tar"]}  # nothing from the damaged shards
    messages = [r.getMessage() for r in caplog.records if "skipped (shard skip" in r.getMessage()]
    assert any("shard-000001.tar: " in m and "the index says" in m and "skip 1 " in m for m in messages), messages
    assert any("shard-000002.tar: missing" in m and "skip 2 " in m for m in messages), messages


def test_every_shard_gone_stops_an_endless_training_stream_instead_of_hanging(copied, caplog):
    shards, labels = copied
    stream = loader(shards, labels, num_workers=0)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        os.unlink(os.path.join(shards, name))
    with caplog.at_level(logging.WARNING, logger="musicpt.data.stream"), \
            pytest.raises(RuntimeError, match="every shard is missing or truncated"):
        next(iter(stream))
    assert sum("skipped (shard skip" in r.getMessage() for r in caplog.records) == 3


def test_a_label_sidecar_deleted_mid_run_stops_the_loader_naming_it(copied):
    shards, labels = copied
    stream = loader(shards, labels, train=False, num_workers=1)  # the error crosses from a worker process
    os.unlink(os.path.join(labels, "shard-000001.npz"))
    with pytest.raises(LabelError, match=r"shard-000001\.npz: teacher \S+ labels for shard shard-000001.tar are "
                                         r"missing .*re-run the teacher's dump"):
        for _ in stream:
            pass


STAGE_KILLS = int(os.environ.get("MUSICPT_FAULT_STAGE_KILLS", "1"))  # per offline stage; the count is 5


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    """12 seconds of tones in 3 shards: enough for the teachers' dumps to be killed midway, cheaply."""
    root = tmp_path_factory.mktemp("small")
    for i in range(3):
        write(root / "audio" / f"tone{i}.wav", tone(4, 24000, freq=220 * (i + 1)), 24000)
    build(str(root / "audio"), str(root / "shards"), ShardConfig(shard_bytes=100_000))
    return str(root / "shards")


def stage_commands(train_data, small_shards, tmp_path) -> dict[str, list[str]]:
    """Each offline stage's CLI on a test corpus, writing to the folder OUT."""
    base, shards = os.path.dirname(train_data[0]), small_shards
    config = tmp_path / "kmeans.yaml"
    config.write_text(f"name: logmel_chroma\nshards: {shards}\nout: {base}/kmeans\nmax_frames: 2000\n"
                      "streams:\n  - {name: logmel, k: 16, features: {kind: logmel, n_mels: 64}}\n"
                      "  - {name: chroma, k: 8, features: {kind: chroma}}\n")
    python = [sys.executable]
    return {
        "shards": python + ["-m", "data.shards", "build", "--input", f"{base}/corpus/audio", "--out", "OUT",
                            "--workers", "1", "--shard-size", "100K"],
        "kmeans": python + ["-m", "teachers.kmeans", "dump", "--config", str(config), "--workers", "1", "labels=OUT"],
        "encodec": python + ["-m", "teachers.encodec", "dump", "--shards", shards, "--labels", "OUT",
                             "--random-init", "--device", "cpu", "--workers", "1"],
    }


def run_stage(cmd: list[str], out, kill_after: float | None = None) -> float:
    """Runs `cmd` writing to `out`; with `kill_after`, SIGKILLs its process tree after that many seconds."""
    cmd = [part.replace("OUT", str(out)) for part in cmd]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, errors = process.communicate(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.communicate()
        return kill_after
    assert process.returncode == 0 or kill_after is not None, errors[-3000:]
    return time.perf_counter() - started


def outputs(out) -> dict[str, bytes | None]:
    """The stage's output bytes, less its run reports (they count what this particular run did)."""
    return {name: data for name, data in snapshot(out).items()
            if not os.path.basename(name).startswith(("report", "dump.json"))}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["shards", "kmeans", "encodec"])
def test_sigkill_at_random_moments_of_an_offline_stage_then_its_output_is_byte_identical(train_data, small_shards,
                                                                                        tmp_path, stage):
    cmd = stage_commands(train_data, small_shards, tmp_path)[stage]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    duration = run_stage(cmd, clean)
    seed = random.randrange(2 ** 32)
    moments = [random.Random(seed + i).uniform(0.3, 1.0) * duration for i in range(STAGE_KILLS)]
    print(f"{stage} seed {seed}: kills after {[round(m, 2) for m in moments]} s of a {duration:.1f} s run")
    for moment in moments:
        run_stage(cmd, killed, kill_after=moment)
    run_stage(cmd, killed)
    assert outputs(killed) == outputs(clean), seed
