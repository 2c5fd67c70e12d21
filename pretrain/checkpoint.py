"""Checkpoints of a run: one directory per save, written under a temporary name, renamed when complete.

    RUN/checkpoints/step-00001200/
        mp_rank_00_model_states.pt, *optim_states.pt  DeepSpeed's engine (model, optimizer, scheduler, scaler)
        rank-00000.pt ...                              per rank: the named parts' states (trainer, rng, loader)
        config.yaml                                    the resolved run config
        complete.json                                  written last: step, world, every file's size and crc32
    RUN/checkpoints/latest                             the newest complete one's name (for people and tools)
    RUN/checkpoints/broken/step-N/, step-N.txt         checkpoints found broken, moved here with the reason

The checkpointer is given named stateful parts, torchtitan-style
(`{"trainer": ..., "rng": ..., "loader": ...}`, each with `state_dict()` and
`load_state_dict()`); every rank saves their states together in its rank
file and gets them back on resume.

A save goes to `.tmp-step-N/`: every rank writes its part, the files are
hashed (split over the ranks) and fsynced, rank 0 writes `complete.json`
and renames the folder. A kill at any moment leaves either a complete
checkpoint or a temporary folder, which the next start deletes once it has
decided to run. A save that fails (a full disk) removes its temporary folder
and stops the run with the free space it needs; earlier checkpoints stay.

Loading takes the newest checkpoint whose files all have their recorded
size and checksum (checked before DeepSpeed reads anything) and that loads
without error; a load that fails midway is followed by the next candidate
in a clean engine. The newer broken ones are then moved to `broken/`. When
the run holds checkpoints and none loads, the run is refused with the
reason for each, and nothing on disk is changed (`train.restart=true`
instead moves the old run into `RUN/previous/DATE/` and starts over).
Pruning keeps the `train.keep` newest good checkpoints, only after a new
save is complete; a checkpoint that fails its check is moved to `broken/`,
never deleted. Everything that is not DeepSpeed's own is read with
`torch.load(weights_only=True)`.

All knowledge of DeepSpeed's file names is in this module.
"""
from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import time
import zlib
from typing import Callable, Mapping, Protocol

import torch

from data.files import atomic_write_bytes, atomic_write_json, read_json
from data.logs import logger
from pretrain import faults

PATTERN = re.compile(r"^step-(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module (and, at ZeRO 0, optimizer) file
MANIFEST = "complete.json"
HASH_CHUNK = 16 << 20  # bytes read per crc32 update
SAVE_POINTS = ("written", "sealed", "renamed", "pruning")  # where faults.pause_at may stop a save (rank 0)
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "samples", "status.json", "config.yaml")
RANK_FILE_VERSION = 2  # {"version": 2, "parts": {name: state}}
log = logger(__name__)


class CheckpointError(RuntimeError):
    pass


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def tag(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int:
    return int(PATTERN.match(name).group(1))


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather(value) -> list:
    """Every rank's `value`, in rank order, on every rank (a list of one without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


# -- file checks


def crc32_of(path: str, sync: bool = False) -> str:
    """The crc32 of the file's bytes, streamed in HASH_CHUNK pieces; `sync`: fsync it as well."""
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if sync:
            os.fsync(file.fileno())
    return f"{crc:08x}"


def file_records(folder: str, names: list[str], sync: bool) -> dict[str, dict]:
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)),
                   "crc32": crc32_of(os.path.join(folder, name), sync)} for name in names}


def file_problem(folder: str, name: str, entry, content: bool) -> str | None:
    """Why file `name` of `folder` differs from its manifest entry (missing, size, checksum), or None."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, {entry['bytes']} when saved (truncated or overwritten)"
    crc = crc32_of(path) if content else entry["crc32"]
    if crc != entry["crc32"]:
        return f"{name} has crc32 {crc}, {entry['crc32']} when saved (same size, other bytes: corrupted)"
    return None


def read_manifest(folder: str) -> dict:
    return read_json(os.path.join(folder, MANIFEST), "the checkpoint manifest")


def find_problem(folder: str, content: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why the checkpoint in `folder` cannot be loaded (unfinished, missing, truncated or corrupted files), or
    None. `content`: compare checksums too, not only sizes. `share=(rank, world)`: check only this rank's
    share of the files (every world-th one), for a check split over ranks."""
    try:
        manifest = read_manifest(folder)
        files = sorted(manifest["files"].items())
    except (OSError, ValueError, KeyError, AttributeError) as error:
        return f"{MANIFEST} unreadable ({error})"
    if manifest.get("hash") != "crc32":
        return f"{MANIFEST} has no checksums: written by an earlier release of this trainer, which this one does not read"
    rank, world = share
    problems = [p for name, entry in files[rank::world] if (p := file_problem(folder, name, entry, content))]
    return "; ".join(problems) or None


