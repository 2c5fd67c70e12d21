"""Run configs: presets, precedence, and errors that name the key."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError, from_yaml, load_config, to_yaml
from pretrain.model import Encoder

PATHS = ["data.shards=/data/shards", "data.labels=[/data/shards/labels/encodec]"]


def test_presets_hold_the_mert_reference_settings():
    base, large = load_config("configs/mert_95m.yaml", PATHS), load_config("configs/mert_330m.yaml", PATHS)
    assert (base.model.dim, base.model.layers, base.model.pre_ln, base.objective.proj_dim) == (768, 12, False, 64)
    assert (large.model.dim, large.model.layers, large.model.pre_ln, large.objective.proj_dim) == (1024, 24, True, 128)
    assert large.model.attention_relax == 32 and large.model.layerdrop == 0 and large.model.feature_grad_mult == 1.0
    assert (base.optim.lr, base.optim.clip, large.optim.lr, large.optim.clip) == (5e-4, 10.0, 1.5e-3, 1.0)
    assert base.data.crop_seconds == 5.0 and large.data.crop_seconds == 5.12 and large.objective.mixup_seconds == (0.5, 1.5)
    assert base.model.conv_layers == large.model.conv_layers and base.model.stride == 320
    # MERT-v1 (both sizes): GroupNorm on the first conv only (fairseq extractor_mode "default"); dropout_input 0.1
    assert base.model.conv_norm == large.model.conv_norm == "group"
    assert base.model.feature_dropout == 0.1 and large.model.feature_dropout == 0.0
    tiny = load_config("configs/tiny.yaml")
    assert sum(p.numel() for p in Encoder(tiny.model).parameters()) < 500_000


def test_overrides_win_and_the_saved_config_reads_back():
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "model.layers=3", "optim.betas=[0.8,0.9]"])
    assert (cfg.train.steps, cfg.model.layers, cfg.optim.betas, cfg.model.dim) == (7, 3, (0.8, 0.9), 64)
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize("overrides, words", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=many"], "train.steps"),
    (["train.precision=fp8"], "train.precision"),
    (["steps"], "key=value"),
    (["model.heads=5"], "model.heads"),
    (["data.labels=[]"], "data.labels"),
    (["data.crop_seconds=1.001"], "crop_seconds"),
    (["model.conv_layers=[[32,10,5],[32,3,2],[32,3,2],[32,3,2],[32,2,2],[32,2,2]]"], "stride of 160"),
    (["objective.hop=160"], "objective.hop"),
])
def test_bad_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config("configs/tiny.yaml", overrides)


def test_unset_paths_and_missing_files_are_named():
    with pytest.raises(ConfigError, match="data.shards"):
        load_config("configs/mert_95m.yaml")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("configs/nope.yaml")


def test_bestrq_needs_no_labels_and_refuses_them():
    cfg = load_config("configs/bestrq_95m.yaml", ["data.shards=/data/shards"])
    assert cfg.objective.kind == "bestrq" and cfg.data.labels == () and cfg.objective.cqt_weight == 0
    assert cfg.model == load_config("configs/mert_95m.yaml", PATHS).model  # the MERT-95M encoder
    assert load_config("configs/tiny.yaml").objective.kind == "mert"  # the default
    with pytest.raises(ConfigError, match=r"data\.labels=\[.*objective\.kind=bestrq"):
        load_config("configs/bestrq_95m.yaml", PATHS)
    with pytest.raises(ConfigError, match=r"data\.labels is empty.*objective\.kind=bestrq"):
        load_config("configs/tiny.yaml", ["data.labels=[]"])


@pytest.mark.parametrize("overrides, words", [
    (["objective.kind=hubert"], "objective.kind"),
    (["objective.bestrq_stack=3"], "objective.bestrq_stack"),
    (["objective.bestrq_codebook_size=1"], "objective.bestrq_codebook_size"),
    (["objective.bestrq_n_fft=16", "objective.bestrq_stack=2"], "objective.bestrq_n_fft"),
    (["objective.bestrq_norm=corpus"], "objective.bestrq_norm"),
    (["train.eval_shards=/e", "train.eval_labels=[/e/labels/km]"], "train.eval_labels"),
])
def test_bad_bestrq_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config("configs/bestrq_95m.yaml", ["data.shards=/data/shards", *overrides])


def test_every_objective_kind_has_a_class_and_every_target_norm_a_function():
    from pretrain.config import OBJECTIVE_KINDS, TARGET_NORMS
    from pretrain.objectives import OBJECTIVES
    from pretrain.objectives.data2vec import TARGET_NORMS as NORM_FUNCTIONS

    assert tuple(OBJECTIVES) == OBJECTIVE_KINDS
    assert tuple(NORM_FUNCTIONS) == TARGET_NORMS


def test_a_preset_names_its_base_and_lists_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {dim: 96, heads: 4, layers: 3}\ntrain: {steps: 10}\n")
    (tmp_path / "middle.yaml").write_text("base: base.yaml\nmodel: {layers: 5}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text("base: ../middle.yaml\ntrain: {steps: 20}\n")  # relative to its file
    cfg = load_config(str(tmp_path / "sub" / "top.yaml"), ["data.shards=x", "data.labels=[x/l]", "model.dim=128"])
    assert (cfg.model.dim, cfg.model.layers, cfg.train.steps) == (128, 5, 20)  # override > top > middle > base
    assert "base" not in to_yaml(cfg)  # a run saves the resolved config


@pytest.mark.parametrize("text, words", [("base: nowhere.yaml\n", "nowhere.yaml: no such config file"),
                                         ("base: loop.yaml\n", "comes back to itself"),
                                         ("base: [a.yaml, b.yaml]\n", "base: must be one preset")])
def test_a_bad_base_is_named(tmp_path, text, words):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(str(tmp_path / "loop.yaml"), ["data.shards=x"])


def test_every_stage_reads_settings_one_way():
    """data.settings.merge_settings: defaults, then layers, then key=value one by one (a key may index a list),
    typed; a bad key or value raises the caller's error type naming the file and the key."""
    from data.settings import merge_settings
    from teachers import TeacherError
    from teachers.kmeans import KMeansConfig

    layer = {"name": "t", "shards": "s", "out": "o", "streams": [{"name": "a", "k": 4, "features": {"kind": "mfcc"}}]}
    cfg = merge_settings(KMeansConfig, [layer], ["streams.0.k=8", "iterations=3"], "t.yaml", TeacherError)
    assert cfg.streams[0].k == 8 and cfg.iterations == 3 and cfg.name == "t"
    with pytest.raises(TeacherError, match=r"t\.yaml \(overrides \['colour=blue'\]\): key 'colour'"):
        merge_settings(KMeansConfig, [layer], ["colour=blue"], "t.yaml", TeacherError)
    with pytest.raises(TeacherError, match=r"t\.yaml: key 'iterations'"):
        merge_settings(KMeansConfig, [{**layer, "iterations": "many"}], [], "t.yaml", TeacherError)
    with pytest.raises(TeacherError, match=r"write them as key=value, e\.g\. k=1"):
        merge_settings(KMeansConfig, [layer], ["k"], "t.yaml", TeacherError, ", e.g. k=1")
