"""The run configuration: one typed schema, read from a YAML preset with `key=value` overrides.

    cfg = load_config("configs/mert_95m.yaml", ["train.steps=1000", "data.batch_size=4"])

Precedence: command-line overrides > the YAML file > its `base:` preset, if it
names one (recursively) > the dataclass defaults below. Keys that the schema does not know, and values of the wrong type,
are errors that name the key. `cfg` is a plain `RunConfig` of frozen
dataclasses; `to_yaml(cfg)` is what a run saves beside its checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from omegaconf import DictConfig, OmegaConf

from data.audio import FRAME_RATE, FRAME_SAMPLES, SAMPLE_RATE
from data.settings import merge_settings
from data.stream import StreamConfig
from pretrain.model import FRONTENDS, EncoderConfig
from pretrain.objectives import OBJECTIVES, ObjectiveConfig


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4  # peak, reached at the end of warmup
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 32000  # linear from 0
    decay: str = "poly"  # "poly": (1 - progress) ** power down to end_lr; "cosine"
    power: float = 1.0
    end_lr: float = 0.0
    clip: float = 10.0  # gradient norm clip; 0 turns it off


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/run"  # resumed automatically when it holds checkpoints
    steps: int = 400000  # optimizer updates
    grad_accum: int = 1  # micro-batches per update; global batch = data.batch_size x grad_accum x world
    precision: str = "fp16"  # "fp32", "bf16" or "fp16" (dynamic loss scale; GPU only)
    zero_stage: int = 1
    compile: bool = False  # torch.compile the objective (encoder + heads) via DeepSpeed's engine.compile()
    checkpoint_activations: bool = False  # recompute each transformer block in the backward pass (less memory)
    seed: int = 0
    init_from: str = ""  # warm start: encoder weights at step 0 from a run, checkpoint, export or HF HuBERT folder
    log_every: int = 100
    save_every: int = 2000  # steps; also on SIGTERM / SIGUSR1
    keep: int = 3  # newest checkpoints kept
    max_nonfinite: int = 20  # consecutive skipped updates (a non-finite loss on any rank) before stopping
    initial_scale_power: int = 16  # fp16: the loss scale starts at 2 ** this
    min_loss_scale: float = 1.0  # fp16: the dynamic loss scale's floor; overflowing at it stops the run
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the GPU's name (none on CPU)
    force_resume: bool = False  # resume even where the saved config differs in a way that matters
    restart: bool = False  # when the run holds checkpoints and none loads: move them (and the logs) to previous/ and
    #                        start from step 0 instead of refusing; when one loads it resumes as usual
    log_samples: bool = False  # write every batch's keys and offsets per rank (tests, debugging)
    # Validation (pretrain/validate.py), by rank 0 every eval_every steps; 0: off.
    eval_every: int = 0
    eval_shards: str = ""  # held-out shard folder for the eval/ metrics; "": collapse signals only, on a training batch
    eval_labels: tuple[str, ...] = ()  # its label folders; (): EVAL_SHARDS/labels/NAME for each data.labels folder .../NAME
    eval_batches: int = 8  # batches of eval_shards per eval
    collapse_rank: int = 2  # WARNING when the output's (or conv features') effective rank falls below this ...
    collapse_fraction: float = 0.1  # ... or below this x its value at step 0's eval (0: no relative check)


@dataclass(frozen=True)
class RunConfig:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: StreamConfig = field(default_factory=lambda: StreamConfig(shards="???"))  # ???: must be set
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    pass


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Schema defaults, then the YAML file at `path`, then `key=value` overrides; typed and checked."""
    where = path or "the defaults"
    layers = [] if path is None else [read_preset(path)]
    refuse_moved_keys(overrides)
    cfg = _typed(merge_settings(RunConfig, layers, overrides, where, ConfigError, ", e.g. train.steps=1000"))
    check(cfg, where)
    return cfg


