"""Which settings a resumed run may change: a run's saved config against the one it is started with.

A checkpoint holds the resolved config it was made with (config.yaml). Starting the same `train.run_dir`
again compares it, key by key, with the config of the new start; any difference outside FREE_TO_CHANGE
(or another world size) refuses the resume, naming each key, unless `train.force_resume=true`.
"""
from __future__ import annotations

from dataclasses import asdict

from pretrain.config import ConfigError, RunConfig, from_yaml

# Settings a resumed run may change; any other difference from the checkpoint's config is refused.
# train.compile is among them: it changes how a step is computed, not what a checkpoint holds or how it loads
# (engine.compile() compiles the module in place, so parameter names are the same; the optimizer, schedule, loss
# scale, RNG and stream states are untouched). A run resumed with the same setting continues exactly; flipping it
# changes later steps only as other hardware would: float rounding of fused kernels and, with dropout > 0, the
# dropout bits Inductor draws (from the same saved generator) instead of eager's.
# train.checkpoint_activations recomputes each block's forward in the backward pass with the RNG state of the
# first pass: the same losses and gradients (tests/test_step.py), so it may be flipped too.
# train.init_from only sets the weights of step 0, which a resume replaces with its checkpoint's.
FREE_TO_CHANGE = ("train.steps", "train.log_every", "train.save_every", "train.keep", "train.max_nonfinite",
                  "train.peak_tflops", "train.force_resume", "train.log_samples", "train.run_dir",
                  "train.min_loss_scale", "train.restart", "train.eval_", "train.collapse_", "train.compile",
                  "train.checkpoint_activations", "train.init_from", "optim.", "data.shards", "data.prefetch_factor")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (as YAML gives them back)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def check_resumable(cfg: RunConfig, world: int, saved_yaml: str, manifest: dict) -> None:
    """Raises ConfigError naming every setting (and the world size) that differs from the checkpoint's and
    may not change, unless cfg.train.force_resume. `manifest` is the checkpoint's complete.json."""
    saved, now = flatten(asdict(from_yaml(saved_yaml))), flatten(asdict(cfg))
    differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
              if saved.get(k) != now.get(k) and not k.startswith(FREE_TO_CHANGE)}
    if manifest["world"] != world:
        differ["world size"] = (manifest["world"], world)
    if differ and not cfg.train.force_resume:
        what = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ConfigError(f"{cfg.train.run_dir}: its checkpoints were made with other settings ({what}). Use another "
                          "train.run_dir for a new run, or pass train.force_resume=true to continue anyway.")
