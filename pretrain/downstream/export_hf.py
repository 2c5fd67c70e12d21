"""Hugging Face export: `python -m pretrain.downstream.export_hf --ckpt MODEL_PT_OR_RUN_DIR --out FOLDER`.

An encoder with the waveform front end (model.frontend "waveform", MERT's)
loads offline, as a `HubertModel`, with
`transformers.AutoModel.from_pretrained(FOLDER)`, and its hidden states equal
ours. An encoder with a spectrogram front end ("logmel", "cqt") has no
transformers class: as MERT's own releases do, the folder then carries its
code (`modeling_musicpt.py` from hf_remote/, and `musicpt_encoder.py`, a copy
of pretrain/model.py) and loads with
`AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`; its weights keep
our names under `encoder.`. Exporting needs only torch and safetensors;
loading needs transformers.

    from transformers import AutoModel
    model = AutoModel.from_pretrained("FOLDER").eval()
    out = model(audio_24khz_mono_float, output_hidden_states=True)

The folder: config.json (HubertConfig), model.safetensors (fp32 weights),
preprocessor_config.json (Wav2Vec2FeatureExtractor: 24000 Hz, do_normalize
false, as we never normalise the waveform), README.md, and musicpt_export.json
(our config, source and step; it also marks the folder as ours, so a later
export may replace it).

How our `Encoder` maps (ours -> HubertModel):

    extractor.blocks.i.0 (bias-free conv)    -> feature_extractor.conv_layers.i.conv (conv_bias false)
    extractor.blocks.i.1 (GroupNorm/LN)      -> feature_extractor.conv_layers.i.layer_norm
        conv_norm "group" (GroupNorm on the first conv only) -> feat_extract_norm "group";
        "layer" (LayerNorm after every conv)                -> feat_extract_norm "layer"
    feature_norm, projection                 -> feature_projection.layer_norm, .projection (feat_proj_layer_norm)
    mask_embedding                           -> masked_spec_embed (kept: mask_time_prob > 0)
    positions.conv (weight norm, dim=2)      -> encoder.pos_conv_embed.conv, same parametrisation names
        (parametrizations.weight.original0 = g, original1 = v), same GELU and trim for even kernels
    norm (before the blocks if Post-LN,      -> encoder.layer_norm (do_stable_layer_norm false / true)
          after them if Pre-LN)
    blocks.i.attn.qkv (fused, rows q|k|v)    -> encoder.layers.i.attention.q_proj / k_proj / v_proj
    blocks.i.attn.out                        -> encoder.layers.i.attention.out_proj
    blocks.i.ln1, ln2                        -> encoder.layers.i.layer_norm, final_layer_norm
    blocks.i.ffn.0, ffn.3                    -> encoder.layers.i.feed_forward.intermediate_dense, output_dense

Hidden states (transformers 5.x): `hidden_states[0]` is the input of the
first block (Post-LN: after the positional conv and `encoder.layer_norm`;
Pre-LN: after the positional conv, not normalised), `hidden_states[i]` is our
`layers[i - 1]` (the output of block i), and `last_hidden_state` is our `x`.
For Pre-LN, `last_hidden_state` carries the final norm while
`hidden_states[-1]` is the last block's output before it (transformers 4.x
put the normalised one there instead).

Not mapped, and why it does not matter:
- `attention_relax`: an fp16 training trick that computes the same softmax
  without overflow; inference is unchanged (HuBERT's plain attention).
- `feature_grad_mult` scales gradients only; `keep_every` (patchout) is our
  inference option, not HuBERT's.
- The prediction heads (label projections, codebook embeddings) and the CQT
  reconstruction head belong to the training objective and are not exported.
- Dropout and layerdrop rates are copied for fine-tuning; HuBERT's
  SpecAugment settings (mask_time_prob 0.05, length 10) are HF's fine-tuning
  defaults, not our pretraining masking.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from data.audio import SAMPLE_RATE
from data.logs import setup_logging
from pretrain.export import load_any
from pretrain.hubert_names import hubert_state_dict
from pretrain.model import Encoder, EncoderConfig

FORMAT = "musicpt-hf-hubert-v1"
MARKER = "musicpt_export.json"
LAYER_NORM_EPS = 1e-5  # torch's default, used by every norm of ours

# -- reading ours

def load_source(path: str) -> tuple[Encoder, dict]:
    """Our fp32 encoder and {"checkpoint", "step", ...} from a `pretrain.export` file, a run directory
    or a checkpoint folder (`pretrain.export.load_any`), with errors that name `path`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory; pass a file written by python -m pretrain.export, "
                                "a run directory or a checkpoint folder")
    try:
        return load_any(path)
    except (FileNotFoundError, ValueError):
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, AttributeError, TypeError) as error:
        raise ValueError(f"{path}: cannot read an encoder from it ({type(error).__name__}: {error}); pass a file "
                         "written by python -m pretrain.export, a run directory or a checkpoint folder") from None


