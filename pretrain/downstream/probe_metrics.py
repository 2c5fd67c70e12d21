"""Key names and the MIREX weighted key score, the probes' losses and metrics (vectorised over probes), and the
table tying each task type to its loss, prediction and metrics; also ProbeError, the probe modules' error."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
KEY_NAMES = tuple(f"{pitch} {mode}" for mode in ("major", "minor") for pitch in PITCH_CLASSES)


class ProbeError(ValueError):
    """Bad inputs, with a message that names the file or key and what to do."""


# ---------------------------------------------------------------- keys


def key_index(text: str) -> int | None:
    """0-23 (C major .. B major, C minor .. B minor) of a key like 'C# minor', 'Db major', 'a:min'; None if unreadable."""
    match = re.fullmatch(r"\s*([A-Ga-g])([#b♯♭]?)\s*[:_ -]?\s*(major|minor|maj|min)\s*", str(text), re.IGNORECASE)
    if not match:
        return None
    letter, accidental, mode = match.groups()
    pitch = PITCH_CLASSES.index(letter.upper()) + {"#": 1, "♯": 1, "b": -1, "♭": -1}.get(accidental, 0)
    return pitch % 12 + (12 if mode.lower().startswith("min") else 0)


@functools.lru_cache(maxsize=1)
def key_score_matrix() -> np.ndarray:
    """[reference, estimate] -> mir_eval.key.weighted_score over the 24 keys (1, 0.5 fifth, 0.3 relative, 0.2 parallel)."""
    import mir_eval.key

    return np.array([[mir_eval.key.weighted_score(ref, est) for est in KEY_NAMES] for ref in KEY_NAMES])


def checked_key(text, where: str = "key") -> int:
    """key_index of `text`, or a ProbeError naming `where`."""
    index = key_index(text)
    if index is None:
        raise ProbeError(f"{where}: key {text!r} is not like 'C# minor' or 'Eb major' "
                         "(a tonic A-G with # or b, then major or minor)")
    return index


# ---------------------------------------------------------------- losses and metrics (vectorised over probes)


def losses_ce(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P, n, C] logits, [n] classes -> [P] mean cross-entropy."""
    probes, n, classes = outputs.shape
    return F.cross_entropy(outputs.reshape(probes * n, classes), y.repeat(probes), reduction="none").view(probes, n).mean(1)


def losses_bce(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs, y.expand_as(outputs), reduction="none").mean((1, 2))


def losses_mse(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (outputs - y).pow(2).mean((1, 2))


def accuracy(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[P, n, C] scores, [n] classes -> [P]."""
    return (preds.argmax(-1) == y).mean(1)


def key_score(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean MIREX weighted score of the arg-max keys."""
    return key_score_matrix()[y[None, :], preds.argmax(-1)].mean(1)


def roc_auc_macro(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[P, n, C] scores, [n, C] 0/1 -> [P] ROC-AUC (Mann-Whitney, ties averaged), macro over the labels with
    both positives and negatives here (nan if none)."""
    from scipy.stats import rankdata

    positives = y.sum(0)
    usable = (positives > 0) & (positives < len(y))
    if not usable.any():
        return np.full(len(preds), np.nan)
    ranks = rankdata(preds[:, :, usable], axis=1)
    pos, neg = positives[usable], len(y) - positives[usable]
    auc = ((ranks * y[None, :, usable]).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    return auc.mean(1)


def average_precision_macro(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[P] average precision (as sklearn's: steps at distinct scores), macro over the labels with positives here."""
    labels = [c for c in range(y.shape[1]) if y[:, c].any()]
    if not labels:
        return np.full(len(preds), np.nan)
    return np.array([np.mean([_average_precision(p[:, c], y[:, c]) for c in labels]) for p in preds])


def _average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    hits = np.cumsum(truth)[last_of_ties]
    precision, recall = hits / (last_of_ties + 1), hits / truth.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def r2(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[P, n, 1] predictions, [n, 1] targets -> [P] coefficient of determination (nan for constant targets)."""
    total = ((y - y.mean()) ** 2).sum()
    residual = ((preds - y[None]) ** 2).sum((1, 2))
    return 1 - residual / total if total > 0 else np.full(len(preds), np.nan)


def pearson(preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    p, t = preds[:, :, 0] - preds[:, :, 0].mean(1, keepdims=True), y[:, 0] - y[:, 0].mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (p * t).sum(1) / np.sqrt((p ** 2).sum(1) * (t ** 2).sum())


@dataclass(frozen=True)
class TaskType:
    """How a task type trains and scores; its labels encoder is probe_data.ENCODERS[type]."""

    metric: str  # the primary metric: early stopping, learning-rate choice, the reported score
    losses: Callable  # ([P, n, C] outputs, targets) -> [P] mean losses
    predict: Callable  # outputs -> what a clip's windows average and the metrics score
    score: Callable  # ([P, n, C] predictions, targets) -> [P]
    extras: dict = field(default_factory=dict)  # secondary metrics, same signature as score


TASK_TYPES = {
    "multiclass": TaskType("accuracy", losses_ce, lambda o: o.softmax(-1), accuracy),
    "multilabel": TaskType("roc_auc", losses_bce, torch.sigmoid, roc_auc_macro, {"ap": average_precision_macro}),
    "regression": TaskType("r2", losses_mse, lambda o: o, r2, {"pearson": pearson}),
    "key": TaskType("key_score", losses_ce, lambda o: o.softmax(-1), key_score, {"accuracy": accuracy}),
}

