"""The checkpointer alone, with a small stand-in for the DeepSpeed engine (a world of one, no process group):
named stateful parts saved and given back (and a rank file from before them), refusal over broken
checkpoints, moving broken ones aside, pruning that counts only good ones, checksums, a load that fails
midway, and a full disk during a save."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from pretrain import checkpoint
from checkpoint_files import seal
from pretrain.checkpoint import MODEL_STATES, CheckpointError, Checkpointer, crc32_of, find_problem, tag


class FakeEngine:
    """Saves and loads one weight tensor and an optimizer counter the way DeepSpeed lays out its files."""

    def __init__(self, value: float = 0.0, fail_after_module: bool = False):
        self.weight, self.optimizer_steps = torch.full((4,), value), 0
        self.fail_after_module = fail_after_module

    def save_checkpoint(self, root, tag, save_latest):
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        torch.save({"module": {"weight": self.weight}}, os.path.join(folder, MODEL_STATES))
        torch.save({"steps": self.optimizer_steps}, os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))

    def load_checkpoint(self, root, tag, **options):
        folder = os.path.join(root, tag)
        self.weight = torch.load(os.path.join(folder, MODEL_STATES), weights_only=True)["module"]["weight"]
        if self.fail_after_module:  # what a half-loaded engine looks like: new weights, old optimizer
            raise RuntimeError("optimizer state does not match")
        self.optimizer_steps = torch.load(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                          weights_only=True)["steps"]
        return folder, {}


class Part:
    """A stateful part as a trainer gives one to the checkpointer: its state is one dict."""

    def __init__(self, **state):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def accept(saved_yaml, manifest):
    pass


def save(saver: Checkpointer, engine: FakeEngine, step: int) -> str:
    saver.parts["trainer"].state = {"step": step}
    return saver.save(engine, step, "train: {}\n")


def save_steps(run_dir, steps, keep=10) -> Checkpointer:
    saver = Checkpointer(str(run_dir), rank=0, world=1, keep=keep, parts={"trainer": Part()})
    for step in steps:
        engine = FakeEngine(float(step))
        engine.optimizer_steps = step
        save(saver, engine, step)
    return saver


def resumed(run_dir, engine, rebuild, restart=False) -> tuple[FakeEngine, int | None, dict]:
    """(engine, step, the trainer part's state) after a resume by a fresh checkpointer."""
    saver = fresh(run_dir)
    engine, step = saver.resume(engine, rebuild, accept, restart=restart)
    return engine, step, saver.parts["trainer"].state


def truncate(run_dir, step, name=MODEL_STATES):
    path = os.path.join(run_dir, "checkpoints", tag(step), name)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


def snapshot(folder) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(parent, name), folder)] = None
        for name in files:
            with open(os.path.join(parent, name), "rb") as file:
                found[os.path.relpath(os.path.join(parent, name), folder)] = file.read()
    return found


def fresh(run_dir) -> Checkpointer:
    return Checkpointer(str(run_dir), rank=0, world=1, keep=3, parts={"trainer": Part()})


def test_a_save_records_every_file_with_its_size_and_crc32(tmp_path):
    save_steps(tmp_path, [5])
    folder = tmp_path / "checkpoints" / tag(5)
    manifest = checkpoint.read_manifest(str(folder))
    assert manifest["step"] == 5 and manifest["hash"] == "crc32"
    assert sorted(manifest["files"]) == sorted(n for n in os.listdir(folder) if n != "complete.json")
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": os.path.getsize(folder / name), "crc32": crc32_of(str(folder / name))}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000005\n"


def test_all_checkpoints_broken_is_refused_naming_each_and_nothing_changes(tmp_path):
    save_steps(tmp_path, [2, 4, 6])
    for step in (2, 4, 6):
        truncate(tmp_path, step)
    os.makedirs(tmp_path / "checkpoints" / ".tmp-step-00000008")  # a killed save: left alone on a refusal
    before = snapshot(tmp_path)
    rebuilt = []
    with pytest.raises(CheckpointError) as refused:
        fresh(tmp_path).resume(FakeEngine(), lambda: rebuilt.append(1) or FakeEngine(), accept)
    message = str(refused.value)
    assert all(f"{tag(step)}: {MODEL_STATES} has" in message for step in (2, 4, 6)), message
    assert "truncated" in message and "train.restart=true" in message and "Nothing was changed" in message
    assert snapshot(tmp_path) == before and rebuilt == []  # sizes were checked before any engine read a file