def checkpoint_names(root: str) -> list[str]:
    """The renamed (finished) checkpoint folders under `root`, newest first."""
    names = [n for n in os.listdir(root) if PATTERN.match(n)] if os.path.isdir(root) else []
    return sorted(names, reverse=True)


def newest(run_dir: str) -> str:
    """The newest complete checkpoint folder of a run (for export and extraction), or an error that says why."""
    root = os.path.join(run_dir, "checkpoints")
    problems = {}
    for name in checkpoint_names(root):
        problems[name] = find_problem(os.path.join(root, name))
        if problems[name] is None:
            return os.path.join(root, name)
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise FileNotFoundError(f"{run_dir}: no checkpoint under {root} passes its checks ({listed})")
    raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {root}; train first (python -m pretrain.train)")


# -- DeepSpeed's files, for readers without an engine


def module_weights(folder: str) -> dict[str, torch.Tensor]:
    """The engine's module state dict as saved (in the training precision), without DeepSpeed."""
    states = torch.load(os.path.join(folder, MODEL_STATES), map_location="cpu", weights_only=False)
    return states["module"]


def fp32_master_weights(folder: str) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a mixed-precision ZeRO (stage >= 1) checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, name = os.path.split(os.path.abspath(folder))
    return get_fp32_state_dict_from_zero_checkpoint(root, name)


# -- moving aside, never deleting