# -- converting

REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote", "modeling_musicpt.py")
ENCODER_CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model.py")


def uses_remote_code(cfg: EncoderConfig) -> bool:
    """Spectrogram front ends have no transformers class: their folder carries its own code."""
    return cfg.frontend != "waveform"


def hf_weights(encoder: Encoder) -> dict[str, torch.Tensor]:
    """The folder's tensors: HubertModel's names, or ours under `encoder.` (remote code)."""
    if uses_remote_code(encoder.cfg):
        return {f"encoder.{name}": t.detach().float().clone().contiguous() for name, t in encoder.state_dict().items()}
    return hubert_state_dict(encoder.state_dict())


def remote_config(cfg: EncoderConfig) -> dict:
    """config.json of a remote-code folder: MusicPTConfig (hf_remote/modeling_musicpt.py) holding our EncoderConfig."""
    return {"architectures": ["MusicPTModel"], "model_type": "musicpt", "encoder": asdict(cfg),
            "auto_map": {"AutoConfig": "modeling_musicpt.MusicPTConfig", "AutoModel": "modeling_musicpt.MusicPTModel"}}


def hubert_config(cfg: EncoderConfig) -> dict:
    """config.json for HubertModel (HubertConfig's fields), equivalent to our EncoderConfig."""
    return {
        "architectures": ["HubertModel"], "model_type": "hubert",
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu",
        "feat_extract_norm": cfg.conv_norm, "feat_extract_activation": "gelu",
        "conv_dim": [c for c, _, _ in cfg.conv_layers], "conv_kernel": [k for _, k, _ in cfg.conv_layers],
        "conv_stride": [s for _, _, s in cfg.conv_layers], "conv_bias": False, "feat_proj_layer_norm": True,
        "num_conv_pos_embeddings": cfg.pos_conv_kernel, "num_conv_pos_embedding_groups": cfg.pos_conv_groups,
        "conv_pos_batch_norm": False, "do_stable_layer_norm": cfg.pre_ln, "layer_norm_eps": LAYER_NORM_EPS,
        "hidden_dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "feat_proj_dropout": cfg.feature_dropout,
        "final_dropout": cfg.dropout, "layerdrop": cfg.layerdrop,
        "apply_spec_augment": True, "mask_time_prob": 0.05, "mask_time_length": 10, "mask_time_min_masks": 2,
        "mask_feature_prob": 0.0, "mask_feature_length": 10, "mask_feature_min_masks": 0,
        "initializer_range": 0.02,
    }


def preprocessor_config() -> dict:
    """Wav2Vec2FeatureExtractor settings: our input is raw 24 kHz mono float audio, never normalised."""
    return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": SAMPLE_RATE,
            "padding_value": 0.0, "padding_side": "right", "do_normalize": False, "return_attention_mask": True}


def readme(name: str, cfg: EncoderConfig, meta: dict, parameters: int) -> str:
    """README.md of the exported folder: what the model is and how to feed it."""
    remote = uses_remote_code(cfg)
    kind = (f"with its own code (a {cfg.frontend} spectrogram front end has no transformers class; "
            "`modeling_musicpt.py`, `musicpt_encoder.py`)" if remote else "as a `HubertModel`")
    load = 'AutoModel.from_pretrained("path/to/this/folder", trust_remote_code=True)' if remote else \
        'AutoModel.from_pretrained("path/to/this/folder")'
    where = (f"frame t's window is centred on the middle of samples [{cfg.stride} t, {cfg.stride} (t + 1))" if remote
             else f"frame t starts at sample {cfg.stride} t")
    step = meta.get("step")
    blocks = "Pre-LN (final LayerNorm after the blocks)" if cfg.pre_ln else "Post-LN"
    trained = f"step {step}" if step is not None else "training step unknown"
    rate = SAMPLE_RATE / cfg.stride
    return f"""# {name}

A musicpt MERT/HuBERT-style music audio encoder exported for Hugging Face
transformers {kind}: {parameters / 1e6:.2f}M parameters, {cfg.layers} blocks of width
{cfg.dim}, {blocks}; {trained}, from `{meta.get("checkpoint")}`.

- Input: **{SAMPLE_RATE} Hz mono float audio** in [-1, 1], shape [batch, samples].
  Resample other audio to {SAMPLE_RATE} Hz and mix it down to mono first.
- The waveform is **not normalised** (no zero-mean / unit-variance step): the feature
  extractor (`preprocessor_config.json`) has `do_normalize: false`; pass the audio as it is.
- Output: {rate:g} Hz frames (one per {cfg.stride} samples; {where}).

```python
import torch
from transformers import AutoModel

model = {load}.eval()
audio = torch.zeros(1, {SAMPLE_RATE} * 5)  # 5 s of {SAMPLE_RATE} Hz mono float audio
with torch.no_grad():
    out = model(audio, output_hidden_states=True)
features = out.last_hidden_state  # [1, frames, {cfg.dim}]
layers = out.hidden_states  # block input, then each block's output
```

Only the encoder is here: the pretraining prediction heads and the CQT
reconstruction head are not exported. `musicpt_export.json` holds our own
config and where the weights came from.
"""