def test_restart_moves_the_old_run_into_previous_and_then_resumes_its_own_checkpoints(tmp_path):
    save_steps(tmp_path, [2, 4])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    os.makedirs(tmp_path / "tensorboard")
    for step in (2, 4):
        truncate(tmp_path, step)
    old = snapshot(tmp_path)
    engine, step, state = resumed(tmp_path, FakeEngine(), FakeEngine, restart=True)
    assert step is None and state == {}  # the part is left as it was
    (previous,) = os.listdir(tmp_path / "previous")
    assert snapshot(tmp_path / "previous" / previous) == old  # every byte kept, nothing deleted
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "metrics.jsonl")

    save_steps(tmp_path, [2])  # the new run saves; started again with restart=true it resumes, not restarts
    engine, step, state = resumed(tmp_path, FakeEngine(), FakeEngine, restart=True)
    assert step == 2 and state == {"step": 2} and os.listdir(tmp_path / "previous") == [previous]


def test_the_newest_broken_is_passed_over_then_moved_to_broken_with_its_reason(tmp_path):
    save_steps(tmp_path, [2, 4, 6])
    truncate(tmp_path, 6, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    engine, step, state = resumed(tmp_path, FakeEngine(), FakeEngine)
    assert step == 4 and state == {"step": 4} and float(engine.weight[0]) == 4.0 and engine.optimizer_steps == 4
    broken = tmp_path / "checkpoints" / "broken"
    assert os.path.isdir(broken / tag(6)) and "optim_states.pt has" in (broken / f"{tag(6)}.txt").read_text()
    assert checkpoint.checkpoint_names(str(tmp_path / "checkpoints")) == [tag(4), tag(2)]


def test_a_same_size_corruption_is_caught_by_the_checksum_before_the_engine_reads(tmp_path):
    save_steps(tmp_path, [2, 4])
    path = tmp_path / "checkpoints" / tag(4) / MODEL_STATES
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "crc32" in find_problem(str(path.parent)) and find_problem(str(path.parent), content=False) is None
    engine, step = fresh(tmp_path).resume(FakeEngine(), FakeEngine, accept)
    assert step == 2 and float(engine.weight[0]) == 2.0


def test_a_load_that_fails_midway_is_followed_by_the_previous_checkpoint_in_a_clean_engine(tmp_path):
    save_steps(tmp_path, [2, 4])
    half_loaded, clean = FakeEngine(fail_after_module=True), FakeEngine()
    engine, step, state = resumed(tmp_path, half_loaded, lambda: clean)
    assert engine is clean and step == 2 and state == {"step": 2} and float(clean.weight[0]) == 2.0 and clean.optimizer_steps == 2
    assert float(half_loaded.weight[0]) == 4.0  # the engine the failure left half-loaded is not used


def test_pruning_keeps_the_newest_good_ones_and_moves_broken_ones_aside(tmp_path):
    save_steps(tmp_path, [200, 250, 300])  # the scenario: every model file truncated, then new saves
    for step in (200, 250, 300):
        truncate(tmp_path, step)
    names = lambda: checkpoint.checkpoint_names(str(tmp_path / "checkpoints"))  # noqa: E731
    saver = fresh(tmp_path)
    save(saver, FakeEngine(50.0), 50)
    assert names() == [tag(50)]  # the broken ones are not counted, and not deleted: moved
    assert sorted(os.listdir(tmp_path / "checkpoints" / "broken")) == sorted(
        [tag(s) for s in (200, 250, 300)] + [f"{tag(s)}.txt" for s in (200, 250, 300)])
    for step in (100, 150, 200, 250):
        save(saver, FakeEngine(float(step)), step)
    assert names() == [tag(250), tag(200), tag(150)]  # keep=3 good ones
    assert os.path.isdir(tmp_path / "checkpoints" / "broken" / tag(200))  # the old broken one is still there
    assert [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".tmp")] == []


def test_pruning_checks_an_older_checkpoint_it_did_not_write_by_content(tmp_path):
    save_steps(tmp_path, [2, 4])
    path = tmp_path / "checkpoints" / tag(2) / MODEL_STATES
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    saver = Checkpointer(str(tmp_path), rank=0, world=1, keep=2, parts={"trainer": Part()})
    save(saver, FakeEngine(6.0), 6)
    assert checkpoint.checkpoint_names(str(tmp_path / "checkpoints")) == [tag(6), tag(4)]
    assert "crc32" in (tmp_path / "checkpoints" / "broken" / f"{tag(2)}.txt").read_text()


