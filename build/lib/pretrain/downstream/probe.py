"""Probing frozen features with MARBLE's constrained protocol: `python -m pretrain.downstream.probe --features DIR --task TASK.yaml`.

Reads a features folder written by `python -m pretrain.downstream.extract` (info.json,
index.jsonl, one float32 [layers, dim] .npy per example) and a task file
(configs/probe/*.yaml) naming a labels file with one JSON row per clip, and
trains small probes on the frozen features:

* features are standardised per layer and dimension with train-split statistics;
* one probe per single layer, plus one on a softmax-weighted sum of all layers
  whose layer weights are parameters trained with the probe;
* a probe is Linear(dim, 512) - ReLU - Dropout(0.2) - Linear(512, outputs),
  trained with Adam on mini-batches of 64 for each learning rate of the grid
  {5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2}, with early stopping on the validation
  metric (the best-validation weights are kept);
* for each layer the learning rate with the best validation metric is chosen
  (ties: lower validation loss) and the test metric of that probe is reported.

Task types: multiclass (cross-entropy; accuracy), multilabel (binary cross-entropy;
ROC-AUC macro, and average precision macro), regression (MSE on standardised
targets; R², and Pearson r), key (24-class cross-entropy; the MIREX weighted score
of mir_eval.key.weighted_score averaged over clips, and accuracy). Examples inherit
their clip's split; with several windows per clip (extract --unit window), the
validation and test predictions of a clip's windows are averaged before scoring
(`--aggregate example` scores windows one by one instead).

Every probe of every layer and learning rate trains at once: parameters carry a
leading probe axis, batched matrix products run them side by side, Adam updates
them all in one go, and probes that stop early leave the batch. Each probe draws
its initial weights and dropout masks from its own seed, (seed, layer, lr), so a
probe's result does not depend on which other layers or learning rates ran with it.

    python -m pretrain.downstream.probe --features demo_out/features/tiny --task configs/probe/demo_key.yaml
    python -m pretrain.downstream.probe --features F --task T.yaml --layers 0,6,12 --lrs 1e-4,1e-3 labels=other/labels.jsonl

Writes OUT/results.csv (the chosen probe per layer and the weighted sum), OUT/grid.csv
(every layer and learning rate), OUT/summary.json and OUT/scores_by_layer.png;
OUT defaults to FEATURES/probe-TASKNAME. In Python, `probe(features_dir, task)`
returns the results rows, and `compare({name: rows, ...})` formats several feature
sets side by side.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch

from data.files import atomic_write_bytes, atomic_write_json
from data.logs import setup_logging
# ProbeError, ProbeSettings and load_task are also this module's interface: code imports them from here
from pretrain.downstream.probe_data import (SPLITS, Features, ProbeData, ProbeSettings, TaskConfig, as_task, load_features,
                                 load_task, prepare)
from pretrain.downstream.probe_metrics import TASK_TYPES, ProbeError, TaskType

WEIGHTED_SUM = "weighted_sum"
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
EVAL_CHUNK_FLOATS = 32_000_000  # probe inputs evaluated at once: probes x examples x dim


# ---------------------------------------------------------------- probes trained side by side


def probe_seed(seed: int, layer: str, lr: float) -> int:
    """The seed of one probe's initial weights and dropout masks: independent of the other probes."""
    return int(hashlib.sha256(f"{seed}:{layer}:{lr!r}".encode()).hexdigest()[:15], 16)


