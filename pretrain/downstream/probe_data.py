"""The probing data: the task file and the protocol's settings, a features folder, the labels joined to its clips,
the train / valid / test splits, the label encoders, and the standardised tensors the probes train on (ProbeData)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf

from data.files import read_json
from data.settings import merge_settings
from pretrain.downstream.probe_metrics import KEY_NAMES, TASK_TYPES, ProbeError, checked_key

FORMAT = "musicpt-features/1"
SPLITS = ("train", "valid", "test")
DEFAULT_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)


LabelRows = dict[str, tuple[str, dict]]  # clip -> ("FILE:LINE", labels row)
Encoded = tuple[np.ndarray, list[str], dict]  # targets per clip, output names (classes, tags, target), notes


# ---------------------------------------------------------------- the task file and the settings


@dataclass
class TaskConfig:
    name: str = MISSING
    type: str = MISSING  # multiclass | multilabel | regression | key
    labels: str = MISSING  # JSON lines, one row per clip
    label_field: str = MISSING  # multiclass/key: a string; multilabel: a list of strings; regression: a number
    clip_field: str = "file"  # equals index.jsonl's "clip" (the path relative to the extracted folder)
    split_field: str = "split"  # train / valid / test


@dataclass(frozen=True)
class ProbeSettings:
    """The protocol's knobs; the defaults are MARBLE's constrained setting."""

    seed: int = 0
    lrs: tuple[float, ...] = DEFAULT_LRS
    max_epochs: int = 100
    patience: int = 10  # epochs without a better validation metric before a probe stops
    batch_size: int = 64
    hidden: int = 512
    dropout: float = 0.2
    weight_decay: float = 0.0  # Adam's L2 term
    layers: str | tuple = "all"  # "all", "none", or layer indices / names
    weighted_sum: bool = True  # also the learned softmax-weighted sum of all layers (needs 2+ layers)
    aggregate: str = "clip"  # "clip": average a clip's window predictions before scoring; "example"
    resplit: tuple[float, ...] | None = None  # (train, valid, test) fractions: ignore split_field
    max_probes: int = 0  # probes trained at once (memory); 0: as many as hold ~16M parameters (~0.5 GB with Adam)
    device: str = "cpu"


def load_task(path: str, overrides: list[str] | tuple = ()) -> TaskConfig:
    """The task file at `path` with `key=value` overrides, checked against TaskConfig."""
    if not os.path.isfile(path):
        raise ProbeError(f"{path}: no such task file (examples are in configs/probe/, e.g. configs/probe/demo_key.yaml)")
    return _task_from(OmegaConf.load(path), path, overrides)


def _task_from(raw, where: str, overrides=()) -> TaskConfig:
    task = merge_settings(TaskConfig, [raw], overrides, where, ProbeError,
                          "; the task keys are name, type, labels, label_field, clip_field, split_field "
                          "(e.g. labels=demo_out/corpus/labels.jsonl)")
    if task.type not in TASK_TYPES:
        raise ProbeError(f"{where}: type {task.type!r} is unknown; use one of {', '.join(TASK_TYPES)}")
    return task


def as_task(task: str | dict | TaskConfig) -> TaskConfig:
    """A task from a YAML path, a dict of its keys, or a TaskConfig (checked the same way)."""
    if isinstance(task, str):
        return load_task(task)
    if isinstance(task, TaskConfig):
        return _task_from(OmegaConf.structured(task), f"task {task.name!r}")
    return _task_from(OmegaConf.create(dict(task)), f"task {dict(task).get('name')!r}")


# ---------------------------------------------------------------- the features folder


@dataclass
class Features:
    folder: str
    info: dict
    layer_names: list[str]
    keys: list[str]  # one per example
    clips: list[str]  # the clip of each example
    x: np.ndarray  # [examples, layers, dim] float32


def load_features(folder: str) -> Features:
    """Every example of a features folder, checked against info.json."""
    how = "make one with python -m pretrain.downstream.extract --out FOLDER"
    if not os.path.isdir(folder):
        raise ProbeError(f"--features {folder}: no such folder; {how}")
    info = _read_json_file(os.path.join(folder, "info.json"), f"the features description; {how}")
    if info.get("format") != FORMAT or not info.get("layer_names"):
        raise ProbeError(f"{folder}/info.json: format {info.get('format')!r} with layer_names "
                         f"{info.get('layer_names')!r}; expected format {FORMAT!r} from python -m pretrain.downstream.extract")
    rows = _read_jsonl(os.path.join(folder, "index.jsonl"), f"the examples index; {how}")
    if not rows:
        raise ProbeError(f"{folder}/index.jsonl: no examples; run python -m pretrain.downstream.extract (again) to fill it")
    arrays = [_load_example(folder, line, row, len(info["layer_names"])) for line, row in rows]
    dims = {array.shape[1] for array in arrays}
    if len(dims) > 1:
        raise ProbeError(f"{folder}: examples of different sizes {sorted(dims)}; the folder mixes extractions")
    keys = [row["key"] for _, row in rows]
    if len(set(keys)) != len(keys):
        raise ProbeError(f"{folder}/index.jsonl: repeated example keys; re-extract into an empty folder")
    return Features(folder, info, list(info["layer_names"]), keys, [row["clip"] for _, row in rows], np.stack(arrays))


def _load_example(folder: str, line: int, row: dict, num_layers: int) -> np.ndarray:
    missing = [name for name in ("key", "clip", "path") if name not in row]
    if missing:
        raise ProbeError(f"{folder}/index.jsonl:{line}: no {', '.join(missing)}; "
                         "expected rows from python -m pretrain.downstream.extract")
    path = os.path.join(folder, row["path"])
    try:
        array = np.load(path)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ProbeError(f"{path} (index.jsonl:{line}): cannot read ({error}); re-extract the folder") from None
    if array.ndim != 2 or array.shape[0] != num_layers:
        raise ProbeError(f"{path}: shape {array.shape}; info.json promises [{num_layers}, dim] features")
    if not np.isfinite(array).all():
        raise ProbeError(f"{path}: clip {row['clip']} has non-finite features (NaN or Inf), which would poison the "
                         "probe; its audio probably holds NaN/Inf samples. Re-extract: pretrain.downstream.extract skips such "
                         "clips into skipped.jsonl")
    return array.astype(np.float32, copy=False)


def _read_json_file(path: str, what: str) -> dict:
    try:
        return read_json(path, what)
    except (FileNotFoundError, ValueError) as error:  # read_json's message names the file and what it holds
        raise ProbeError(str(error)) from None


def _read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, row) of each non-blank line."""
    if not os.path.isfile(path):
        raise ProbeError(f"{path}: missing {what}")
    rows = []
    with open(path) as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ProbeError(f"{path}:{number}: not valid JSON ({error}); expected {what}") from None
    return rows


