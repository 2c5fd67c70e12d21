"""bench/learning.py --objective: every objective's settings make a valid run of the benchmark's presets."""
from __future__ import annotations

import importlib.util
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


def test_runs_of_other_objectives_get_their_own_name():
    assert learning.parse_args(["--objective", "data2vec"]).name == "small-data2vec"
    assert learning.parse_args([]).name == "small"