def read_preset(path: str, children: tuple[str, ...] = ()) -> DictConfig:
    """The YAML file at `path` merged over its `base:` preset (a path relative to the file), recursively: a preset
    that differs from another in a few keys names it and lists only those keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file (presets are in configs/, e.g. configs/tiny.yaml)")
    if os.path.realpath(path) in children:
        raise ConfigError(f"{path}: its base: chain comes back to itself ({' -> '.join(children)})")
    preset = OmegaConf.create(migrate(OmegaConf.to_container(OmegaConf.load(path))))  # each file before the merge
    base = preset.pop("base", None)
    if base is None:
        return preset
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: must be one preset's path, relative to {path}, e.g. base: tiny.yaml")
    parent = read_preset(os.path.join(os.path.dirname(path), base), children + (os.path.realpath(path),))
    return OmegaConf.merge(parent, preset)


def reads_labels(path: str, overrides: list[str] = ()) -> bool:
    """Whether the preset at `path`, with `key=value` overrides, trains on teacher labels (data.labels: MERT's
    objective), not on targets its objective makes from the audio in the step."""
    kinds = [item.split("=", 1)[1] for item in overrides if item.startswith("objective.kind=")]
    kind = (kinds or [read_preset(path).get("objective", {}).get("kind", ObjectiveConfig.kind)])[-1]
    return kind not in OBJECTIVES or OBJECTIVES[kind].reads_labels


def check(cfg: RunConfig, where: str) -> None:
    try:
        cfg.data.check()
    except ValueError as error:
        raise ConfigError(f"{where}: data: {error}") from None
    choices = {"objective.kind": (cfg.objective.kind, tuple(OBJECTIVES)),
               "train.precision": (cfg.train.precision, ("fp32", "bf16", "fp16")),
               "optim.decay": (cfg.optim.decay, ("poly", "cosine")),
               "train.zero_stage": (cfg.train.zero_stage, (0, 1, 2)),
               "model.conv_norm": (cfg.model.conv_norm, ("group", "layer")),
               "model.frontend": (cfg.model.frontend, FRONTENDS),
               "model.stem": (cfg.model.stem, ("conv2d", "conv1d"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where}: {key}={value!r}; use one of {allowed}")
    check_targets(cfg, where)
    check_frame_geometry(cfg, where)
    if cfg.model.frontend == "cqt":
        check_cqt_octaves("model", cfg.model.cqt_bins, cfg.model.cqt_bins_per_octave, cfg.model.hop, where)
    if cfg.objective.cqt_weight > 0:
        check_cqt_octaves("objective", cfg.objective.cqt_bins, cfg.objective.cqt_bins_per_octave, cfg.objective.hop,
                          where)
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"{where}: model.dim={cfg.model.dim} is not a multiple of model.heads={cfg.model.heads}")
    for key in ("train.steps", "train.grad_accum", "train.log_every", "train.save_every", "train.keep"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{where}: {key} must be at least 1")
    for key in ("eval_every", "collapse_rank"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"{where}: train.{key} must be at least 0")
    if cfg.objective.vicreg_weight < 0:
        raise ConfigError(f"{where}: objective.vicreg_weight={cfg.objective.vicreg_weight}: use 0 (off) or a positive weight")
    if cfg.train.eval_batches < 1:
        raise ConfigError(f"{where}: train.eval_batches must be at least 1")
    if not 0 <= cfg.train.collapse_fraction < 1:
        raise ConfigError(f"{where}: train.collapse_fraction={cfg.train.collapse_fraction}: use 0 (off) up to below 1")
    if cfg.train.eval_labels and not cfg.train.eval_shards:
        raise ConfigError(f"{where}: train.eval_labels is set but train.eval_shards is empty; name the eval shard folder")


def check_targets(cfg: RunConfig, where: str) -> None:
    """An objective that reads labels (mert) needs data.labels; one that makes its targets in the step takes none;
    then the kind's own settings (objective.<kind>.*) are checked by its Settings."""
    kind, reads_labels = cfg.objective.kind, OBJECTIVES[cfg.objective.kind].reads_labels
    if reads_labels and not cfg.data.labels:
        self_targeted = [k for k, objective in OBJECTIVES.items() if not objective.reads_labels]
        raise ConfigError(f"{where}: data.labels is empty; name at least one teacher's label folder, "
                          "e.g. 'data.labels=[SHARDS/labels/encodec]' (made by python -m teachers.encodec dump), "
                          f"or use objective.kind={' or '.join(self_targeted)}, which compute their targets from the audio")
    for key, folders in (("data.labels", cfg.data.labels), ("train.eval_labels", cfg.train.eval_labels)):
        if folders and not reads_labels:
            raise ConfigError(f"{where}: {key}={list(folders)} with objective.kind={kind}, which computes its "
                              f"targets from the audio in the step; set {key}=[] (or use objective.kind=mert to "
                              "train on those labels)")
    try:
        getattr(cfg.objective, kind).check(cfg.model)
    except ValueError as error:
        raise ConfigError(f"{where}: objective.{kind}.{error}") from None