def unused_path(path: str) -> str:
    """`path`, or `path.2`, `path.3` ... whichever does not exist yet."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def set_aside_broken(root: str, name: str, reason: str) -> str:
    """Moves checkpoint `name` to root/broken/ with a note of `reason` beside it; returns its new folder."""
    target = unused_path(os.path.join(root, "broken", name))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(root, name), target)
    atomic_write_bytes(target + ".txt", f"{time.strftime('%Y-%m-%d %H:%M:%S')}: moved here: {reason}\n".encode())
    return target


def move_run_aside(run_dir: str) -> str:
    """Moves the run's checkpoints, metrics, TensorBoard logs, sample logs and status into
    RUN/previous/DATE/ (train.restart=true); returns that folder."""
    target = unused_path(os.path.join(run_dir, "previous", time.strftime("%Y-%m-%dT%H-%M-%S")))
    os.makedirs(target)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(run_dir, name)):
            os.rename(os.path.join(run_dir, name), os.path.join(target, name))
    return target


def refusal(run_dir: str, root: str, failures: dict[str, str]) -> str:
    listed = "\n".join(f"  {os.path.join(root, name)}: {why}" for name, why in failures.items())
    return (f"{run_dir} holds {len(failures)} checkpoint(s) and none of them loads:\n{listed}\n"
            "Nothing was changed. Fix them or move them out of the way to resume from an earlier state, or pass "
            f"train.restart=true to start over from step 0 (it first moves the checkpoints, metrics.jsonl and "
            f"tensorboard/ into {os.path.join(run_dir, 'previous', 'DATE')}/; nothing is deleted).")


# -- the checkpointer


class Checkpointer:
    """Saves and resumes DeepSpeed's engine with this rank's named `parts` (see the module docstring)."""

    def __init__(self, run_dir: str, rank: int, world: int, keep: int, parts: Mapping[str, Stateful]):
        self.run_dir, self.root = run_dir, os.path.join(run_dir, "checkpoints")
        self.rank, self.world, self.keep, self.parts = rank, world, keep, dict(parts)
        self.verified: set[str] = set()  # checked by content in this process: pruning trusts them

    def complete(self) -> list[str]:
        return checkpoint_names(self.root)

    def remove_stale_temporaries(self) -> None:
        """Deletes what saves and prunes killed midway left (`.tmp-*`); call once the run is going ahead."""
        if self.rank == 0:
            for stale in glob.glob(os.path.join(self.root, ".tmp-*")):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    # -- saving

    def save(self, engine, step: int, config_yaml: str) -> str:
        """Collective: every rank calls it. Returns the checkpoint's directory; raises CheckpointError when a
        write fails, after removing the temporary folder."""
        folder = os.path.join(self.root, f".tmp-{tag(step)}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
        states = self.states()
        self._guarded(folder, lambda: self._write_parts(engine, folder, states, config_yaml))
        barrier()
        faults.pause_at("written", step)
        self._guarded(folder, lambda: self._seal(folder, step))
        final = os.path.join(self.root, tag(step))
        if self.rank == 0:
            faults.pause_at("sealed", step)
            self._replace(final, folder, step)
            faults.pause_at("renamed", step)
            atomic_write_bytes(os.path.join(self.root, "latest"), tag(step).encode() + b"\n")
            self.verified.add(tag(step))
            self._prune(step)
        barrier()
        return final

    def states(self) -> dict:
        """This rank's file: every part's state, by name."""
        return {"version": RANK_FILE_VERSION, "parts": {name: part.state_dict() for name, part in self.parts.items()}}

    def _write_parts(self, engine, folder: str, states: dict, config_yaml: str) -> None:
        engine.save_checkpoint(self.root, tag=os.path.basename(folder), save_latest=False)
        torch.save(states, os.path.join(folder, rank_file(self.rank)))
        if self.rank == 0:
            atomic_write_bytes(os.path.join(folder, "config.yaml"), config_yaml.encode())

    def _seal(self, folder: str, step: int) -> None:
        """Hashes and fsyncs the files (each rank its share), then rank 0 writes complete.json."""
        names = sorted(n for n in os.listdir(folder) if n != MANIFEST)
        shares = gather(file_records(folder, names[self.rank::self.world], sync=True))
        if self.rank == 0:
            files = {name: record for share in shares for name, record in share.items()}
            atomic_write_json(os.path.join(folder, MANIFEST),
                              {"step": step, "world": self.world, "hash": "crc32", "files": dict(sorted(files.items()))})

    def _guarded(self, folder: str, write: Callable[[], None]) -> None:
        try:
            write()
        except Exception as error:  # noqa: BLE001: any failed write: clean up, say why and what it needs
            written = folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            raise CheckpointError(self._save_failed(folder, error, written)) from error

    def _save_failed(self, folder: str, error: Exception, written: int) -> str:
        free = shutil.disk_usage(self.root).free if os.path.isdir(self.root) else 0
        previous = self.complete()
        needed = folder_bytes(os.path.join(self.root, previous[0])) if previous else written
        full = getattr(error, "errno", None) == errno.ENOSPC or "write failed" in str(error) or free < needed
        return (f"saving the checkpoint {folder} failed on rank {self.rank} ({type(error).__name__}: {error})"
                f"{' - the disk looks full' if full else ''}. Its temporary folder was removed; the earlier "
                f"checkpoints are untouched ({', '.join(previous) or 'none yet'}). {free / 1e9:.2f} GB are free "
                f"on {self.root}; one checkpoint of this run needs about {needed / 1e9:.2f} GB"
                f"{'' if previous else ' or more (it failed after writing that much)'}. Free that much space (or "
                "lower train.keep) and start the same command again: it resumes from the newest checkpoint.")

    def _replace(self, final: str, folder: str, step: int) -> None:
        if os.path.exists(final):  # a broken save of the same step that a resume passed over: keep it aside
            set_aside_broken(self.root, tag(step), "replaced by a new save of the same step")
        os.rename(folder, final)
        sync_folder(self.root)

    def _prune(self, step: int) -> None:
        """Keeps the train.keep newest good checkpoints; moves the broken ones to broken/ (rank 0, after a save)."""
        problem = find_problem(os.path.join(self.root, tag(step)), content=False)
        if problem:  # cannot happen unless the disk changed under us; then prune nothing
            log.warning("the new checkpoint %s fails its check right after saving (%s); nothing pruned",
                        tag(step), problem)
            return
        good = 0
        for name in self.complete():
            problem = find_problem(os.path.join(self.root, name), content=name not in self.verified)
            if problem:
                log.warning("checkpoint %s is broken (%s); moved to %s/broken/", name, problem, self.root)
                set_aside_broken(self.root, name, problem)
                continue
            self.verified.add(name)
            good += 1
            if good > self.keep:
                self._delete(name, step)

    def _delete(self, name: str, step: int) -> None:
        doomed = os.path.join(self.root, f".tmp-prune-{name}")  # one rename: never a half-deleted step-N/
        os.rename(os.path.join(self.root, name), doomed)
        faults.pause_at("pruning", step)
        shutil.rmtree(doomed, ignore_errors=True)
        self.verified.discard(name)

    # -- finding and loading

    def resume(self, engine, rebuild: Callable[[], object], check_config, restart: bool = False):
        """Loads the newest good checkpoint into `engine` and this rank's parts. Returns (engine, step), or
        (engine, None) to start from step 0, the parts untouched: the run holds no checkpoint, or none loads
        and `restart` (the old run was moved to previous/). Raises CheckpointError when none loads and not
        `restart`, having changed nothing on disk. `rebuild()` makes a clean engine after a load that failed midway;
        `check_config(saved_yaml, manifest)` raises when the run may not resume from a checkpoint."""
        failures = {}
        for name in self.complete():
            problem = self._verify(name)
            states = None
            if problem is None:
                folder = os.path.join(self.root, name)
                with open(os.path.join(folder, "config.yaml")) as file:
                    check_config(file.read(), read_manifest(folder))
                problem, states = self._load_agreed(engine, name)
                if problem:
                    engine = rebuild()
            if problem:
                failures[name] = problem
                if self.rank == 0:  # every rank knows the same problems
                    log.warning("checkpoint %s skipped: %s", os.path.join(self.root, name), problem)
                continue
            self.verified.add(name)
            self._set_aside_all(failures)
            self._restore(states)
            return engine, step_of(name)
        if failures and not restart:
            raise CheckpointError(refusal(self.run_dir, self.root, failures))
        if failures:
            self._restart()
        return engine, None

    def _verify(self, name: str) -> str | None:
        """The checkpoint's problem as found by all ranks together (each checks its share of the files)."""
        problems = gather(find_problem(os.path.join(self.root, name), share=(self.rank, self.world)))
        return "; ".join(sorted({p for p in problems if p})) or None

    def _load_agreed(self, engine, name: str) -> tuple[str | None, dict | None]:
        try:
            state, problem = self._load(engine, name), None
        except Exception as error:  # noqa: BLE001: any failure to read means: try the previous one
            state, problem = None, f"loading failed on rank {self.rank}: {type(error).__name__}: {error}"
        problems = [p for p in gather(problem) if p]
        return ("; ".join(problems), None) if problems else (None, state)

    def _load(self, engine, name: str) -> dict[str, dict]:
        """Loads the engine; returns the parts' states from this rank's file (not yet given to the parts)."""
        path, _ = engine.load_checkpoint(self.root, tag=name, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError("DeepSpeed found no checkpoint files")
        saved = torch.load(os.path.join(self.root, name, rank_file(self.rank)), weights_only=True)
        if saved.get("version") != RANK_FILE_VERSION:
            raise ValueError(f"{rank_file(self.rank)} is version {saved.get('version', 1)}, not {RANK_FILE_VERSION}: "
                             "written by an earlier release of this trainer, which this one does not read")
        states = saved["parts"]
        if set(states) != set(self.parts):
            raise ValueError(f"{rank_file(self.rank)} holds the parts {sorted(states)}; this run has {sorted(self.parts)}")
        return states

    def _restore(self, states: dict[str, dict]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(states[name])

    def _set_aside_all(self, failures: dict[str, str]) -> None:
        if self.rank == 0:
            for name, why in failures.items():
                log.info("moved %s to %s", name, set_aside_broken(self.root, name, why))
        barrier()

    def _restart(self) -> None:
        if self.rank == 0:
            log.warning("train.restart: none of the checkpoints loads; the old run is now in %s; starting from step 0",
                        move_run_aside(self.run_dir))
        barrier()


def folder_bytes(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, name)))


def sync_folder(folder: str) -> None:
    """fsync a directory, so a rename in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
