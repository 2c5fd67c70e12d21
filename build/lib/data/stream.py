"""Streaming loader: shards -> shuffled, frame-aligned random crops -> batches, resumable exactly.

    loader = AudioLoader(StreamConfig(shards="shards/", crop_seconds=5, batch_size=8), rank=0, world=1)
    for batch in loader:            # {"audio": float32 [B, samples], "lengths": [B], "offsets": [B], "keys", "shards",
        ...                         #  "labels": {teacher: int64 [B, samples // 320, codebooks], -1 past a clip's end}}
    state = loader.state_dict()     # save with the checkpoint; AudioLoader(...).load_state_dict(state) resumes

Each (rank, worker) pair reads whole shards sequentially, WebDataset-style:
in training mode from an endless sequence of per-epoch seeded permutations
of the shard list (position p of the sequence goes to global worker p mod
(world x workers)), in evaluation mode from one pass over the sorted list.
Samples go through a seeded shuffle buffer, then a random crop of
`crop_seconds` that starts on a 320-sample frame boundary (label frame i
covers samples [320 i, 320 i + 320)). Only the cropped part of a segment's
FLAC (or WAV) is read, as int16 (exact for our 16-bit shards); batches cross from
the workers as int16 and become float32 in [-1, 1) in the main process, or,
with `AudioLoader(..., convert=False)`, stay int16 until `to_device` moves
them (from pinned memory with `pin_memory=True`) and converts them there:
half the bytes over the bus, the same numbers.

The state of a worker is small: where it is in its shard sequence, the byte
offset of the next sample in its current shard, the shuffle RNG, and the
buffer as (shard, byte offset) references, which are re-read on restore.
Teacher labels (StreamConfig.labels, folders written by a teacher dump) are
joined per item by (shard, key, offset): label frame offset // 320 + i goes
with crop frame i. Every teacher manifest is checked against the shard index
before the first batch, and a sample whose codes do not fit its audio stops
the run (LabelError) instead of being skipped.
"""
from __future__ import annotations

import json
import os
import signal
import zlib
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data.audio import FRAME_SAMPLES, SAMPLE_RATE
from data.cluster import rank_world
from data.index import read_index
from data.labels import SidecarReader, check_labels
from data.logs import Throttled, logger
from data.shards import AUDIO_PARTS, audio_part
from data.tar import Member, OpenFiles, read_one, read_samples

STATE_VERSION = 1
MAX_BAD_IN_A_ROW = 100
LAZY = AUDIO_PARTS  # audio stays in the shard until its crop is decoded
log = logger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    shards: str  # folder written by `python -m data.shards build`
    crop_seconds: float = 5.0
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 256  # samples per worker; 0 turns shuffling off
    short: str = "pad"  # clips shorter than the crop: "pad" with zeros (lengths tell) or "drop"
    min_seconds: float = 1.0  # clips shorter than this are always dropped
    seed: int = 0
    train: bool = True  # False: each sample once, in order, deterministic crops
    prefetch_factor: int = 2
    labels: tuple[str, ...] = ()  # label folders (teacher dumps) joined to each crop by shard, key and offset

    @property
    def crop_samples(self) -> int:
        return int(round(self.crop_seconds * SAMPLE_RATE))

    def check(self) -> None:
        if self.short not in ("pad", "drop"):
            raise ValueError(f"StreamConfig.short={self.short!r}: use 'pad' or 'drop'")
        if self.crop_samples % FRAME_SAMPLES:
            raise ValueError(
                f"StreamConfig.crop_seconds={self.crop_seconds}: the crop must be a whole number of "
                f"{FRAME_SAMPLES}-sample frames at {SAMPLE_RATE} Hz (e.g. 5.0 or 5.12)"
            )


# ---------------------------------------------------------------- cropping


