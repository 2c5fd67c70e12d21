"""bench/learning.py --objective: every objective's settings make a valid run of the benchmark's presets."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from pretrain.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("learning", os.path.join(ROOT, "bench", "learning.py"))
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


@pytest.mark.parametrize("objective", sorted(learning.OBJECTIVE_SETTINGS))
@pytest.mark.parametrize("preset", ["configs/small.yaml", "configs/tiny.yaml"])
def test_each_objective_makes_a_valid_run_of_the_preset(objective, preset):
    layers = load_config(preset, ["data.shards=x", "data.labels=[x/labels/km]"]).model.layers
    overrides = ["data.shards=x", "data.labels=[x/labels/km]", *learning.OBJECTIVE_SETTINGS[objective](layers)]
    cfg = load_config(preset, overrides)  # the benchmark's order: its labels, then the objective's settings
    assert cfg.objective.kind == objective
    assert bool(cfg.data.labels) == (objective == "mert")
    if objective == "data2vec":
        assert 1 <= cfg.objective.data2vec_top_k < layers or layers == 1
        music2vec = load_config("configs/music2vec_95m.yaml", ["data.shards=x"])
        assert cfg.model.conv_norm == music2vec.model.conv_norm == "layer"  # data2vec audio base's extractor


def test_runs_of_other_objectives_get_their_own_name():
    assert learning.parse_args(["--objective", "data2vec"]).name == "small-data2vec"
    assert learning.parse_args([]).name == "small"


def test_compare_prints_one_row_per_finished_benchmark(tmp_path, capsys):
    def result(trained: float, objective: str) -> dict:
        scores = {task: {"trained": {"test": trained}, "random": {"test": 0.5}} for task in learning.TASKS}
        ranks = {task: {"trained": 4, "random": 20} for task in learning.TASKS}
        return {"scores": scores, "effective_rank": ranks, "overrides": [f"objective.kind={objective}"],
                "targets": {"a": True, "b": False}}
    for name, trained, objective in (("one", 0.6, "mert"), ("two", 0.25, "data2vec")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "learning.json").write_text(json.dumps(result(trained, objective)))
    learning.main(["--compare", str(tmp_path / "one"), str(tmp_path / "two")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["one", "mert", "0.600", "(1.20x)"] and "4,4,4 / 20,20,20" in lines[1]
    assert lines[2].split()[:4] == ["two", "data2vec", "0.250", "(0.50x)"] and "1/2" in lines[2]
    with pytest.raises(SystemExit, match="no learning.json"):
        learning.main(["--compare", str(tmp_path)])


def test_score_margins_say_when_a_target_is_within_the_test_sets_noise(tmp_path):
    assert learning.standard_error(0.5, 100) == pytest.approx(0.05)
    assert learning.standard_error(1.0, 100) == 0.0
    scores = {task: {"trained": {"test": 0.66}, "random": {"test": 0.55}, "mfcc": {"test": 0.2}} for task in learning.TASKS}
    margins = learning.score_margins(scores, {task: 100 for task in learning.TASKS})
    assert abs(margins["instrument: trained >= 1.2 x random"]) < 1e-9  # 0.66 = 1.2 x 0.55: on the line
    assert margins["key: trained >= mfcc"] > 2 and "instrument: trained >= mfcc" not in margins
    scores["pitch"]["trained"]["test"] = 0.75
    few = learning.score_margins(scores, {task: 50 for task in learning.TASKS})["pitch: trained >= 1.2 x random"]
    many = learning.score_margins(scores, {task: 400 for task in learning.TASKS})["pitch: trained >= 1.2 x random"]
    assert 0 < few < 2 < many  # the same gap is noise on 50 test clips and a result on 400
    certain = {task: {"trained": {"test": 1.0}, "random": {"test": 0.0}, "mfcc": {"test": 0.0}} for task in learning.TASKS}
    assert learning.score_margins(certain, {task: 10 for task in learning.TASKS})["key: trained >= mfcc"] == float("inf")
    zeros = {task: {name: {"test": 0.0} for name in ("trained", "random", "mfcc")} for task in learning.TASKS}
    assert learning.score_margins(zeros, {task: 10 for task in learning.TASKS})["pitch: trained >= mfcc"] == 0.0
    (tmp_path / "probe").mkdir()  # the counts data.demo --probe writes into probe.json
    tasks = {task: {"splits": {"train": 9, "valid": 3, "test": test}} for task, test in zip(learning.TASKS, (2, 0, 1))}
    (tmp_path / "probe" / "probe.json").write_text(json.dumps({"tasks": tasks}))
    assert learning.test_clips(str(tmp_path)) == {"pitch": 2, "instrument": 0, "key": 1}


def test_a_target_the_compared_score_leaves_no_room_for_says_so():
    scores = {task: {"trained": {"test": 0.9}, "random": {"test": 0.5}, "mfcc": {"test": 0.3}} for task in learning.TASKS}
    scores["instrument"]["random"]["test"] = 0.832  # the small preset's random init: 1.2x is 0.998
    scores["key"]["random"]["test"] = 0.9  # 1.2x is 1.08
    notes = learning.headroom_notes(scores, {task: 250 for task in learning.TASKS})
    assert notes == {"instrument: trained >= 1.2 x random": "needs 0.998: all 250 test clips right",
                     "key: trained >= 1.2 x random": "unattainable: needs 1.080, above a perfect score"}
    assert learning.headroom_notes(scores, {task: 1000 for task in learning.TASKS}).keys() == {"key: trained >= 1.2 x random"}


def test_a_work_folder_probed_at_another_scale_is_refused_not_reused(tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.json").write_text(json.dumps({"scale": 1.0, "tasks": {}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")  # never read: the check comes first
    with pytest.raises(SystemExit, match=r"probe\.json: .* built with --scale 1, not 2\.5; pass --scale 1"):
        learning.main(["--run", str(tmp_path / "run"), "--work", str(tmp_path)])  # the default scale
    learning.check_probe_scale(str(tmp_path / "probe"), 1.0)  # the scale it was built with: fine
    learning.check_probe_scale(str(tmp_path / "elsewhere"), 2.5)  # none built yet: fine


def test_a_work_folder_with_another_training_corpus_is_refused_not_reused(tmp_path):
    (tmp_path / "corpus.json").write_text(json.dumps({"minutes": 30.0, "timbres": "fixed"}))
    args = learning.parse_args(["--work", str(tmp_path), "--timbres", "random"])
    with pytest.raises(SystemExit, match=r"corpus\.json: .* made with --minutes 30 --timbres fixed; pass those"):
        learning.prepare_training(args, str(tmp_path))
    assert not (tmp_path / "corpus").exists()  # refused before any stage ran
    learning.check_corpus(str(tmp_path / "corpus.json"), {"minutes": 30.0, "timbres": "fixed"})  # the same: fine
    older = tmp_path / "older"  # a work folder from before the stamp: its corpus is kept, never stamped by guess
    for made in ("corpus/labels.jsonl", "shards/index.json"):
        (older / made).parent.mkdir(parents=True)
        (older / made).write_text("{}")
    learning.prepare_training(learning.parse_args(["--work", str(older), "--objective", "data2vec"]), str(older))
    assert not (older / "corpus.json").exists()
