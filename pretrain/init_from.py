"""`train.init_from`: the encoder's weights at step 0 from a trained encoder instead of the random init.

    train.init_from=runs/mert_95m            # a run directory, a checkpoint folder or a pretrain.export file
    train.init_from=/models/hubert-base      # a Hugging Face HubertModel folder (config.json + model.safetensors)
    train.init_from=/models/musicpt-logmel   # our remote-code Hugging Face export (a spectrogram front end)

A warm start, as MERT and MusicHuBERT runs often begin from HuBERT. Only the encoder is taken; the objective's
heads, the optimizer and the schedule start fresh. A resumed run ignores it (its checkpoint holds the weights).
Every weight of the encoder must be found with the shape the run's model.* settings give it: a missing or
misshapen tensor is an error that names it (the usual cause: other model.* settings than the source's).
A Hugging Face folder is read with the names the export writes (the inverse of pretrain/hubert_names.py's RENAMES; q_proj,
k_proj and v_proj fused into our qkv), with or without a `hubert.` prefix (HubertForCTC and friends); our
remote-code export (model_type "musicpt") keeps our names under `encoder.` and our config under "encoder".
"""
from __future__ import annotations

import json
import os

import torch

from pretrain.export import load_any
from pretrain.hubert_names import hubert_names
from pretrain.model import Encoder, EncoderConfig

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_hf_folder(folder: str) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's tensors by name, without a leading `hubert.`."""
    path = next((os.path.join(folder, name) for name in HF_WEIGHTS if os.path.exists(os.path.join(folder, name))), None)
    if path is None:
        raise FileNotFoundError(f"train.init_from={folder}: a Hugging Face folder needs {' or '.join(HF_WEIGHTS)}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    return {name.removeprefix("hubert."): tensor for name, tensor in tensors.items()}


def from_hf(folder: str, encoder: Encoder) -> dict[str, torch.Tensor]:
    """Our encoder's state_dict taken from a HubertModel folder's weights."""
    hf, state, missing = read_hf_folder(folder), {}, []
    for name in encoder.state_dict():
        names = hubert_names(name)
        if names is None:
            raise ValueError(f"{name}: no HuBERT counterpart (update RENAMES in pretrain/hubert_names.py)")
        if any(n not in hf for n in names):
            missing += [n for n in names if n not in hf]
            continue
        state[name] = torch.cat([hf[n] for n in names])  # one name: the tensor itself; q, k, v: fused back
    if missing:
        raise ValueError(f"train.init_from={folder}: no {missing[:5]}{' ...' if len(missing) > 5 else ''} among its "
                         "weights (is it a HuBERT-style model?)")
    return state


# model.* settings that change what the weights compute without changing their shapes (dim and layers do, and
# are caught by the shape check), and HubertConfig's names for them
ARCHITECTURE = {"frontend": None, "pre_ln": "do_stable_layer_norm", "conv_norm": "feat_extract_norm",
                "heads": "num_attention_heads", "conv_layers": None, "pos_conv_kernel": "num_conv_pos_embeddings",
                "pos_conv_groups": "num_conv_pos_embedding_groups"}
SPECTROGRAM = ("sample_rate", "hop", "n_fft", "n_mels", "cqt_bins", "cqt_bins_per_octave", "cqt_fmin", "stem",
               "stem_channels")


def architecture(cfg) -> dict:
    """The ARCHITECTURE settings of an encoder config; a spectrogram front end's settings too."""
    keys = list(ARCHITECTURE) + (list(SPECTROGRAM) if cfg.frontend != "waveform" else [])
    return {key: getattr(cfg, key) for key in keys}


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as file:
        return json.load(file)


def hf_architecture(folder: str) -> dict:
    config = read_config(folder)
    found = {ours: config[theirs] for ours, theirs in ARCHITECTURE.items() if theirs and theirs in config}
    if {"conv_dim", "conv_kernel", "conv_stride"} <= set(config):
        found["conv_layers"] = tuple(zip(config["conv_dim"], config["conv_kernel"], config["conv_stride"]))
    return {"frontend": "waveform", **found}


def from_remote_code_folder(folder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, our state_dict) of our remote-code export (pretrain/downstream/export_hf.py)."""
    weights = read_hf_folder(folder)
    return (architecture(EncoderConfig.from_dict(read_config(folder)["encoder"])),
            {name.removeprefix("encoder."): t for name, t in weights.items()})


def check_architecture(path: str, source: dict, cfg) -> None:
    differ = [f"model.{key}: {value!r} there, {getattr(cfg, key)!r} here" for key, value in source.items()
              if (tuple(map(tuple, value)) if key == "conv_layers" else value) != getattr(cfg, key)]
    if differ:
        raise ValueError(f"train.init_from={path} was built with other settings ({'; '.join(differ)}); set them "
                         "to the source's")


def initial_weights(path: str, encoder: Encoder) -> dict[str, torch.Tensor]:
    """The state_dict for `encoder` from `path` (see the module docstring), checked against its shapes."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from={path}: no such file or folder; pass a run directory, a checkpoint "
                                "folder, a pretrain.export file or a Hugging Face HubertModel folder")
    hf = os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
    if hf and read_config(path).get("model_type") == "musicpt":
        source, state = from_remote_code_folder(path)
        check_architecture(path, source, encoder.cfg)
    elif hf:
        check_architecture(path, hf_architecture(path), encoder.cfg)
        state = from_hf(path, encoder)
    else:
        source = load_any(path)[0]
        check_architecture(path, architecture(source.cfg), encoder.cfg)
        state = source.state_dict()
    own = encoder.state_dict()
    wrong = [f"{name} {tuple(state[name].shape)} (the run's model: {tuple(t.shape)})"
             for name, t in own.items() if name in state and state[name].shape != t.shape]
    missing = sorted(set(own) - set(state))
    if wrong or missing:
        raise ValueError(f"train.init_from={path} does not fit this run's model.* settings: "
                         f"{'; '.join(wrong[:5] + [f'{n} missing' for n in missing[:5]])}")
    return {name: state[name].to(own[name].dtype) for name in own}
