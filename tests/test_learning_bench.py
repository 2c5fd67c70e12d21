"""bench/learning.py: the objective presets, the targets and tables, the work folder's checks."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from pretrain.config import load_config, reads_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("learning", os.path.join(ROOT, "bench", "learning.py"))
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


OBJECTIVE_PRESETS = sorted(os.path.relpath(path, ROOT) for objective in ("data2vec", "bestrq")
                           for path in glob.glob(os.path.join(ROOT, "configs", f"*_{objective}.yaml")))


def test_the_cpu_presets_have_an_objective_preset_each():
    assert OBJECTIVE_PRESETS == ["configs/small_bestrq.yaml", "configs/small_data2vec.yaml", "configs/tiny_data2vec.yaml"]


@pytest.mark.parametrize("path", OBJECTIVE_PRESETS)
def test_each_objective_preset_is_its_base_preset_with_the_objectives_settings(path):
    size, objective = os.path.basename(path)[:-len(".yaml")].split("_")
    base, cfg = (load_config(os.path.join(ROOT, p), ["data.shards=x"]) for p in (f"configs/{size}.yaml", path))
    assert cfg.objective.kind == objective and cfg.data.labels == () and not reads_labels(path)
    assert reads_labels(f"configs/{size}.yaml") and base.data.labels
    assert (cfg.model.dim, cfg.model.layers, cfg.train.steps) == (base.model.dim, base.model.layers, base.train.steps)
    if objective == "data2vec":
        assert cfg.objective.data2vec.top_k == max(1, round(cfg.model.layers * 2 / 3))  # data2vec base: 8 of 12
        music2vec = load_config("configs/music2vec_95m.yaml", ["data.shards=x"])
        assert cfg.model.conv_norm == music2vec.model.conv_norm == "layer"  # data2vec audio base's extractor
    if objective == "bestrq":
        reference = load_config("configs/bestrq_95m.yaml", ["data.shards=x"]).objective
        assert (cfg.objective.mask_prob, cfg.objective.mask_length) == (reference.mask_prob, reference.mask_length)


def test_runs_are_named_after_their_preset():
    assert learning.parse_args(["--config", "configs/small_data2vec.yaml"]).name == "small_data2vec"
    assert learning.parse_args([]).name == "small"


def scores_of(**by_name) -> dict:
    """scores[task][pooling][name] = {"test": value, "metric": ...} for every task and pooling."""
    return {task: {pooling: {name: {"test": value, "metric": "accuracy"} for name, value in by_name.items()}
                   for pooling in learning.POOLINGS} for task in learning.TASKS}


def test_compare_prints_one_row_per_finished_benchmark(tmp_path, capsys):
    def result(trained: float, objective: str) -> dict:
        scores = scores_of(trained=trained, random=0.5, mfcc=0.3, chroma=0.2, logmel=0.4)
        ranks = {task: {"trained": 4, "random": 20} for task in learning.TASKS}
        return {"scores": scores, "effective_rank": ranks, "overrides": [f"objective.kind={objective}"],
                "targets": {"a": True, "b": False, "c": None}}
    for name, trained, objective in (("one", 0.6, "mert"), ("two", 0.25, "data2vec")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "learning.json").write_text(json.dumps(result(trained, objective)))
    learning.main(["--compare", str(tmp_path / "one"), str(tmp_path / "two")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:6] == ["one", "mert", "0.600", "(1.50x", "best,", "1.20x"] and "4,4,4 / 20,20,20" in lines[1]
    assert lines[2].split()[:4] == ["two", "data2vec", "0.250", "(0.62x"] and " 1/2 " in lines[2]
    with pytest.raises(SystemExit, match="no learning.json"):
        learning.main(["--compare", str(tmp_path)])


def verdicts(scores: dict, clips: int, trained_rank: int = 9) -> dict:
    ranks = {task: {"trained": trained_rank, "random": 8} for task in learning.TASKS}
    return {row["label"]: row for row in learning.targets(scores, ranks, {task: clips for task in learning.TASKS})}


def test_the_trained_encoder_is_held_to_the_best_hand_made_statistic_like_for_like():
    assert learning.standard_error(0.5, 100) == pytest.approx(0.05)
    assert learning.standard_error(1.0, 100) == 0.0
    scores = scores_of(trained=0.80, random=0.5, mfcc=0.3, chroma=0.85, logmel=0.6)
    scores["pitch"]["mean_std"]["logmel"]["test"] = 0.95  # the best differs per task; mean pooling is not judged
    scores["pitch"]["mean"]["trained"]["test"] = 0.99
    rows = verdicts(scores, 100)
    pitch, key = rows["pitch: trained at or above the best hand-made (logmel)"], rows["key: trained at or above the best hand-made (chroma)"]
    assert pitch["ok"] is False and pitch["margin"] < -2 and pitch["note"] == "0.84x"
    assert key["ok"] is True and -2 < key["margin"] < 0  # 0.80 against 0.85 on 100 clips: within noise, counts as at
    assert rows["hand-made: at or above on >= 2 tasks, >= 0.9x on the third"]["ok"] is False  # pitch is at 0.84x
    scores["pitch"]["mean_std"]["trained"]["test"] = 0.86  # 0.91x of 0.95
    assert verdicts(scores, 100)["hand-made: at or above on >= 2 tasks, >= 0.9x on the third"]["ok"] is True
    assert not verdicts(scores, 100, trained_rank=7)["key: effective rank trained >= random"]["ok"]
    few = verdicts(scores, 50)["key: trained >= 1.2 x random"]["margin"]  # 0.80 against 1.2 x 0.5 = 0.6
    many = verdicts(scores, 400)["key: trained >= 1.2 x random"]["margin"]
    assert 0 < few < 2 < many  # the same gap is noise on 50 test clips and a result on 400


def test_a_random_init_that_leaves_no_room_for_1_2x_is_not_judged_and_says_so():
    scores = scores_of(trained=0.9, random=0.5, mfcc=0.3, chroma=0.2, logmel=0.4)
    scores["instrument"]["mean_std"]["random"]["test"] = 0.832  # 1.2x is 0.998
    scores["key"]["mean_std"]["random"]["test"] = 0.9  # 1.2x is 1.08
    rows = verdicts(scores, 250)
    assert rows["instrument: trained >= 1.2 x random"]["ok"] is None
    assert rows["instrument: trained >= 1.2 x random"]["note"] == "no room: needs 0.998, all 250 test clips right"
    assert rows["key: trained >= 1.2 x random"]["note"] == "no room: needs 1.080, above a perfect score"
    assert rows["pitch: trained >= 1.2 x random"]["ok"] is True
    assert verdicts(scores, 1000)["instrument: trained >= 1.2 x random"]["ok"] is False  # 0.998 < 999/1000: room


def test_the_chart_is_written_beside_the_figures(tmp_path):
    scores = scores_of(trained=0.9, random=0.5, mfcc=0.3, chroma=0.2, logmel=0.4)
    learning.plot(scores, {task: 100 for task in learning.TASKS}, str(tmp_path / "learning.png"), "a title")
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    with pytest.raises(SystemExit, match=r"made with --minutes 30 --timbres fixed"):  # a folder of recordings instead
        learning.prepare_training(learning.parse_args(["--work", str(tmp_path), "--corpus", str(recordings)]), str(tmp_path))
    with pytest.raises(SystemExit):
        learning.parse_args(["--corpus", str(tmp_path / "nowhere")])
    older = tmp_path / "older"  # a work folder from before the stamp: its corpus is kept, never stamped by guess
    for made in ("corpus/labels.jsonl", "shards/index.json"):
        (older / made).parent.mkdir(parents=True)
        (older / made).write_text("{}")
    learning.prepare_training(learning.parse_args(["--work", str(older), "--config", "configs/small_data2vec.yaml"]),
                               str(older))
    assert not (older / "corpus.json").exists()


report_spec = importlib.util.spec_from_file_location("report", os.path.join(ROOT, "bench", "report.py"))
report = importlib.util.module_from_spec(report_spec)
report_spec.loader.exec_module(report)


def test_the_docs_tables_are_the_recorded_results():
    """Every report block in the README and docs is what bench/report.py makes of the JSON files it names:
    regenerating changes nothing (edit the results, not the tables)."""
    docs = ["README.md"] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    kinds = set()
    for name in docs:
        text = open(os.path.join(ROOT, name)).read()
        for block in report.BLOCK.finditer(text):
            kinds.add(block["kind"])
            assert block["table"] == report.table(block["kind"], block["glob"]), f"{name}: python bench/report.py --update {name}"
    assert kinds == set(report.TABLES)  # every kind of table is in the docs, so each is checked here


def test_a_table_block_is_rewritten_from_its_results(tmp_path):
    result = {"scores": scores_of(trained=0.9, random=0.5, mfcc=0.3, chroma=0.2, logmel=0.6), "corpus": "synthetic, 30 min",
              "effective_rank": {task: {"trained": 9, "random": 8} for task in learning.TASKS}, "overrides": ["x=1"],
              "targets": {"a": True, "b": None, "c": False}, "frontend": "logmel", "objective": "mert",
              "config": "configs/small.yaml", "steps": 3000, "seed": 1}
    (tmp_path / "syn-x.json").write_text(json.dumps(result))
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n<!-- report learning-table: {tmp_path}/syn-*.json -->\nstale\n<!-- /report -->\nafter\n")
    assert report.update(str(doc)) and not report.update(str(doc))
    lines = doc.read_text().splitlines()
    assert lines[0] == "before" and lines[-1] == "after" and "stale" not in lines
    assert lines[4].startswith("| syn-x | synthetic | logmel + mert, small.yaml 3000 steps, seed 1: `x=1` | 0.900 (1.50x logmel); rnd 0.500 (1.80x)")
    assert lines[4].endswith("| 9/8, 9/8, 9/8 | 1/2 |")


def test_mean_pooled_features_are_the_first_half_of_the_mean_and_std_ones(tmp_path):
    import numpy as np

    from pretrain.downstream.extract import main as extract_main
    from pretrain.downstream.probe_data import load_features
    from conftest import tone, write

    write(tmp_path / "audio" / "a.wav", tone(1.5, 24000, 440), 24000)
    write(tmp_path / "audio" / "b.wav", tone(1.0, 24000, 220), 24000)
    common = ["--random-init", "configs/tiny.yaml", "--input", str(tmp_path / "audio"), "--window-seconds", "1.0"]
    extract_main([*common, "--out", str(tmp_path / "mean_std"), "--pooling", "mean_std"])
    extract_main([*common, "--out", str(tmp_path / "extracted"), "--pooling", "mean"])
    learning.means_of(str(tmp_path / "mean_std"), str(tmp_path / "mean"))
    derived, extracted = load_features(str(tmp_path / "mean")), load_features(str(tmp_path / "extracted"))
    assert derived.keys == extracted.keys and np.allclose(derived.x, extracted.x, atol=1e-6)
    assert derived.info["pooling"] == "mean" and not (tmp_path / "mean.partial").exists()
