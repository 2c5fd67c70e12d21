"""Run configs: presets, precedence, and errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, from_yaml, load_config, to_yaml
from pretrain.model import Encoder
from pretrain.resume_check import check_resumable

PATHS = ["data.shards=/data/shards", "data.labels=[/data/shards/labels/encodec]"]


def test_presets_hold_the_mert_reference_settings():
    base, large = load_config("configs/mert_95m.yaml", PATHS), load_config("configs/mert_330m.yaml", PATHS)
    assert (base.model.dim, base.model.layers, base.model.pre_ln, base.objective.mert.proj_dim) == (768, 12, False, 64)
    assert (large.model.dim, large.model.layers, large.model.pre_ln, large.objective.mert.proj_dim) == (1024, 24, True, 128)
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
    (["objective.bestrq.stack=3"], "objective.bestrq.stack"),
    (["objective.bestrq.codebook_size=1"], "objective.bestrq.codebook_size"),
    (["objective.bestrq.n_fft=16", "objective.bestrq.stack=2"], "objective.bestrq.n_fft"),
    (["objective.bestrq.norm=corpus"], "objective.bestrq.norm"),
    (["train.eval_shards=/e", "train.eval_labels=[/e/labels/km]"], "train.eval_labels"),
])
def test_bad_bestrq_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config("configs/bestrq_95m.yaml", ["data.shards=/data/shards", *overrides])


@pytest.mark.parametrize("overrides, key", [
    (["model.frontend=cqt", "model.cqt_bins=169"], "model.cqt_bins=169"),  # 7 octaves and a bin: nnAudio fails
    (["objective.cqt_bins=96", "objective.cqt_bins_per_octave=12"], "objective.cqt_bins=96"),
])
def test_a_cqt_of_more_octaves_than_the_hop_allows_is_refused(overrides, key):
    load_config("configs/tiny.yaml", PATHS + ["model.frontend=cqt", "model.cqt_bins=168"])  # 7 octaves: computed
    with pytest.raises(ConfigError, match=rf"{key} .* spans 8 octaves.*at most 7"):
        load_config("configs/tiny.yaml", PATHS + overrides)


def test_every_objective_owns_a_settings_section_that_checks_itself():
    from pretrain.objectives import OBJECTIVES, ObjectiveConfig

    model = load_config("configs/mert_95m.yaml", PATHS).model
    for kind, objective in OBJECTIVES.items():
        settings = getattr(ObjectiveConfig(), kind)
        assert dataclasses.is_dataclass(settings) and type(settings) is objective.Settings
        assert isinstance(objective.reads_labels, bool)
        settings.check(model)  # its defaults pass its own checks
    assert [k for k, o in OBJECTIVES.items() if o.reads_labels] == ["mert"]


def old_shape(text: str) -> str:
    """A saved run config as written before each objective's settings moved under objective.<kind>."""
    saved = OmegaConf.to_container(OmegaConf.create(text))
    objective = saved["objective"]
    for kind in ("bestrq", "data2vec"):
        objective.update({f"{kind}_{name}": value for name, value in objective.pop(kind).items()})
    objective.update(objective.pop("mert"))  # proj_dim, temperature
    return OmegaConf.to_yaml(OmegaConf.create(saved))


def test_a_run_saved_with_the_earlier_objective_section_is_migrated_and_resumes():
    cfg = load_config("configs/small_bestrq.yaml", ["data.shards=x", "objective.bestrq.seed=3"])
    saved = old_shape(to_yaml(cfg))
    assert "bestrq_seed: 3" in saved and "proj_dim: 64" in saved
    assert from_yaml(saved) == cfg
    check_resumable(cfg, 1, saved, {"world": 1})  # no difference to refuse
    with pytest.raises(ConfigError, match=r"objective\.bestrq\.seed: 3 then, 4 now"):
        check_resumable(dataclasses.replace(cfg, objective=dataclasses.replace(
            cfg.objective, bestrq=dataclasses.replace(cfg.objective.bestrq, seed=4))), 1, saved, {"world": 1})


def test_a_setting_typed_at_its_earlier_place_is_refused_with_its_new_name_and_a_file_is_migrated(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.data2vec_top_k is now objective\.data2vec\.top_k"):
        load_config("configs/small_data2vec.yaml", ["data.shards=x", "objective.data2vec_top_k=2"])
    run_config = tmp_path / "config.yaml"  # e.g. extraction's --random-init RUN/config.yaml of an earlier run
    run_config.write_text(old_shape(to_yaml(load_config("configs/tiny.yaml", PATHS + ["objective.mert.proj_dim=16"]))))
    assert load_config(str(run_config)).objective.mert.proj_dim == 16
    (tmp_path / "child.yaml").write_text("base: config.yaml\nobjective: {mert: {proj_dim: 48}}\n")  # each file migrated
    assert load_config(str(tmp_path / "child.yaml")).objective.mert.proj_dim == 48  # before its base is merged under it


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