def choose_offset(total: int, crop: int, rng: np.random.Generator) -> int:
    """A crop start on a frame boundary, uniform over the starts that fit."""
    if total <= crop:
        return 0
    return int(rng.integers(0, (total - crop) // FRAME_SAMPLES + 1)) * FRAME_SAMPLES


def decode_crop(member: Member, offset: int, count: int) -> tuple[np.ndarray, int]:
    """`count` int16 samples from `offset` (zero-padded past the end) and how many were real.

    Shards hold 16-bit FLAC or WAV, so int16 is exact; it decodes faster and crosses
    from worker to trainer in half the bytes of float32.
    """
    audio = np.zeros(count, dtype=np.int16)
    with member.open() as file, sf.SoundFile(file) as f:
        f.seek(offset)
        length = len(f.read(out=audio[: max(0, min(count, f.frames - offset))]))
    return audio, length


def wav_layout(header: bytes) -> tuple[int, int] | None:
    """(byte offset of the samples, bytes of samples) of a 16-bit mono PCM WAV from its first bytes; None for
    any other layout (then soundfile reads it)."""
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    at, plain_pcm = 12, False
    while at + 8 <= len(header):
        chunk, size = header[at:at + 4], int.from_bytes(header[at + 4:at + 8], "little")
        if chunk == b"fmt ":
            fmt = header[at + 8:at + 24]
            plain_pcm = (len(fmt) == 16 and int.from_bytes(fmt[0:2], "little") == 1  # PCM
                         and int.from_bytes(fmt[2:4], "little") == 1 and int.from_bytes(fmt[14:16], "little") == 16)
        elif chunk == b"data":
            return (at + 8, size) if plain_pcm else None
        at += 8 + size + size % 2
    return None


def read_wav_crop(member: Member, offset: int, count: int, files: OpenFiles) -> tuple[np.ndarray, int]:
    """`decode_crop` for a WAV member without decoding: one read of its header, one of the crop's samples."""
    layout = wav_layout(files.read(member, 512))
    if layout is None:
        return decode_crop(member, offset, count)
    start, size = layout
    frames = min(size, member.size - start) // 2
    audio = np.zeros(count, dtype="<i2")
    length = max(0, min(count, frames - offset))
    if files.read_into(member, audio[:length], start + 2 * offset) != 2 * length:
        raise ValueError(f"{member.path}: the WAV member at byte {member.offset} ends early; rebuild this shard")
    return audio, length


class ShardStream(IterableDataset):
    """One worker's stream of cropped items; see the module docstring."""

    def __init__(self, cfg: StreamConfig, shard_names: list[str], rank: int, world: int, teachers: dict | None = None,
                 shard_bytes: dict[str, int] | None = None):
        self.cfg, self.names, self.rank, self.world = cfg, shard_names, rank, world
        self.teachers = teachers or {}  # name -> (labels dir, codebooks)
        self.shard_bytes = shard_bytes or {}  # name -> size in the index: a shard of another size is skipped
        self.bad_shards: set[str] = set()  # found missing or truncated by this worker
        self.readers: dict[str, SidecarReader] | None = None  # opened lazily, in the worker
        self.files = OpenFiles()  # the shards last cropped from, kept open (WAV crops)
        self.throttle = Throttled(log)  # per-sample warnings: the first few of a kind, then one in 100
        self.state = self._initial_state()

    def _initial_state(self) -> dict:
        return {"taken": 0, "offset": 0, "buffer": [], "rng": None, "popped": 0, "bad": 0}

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))  # a deep copy of plain data

    def load_state_dict(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))

    # -- which shards this worker reads

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def _shard_at(self, taken: int) -> str | None:
        me, everyone = self._worker()
        position = me + taken * everyone
        if not self.cfg.train:
            return self.names[position] if position < len(self.names) else None
        epoch, i = divmod(position, len(self.names))
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.names))
        return self.names[order[i]]

    def _raw(self) -> Iterator[tuple[list, str, dict]]:
        """([shard, offset], key, parts) in reading order; keeps taken/offset current."""
        state = self.state
        while (name := self._shard_at(state["taken"])) is not None:
            path = os.path.join(self.cfg.shards, name)
            problem = self._shard_problem(name)
            if problem:
                self._skip_shard(name, problem)
                state["taken"], state["offset"] = state["taken"] + 1, 0
                continue
            for start, next_start, key, parts in read_samples(path, state["offset"], lazy=LAZY):
                state["offset"] = next_start
                yield [name, start], key, parts
            state["taken"], state["offset"] = state["taken"] + 1, 0

    def _shard_problem(self, name: str) -> str | None:
        """Why shard `name` cannot be read as the index describes it (missing, other size), or None."""
        path = os.path.join(self.cfg.shards, name)
        if not os.path.exists(path):
            return "missing"
        size, expected = os.path.getsize(path), self.shard_bytes.get(name)
        if expected is not None and size != expected:
            return f"{size} bytes, the index says {expected} (truncated or rewritten)"
        return None

    def _skip_shard(self, name: str, problem: str) -> None:
        """Counts and warns about a shard that cannot be read; stops when no shard can be."""
        self.bad_shards.add(name)
        self.state["skipped_shards"] = self.state.get("skipped_shards", 0) + 1
        self.throttle.warning("shards skipped", f"{os.path.join(self.cfg.shards, name)}: {problem}; skipped (shard skip "
                              f"{self.state['skipped_shards']} of this reader). Rebuild it with python -m data.shards build")
        if self.bad_shards >= set(self.names):
            raise RuntimeError(f"{self.cfg.shards}: every shard is missing or truncated ({problem} for {name}); "
                               "rebuild them with python -m data.shards build")

    # -- shuffle, crop, yield

    def __iter__(self) -> Iterator[dict]:
        for ref, key, parts in self._shuffled():
            item = self._make_item(ref, key, parts)
            if item is not None:
                yield item

    def _shuffled(self) -> Iterator[tuple[list, str, dict]]:
        state, size = self.state, self.cfg.shuffle_buffer if self.cfg.train else 0
        rng = np.random.default_rng([self.cfg.seed, *self._worker()])
        if state["rng"] is not None:
            rng.bit_generator.state = state["rng"]
        state["buffer"] = [ref for ref in state["buffer"] if not self._shard_problem(ref[0])]  # a shard gone since
        buffer = [(ref, *read_one(os.path.join(self.cfg.shards, ref[0]), ref[1], lazy=LAZY)) for ref in state["buffer"]]
        for incoming in self._raw():
            if len(buffer) < size:
                buffer.append(incoming)
                state["buffer"].append(incoming[0])
                continue
            if size:
                i = int(rng.integers(len(buffer)))
                incoming, buffer[i] = buffer[i], incoming
                state["buffer"][i] = buffer[i][0]
                state["rng"] = rng.bit_generator.state
            yield incoming
        while buffer:  # evaluation mode, or a training set that ran dry
            state["buffer"].pop(0)
            yield buffer.pop(0)

    def _make_item(self, ref: list, key: str, parts: dict) -> dict | None:
        """Crop one sample; None (counted) when it is too short or cannot be decoded."""
        state, cfg = self.state, self.cfg
        state["popped"] += 1
        crop = cfg.crop_samples
        try:
            total = int(json.loads(parts["json"])["samples"])
            if total < cfg.min_seconds * SAMPLE_RATE or (total < crop and cfg.short == "drop"):
                return None
            rng = np.random.default_rng(
                [cfg.seed, *self._worker(), state["popped"]] if cfg.train else [cfg.seed, zlib.crc32(key.encode())]
            )
            offset = choose_offset(total, crop, rng)
            if "wav" in parts:
                audio, length = read_wav_crop(parts["wav"], offset, crop, self.files)
            else:
                audio, length = decode_crop(audio_part(parts), offset, crop)
        except (KeyError, ValueError, RuntimeError, OSError, sf.LibsndfileError) as e:
            return self._bad(ref, key, e)
        state["bad"] = 0
        item = {"audio": audio, "length": length, "offset": offset, "key": key, "shard": ref[0]}
        if self.teachers:  # misaligned or missing labels raise LabelError: a run must not train on them
            item["labels"] = {name: reader.crop(ref[0], key, total, offset, crop) for name, reader in self._readers().items()}
        return item

    def _readers(self) -> dict[str, SidecarReader]:
        if self.readers is None:
            self.readers = {name: SidecarReader(folder, name, books) for name, (folder, books) in self.teachers.items()}
        return self.readers

    def _bad(self, ref: list, key: str, error: Exception) -> None:
        self.state["bad"] += 1
        self.throttle.warning("unreadable samples skipped",
                              f"{ref[0]} sample {key} (byte {ref[1]}): skipped, {type(error).__name__}: {error}")
        if self.state["bad"] >= MAX_BAD_IN_A_ROW:
            raise RuntimeError(f"{self.state['bad']} unreadable samples in a row, last in {ref[0]}; rebuild those shards")
        return None


