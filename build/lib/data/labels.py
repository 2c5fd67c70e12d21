"""Label sidecars: one folder per teacher, one file per shard, and a manifest that ties them to the shards.

    LABELS/shard-NNNNNN.npz   codes per sample key: int16 (int32 above 32767 clusters) [frames, codebooks]
    LABELS/shard-NNNNNN.json  the shard's frame count and code histogram; written before the .npz,
                              whose atomic rename marks the shard done
    LABELS/dump.json          the teacher and shard set this folder is being filled from (refuses a mix)
    LABELS/teacher.json       the manifest, written when every shard is done: teacher name, config
                              hash, frame rate, codebooks, cardinality, the shards' content hash and
                              the code histogram over all shards (its entropy: `label_entropy`), and
                              the models they were made from with their fingerprints (`sources`:
                              an encoder layer's k-means; the loader refuses the labels if one changed)

Frame f of a sample's codes covers samples [320 f, 320 f + 320) of its
segment; a segment of N samples has N // 320 frames.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import numpy as np

from data.audio import FRAME_RATE, FRAME_SAMPLES
from data.files import atomic_write_bytes, atomic_write_json, fingerprint, read_json

LABELS_FORMAT = "musicpt-labels/1"
MANIFEST_NAME = "teacher.json"


def sidecar_path(labels_dir: str, shard: str) -> str:
    return os.path.join(labels_dir, shard.replace(".tar", ".npz"))


def summary_path(labels_dir: str, shard: str) -> str:
    return os.path.join(labels_dir, shard.replace(".tar", ".json"))


def code_dtype(cardinality: int) -> np.dtype:
    return np.dtype(np.int16 if cardinality <= np.iinfo(np.int16).max + 1 else np.int32)


def write_sidecar(path: str, codes: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **codes)
    atomic_write_bytes(path, buffer.getvalue())


def teacher_identity(teacher) -> dict[str, Any]:
    """What a labels folder promises about its teacher; compared on every re-run and by the loader."""
    return {
        "teacher": teacher.name,
        "config_hash": teacher.config_hash,
        "frame_rate": FRAME_RATE,
        "hop": FRAME_SAMPLES,
        "codebooks": teacher.codebooks,
        "cardinality": teacher.cardinality,
        "codebook_sizes": list(getattr(teacher, "codebook_sizes", [teacher.cardinality] * teacher.codebooks)),
        "random_init": bool(getattr(teacher, "random_init", False)),
    }


def try_write_manifest(labels_dir: str, identity: dict, index: dict, extra: dict) -> dict | None:
    """Write teacher.json once every shard of the index has its sidecar; return it, else None."""
    shards, histogram = {}, None
    for shard in index["shards"]:
        if not os.path.exists(sidecar_path(labels_dir, shard["name"])):
            return None
        summary = read_json(summary_path(labels_dir, shard["name"]), "a label shard summary")
        shards[shard["name"]] = {"samples": summary["samples"], "frames": summary["frames"]}
        counts = np.asarray(summary["histogram"], dtype=np.int64)
        histogram = counts if histogram is None else histogram + counts
    manifest = {"format": LABELS_FORMAT, **identity, "shards_content_hash": index["content_hash"],
                "shards": shards, "frames": sum(s["frames"] for s in shards.values()),
                "histogram": [] if histogram is None else histogram.tolist(), **extra}
    atomic_write_json(os.path.join(labels_dir, MANIFEST_NAME), manifest)
    return manifest


def label_entropy(manifest: dict, labels_dir: str | None = None) -> list[float] | None:
    """Entropy (nats) of each codebook's code frequencies over all the labelled frames: the masked cross-entropy
    of a model that predicts only the label prior. From the manifest's histogram, else (manifests written
    before it had one) from the shard summaries in `labels_dir`; None when neither is there."""
    counts = np.asarray(manifest.get("histogram") or [], dtype=np.float64)
    if not counts.size and labels_dir is not None:
        try:
            summaries = [read_json(summary_path(labels_dir, shard), "a label shard summary") for shard in manifest["shards"]]
            counts = np.sum([np.asarray(s["histogram"], dtype=np.float64) for s in summaries], axis=0)
        except (OSError, KeyError, ValueError):
            return None
    if not counts.size:
        return None
    p = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    return [float(-(row[row > 0] * np.log(row[row > 0])).sum()) for row in p]


def check_labels(labels_dir: str, index: dict, shard_dir: str, config_hash: str | None = None) -> dict:
    """The manifest of `labels_dir` if its labels fit these shards; else an error naming teacher and shard."""
    path = os.path.join(labels_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no teacher manifest, so these labels are missing or unfinished. Run (or re-run to finish) "
            f"the teacher's dump, e.g. `python -m teachers.kmeans dump --config ...`, for {shard_dir}."
        )
    manifest = read_json(path, "a teacher manifest")
    name = manifest.get("teacher", "?")
    if manifest.get("format") != LABELS_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {LABELS_FORMAT!r}; re-run the dump of teacher {name}.")
    if manifest["shards_content_hash"] != index["content_hash"]:
        raise ValueError(
            f"{path}: teacher {name} labelled shards with content hash {manifest['shards_content_hash'][:12]}, but "
            f"{shard_dir} has {index['content_hash'][:12]}: the labels are stale. Re-run the dump into a new folder."
        )
    if manifest["frame_rate"] != FRAME_RATE or manifest["hop"] != FRAME_SAMPLES:
        raise ValueError(f"{path}: teacher {name} is at {manifest['frame_rate']} Hz (hop {manifest['hop']}); "
                         f"training needs {FRAME_RATE} Hz labels (hop {FRAME_SAMPLES}).")
    if config_hash is not None and manifest["config_hash"] != config_hash:
        raise ValueError(f"{path}: teacher {name} has config hash {manifest['config_hash'][:12]}, the training "
                         f"config expects {config_hash[:12]}; point the config at the right labels or re-run the dump.")
    for source in manifest.get("sources", []):  # a model the labels were made from (an encoder layer's k-means)
        if os.path.exists(source["path"]) and fingerprint(source["path"]) != source["fingerprint"]:
            raise ValueError(f"{path}: teacher {name} was made from {source['path']}, which has changed since "
                             "(another checkpoint under that path): its labels no longer match it. Re-run the fit and "
                             "dump into new folders, or restore that checkpoint.")
    for shard in index["shards"]:
        listed = manifest["shards"].get(shard["name"])
        sidecar = sidecar_path(labels_dir, shard["name"])
        if listed is None or listed["samples"] != shard["samples"] or not os.path.exists(sidecar):
            raise FileNotFoundError(f"{sidecar}: teacher {name} has no labels for shard {shard['name']} "
                                    "(or for a different version of it); re-run the dump.")
    return manifest


class LabelError(Exception):
    """Labels that do not fit their audio: never skipped like a bad sample, always fatal."""


class SidecarReader:
    """Codes of one teacher by (shard, key), keeping the last few sidecars open."""

    def __init__(self, labels_dir: str, name: str, codebooks: int, keep_open: int = 4):
        self.labels_dir, self.name, self.codebooks, self.keep_open = labels_dir, name, codebooks, keep_open
        self.open: dict[str, Any] = {}

    def crop(self, shard: str, key: str, num_samples: int, offset: int, count: int) -> np.ndarray:
        """Codes [count // 320, codebooks] of the crop of `count` samples at `offset`; -1 past the segment's end."""
        frames = count // FRAME_SAMPLES
        start = offset // FRAME_SAMPLES
        codes = self.codes(shard, key, num_samples)[start:start + frames]
        out = np.full((frames, self.codebooks), -1, dtype=codes.dtype)
        out[: len(codes)] = codes
        return out

    def codes(self, shard: str, key: str, num_samples: int) -> np.ndarray:
        """[frames, codebooks] for the whole segment; a frame count that does not match its audio is an error."""
        npz = self._sidecar(shard)
        if key not in npz.files:
            raise LabelError(f"{sidecar_path(self.labels_dir, shard)}: teacher {self.name} has no codes for sample {key}; re-run the dump.")
        codes = npz[key]
        if codes.shape != (num_samples // FRAME_SAMPLES, self.codebooks):
            raise LabelError(
                f"{sidecar_path(self.labels_dir, shard)}: teacher {self.name} codes for {key} have shape {codes.shape}, "
                f"but {num_samples} samples need ({num_samples // FRAME_SAMPLES}, {self.codebooks}); the labels are misaligned."
            )
        return codes

    def _load(self, shard: str):
        path = sidecar_path(self.labels_dir, shard)
        try:
            return np.load(path)
        except FileNotFoundError:
            raise LabelError(f"{path}: teacher {self.name}'s labels for shard {shard} are missing (deleted after the "
                             "run started?); re-run the teacher's dump for these shards, then resume.") from None
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise LabelError(f"{path}: teacher {self.name}'s labels for shard {shard} are unreadable ({error}); "
                             "re-run the teacher's dump for these shards, then resume.") from None

    def _sidecar(self, shard: str):
        if shard not in self.open:
            if len(self.open) >= self.keep_open:
                self.open.pop(next(iter(self.open))).close()
            self.open[shard] = self._load(shard)
        return self.open[shard]
