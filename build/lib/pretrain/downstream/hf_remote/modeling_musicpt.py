"""A musicpt encoder for Hugging Face transformers (remote code: `trust_remote_code=True`).

Written into an exported folder by `python -m pretrain.downstream.export_hf`, next to `musicpt_encoder.py` (a copy
of the exporting project's model file, which needs only torch; its spectrogram front ends also use torchaudio
for "logmel" or nnAudio for "cqt"). Its hidden states are the exporting project's own layers.

    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    out = model(audio_24khz_mono_float, output_hidden_states=True)
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .musicpt_encoder import Encoder, EncoderConfig


class MusicPTConfig(PretrainedConfig):
    model_type = "musicpt"

    def __init__(self, encoder: dict | None = None, **kwargs):
        self.encoder = dict(encoder or {})
        super().__init__(**kwargs)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig.from_dict(self.encoder)


class MusicPTModel(PreTrainedModel):
    """forward(input_values [B, N] 24 kHz mono float audio, attention_mask [B, N] (1: real sample) or None):
    `last_hidden_state` [B, T, D]; with output_hidden_states, `hidden_states` = (the first block's input, then
    each block's output), as HubertModel's."""

    config_class = MusicPTConfig
    base_model_prefix = "musicpt"
    main_input_name = "input_values"

    def __init__(self, config: MusicPTConfig):
        super().__init__(config)
        self.encoder = Encoder(config.encoder_config())
        self.post_init()

    def _init_weights(self, module):  # the weights come from the folder; the encoder initialises itself
        pass

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        lengths = None if attention_mask is None else attention_mask.long().sum(-1)
        out = self.encoder(input_values, lengths, all_layers=True)
        hidden = (out["embedding"], *out["layers"]) if output_hidden_states else None
        if return_dict is False:
            return (out["x"],) + ((hidden,) if hidden is not None else ())
        return BaseModelOutput(last_hidden_state=out["x"], hidden_states=hidden)