def check_cqt_octaves(section: str, bins: int, per_octave: int, hop: int, where: str) -> None:
    """nnAudio's CQT computes the top octave at the full rate and each lower one at half the rate of the one
    above, with half its hop: a hop of 320 = 2^6 x 5 samples allows 7 octaves."""
    octaves, most = -(-bins // max(per_octave, 1)), (hop & -hop).bit_length()
    if octaves > most:
        raise ConfigError(f"{where}: {section}.cqt_bins={bins} at {section}.cqt_bins_per_octave={per_octave} spans "
                          f"{octaves} octaves; the CQT halves its {hop}-sample hop once per octave below the top, so "
                          f"it computes at most {most}: use at most {most * per_octave} bins (a higher "
                          f"{section}.cqt_fmin moves them up)")


def check_frame_geometry(cfg: RunConfig, where: str) -> None:
    """Encoder frame t must be label frame t: the conv stack's total stride is the label hop (data.audio)."""
    if cfg.model.frontend != "waveform":
        if (cfg.model.hop, cfg.model.sample_rate) != (FRAME_SAMPLES, SAMPLE_RATE):
            raise ConfigError(f"{where}: model.hop={cfg.model.hop} and model.sample_rate={cfg.model.sample_rate} must be "
                              f"{FRAME_SAMPLES} and {SAMPLE_RATE}, the label geometry ({FRAME_RATE} Hz frames)")
        for key in ("n_fft", "n_mels", "cqt_bins", "cqt_bins_per_octave", "stem_channels"):
            if getattr(cfg.model, key) < 1:
                raise ConfigError(f"{where}: model.{key}={getattr(cfg.model, key)} must be at least 1")
        if cfg.model.n_fft < cfg.model.hop:
            raise ConfigError(f"{where}: model.n_fft={cfg.model.n_fft} is shorter than the {cfg.model.hop}-sample hop; "
                              "use e.g. 2048")
    elif cfg.model.stride != FRAME_SAMPLES:
        raise ConfigError(f"{where}: model.conv_layers have a total stride of {cfg.model.stride} samples, but labels "
                          f"come every {FRAME_SAMPLES} samples ({FRAME_RATE} Hz at {SAMPLE_RATE} Hz); "
                          f"choose strides whose product is {FRAME_SAMPLES}, e.g. 5, 2, 2, 2, 2, 2, 2")
    if (cfg.objective.hop, cfg.objective.sample_rate) != (FRAME_SAMPLES, SAMPLE_RATE):
        raise ConfigError(f"{where}: objective.hop={cfg.objective.hop} and objective.sample_rate="
                          f"{cfg.objective.sample_rate} must be {FRAME_SAMPLES} and {SAMPLE_RATE}, the label geometry")


def moved_key(name: str) -> str | None:
    """Where a setting of the objective section went when each kind's own settings moved under objective.<kind>
    (objective.bestrq_seed -> objective.bestrq.seed, objective.proj_dim -> objective.mert.proj_dim); None: it
    did not move."""
    if name in ("proj_dim", "temperature"):
        return f"mert.{name}"
    for kind in ("bestrq", "data2vec"):
        if name.startswith(kind + "_"):
            return f"{kind}.{name[len(kind) + 1:]}"
    return None


def refuse_moved_keys(overrides: list[str] | tuple) -> None:
    """An override that names a setting by its earlier place gets an error that names the new one (files are
    migrated: a saved run config must load as it was written)."""
    for item in overrides:
        section, _, name = item.split("=", 1)[0].partition(".")
        if section == "objective" and moved_key(name):
            raise ConfigError(f"overrides: objective.{name} is now objective.{moved_key(name)} (each objective's own "
                              "settings are under objective.<kind>); rename it")


def migrate(saved: dict) -> dict:
    """A run config or preset of the earlier shape (each kind's settings flat in objective) in today's: what lets
    runs saved that way resume, export and extract."""
    objective = dict(saved.get("objective") or {}) if isinstance(saved, dict) else {}
    for name in [name for name in objective if moved_key(name)]:
        kind, new = moved_key(name).split(".")
        objective.setdefault(kind, {})[new] = objective.pop(name)
    return {**saved, "objective": objective} if objective else saved


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))


def from_yaml(text: str) -> RunConfig:
    """A saved run config (the checkpoint's config.yaml), checked against the schema like a preset; one of the
    earlier shape is migrated (`migrate`)."""
    saved = migrate(OmegaConf.to_container(OmegaConf.create(text)))
    return _typed(merge_settings(RunConfig, [saved], (), "a saved run config", ConfigError))


def _typed(cfg: RunConfig) -> RunConfig:
    conv_layers = tuple(tuple(layer) for layer in cfg.model.conv_layers)  # OmegaConf leaves inner lists
    return replace(cfg, model=replace(cfg.model, conv_layers=conv_layers))
