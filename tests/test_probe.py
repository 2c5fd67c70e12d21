"""Probing frozen features: the informative layer wins, windows keep to their clip's split, the files, the errors."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from synth import demo
from pretrain.downstream import probe as P
from pretrain.downstream import probe_data as D
from pretrain.downstream import probe_metrics as M

KEYS = M.KEY_NAMES
TAGS = ("bass", "drums", "organ", "pluck", "strings")
CHANCE_CEILING = {"multiclass": 0.6, "multilabel": 0.75, "regression": 0.3, "key": 0.35}
INFORMED_FLOOR = {"multiclass": 0.9, "multilabel": 0.95, "regression": 0.8, "key": 0.8}
WEIGHTED_SUM_FLOOR = {"multiclass": 0.8, "multilabel": 0.95, "regression": 0.15, "key": 0.45}


def split_of(clip: int) -> str:
    return "test" if clip % 5 == 0 else "valid" if clip % 5 == 1 else "train"


def label_and_signal(kind: str, clip: int, dim: int, rng) -> tuple[object, np.ndarray]:
    """A label of the task type and the direction that encodes it in the informative layer."""
    signal = np.zeros(dim)
    if kind in ("multiclass", "key"):
        classes = KEYS if kind == "key" else ("a", "b", "c", "d")
        label = clip % len(classes)
        signal[label] = 1.0
        return classes[label], signal
    if kind == "multilabel":
        hot = rng.random(len(TAGS)) < 0.4
        signal[:len(TAGS)] = hot
        return [tag for tag, on in zip(TAGS, hot) if on], signal
    tempo = float(rng.uniform(60, 180))
    signal[0] = (tempo - 120) / 35
    return tempo, signal


def write_features(folder, rows: list[dict], arrays: list[np.ndarray], layer_names: list[str], unit: str = "clip") -> str:
    os.makedirs(folder / "features", exist_ok=True)
    for row, array in zip(rows, arrays):
        np.save(folder / row["path"], array.astype(np.float32))
    info = {"format": "musicpt-features/1", "layer_names": layer_names, "dim": arrays[0].shape[1],
            "pooling": "mean", "unit": unit, "model": {"synthetic": True}}
    (folder / "info.json").write_text(json.dumps(info))
    (folder / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def make_set(root, kind: str, clips: int = 100, layers: int = 4, dim: int = 16, informative: int = 2,
             windows: int = 1, seed: int = 0) -> tuple[str, dict]:
    """A features folder where layer `informative` carries the label and the others are noise, and its task."""
    rng = np.random.default_rng(seed)
    labels, rows, arrays = [], [], []
    for clip in range(clips):
        label, signal = label_and_signal(kind, clip, dim, rng)
        name = f"audio/clip_{clip:04d}.wav"
        labels.append({"file": name, "y": label, "split": split_of(clip)})
        for window in range(windows):
            array = rng.standard_normal((layers, dim))
            array[informative] = 0.5 * array[informative] + 3.0 * signal
            rows.append({"key": f"{name}#{window:04d}", "clip": name, "path": f"features/{clip:04d}_{window}.npy",
                         "seconds": 5.0})
            arrays.append(array)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labels))
    names = ["features"] + [f"layer_{i}" for i in range(1, layers)]
    folder = write_features(root / "features", rows, arrays, names, "window" if windows > 1 else "clip")
    task = {"name": f"synthetic_{kind}", "type": kind, "labels": str(root / "labels.jsonl"), "label_field": "y"}
    return folder, task


def quick(**overrides) -> dict:
    return {"lrs": (1e-3, 1e-2), "max_epochs": 40, "patience": 8, "verbose": False, **overrides}


# ---------------------------------------------------------------- the protocol finds the informative layer


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression", "key"])
def test_the_informative_layer_wins_and_noise_layers_score_near_chance(tmp_path, kind):
    clips, dim = (144, 32) if kind == "key" else (100, 16)
    features, task = make_set(tmp_path, kind, clips=clips, dim=dim)
    rows = P.probe(features, task, verbose=False)  # the full default protocol: 6 learning rates, patience 10
    layers = [row for row in rows if row["index"] >= 0]
    assert [row["layer"] for row in rows] == ["features", "layer_1", "layer_2", "layer_3", "weighted_sum"]
    assert max(layers, key=P.rank)["layer"] == "layer_2"
    assert layers[2]["test"] >= INFORMED_FLOOR[kind]
    assert max(row["test"] for i, row in enumerate(layers) if i != 2) <= CHANCE_CEILING[kind]
    assert all(row["lr"] in D.DEFAULT_LRS and 1 <= row["best_epoch"] <= row["epochs"] <= 100 for row in rows)
    assert sum(rows[-1]["weights"].values()) == pytest.approx(1.0)
    if kind == "key":
        assert {"valid_accuracy", "test_accuracy"} <= set(layers[2]) and layers[2]["test_accuracy"] >= 0.7
    if kind == "multilabel":
        assert layers[2]["test_ap"] >= 0.9 and layers[0]["test_ap"] < layers[2]["test_ap"]


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression", "key"])
def test_the_weighted_sum_learns_to_weight_the_informative_layer(tmp_path, kind):
    # The layer weights move about lr per Adam step, so this needs more steps than the test above gives them:
    # 192 train clips (3 steps an epoch) at lr 1e-2. With only a quarter of the weight on the one informative
    # layer the sum drowns its signal in noise, so the score trails the layer's (regression most).
    features, task = make_set(tmp_path, kind, clips=320, dim=32 if kind == "key" else 16)
    informed, weighted = P.probe(features, task, write=False, **quick(layers="2", lrs=(1e-2,), max_epochs=60, patience=15))
    weights = weighted["weights"]
    assert max(weights, key=weights.get) == "layer_2" and weights["layer_2"] > 0.3
    assert WEIGHTED_SUM_FLOOR[kind] <= weighted["test"] <= informed["test"] + 0.05


# ---------------------------------------------------------------- splits and windows


def test_windows_of_one_clip_stay_in_its_split_and_are_scored_per_clip(tmp_path):
    features, task = make_set(tmp_path, "multiclass", clips=60, windows=3)
    loaded = D.load_features(features)
    for resplit in (None, (0.6, 0.2, 0.2)):
        data = D.prepare(loaded, D.as_task(task), D.ProbeSettings(resplit=resplit))
        by_clip = {}
        for clip, split in zip(loaded.clips, data.example_split):
            by_clip.setdefault(clip, set()).add(split)
        assert all(len(splits) == 1 for splits in by_clip.values())
        if resplit is None:
            assert all(splits == {split_of(int(clip[11:15]))} for clip, splits in by_clip.items())
        counts = {name: data.splits[name].num_clips for name in D.SPLITS}
        assert sum(counts.values()) == 60 and min(counts.values()) >= 10
        assert all(len(data.splits[name].examples) == 3 * counts[name] for name in D.SPLITS)
    out = tmp_path / "out"
    P.probe(features, task, str(out), **quick(layers="2", weighted_sum=False))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"]["test"] == 12 and summary["examples"]["test"] == 36
    assert summary["best_layer_test"] >= 0.9


def test_train_statistics_standardise_the_features(tmp_path):
    features, task = make_set(tmp_path, "regression", clips=40)
    data = D.prepare(D.load_features(features), D.as_task(task), D.ProbeSettings())
    train = data.x[:, data.splits["train"].examples]
    assert torch.allclose(train.mean(1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(train.std(1, unbiased=False), torch.ones(()), atol=1e-4)
    targets = data.y[data.splits["train"].examples]
    assert abs(float(targets.mean())) < 1e-5 and abs(float(targets.std(unbiased=False)) - 1) < 1e-4


def test_clips_extracted_from_the_audio_folder_find_their_labels_by_path_suffix(tmp_path):
    features, task = make_set(tmp_path, "multiclass", clips=20, layers=3, dim=4)
    index = os.path.join(features, "index.jsonl")
    rows = [json.loads(line) for line in open(index)]
    with open(index, "w") as file:
        file.write("".join(json.dumps({**row, "clip": row["clip"].removeprefix("audio/")}) + "\n" for row in rows))
    data = D.prepare(D.load_features(features), D.as_task(task), D.ProbeSettings())
    assert sum(split.num_clips for split in data.splits.values()) == 20


def test_tags_never_in_train_are_left_out_and_each_split_scores_the_tags_it_has():
    task = D.TaskConfig(name="t", type="multilabel", labels="l.jsonl", label_field="tags")
    y, classes, notes = D.encode_multilabel([["a", "b"], ["c"], ["a"]], ["l:1", "l:2", "l:3"],
                                            np.array([True, False, True]), task)
    assert classes == ["a", "b"] and notes == {"labels_not_in_train": ["c"]}
    assert y.tolist() == [[1, 1], [0, 0], [1, 0]]
    # "b" has no positive among these clips and "a" no negative: neither can give a ROC-AUC here
    assert np.isnan(M.roc_auc_macro(np.ones((1, 2, 2)), np.array([[1.0, 0.0], [1.0, 0.0]]))).all()


# ---------------------------------------------------------------- outputs, determinism, the CLI


def test_the_cli_writes_the_table_csv_plot_and_summary(tmp_path, capsys):
    features, task = make_set(tmp_path, "multiclass", clips=50, layers=3, dim=8)
    task_file = tmp_path / "task.yaml"
    task_file.write_text("".join(f"{key}: {value}\n" for key, value in task.items()))
    P.main(["--features", features, "--task", str(task_file), "--lrs", "1e-3,1e-2", "--max-epochs", "20",
            "--patience", "5", "name=renamed"])
    printed = capsys.readouterr().out
    out = tmp_path / "features" / "probe-renamed"
    assert "weighted_sum" in printed and "test accuracy" in printed and str(out) in printed
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["layer"] for row in rows] == ["features", "layer_1", "layer_2", "weighted_sum"]
    assert {"lr", "valid", "test", "best_epoch", "epochs", "valid_loss"} <= set(rows[0])
    with open(out / "grid.csv") as file:
        assert len(list(csv.DictReader(file))) == 4 * 2
    assert (out / "scores_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"]["name"] == "renamed" and summary["metric"] == "accuracy"
    assert summary["best_layer"] == "layer_2" and summary["features"] == os.path.abspath(features)
    assert summary["weighted_sum_test"] == pytest.approx(float(rows[-1]["test"]), abs=1e-5)
    assert set(summary["weighted_sum_weights"]) == {"features", "layer_1", "layer_2"}


def test_the_same_seed_gives_the_same_results_and_a_probe_does_not_depend_on_the_others(tmp_path):
    features, task = make_set(tmp_path, "multilabel", clips=50, layers=3, dim=8)
    first = P.probe(features, task, write=False, **quick())
    assert P.probe(features, task, write=False, **quick()) == first
    alone = P.probe(features, task, write=False, **quick(layers="layer_1", weighted_sum=False, max_probes=1))
    assert alone == [first[1]]
    assert P.probe(features, task, write=False, **quick(seed=1)) != first


def test_compare_lists_best_layer_and_weighted_sum_per_feature_set(tmp_path):
    features, task = make_set(tmp_path, "multiclass", clips=50, layers=3, dim=8)
    rows = P.probe(features, task, write=False, **quick())
    single = [dict(rows[0], layer="mfcc")]
    table = P.compare({"trained": rows, "mfcc stats": single})
    lines = table.splitlines()
    assert len(lines) == 3 and "weighted sum" in lines[0]
    assert lines[1].startswith("trained") and "layer_2" in lines[1] and f"{rows[-1]['test']:.4f}" in lines[1]
    assert lines[2].startswith("mfcc stats") and " - " in lines[2]


# ---------------------------------------------------------------- metrics


def test_the_key_score_is_mir_evals_weighted_score():
    def score(reference: str, estimate: str) -> float:
        return float(M.key_score_matrix()[M.checked_key(reference), M.checked_key(estimate)])

    assert score("C major", "C major") == 1.0
    assert score("C major", "G major") == 0.5  # a perfect fifth above
    assert score("C major", "A minor") == 0.3  # relative minor
    assert score("A minor", "C major") == 0.3  # relative major
    assert score("C major", "C minor") == 0.2  # parallel
    assert score("C major", "F# major") == 0.0
    matrix = M.key_score_matrix()
    assert matrix[KEYS.index("D major"), KEYS.index("A major")] == 0.5 and np.trace(matrix) == 24
    preds = np.eye(24)[[KEYS.index("G major"), KEYS.index("A minor"), KEYS.index("C minor")]][None]
    assert M.key_score(preds, np.array([KEYS.index("C major")] * 3)) == pytest.approx([(0.5 + 0.3 + 0.2) / 3])


def test_key_strings_are_read_into_mir_eval_names():
    import mir_eval.key

    for name in KEYS:
        mir_eval.key.validate_key(name)
    assert KEYS[M.key_index("Db major")] == "C# major" and KEYS[M.key_index("bb minor")] == "A# minor"
    assert KEYS[M.key_index("a:min")] == "A minor" and KEYS[M.key_index("Cb major")] == "B major"
    assert M.key_index("H major") is None and M.key_index("C dorian") is None


def test_auc_and_average_precision_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.3).astype(float)
    y[:, 3] = 0  # absent here: left out of both macro averages
    preds = np.round(rng.random((2, 40, 4)) + y[None], 1)  # with ties
    auc, ap = M.roc_auc_macro(preds, y), M.average_precision_macro(preds, y)
    for p in range(2):
        assert auc[p] == pytest.approx(metrics.roc_auc_score(y[:, :3], preds[p, :, :3], average="macro"))
        assert ap[p] == pytest.approx(metrics.average_precision_score(y[:, :3], preds[p, :, :3], average="macro"))


def test_the_vectorised_adam_is_torch_adam_with_a_learning_rate_per_probe():
    torch.manual_seed(0)
    start, grads = torch.randn(3, 5, 4), [torch.randn(3, 5, 4) for _ in range(4)]
    stack = P.ProbeStack.__new__(P.ProbeStack)
    stack.settings, stack.steps, stack.lr = P.ProbeSettings(weight_decay=0.01), 0, torch.tensor([1e-3, 1e-2, 1e-1])
    stack.params = {"w": start.clone()}
    stack.moments = {"w": (torch.zeros_like(start), torch.zeros_like(start))}
    for grad in grads:
        stack._adam((grad.clone(),))
    for p, lr in enumerate(stack.lr.tolist()):
        param = start[p].clone().requires_grad_()
        adam = torch.optim.Adam([param], lr=lr, weight_decay=0.01)
        for grad in grads:
            param.grad = grad[p].clone()
            adam.step()
        assert torch.allclose(stack.params["w"][p], param.detach(), atol=1e-6)


# ---------------------------------------------------------------- task files and errors


@pytest.mark.parametrize("name, kind, field", [
    ("demo_key", "key", "key"),
    ("demo_instruments", "multilabel", "instruments"),
    ("demo_tempo", "regression", "tempo_bpm"),
])
def test_the_demo_task_files_read_the_demo_corpus_labels(tmp_path, name, kind, field):
    task = P.load_task(f"configs/probe/{name}.yaml", [f"labels={tmp_path}/labels.jsonl"])
    assert (task.name, task.type, task.label_field) == (name, kind, field)
    assert (task.clip_field, task.split_field) == ("file", "split")
    records = [demo.label_record(demo.plan_track(0, i), f"audio/track_{i:04d}.wav") for i in range(40)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [{"key": r["file"], "clip": r["file"], "path": f"features/{i}.npy", "seconds": 20.0}
            for i, r in enumerate(records)]
    arrays = [np.random.default_rng(i).standard_normal((2, 4)) for i in range(len(records))]
    features = write_features(tmp_path / "features", rows, arrays, ["embedding", "layer_1"])
    results = P.probe(features, task, write=False, lrs=(1e-3,), max_epochs=2, resplit=(0.6, 0.2, 0.2), verbose=False)
    assert len(results) == 3 and all(np.isfinite(row["valid"]) for row in results)


def error_case(tmp_path, case: str):
    """Breaks one thing of a good set; returns the probe call's arguments."""
    features, task = make_set(tmp_path, "key", clips=30, layers=3, dim=24)
    labels = tmp_path / "labels.jsonl"
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    if case == "no features folder":
        features = str(tmp_path / "nowhere")
    elif case == "no info.json":
        os.remove(os.path.join(features, "info.json"))
    elif case == "no npy":
        os.remove(os.path.join(features, "features", "0003_0.npy"))
    elif case == "non-finite features":
        path = os.path.join(features, "features", "0003_0.npy")
        array = np.load(path)
        array[0, 0] = np.nan
        np.save(path, array)
    elif case == "no labels file":
        task["labels"] = str(tmp_path / "missing.jsonl")
    elif case == "clip without labels":
        labels.write_text("".join(json.dumps(row) + "\n" for row in rows[1:]))
    elif case == "empty split":
        labels.write_text("".join(json.dumps({**row, "split": "valid" if row["split"] == "test" else row["split"]}) + "\n"
                                  for row in rows))
    elif case == "bad key":
        labels.write_text("".join(json.dumps({**row, "y": "H major" if i == 4 else row["y"]}) + "\n"
                                  for i, row in enumerate(rows)))
    elif case == "bad split value":
        labels.write_text("".join(json.dumps({**row, "split": "dev" if i == 2 else row["split"]}) + "\n"
                                  for i, row in enumerate(rows)))
    elif case == "unknown task type":
        task["type"] = "ranking"
    elif case == "unknown task key":
        task["label_feild"] = "y"
    return features, task