# -- writing

def check_destination(out: str) -> None:
    """Refuse to replace anything but an empty folder or a previous export."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not is_previous_export(out):
        raise ValueError(f"{out}: folder is not empty and is not a previous export (no {MARKER} with format "
                         f"{FORMAT}); choose another --out or empty it first")


def is_previous_export(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MARKER)) as file:
            return json.load(file).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_files(folder: str, cfg: EncoderConfig, weights: dict[str, torch.Tensor], meta: dict, name: str) -> None:
    """Every file of an export into the (new, empty) `folder`."""
    parameters = sum(t.numel() for t in weights.values())
    documents = {
        "config.json": remote_config(cfg) if uses_remote_code(cfg) else hubert_config(cfg),
        "preprocessor_config.json": preprocessor_config(),
        MARKER: {"format": FORMAT, "name": name, "checkpoint": meta.get("checkpoint"), "step": meta.get("step"),
                 "encoder_config": asdict(cfg)},
    }
    for filename, document in documents.items():
        with open(os.path.join(folder, filename), "w") as file:
            json.dump(document, file, indent=2, sort_keys=True)
            file.write("\n")
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if uses_remote_code(cfg):
        shutil.copyfile(REMOTE_CODE, os.path.join(folder, "modeling_musicpt.py"))
        shutil.copyfile(ENCODER_CODE, os.path.join(folder, "musicpt_encoder.py"))
    with open(os.path.join(folder, "README.md"), "w") as file:
        file.write(readme(name, cfg, meta, parameters))


def replace_folder(staged: str, out: str) -> None:
    """Move the finished `staged` folder to `out`, replacing an empty folder or a previous export."""
    if os.path.isdir(out) and os.listdir(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "export"))
        os.rename(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)  # onto nothing, or onto an empty folder


def default_name(parameters: int) -> str:
    """musicpt-95M, musicpt-330M; musicpt-210K for the tiny preset."""
    return f"musicpt-{parameters / 1e6:.0f}M" if parameters >= 1e6 else f"musicpt-{parameters / 1e3:.0f}K"


def export_hf(ckpt: str, out: str, name: str | None = None) -> dict:
    """Write the Hugging Face folder `out` for the encoder of `ckpt`; returns what was written."""
    out = os.path.abspath(out)
    check_destination(out)
    encoder, meta = load_source(ckpt)
    weights = hf_weights(encoder)
    parameters = sum(t.numel() for t in weights.values())
    name = name or default_name(parameters)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes 0700
        write_files(staged, encoder.cfg, weights, meta, name)
        replace_folder(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {"checkpoint": meta.get("checkpoint"), "step": meta.get("step"), "parameters": parameters,
            "name": name, "out": out, "remote_code": uses_remote_code(encoder.cfg)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="a file written by python -m pretrain.export, a run directory or a checkpoint folder")
    parser.add_argument("--out", required=True, help="the folder to write (empty, new, or a previous export)")
    parser.add_argument("--name", default=None, help="the model's name in README.md (default: musicpt-<size>)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        report = export_hf(args.ckpt, args.out, args.name)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"exported {report['name']} from {report['checkpoint']} (step {report['step']}, "
          f"{report['parameters'] / 1e6:.2f}M parameters) to {report['out']}: "
          "load it with transformers.AutoModel.from_pretrained"
          f"{' (trust_remote_code=True)' if report['remote_code'] else ''}")


if __name__ == "__main__":
    main()