class FullDiskEngine(FakeEngine):
    """Writes part of its model file, then the disk is full."""

    def save_checkpoint(self, root, tag, save_latest):
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, MODEL_STATES), "wb") as file:
            file.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, MODEL_STATES))


def test_a_full_disk_during_a_save_keeps_the_earlier_checkpoints_and_names_the_space_needed(tmp_path):
    saver = save_steps(tmp_path, [2, 4], keep=3)
    before = snapshot(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError) as failed:
        save(saver, FullDiskEngine(), 6)
    message = str(failed.value)
    needed = checkpoint.folder_bytes(str(tmp_path / "checkpoints" / tag(4)))
    assert ".tmp-step-00000006" in message and "disk looks full" in message and "GB are free" in message
    assert f"needs about {needed / 1e9:.2f} GB" in message and "step-00000004" in message
    assert snapshot(tmp_path / "checkpoints") == before  # no temporary folder, earlier ones as they were


def test_a_torch_writer_failure_in_the_rank_state_is_reported_the_same_way(tmp_path, monkeypatch):
    saver = save_steps(tmp_path, [2], keep=3)
    before = snapshot(tmp_path / "checkpoints")
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):  # torch's zip writer says this when the disk is full
        if os.path.basename(str(path)).startswith("rank-"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"\.tmp-step-00000003 failed on rank 0 .*disk looks full"):
        save(saver, FakeEngine(), 3)
    assert snapshot(tmp_path / "checkpoints") == before


def test_a_manifest_from_before_checksums_is_named_as_such(tmp_path):
    save_steps(tmp_path, [2])
    folder = str(tmp_path / "checkpoints" / tag(2))
    manifest = checkpoint.read_manifest(folder)
    old = {"step": 2, "world": 1, "files": {name: entry["bytes"] for name, entry in manifest["files"].items()}}
    checkpoint.atomic_write_json(os.path.join(folder, "complete.json"), old)
    assert find_problem(folder) == ("complete.json has no checksums: written by an earlier release of this trainer, "
                                    "which this one does not read")


def test_every_named_part_is_saved_in_the_rank_file_and_given_back_on_resume(tmp_path):
    parts = {"trainer": Part(step=3), "rng": Part(generator=torch.arange(4)), "loader": Part(offset=17)}
    saver = Checkpointer(str(tmp_path), rank=0, world=1, keep=3, parts=parts)
    folder = saver.save(FakeEngine(3.0), 3, "train: {}\n")
    saved = torch.load(os.path.join(folder, "rank-00000.pt"), weights_only=True)
    assert saved["version"] == 2 and sorted(saved["parts"]) == ["loader", "rng", "trainer"]

    again = {name: Part() for name in parts}
    engine, step = Checkpointer(str(tmp_path), rank=0, world=1, keep=3, parts=again).resume(
        FakeEngine(), FakeEngine, accept)
    assert step == 3 and float(engine.weight[0]) == 3.0
    assert again["trainer"].state == {"step": 3} and again["loader"].state == {"offset": 17}
    assert torch.equal(again["rng"].state["generator"], torch.arange(4))


def test_a_rank_file_from_before_named_parts_is_refused_naming_its_version(tmp_path):
    """Version 1 (the trainer's one flat dict per rank, from an earlier release) is not read: the run says so."""
    save_steps(tmp_path, [4])
    folder = str(tmp_path / "checkpoints" / tag(4))
    torch.save({"step": 4, "generator": torch.arange(3)}, os.path.join(folder, "rank-00000.pt"))
    seal(folder, 4, world=1)
    parts = {"trainer": Part()}
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt is version 1, not 2: written by an earlier release"):
        Checkpointer(str(tmp_path), rank=0, world=1, keep=3, parts=parts).resume(FakeEngine(), FakeEngine, accept)
    assert parts["trainer"].state == {}


def test_a_checkpoint_without_one_of_the_parts_is_not_loaded(tmp_path):
    save_steps(tmp_path, [2])  # only a "trainer" part
    parts = {"trainer": Part(), "loader": Part()}
    with pytest.raises(CheckpointError, match=r"holds the parts \['trainer'\]; this run has \['loader', 'trainer'\]"):
        Checkpointer(str(tmp_path), rank=0, world=1, keep=3, parts=parts).resume(FakeEngine(), FakeEngine, accept)
    assert parts["trainer"].state == {} and parts["loader"].state == {}  # nothing half-restored