# ---------------------------------------------------------------- labels and splits


def read_labels(task: TaskConfig) -> LabelRows:
    """clip -> (where: "FILE:LINE", row) from the task's labels file."""
    rows = _read_jsonl(task.labels, "the labels: one JSON row per clip (set labels=PATH in the task file "
                                    "or as an override; relative paths start at the current folder)")
    by_clip = {}
    for line, row in rows:
        where = f"{task.labels}:{line}"
        if task.clip_field not in row:
            raise ProbeError(f"{where}: no field {task.clip_field!r} (clip_field); the row has {sorted(row)}")
        clip = str(row[task.clip_field])
        if clip in by_clip:
            raise ProbeError(f"{where}: clip {clip!r} repeats {by_clip[clip][0]}; keep one row per clip")
        by_clip[clip] = (where, row)
    return by_clip


def match_clips(clips: list[str], labels: LabelRows, task: TaskConfig, folder: str) -> LabelRows:
    """The labels row of every clip: the same path, else the one labels path that ends with it (or it with)."""
    by_name = {}
    for clip in labels:
        by_name.setdefault(os.path.basename(clip), []).append(clip)
    matched, missing = {}, []
    for clip in dict.fromkeys(clips):
        if clip in labels:
            matched[clip] = labels[clip]
            continue
        near = [other for other in by_name.get(os.path.basename(clip), [])
                if other.endswith("/" + clip) or clip.endswith("/" + other)]
        if len(near) == 1:
            matched[clip] = labels[near[0]]
        else:
            missing.append(clip)
    if missing:
        raise ProbeError(f"{folder}/index.jsonl: {len(missing)} of {len(matched) + len(missing)} clips have no row in "
                         f"{task.labels} (clip_field {task.clip_field!r}), e.g. {missing[:3]}; labels rows look like "
                         f"{list(labels)[:2]}. Extract from the folder that the labels' paths are relative to, "
                         "or point clip_field / labels at the right file")
    return matched