def collate(items: list[dict]) -> dict:
    audio = torch.empty(len(items), len(items[0]["audio"]), dtype=torch.int16)
    if get_worker_info() is not None:
        audio.share_memory_()  # stacked straight into the buffer the main process maps: one copy, not two
    np.stack([it["audio"] for it in items], out=audio.numpy())
    labels = {name: torch.from_numpy(np.stack([it["labels"][name] for it in items])) for name in items[0].get("labels", {})}
    return {
        "audio": audio,
        "labels": labels,
        "lengths": torch.tensor([it["length"] for it in items]),
        "offsets": torch.tensor([it["offset"] for it in items]),
        "keys": [it["key"] for it in items],
        "shards": [it["shard"] for it in items],
    }


def pcm_to_float(audio: torch.Tensor) -> torch.Tensor:
    """int16 PCM -> float32 in [-1, 1), exactly (a power-of-two scale), on audio's device."""
    return audio.float().mul_(1 / 32768)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(audio float32 [B, N], labels {teacher: int64 [B, T, codebooks]}) of a batch on `device`. A batch of a
    `convert=False` loader crosses as stored (int16 audio, int16/int32 codes; non-blocking from pinned memory)
    and is converted on the device; a converted batch is only moved. On the CPU both give the same tensors."""
    audio = batch["audio"].to(device, non_blocking=True)
    labels = {name: codes.to(device, non_blocking=True) for name, codes in batch["labels"].items()}
    if audio.dtype == torch.int16:
        audio = pcm_to_float(audio)
    return audio, {name: codes.long() for name, codes in labels.items()}  # -1: no label


# ---------------------------------------------------------------- the loader


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A scheduler's SIGTERM/SIGUSR1 reaches every process of the job; shielded workers keep reading so that
    the training process can finish its step and save a checkpoint. It must stop them with `close()`."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


class AudioLoader:
    """A resumable DataLoader over shards for one rank; `state_dict` goes into checkpoints."""

    def __init__(self, cfg: StreamConfig, rank: int | None = None, world: int | None = None, shield_workers: bool = False,
                 convert: bool = True, pin_memory: bool = False):
        """shield_workers: worker processes ignore SIGTERM/SIGUSR1 (for a trainer that checkpoints on them);
        then call `close()` when done, or the interpreter waits for them at exit.
        convert=False: batches keep int16 audio and the labels' stored integer type; `to_device` converts them.
        pin_memory: batches arrive in page-locked memory (a GPU trainer; without an accelerator torch ignores it)."""
        cfg.check()
        self.convert = convert
        if rank is None and world is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world = rank_world(rank, world)
        self.cfg = cfg
        self.index = read_index(cfg.shards)
        names = [s["name"] for s in self.index["shards"] if s["samples"] > 0]
        if not names:
            raise ValueError(f"{cfg.shards}: the shard index lists no samples; check the build report there")
        if not cfg.train and len(names) < self.world * max(1, cfg.num_workers):
            log.warning("%s: %d shards for %d readers; some read nothing", cfg.shards, len(names),
                        self.world * max(1, cfg.num_workers))
        self.manifests = self._check_labels()
        teachers = {m["teacher"]: (folder, m["codebooks"]) for folder, m in zip(cfg.labels, self.manifests)}
        sizes = {s["name"]: s["bytes"] for s in self.index["shards"]}
        self.dataset = ShardStream(cfg, names, self.rank, self.world, teachers, sizes)
        self.loader = StatefulDataLoader(
            self.dataset, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None, drop_last=cfg.train,
            persistent_workers=False, worker_init_fn=leave_stop_signals_to_the_main_process if shield_workers else None,
            pin_memory=pin_memory,
            # Its own generator for the workers' base seed, which each iter() draws: from torch's default generator
            # it would shift the trainer's dropout stream, so a resumed run (whose iter() comes after the RNG states
            # are restored) would drop other units than the uninterrupted one. The items do not depend on it.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _check_labels(self) -> list[dict]:
        manifests = [check_labels(folder, self.index, self.cfg.shards) for folder in self.cfg.labels]
        names = [m["teacher"] for m in manifests]
        if len(set(names)) < len(names):
            raise ValueError(f"StreamConfig.labels {self.cfg.labels}: two folders hold the same teacher ({names}); keep one")
        for folder, manifest in zip(self.cfg.labels, manifests):
            if manifest.get("random_init"):
                log.warning("%s: teacher %s was a random-init model (tests only)", folder, manifest["teacher"])
        return manifests

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if self.convert:
                batch["audio"] = pcm_to_float(batch["audio"])  # int16 PCM -> [-1, 1)
                batch["labels"] = {name: codes.long() for name, codes in batch["labels"].items()}  # -1: no label
            yield batch

    def close(self) -> None:
        """Stops the worker processes of the current pass (torchdata keeps its iterator for `state_dict`)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "world": self.world, "rank": self.rank, "num_workers": self.cfg.num_workers,
                "content_hash": self.index["content_hash"], "config": asdict(self.cfg), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._check_compatible(state)
        self.loader.load_state_dict(state["loader"])

    def _check_compatible(self, state: dict) -> None:
        mine = {"world": self.world, "rank": self.rank, "num_workers": self.cfg.num_workers,
                "content_hash": self.index["content_hash"]}
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        saved_cfg, cfg = state.get("config", {}), asdict(self.cfg)
        differ.update({f"config.{k}": (saved_cfg.get(k), v) for k, v in cfg.items() if k != "shards" and saved_cfg.get(k) != v})
        if state.get("version") != STATE_VERSION or differ:
            what = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items()) or "state version"
            raise ValueError(
                f"cannot resume the data stream of {self.cfg.shards} exactly ({what}). Each (rank, worker) owns its "
                "own position in the shard sequence, so resume with the same world size, workers, loader settings "
                "and shards, or start the data stream afresh."
            )
