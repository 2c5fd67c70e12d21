"""Weights-only encoder export: `python -m pretrain.export --ckpt RUN_DIR_OR_CHECKPOINT --out model.pt`.

The file holds the encoder's fp32 weights (no prediction heads, no
optimizer), its config and the step; `load_encoder(path)` rebuilds it
without DeepSpeed, with `torch.load(weights_only=True)`:

    from pretrain.export import load_encoder
    encoder = load_encoder("model.pt").eval()
    out = encoder(audio_24khz, all_layers=True)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from data.files import read_json
from data.logs import logger, setup_logging
from pretrain.checkpoint import MANIFEST, find_problem, fp32_master_weights, module_weights, newest
from pretrain.config import from_yaml
from pretrain.model import Encoder, EncoderConfig

FORMAT = "musicpt-encoder-v1"
log = logger(__name__)


def checkpoint_folder(path: str) -> str:
    """A run directory (its newest complete checkpoint) or one checkpoint folder."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return newest(path)
    problem = find_problem(path)
    if problem:
        raise FileNotFoundError(f"{path}: not a run directory or a complete checkpoint ({problem})")
    return path


def fp32_weights(folder: str, precision: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The model's weights from a DeepSpeed checkpoint: the fp32 master copy where training was mixed precision."""
    if precision != "fp32" and zero_stage >= 1:
        return fp32_master_weights(folder)
    if precision != "fp32":
        log.warning("%s: %s training with ZeRO stage 0; exporting the %s weights as fp32", folder, precision, precision)
    return {name: tensor.float() for name, tensor in module_weights(folder).items()}


def checkpoint_encoder(ckpt: str) -> tuple[Encoder, dict]:
    """The fp32 encoder of a run directory or checkpoint folder, with {"checkpoint", "step", "crop_seconds"}."""
    folder = checkpoint_folder(ckpt)
    with open(os.path.join(folder, "config.yaml")) as file:
        cfg = from_yaml(file.read())
    weights = fp32_weights(folder, cfg.train.precision, cfg.train.zero_stage)
    encoder = Encoder(cfg.model)
    encoder.load_state_dict({name[len("encoder."):]: t for name, t in weights.items() if name.startswith("encoder.")})
    step = read_json(os.path.join(folder, MANIFEST), "the checkpoint manifest")["step"]
    return encoder, {"checkpoint": folder, "step": step, "crop_seconds": cfg.data.crop_seconds}


def load_any(path: str) -> tuple[Encoder, dict]:
    """An fp32 encoder from a file written by `export`, a run directory or a checkpoint folder, with
    what is known of it ({"checkpoint", "step", "crop_seconds"})."""
    if os.path.isfile(path):
        payload = read_export(path)
        return encoder_from(payload), {"checkpoint": path, "step": payload.get("step"), "crop_seconds": None}
    return checkpoint_encoder(path)


def export(ckpt: str, out: str) -> dict:
    encoder, meta = checkpoint_encoder(ckpt)
    weights = {name: t.contiguous() for name, t in encoder.state_dict().items()}
    payload = {"format": FORMAT, "config": json.dumps(asdict(encoder.cfg)), "step": meta["step"], "state_dict": weights}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(payload, out + ".tmp")
    os.replace(out + ".tmp", out)
    return {"checkpoint": meta["checkpoint"], "step": meta["step"],
            "parameters": sum(t.numel() for t in weights.values()), "out": out}


def read_export(path: str) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an encoder exported by python -m pretrain.export (format {payload.get('format')!r})")
    return payload


def encoder_from(payload: dict) -> Encoder:
    encoder = Encoder(EncoderConfig.from_dict(json.loads(payload["config"])))
    encoder.load_state_dict(payload["state_dict"])
    return encoder


def load_encoder(path: str) -> Encoder:
    return encoder_from(read_export(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a run directory (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        report = export(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"exported the encoder of {report['checkpoint']} (step {report['step']}, "
          f"{report['parameters'] / 1e6:.2f}M parameters) to {report['out']}")


if __name__ == "__main__":
    main()
