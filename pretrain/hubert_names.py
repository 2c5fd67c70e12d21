"""Our encoder's state_dict names against transformers' HubertModel's: the Hugging Face export writes through this
map (pretrain/downstream/export_hf.py) and `train.init_from` reads a HuBERT folder back through it."""
from __future__ import annotations

import re

import torch

# One-to-one renames (regex over our state_dict names); the fused qkv is split in `hubert_names`.
RENAMES = [
    (r"extractor\.blocks\.(\d+)\.0\.weight", r"feature_extractor.conv_layers.\1.conv.weight"),
    (r"extractor\.blocks\.(\d+)\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"projection\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"mask_embedding", r"masked_spec_embed"),
    (r"positions\.conv\.(bias|parametrizations\.weight\.original[01])", r"encoder.pos_conv_embed.conv.\1"),
    (r"norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"blocks\.(\d+)\.attn\.out\.(weight|bias)", r"encoder.layers.\1.attention.out_proj.\2"),
    (r"blocks\.(\d+)\.ln1\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"blocks\.(\d+)\.ln2\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"blocks\.(\d+)\.ffn\.3\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
]
QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")


def hubert_names(name: str) -> list[str] | None:
    """HubertModel's name(s) for one of our state_dict names: three (q_proj, k_proj, v_proj) for a fused qkv
    tensor, whose output rows are q, then k, then v; None when it has no counterpart. `pretrain.init_from` reads
    a HuBERT folder back through the same map."""
    qkv = QKV.fullmatch(name)
    if qkv:
        layer, kind = qkv.groups()
        return [f"encoder.layers.{layer}.attention.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj")]
    return next(([re.sub(pattern, new, name)] for pattern, new in RENAMES if re.fullmatch(pattern, name)), None)


def hubert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's state_dict under HubertModel's names: contiguous fp32 tensors that share no memory."""
    out, unmapped = {}, []
    for name, tensor in state.items():
        targets = hubert_names(name)
        if targets is None:
            unmapped.append(name)
            continue
        for target, part in zip(targets, tensor.detach().float().chunk(len(targets), dim=0)):
            out[target] = part.clone().contiguous()
    if unmapped:
        raise ValueError(f"encoder weights with no HuBERT counterpart: {unmapped}; update RENAMES in {__file__}")
    return out