@pytest.mark.parametrize("case, words", [
    ("no features folder", r"nowhere: no such folder; make one with python -m pretrain\.downstream\.extract"),
    ("no info.json", r"info\.json: missing the features description"),
    ("no npy", r"0003_0\.npy \(index\.jsonl:4\): cannot read"),
    ("non-finite features", r"0003_0\.npy: clip audio/clip_0003\.wav has non-finite features .*Re-extract"),
    ("no labels file", r"missing\.jsonl: missing the labels"),
    ("clip without labels", r"index\.jsonl: 1 of 30 clips have no row in .*labels\.jsonl .*audio/clip_0000\.wav"),
    ("empty split", r"labels\.jsonl: no test examples .*--resplit"),
    ("bad key", r"labels\.jsonl:5: key 'H major' is not like 'C# minor'"),
    ("bad split value", r"labels\.jsonl:3: split \(split_field\) is 'dev'; use one of"),
    ("unknown task type", r"type 'ranking' is unknown; use one of multiclass, multilabel, regression, key"),
    ("unknown task key", r"key 'label_feild'"),
])
def test_bad_inputs_say_what_and_where(tmp_path, case, words):
    features, task = error_case(tmp_path, case)
    with pytest.raises(P.ProbeError, match=words):
        P.probe(features, task, write=False, **quick(max_epochs=1))


def test_bad_task_files_and_settings_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: key\nlabels: l.jsonl\nlabel_field: key\ncolour: blue\n")
    with pytest.raises(P.ProbeError, match=r"bad\.yaml: key 'colour'"):
        P.load_task(str(bad))
    bad.write_text("name: x\ntype: key\n")
    with pytest.raises(P.ProbeError, match=r"bad\.yaml: no value for label_field, labels"):
        P.load_task(str(bad))
    with pytest.raises(P.ProbeError, match="nope.yaml: no such task file"):
        P.load_task(str(tmp_path / "nope.yaml"))
    features, task = make_set(tmp_path, "multiclass", clips=20, layers=3, dim=4)
    with pytest.raises(P.ProbeError, match=r"--layers 'layer_9': not a layer"):
        P.probe(features, task, write=False, **quick(layers="0,layer_9"))
    with pytest.raises(P.ProbeError, match="--patience"):
        P.probe(features, task, write=False, **quick(patience=0))