def clip_splits(clips: list[str], rows: dict, task: TaskConfig, resplit: tuple | None) -> dict[str, str]:
    """clip -> train / valid / test: the labels' split_field, or a hash split with --resplit."""
    if resplit is not None:
        return hash_split(clips, resplit)
    splits = {}
    for clip in clips:
        where, row = rows[clip]
        value = row.get(task.split_field)
        if value not in SPLITS:
            raise ProbeError(f"{where}: {task.split_field} (split_field) is {value!r}; use one of {SPLITS}, "
                             "or pass --resplit 0.8,0.1,0.1 to split the clips by a hash of their names")
        splits[clip] = value
    return splits


def hash_split(clips: list[str], fractions: tuple) -> dict[str, str]:
    """Clips ordered by a hash of their names, cut into train / valid / test by `fractions` (each at least one)."""
    if len(fractions) != 3 or min(fractions) <= 0:
        raise ProbeError(f"--resplit {fractions}: give three positive fractions, train,valid,test (e.g. 0.8,0.1,0.1)")
    if len(clips) < 3:
        raise ProbeError(f"--resplit: {len(clips)} clips cannot make three splits")
    order = sorted(clips, key=lambda clip: hashlib.sha1(f"probe-split:{clip}".encode()).hexdigest())
    total = sum(fractions)
    valid = max(1, round(len(clips) * fractions[1] / total))
    test = max(1, min(len(clips) - valid - 1, round(len(clips) * fractions[2] / total)))
    return {clip: "valid" if i < valid else "test" if i < valid + test else "train" for i, clip in enumerate(order)}


# ---------------------------------------------------------------- targets


def encode_multiclass(values: list, wheres: list[str], train: np.ndarray, task: TaskConfig) -> Encoded:
    for value, where in zip(values, wheres):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ProbeError(f"{where}: {task.label_field} is {value!r}; a multiclass label is a string")
    classes = sorted({str(value) for value in values})
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup[str(value)] for value in values]), classes, {}


def encode_key(values: list, wheres: list[str], train: np.ndarray, task: TaskConfig) -> Encoded:
    return np.array([checked_key(value, where) for value, where in zip(values, wheres)]), list(KEY_NAMES), {}


def encode_multilabel(values: list, wheres: list[str], train: np.ndarray, task: TaskConfig) -> Encoded:
    """Multi-hot over the labels seen in train; labels never in train cannot be learnt and are left out."""
    for value, where in zip(values, wheres):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ProbeError(f"{where}: {task.label_field} is {value!r}; a multilabel label is a list of strings")
    seen = sorted({item for value, is_train in zip(values, train) if is_train for item in value})
    dropped = sorted({item for value in values for item in value} - set(seen))
    lookup = {name: i for i, name in enumerate(seen)}
    y = np.zeros((len(values), len(seen)), np.float32)
    for row, value in enumerate(values):
        y[row, [lookup[item] for item in value if item in lookup]] = 1.0
    return y, seen, {"labels_not_in_train": dropped}


def encode_regression(values: list, wheres: list[str], train: np.ndarray, task: TaskConfig) -> Encoded:
    """Targets standardised with the train mean and standard deviation."""
    for value, where in zip(values, wheres):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ProbeError(f"{where}: {task.label_field} is {value!r}; a regression label is a finite number")
    y = np.array(values, np.float64)
    mean, std = float(y[train].mean()), float(y[train].std())
    if std == 0:
        raise ProbeError(f"{task.labels}: every train clip has {task.label_field} = {mean}; nothing to regress")
    return ((y - mean) / std).astype(np.float32)[:, None], [task.label_field], {"target_mean": mean, "target_std": std}