class ProbeStack:
    """P probes with a leading probe axis on every parameter, trained with one vectorised Adam.

    Probe p reads layer `layer_of[p]` of the features, or (layer_of[p] == -1) the softmax-weighted sum of all
    layers with its own weights `mix[p]`; single-layer probes come first."""

    def __init__(self, layer_of: list[int], lrs: list[float], seeds: list[int], data: ProbeData,
                 outputs: int, settings: ProbeSettings):
        assert layer_of == sorted(layer_of, key=lambda layer: layer < 0), "single-layer probes first"
        device = data.x.device
        self.settings, self.x = settings, data.x
        self.layer_of = torch.tensor(layer_of, device=device)
        self.lr = torch.tensor(lrs, device=device)
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        inits = [self._init(g, data.x.shape[0], data.x.shape[2], outputs) for g in self.generators]
        self.params = {name: torch.stack([init[name] for init in inits]).requires_grad_() for name in inits[0]}
        self.moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in self.params.items()}
        self.best = {name: p.detach().clone() for name, p in self.params.items()}
        self.steps = 0

    def _init(self, generator: torch.Generator, layers: int, dim: int, outputs: int) -> dict[str, torch.Tensor]:
        """nn.Linear's default initialisation (uniform, bound 1/sqrt(fan_in)); equal layer weights."""
        hidden, device = self.settings.hidden, generator.device

        def uniform(*shape, fan_in):
            return (torch.rand(*shape, generator=generator, device=device) * 2 - 1) / math.sqrt(fan_in)
        return {"w1": uniform(dim, hidden, fan_in=dim), "b1": uniform(hidden, fan_in=dim),
                "w2": uniform(hidden, outputs, fan_in=hidden), "b2": uniform(outputs, fan_in=hidden),
                "mix": torch.zeros(layers, device=device)}

    def __len__(self) -> int:
        return len(self.layer_of)

    def forward(self, params: dict, layer_of: torch.Tensor, examples: torch.Tensor, train: bool = False) -> torch.Tensor:
        """[P, n, outputs] for the probes `layer_of` with parameters `params`, on `examples`."""
        single = int((layer_of >= 0).sum())
        hidden = []
        if single:
            inputs = self.x[layer_of[:single, None], examples[None, :]]  # [S, n, D]
            hidden.append(torch.baddbmm(params["b1"][:single, None], inputs, params["w1"][:single]))
        if single < len(layer_of):
            weights = params["mix"][single:].softmax(1)  # [M, L]
            inputs = torch.einsum("ml,lnd->mnd", weights, self.x[:, examples])
            hidden.append(torch.baddbmm(params["b1"][single:, None], inputs, params["w1"][single:]))
        h = torch.relu(torch.cat(hidden))
        if train and self.settings.dropout > 0:
            h = h * self._dropout_mask(h.shape[1:])
        return torch.baddbmm(params["b2"][:, None], h, params["w2"])

    def _dropout_mask(self, shape) -> torch.Tensor:
        keep = 1 - self.settings.dropout
        masks = [torch.rand(*shape, generator=g, device=g.device) < keep for g in self.generators]
        return torch.stack(masks).float() / keep

    def train_epoch(self, data: ProbeData, losses: Callable, order: torch.Tensor) -> None:
        """One pass over the train examples in `order`, in mini-batches."""
        for start in range(0, len(order), self.settings.batch_size):
            batch = order[start:start + self.settings.batch_size]
            loss = losses(self.forward(self.params, self.layer_of, batch, train=True), data.y[batch]).sum()
            self._adam(torch.autograd.grad(loss, list(self.params.values()), allow_unused=True))

    @torch.no_grad()
    def _adam(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """torch.optim.Adam's update with a learning rate per probe, in place (the gradients are overwritten)."""
        self.steps += 1
        (beta1, beta2), decay = ADAM_BETAS, self.settings.weight_decay
        correction1, root2 = 1 - beta1 ** self.steps, math.sqrt(1 - beta2 ** self.steps)
        for (name, param), grad in zip(self.params.items(), grads):
            if grad is None:  # the layer weights, once no weighted-sum probe is left
                continue
            if decay:
                grad.add_(param, alpha=decay)
            mean, square = self.moments[name]
            mean.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = self.lr.view(-1, *[1] * (param.dim() - 1)) * (root2 / correction1)
            denom = torch.sqrt(square, out=grad).add_(ADAM_EPS * root2).div_(step)  # lr/c1 * m / (sqrt(v/c2) + eps)
            param.addcdiv_(mean, denom, value=-1)

    def save_best(self, improved: torch.Tensor) -> None:
        for name, param in self.params.items():
            self.best[name][improved] = param.detach()[improved]

    def keep(self, kept: torch.Tensor) -> None:
        """Drops the probes not in `kept` (a boolean mask) from every tensor."""
        self.params = {name: p.detach()[kept].requires_grad_() for name, p in self.params.items()}
        self.moments = {name: (m[kept], v[kept]) for name, (m, v) in self.moments.items()}
        self.best = {name: p[kept] for name, p in self.best.items()}
        self.layer_of, self.lr = self.layer_of[kept], self.lr[kept]
        self.generators = [g for g, k in zip(self.generators, kept.tolist()) if k]


@torch.no_grad()
def evaluate(stack: ProbeStack, params: dict, layer_of: torch.Tensor, data: ProbeData, split: str,
             kind: TaskType, extras: bool = False) -> dict[str, np.ndarray]:
    """{"score", "loss", extras...}: [P] arrays for the probes `layer_of` on one split."""
    part = data.splits[split]
    chunk = max(1, EVAL_CHUNK_FLOATS // max(1, len(layer_of) * data.x.shape[2]))
    outputs = torch.cat([stack.forward(params, layer_of, part.examples[i:i + chunk])
                         for i in range(0, len(part.examples), chunk)], dim=1)
    loss = kind.losses(outputs, data.y[part.examples]).cpu().numpy()
    preds = kind.predict(outputs)
    num_groups = len(part.group_targets)
    sums = preds.new_zeros(preds.shape[0], num_groups, preds.shape[2]).index_add_(1, part.groups, preds)
    counts = torch.bincount(part.groups, minlength=num_groups).clamp(min=1).to(preds.dtype)
    grouped = (sums / counts[None, :, None]).double().cpu().numpy()
    result = {"score": kind.score(grouped, part.group_targets), "loss": loss}
    if extras:
        result.update({name: fn(grouped, part.group_targets) for name, fn in kind.extras.items()})
    return result


# ---------------------------------------------------------------- the learning-rate grid


@dataclass(frozen=True)
class ProbeSpec:
    layer: int  # index into the layer names; -1: the weighted sum of all layers
    lr: float


def train_probes(specs: list[ProbeSpec], data: ProbeData, kind: TaskType, settings: ProbeSettings) -> list[dict]:
    """Trains `specs` side by side with early stopping on the validation metric; one result per spec, in order.

    A probe stops `patience` epochs after its validation metric last rose (or at max_epochs) and is scored with
    its best weights: those of the best validation metric, ties going to the lower validation loss."""
    order = sorted(range(len(specs)), key=lambda i: specs[i].layer < 0)
    names = [data.layer_names[specs[i].layer] if specs[i].layer >= 0 else WEIGHTED_SUM for i in order]
    stack = ProbeStack([specs[i].layer for i in order], [specs[i].lr for i in order],
                       [probe_seed(settings.seed, name, specs[i].lr) for name, i in zip(names, order)],
                       data, len(data.classes), settings)
    active = np.array(order)  # the spec of each probe in the stack
    best_score, best_loss = np.full(len(specs), -np.inf), np.full(len(specs), np.inf)
    best_epoch, waited = np.zeros(len(specs), int), np.zeros(len(specs), int)
    results, train = [None] * len(specs), data.splits["train"].examples
    shuffle = torch.Generator().manual_seed(settings.seed)  # the same batches for every probe
    for epoch in range(1, settings.max_epochs + 1):
        stack.train_epoch(data, kind.losses, train[torch.randperm(len(train), generator=shuffle).to(train.device)])
        valid = evaluate(stack, stack.params, stack.layer_of, data, "valid", kind)
        score, loss = valid["score"], valid["loss"]
        risen = (score > best_score[active]) | (best_epoch[active] == 0)
        improved = risen | ((score == best_score[active]) & (loss < best_loss[active]))
        stack.save_best(torch.as_tensor(improved, device=data.x.device))
        for values, new in ((best_score, score), (best_loss, loss)):
            values[active[improved]] = new[improved]
        best_epoch[active[improved]] = epoch
        waited[active] = np.where(risen, 0, waited[active] + 1)
        done = (waited[active] >= settings.patience) | (epoch == settings.max_epochs)
        if done.any():
            for spec, result in zip(active[done], finish(stack, done, data, kind)):
                results[spec] = {**result, "best_epoch": int(best_epoch[spec]), "epochs": epoch}
            stack.keep(torch.as_tensor(~done, device=data.x.device))
            active = active[~done]
        if not len(active):
            break
    return results


def finish(stack: ProbeStack, done: np.ndarray, data: ProbeData, kind: TaskType) -> list[dict]:
    """Validation and test metrics of the stopped probes' best weights (and the weighted sums' layer weights)."""
    mask = torch.as_tensor(done, device=data.x.device)
    params, layer_of = {name: p[mask] for name, p in stack.best.items()}, stack.layer_of[mask]
    valid = evaluate(stack, params, layer_of, data, "valid", kind, extras=True)
    test = evaluate(stack, params, layer_of, data, "test", kind, extras=True)
    weights = params["mix"].softmax(1).cpu().numpy()
    results = []
    for p, layer in enumerate(layer_of.tolist()):
        result = {"valid": float(valid["score"][p]), "test": float(test["score"][p]), "valid_loss": float(valid["loss"][p])}
        for name in kind.extras:
            result.update({f"valid_{name}": float(valid[name][p]), f"test_{name}": float(test[name][p])})
        if layer < 0:
            result["weights"] = dict(zip(data.layer_names, map(float, weights[p])))
        results.append(result)
    return results


def probes_at_once(settings: ProbeSettings, data: ProbeData) -> int:
    """settings.max_probes, or as many probes as hold ~16M parameters (x5 with gradients, Adam and the best copy)."""
    if settings.max_probes > 0:
        return settings.max_probes
    per_probe = (data.x.shape[2] + 1) * settings.hidden + (settings.hidden + 1) * len(data.classes) + data.x.shape[0]
    return max(1, 16_000_000 // per_probe)


def train_grid(specs: list[ProbeSpec], data: ProbeData, kind: TaskType, settings: ProbeSettings) -> list[dict]:
    """Every (layer, lr) probe, in groups of probes_at_once; one row per spec."""
    size, results = probes_at_once(settings, data), []
    for start in range(0, len(specs), size):
        results += train_probes(specs[start:start + size], data, kind, settings)
    return [{"layer": data.layer_names[spec.layer] if spec.layer >= 0 else WEIGHTED_SUM, "index": spec.layer,
             "lr": spec.lr, "metric": kind.metric, **result} for spec, result in zip(specs, results)]


def rank(row: dict) -> tuple[float, float, float]:
    """Higher is better: the validation metric (nan lowest), then a lower validation loss, then a lower lr."""
    valid = row["valid"] if math.isfinite(row["valid"]) else -math.inf
    loss = row["valid_loss"] if math.isfinite(row["valid_loss"]) else math.inf
    return valid, -loss, -row["lr"]


def choose_lrs(grid: list[dict]) -> list[dict]:
    """Per layer (and the weighted sum, last), the row of the learning rate with the best validation metric."""
    by_layer = {}
    for row in grid:
        by_layer.setdefault(row["index"], []).append(row)
    order = sorted(by_layer, key=lambda index: (index < 0, index))
    return [max(by_layer[index], key=rank) for index in order]


def select_layers(layers: str | tuple | list, names: list[str]) -> list[int]:
    """"all", "none", or indices / names (a comma-separated string or a sequence) -> layer indices."""
    if isinstance(layers, str):
        if layers.strip().lower() in ("all", "none"):
            return list(range(len(names))) if layers.strip().lower() == "all" else []
        layers = [item.strip() for item in layers.split(",") if item.strip()]
    chosen = []
    for item in layers:
        index = int(item) if str(item).lstrip("-").isdigit() else names.index(item) if item in names else None
        if index is None or not -len(names) <= index < len(names):
            raise ProbeError(f"--layers {item!r}: not a layer; use indices 0-{len(names) - 1} or names {names}")
        chosen.append(index % len(names))
    return sorted(set(chosen))


# ---------------------------------------------------------------- the run


def check_settings(settings: ProbeSettings) -> None:
    problems = {
        "--lrs": not settings.lrs or min(settings.lrs) <= 0,
        "--max-epochs": settings.max_epochs < 1,
        "--patience": settings.patience < 1,
        "--batch-size": settings.batch_size < 1,
        "--hidden": settings.hidden < 1,
        "--dropout": not 0 <= settings.dropout < 1,
        "--aggregate": settings.aggregate not in ("clip", "example"),
    }
    bad = [name for name, wrong in problems.items() if wrong]
    if bad:
        raise ProbeError(f"{', '.join(bad)}: out of range in {settings}; lrs and sizes must be positive, "
                         "0 <= dropout < 1, aggregate clip or example")


def probe(features_dir: str, task: str | dict | TaskConfig, out: str | None = None, settings: ProbeSettings | None = None,
          *, write: bool = True, verbose: bool = True, **overrides) -> list[dict]:
    """Probes every chosen layer (and the weighted sum) of a features folder on a task; returns the results rows.

    `task` is a task YAML path, a dict or a TaskConfig; `overrides` set ProbeSettings fields (seed=1, layers="0,3",
    max_epochs=50, ...). Writes results.csv, grid.csv, summary.json and scores_by_layer.png to `out`
    (default FEATURES/probe-TASKNAME) unless write=False."""
    settings = replace(settings or ProbeSettings(), **overrides)
    check_settings(settings)
    task, started = as_task(task), time.perf_counter()
    features = load_features(features_dir)
    data, kind = prepare(features, task, settings), TASK_TYPES[task.type]
    if not data.classes:
        raise ProbeError(f"{task.labels}: no {task.label_field!r} labels on train clips; nothing to learn")
    layers = select_layers(settings.layers, data.layer_names)
    weighted = [-1] if settings.weighted_sum and len(data.layer_names) > 1 else []
    if not layers + weighted:
        raise ProbeError(f"--layers {settings.layers!r} with no weighted sum leaves nothing to probe")
    specs = [ProbeSpec(layer, float(lr)) for lr in settings.lrs for layer in layers + weighted]
    grid = train_grid(specs, data, kind, settings)
    rows = choose_lrs(grid)
    summary = summarize(rows, task, features, data, settings, time.perf_counter() - started)
    if verbose:
        print(format_table(rows, f"{task.name} on {features_dir}"))
        print(summary_line(summary))
    if write:
        out = out or os.path.join(features_dir, f"probe-{task.name}")
        write_outputs(out, rows, grid, summary)
        if verbose:
            print(f"results in {out}/ (results.csv, grid.csv, summary.json, scores_by_layer.png)")
    return rows


def summarize(rows: list[dict], task: TaskConfig, features: Features, data: ProbeData,
              settings: ProbeSettings, seconds: float) -> dict:
    layers = [row for row in rows if row["index"] >= 0]
    best = max(layers, key=rank) if layers else None
    weighted = next((row for row in rows if row["index"] < 0), None)
    oracle = max(layers, key=lambda row: row["test"]) if layers else None
    info = {name: features.info.get(name) for name in ("dim", "pooling", "unit", "model", "window_seconds")}
    return {
        "task": asdict(task), "metric": rows[0]["metric"], "features": os.path.abspath(features.folder),
        "features_info": {**info, "layers": len(features.layer_names)},
        "best_layer": best and best["layer"], "best_layer_lr": best and best["lr"],
        "best_layer_valid": best and best["valid"], "best_layer_test": best and best["test"],
        "weighted_sum_test": weighted and weighted["test"], "weighted_sum_valid": weighted and weighted["valid"],
        "weighted_sum_lr": weighted and weighted["lr"], "weighted_sum_weights": weighted and weighted["weights"],
        "max_test_over_layers": oracle and {"layer": oracle["layer"], "test": oracle["test"]},
        "examples": {name: len(split.examples) for name, split in data.splits.items()},
        "clips": {name: split.num_clips for name, split in data.splits.items()},
        "classes": data.classes, "notes": data.notes, "settings": asdict(settings), "seconds": round(seconds, 2),
    }


def summary_line(summary: dict) -> str:
    metric, parts = summary["metric"], []
    if summary["best_layer"] is not None:
        parts.append(f"best layer (by validation) {summary['best_layer']}: test {metric} {summary['best_layer_test']:.4f}")
    if summary["weighted_sum_test"] is not None:
        weights = summary["weighted_sum_weights"]
        top = max(weights, key=weights.get)
        parts.append(f"weighted sum: test {metric} {summary['weighted_sum_test']:.4f} "
                     f"(largest weight {top} {weights[top]:.2f})")
    counts = "/".join(str(summary["clips"][name]) for name in SPLITS)
    return "; ".join(parts) + f"; clips train/valid/test {counts}; {summary['seconds']:.1f} s"


# ---------------------------------------------------------------- tables, files, plot


def _columns(rows: list[dict]) -> list[str]:
    extras = [name for name in rows[0] if name.startswith("valid_") and name != "valid_loss"]
    pairs = [column for name in extras for column in (name, "test_" + name[len("valid_"):])]
    return ["layer", "index", "lr", "metric", "valid", "test", *pairs, "valid_loss", "best_epoch", "epochs"]


def _csv_bytes(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, _columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: f"{value:.6g}" if isinstance(value, float) else value for name, value in row.items()})
    return text.getvalue().encode()


def format_table(rows: list[dict], title: str) -> str:
    """The results as aligned text; * marks the layer chosen by the validation metric."""
    columns = [c for c in _columns(rows) if c not in ("index", "metric", "valid_loss")]
    layers = [row for row in rows if row["index"] >= 0]
    best = max(layers, key=rank)["layer"] if layers else None
    header = [c if c not in ("valid", "test") else f"{c} {rows[0]['metric']}" for c in columns]
    cells = [[("* " if row["layer"] == best else "  ") + row["layer"] if c == "layer" else
              f"{row[c]:.4g}" if c == "lr" else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
              for c in columns] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_outputs(out: str, rows: list[dict], grid: list[dict], summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(os.path.join(out, "results.csv"), _csv_bytes(rows))
    atomic_write_bytes(os.path.join(out, "grid.csv"), _csv_bytes(grid))
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    atomic_write_bytes(os.path.join(out, "scores_by_layer.png"), plot_png(rows, summary))


def plot_png(rows: list[dict], summary: dict) -> bytes:
    """Test (bars) and validation (dots) metric by layer, the weighted sum as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row for row in rows if row["index"] >= 0]
    metric = summary["metric"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 2), 3.6))
    colors = ["tab:green" if row["layer"] == summary["best_layer"] else "tab:blue" for row in layers]
    ax.bar(range(len(layers)), [row["test"] for row in layers], color=colors, label=f"test {metric} (green: chosen)")
    ax.plot(range(len(layers)), [row["valid"] for row in layers], "o", color="tab:orange", label=f"valid {metric}")
    weighted = next((row for row in rows if row["index"] < 0), None)
    if weighted is not None:
        ax.axhline(weighted["test"], color="tab:red", linestyle="--", label=f"weighted sum (test) {weighted['test']:.3f}")
    ax.set_xticks(range(len(layers)), [row["layer"] for row in layers], rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{summary['task']['name']}: {metric} by layer\n{os.path.basename(os.path.normpath(summary['features']))}")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def compare(results_by_name: dict[str, list[dict]]) -> str:
    """A table of several feature sets' results rows (from probe): the layer chosen by validation and its test
    score, the weighted sum's test score, and the best test score of any layer (optimistic, as MARBLE's tables)."""
    header = ["features", "metric", "best layer (valid)", "test", "weighted sum", "max test (layer)"]
    lines = []
    for name, rows in results_by_name.items():
        layers = [row for row in rows if row["index"] >= 0]
        weighted = next((row for row in rows if row["index"] < 0), None)
        best, oracle = (max(layers, key=rank), max(layers, key=lambda row: row["test"])) if layers else (None, None)
        lines.append([name, rows[0]["metric"],
                      f"{best['layer']} (lr {best['lr']:.0e})" if best else "-",
                      f"{best['test']:.4f}" if best else "-",
                      f"{weighted['test']:.4f}" if weighted else "-",
                      f"{oracle['test']:.4f} ({oracle['layer']})" if oracle else "-"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *lines])


# ---------------------------------------------------------------- command line


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 5e-5,1e-4,1e-3") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = ProbeSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Trailing key=value pairs "
                                     "override the task file, e.g. labels=other/labels.jsonl")
    parser.add_argument("--features", required=True, help="a folder written by python -m pretrain.downstream.extract")
    parser.add_argument("--task", required=True, help="a task file, e.g. configs/probe/demo_key.yaml")
    parser.add_argument("--out", help="default: FEATURES/probe-TASKNAME")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without a better validation metric")
    parser.add_argument("--lrs", type=_floats, default=defaults.lrs, help="learning-rate grid, comma-separated")
    parser.add_argument("--layers", default="all", help="all, none (weighted sum only), or indices / names: 0,3,layer_5")
    parser.add_argument("--no-weighted-sum", action="store_true", help="skip the learned weighted sum of all layers")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden units of the probe")
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--aggregate", choices=("clip", "example"), default=defaults.aggregate,
                        help="clip: average a clip's window predictions before scoring (window features)")
    parser.add_argument("--resplit", type=_floats, metavar="TRAIN,VALID,TEST",
                        help="ignore split_field: split the clips by a hash of their names, e.g. 0.8,0.1,0.1")
    parser.add_argument("--max-probes", type=int, default=0,
                        help="probes trained at once, a memory bound (0: as many as hold ~16M parameters)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("overrides", nargs="*", help="task file key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    settings = ProbeSettings(seed=args.seed, lrs=args.lrs, max_epochs=args.max_epochs, patience=args.patience,
                             batch_size=args.batch_size, hidden=args.hidden, dropout=args.dropout,
                             weight_decay=args.weight_decay, layers=args.layers, weighted_sum=not args.no_weighted_sum,
                             aggregate=args.aggregate, resplit=args.resplit, max_probes=args.max_probes, device=args.device)
    try:
        task = load_task(args.task, args.overrides)
        probe(args.features, task, args.out, settings)
    except ProbeError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