ENCODERS = {  # task type -> (label values, where each is from, train mask, task) -> (targets, class names, notes)
    "multiclass": encode_multiclass,
    "multilabel": encode_multilabel,
    "regression": encode_regression,
    "key": encode_key,
}


# ---------------------------------------------------------------- the probing data


@dataclass
class Split:
    examples: torch.Tensor  # example indices
    groups: torch.Tensor  # per example of the split: its clip's position (or its own with aggregate=example)
    group_targets: np.ndarray  # targets per group, for the metrics
    num_clips: int


@dataclass
class ProbeData:
    x: torch.Tensor  # [layers, examples, dim], standardised with train statistics
    y: torch.Tensor  # per example targets
    splits: dict[str, Split]
    layer_names: list[str]
    classes: list[str]
    example_split: list[str]  # the split of each example
    notes: dict  # what the encoding left out, target scale


def prepare(features: Features, task: TaskConfig, settings: ProbeSettings) -> ProbeData:
    """Labels joined to examples, splits from clips, standardised feature tensors."""
    encode = ENCODERS[task.type]
    rows = match_clips(features.clips, read_labels(task), task, features.folder)
    clips = list(rows)
    split_of = clip_splits(clips, rows, task, settings.resplit)
    values, wheres = [], []
    for clip in clips:
        where, row = rows[clip]
        if row.get(task.label_field) is None:
            raise ProbeError(f"{where}: no {task.label_field!r} (label_field) for clip {clip!r}; label every clip "
                             f"or leave it out of the features")
        values.append(row[task.label_field])
        wheres.append(where)
    clip_targets, classes, notes = encode(values, wheres, np.array([split_of[c] == "train" for c in clips]), task)
    clip_position = {clip: i for i, clip in enumerate(clips)}
    example_clip = np.array([clip_position[clip] for clip in features.clips])
    example_split = [split_of[clip] for clip in features.clips]
    _check_splits(example_split, split_of, task, features.folder)
    x = features.x.transpose(1, 0, 2)  # [L, N, D]
    train = np.array([s == "train" for s in example_split])
    mean, std = x[:, train].mean(1, keepdims=True), x[:, train].std(1, keepdims=True)
    x = (x - mean) / np.where(std > 1e-8, std, 1.0)
    device = torch.device(settings.device)
    y = torch.as_tensor(clip_targets[example_clip], device=device)
    splits = {name: _split(name, example_split, example_clip, clip_targets, settings.aggregate, device) for name in SPLITS}
    return ProbeData(torch.as_tensor(np.ascontiguousarray(x, np.float32), device=device), y, splits,
                     features.layer_names, classes, example_split, notes)


def _check_splits(example_split: list[str], split_of: dict, task: TaskConfig, folder: str) -> None:
    clips = {name: list(split_of.values()).count(name) for name in SPLITS}
    empty = [name for name in SPLITS if name not in example_split]
    if empty:
        raise ProbeError(f"{task.labels}: no {' or '.join(empty)} examples among the {len(split_of)} clips of "
                         f"{folder} (clips per {task.split_field}: {clips}); give some clips split "
                         f"{empty[0]!r} in the labels, or pass --resplit 0.8,0.1,0.1 to split the clips by a hash "
                         "of their names")


def _split(name: str, example_split: list[str], example_clip: np.ndarray, clip_targets: np.ndarray,
           aggregate: str, device: torch.device) -> Split:
    examples = np.array([i for i, s in enumerate(example_split) if s == name])
    clip_ids = example_clip[examples]
    if aggregate == "example":
        groups, group_clips = np.arange(len(examples)), clip_ids
    else:
        group_clips, groups = np.unique(clip_ids, return_inverse=True)
    return Split(torch.as_tensor(examples, device=device), torch.as_tensor(groups, device=device),
                 clip_targets[group_clips], len(np.unique(clip_ids)))
