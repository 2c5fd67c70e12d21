"""The MERT/HuBERT encoder: front end -> projection -> conv positions -> transformer.

Front ends (`frontend`), each giving 75 Hz frames from 24 kHz audio:
- "waveform" (MERT, HuBERT): 7 strided convolutions (total stride 320);
  frame t of the conv output starts at sample 320 t, so it lines up with
  label frame t (the last partial frames are dropped by the convs).
- "logmel" (as MusicFM and MuQ) or "cqt": a log spectrogram computed in the
  forward pass (fp32, on the input's device; `Spectrogram`), standardised
  per clip, then a small 2-D conv stem over frequency and time
  (`SpectrogramStem`). Frame t's window is centred on sample 320 t + 160,
  the middle of label frame t; N samples give N // 320 frames.
Blocks are Pre-LN (MERT-330M) or Post-LN (MERT-95M, HuBERT base).
Attention uses `scaled_dot_product_attention` (a fused kernel) unless
`attention_relax > 0` and the input is fp16: then it takes an explicit path
that cannot overflow (see `relaxed_attention`). `Encoder(cfg,
checkpoint_activations=True)` recomputes each block in the backward pass
(torch.utils.checkpoint, RNG preserved: the same dropout, losses and grads).

This module knows nothing of training, data, files or launchers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


FRONTENDS = ("waveform", "logmel", "cqt")


@dataclass(frozen=True)
class EncoderConfig:
    frontend: str = "waveform"  # "waveform": the conv extractor below; "logmel" | "cqt": a spectrogram and a conv stem
    conv_layers: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    conv_norm: str = "group"  # "group": GroupNorm on the first conv only (HuBERT base); "layer": LayerNorm after each
    dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    pre_ln: bool = False
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feature_dropout: float = 0.0  # on the projected conv features
    layerdrop: float = 0.05
    feature_grad_mult: float = 0.1  # scales the conv extractor's gradient (1.0: plain)
    attention_relax: float = 0.0  # alpha > 0: the overflow-proof explicit attention (fp16)
    # Spectrogram front ends (frontend "logmel" or "cqt"); the waveform front end ignores these.
    sample_rate: int = 24000
    hop: int = 320  # samples per frame: 75 Hz at 24 kHz, the label rate
    n_fft: int = 2048  # logmel: Hann window of 85 ms, centred on its frame
    n_mels: int = 128  # logmel: Slaney mel bands from 0 Hz to sample_rate / 2 (MusicFM: 128)
    cqt_bins: int = 168  # cqt: magnitude CQT (nnAudio), 7 octaves ...
    cqt_bins_per_octave: int = 24  # ... of 24 bins (quarter tones) ...
    cqt_fmin: float = 32.7  # ... from C1
    stem: str = "conv2d"  # "conv2d": two 3x3 convs over frequency and time, each halving frequency (MusicFM's stem
    #                      at our frame rate); "conv1d": two convs of 3 frames over all bins (Whisper's, stride 1)
    stem_channels: int = 32  # channels of the stem's convs

    @classmethod
    def from_dict(cls, settings: dict) -> "EncoderConfig":
        """The config saved as a plain dict (dataclasses.asdict, through JSON: conv_layers as lists)."""
        settings = dict(settings)
        if "conv_layers" in settings:
            settings["conv_layers"] = tuple(tuple(layer) for layer in settings["conv_layers"])
        return cls(**settings)

    @property
    def stride(self) -> int:
        """Samples per output frame."""
        return math.prod(s for _, _, s in self.conv_layers) if self.frontend == "waveform" else self.hop

    @property
    def spectrogram_bins(self) -> int:
        return self.n_mels if self.frontend == "logmel" else self.cqt_bins

    @property
    def feature_dim(self) -> int:
        """Channels of the front end's output frames (the conv features, or the stem's flattened maps)."""
        if self.frontend == "waveform":
            return self.conv_layers[-1][0]
        return self.stem_channels * (stem_bins(self.spectrogram_bins) if self.stem == "conv2d" else 1)


def stem_bins(bins: int) -> int:
    """Frequency rows left after the stem's two stride-2 convs (kernel 3, padding 1)."""
    for _ in range(2):
        bins = (bins - 1) // 2 + 1
    return bins


def conv_frames(num_samples: torch.Tensor | int, cfg: EncoderConfig):
    """Frames the front end makes from `num_samples` samples (works on ints and tensors)."""
    if cfg.frontend != "waveform":
        return num_samples // cfg.hop
    for _, kernel, stride in cfg.conv_layers:
        num_samples = (num_samples - kernel) // stride + 1
    return num_samples


def training_flops(cfg: EncoderConfig, num_samples: int) -> float:
    """Forward + backward FLOPs (3 x 2 x multiply-adds) of one clip of `num_samples`: conv extractor,
    projection, positional conv, transformer matmuls and attention; norms and heads left out.
    MERT-95M: ~66 GF per audio-second at 5 s crops, MERT-330M ~171 GF."""
    macs, samples, channels = 0, num_samples, 1
    if cfg.frontend == "waveform":
        for out, kernel, stride in cfg.conv_layers:
            samples = (samples - kernel) // stride + 1
            macs += out * channels * kernel * samples
            channels = out
    else:  # the stem's two convs (the spectrogram itself is not trained)
        samples, rows, c = num_samples // cfg.hop, cfg.spectrogram_bins, cfg.stem_channels
        half = (rows - 1) // 2 + 1
        macs += samples * (9 * (c * half + c * c * stem_bins(rows)) if cfg.stem == "conv2d" else 3 * c * (rows + c))
        channels = cfg.feature_dim
    frames, dim = samples, cfg.dim
    macs += frames * channels * dim + frames * dim * dim // cfg.pos_conv_groups * cfg.pos_conv_kernel
    macs += cfg.layers * frames * (4 * dim * dim + 2 * dim * cfg.ffn_dim + 2 * frames * dim)
    return 6.0 * macs


class ConvExtractor(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        blocks, channels = [], 1
        for i, (out, kernel, stride) in enumerate(cfg.conv_layers):
            norm = (nn.GroupNorm(out, out) if cfg.conv_norm == "group" and i == 0 else
                    _ChannelLayerNorm(out) if cfg.conv_norm == "layer" else nn.Identity())
            blocks.append(nn.Sequential(nn.Conv1d(channels, out, kernel, stride, bias=False), norm, nn.GELU()))
            channels = out
        if cfg.conv_norm not in ("group", "layer"):
            raise ValueError(f"EncoderConfig.conv_norm={cfg.conv_norm!r}: use 'group' or 'layer'")
        self.blocks = nn.Sequential(*blocks)
        for block in self.blocks:
            nn.init.kaiming_normal_(block[0].weight)  # fairseq's init: keeps the output scale through the stack

    def forward(self, audio: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, C, T]
        return self.blocks(audio[:, None])


class Spectrogram(nn.Module):
    """[B, N] audio -> log spectrogram [B, bins, N // hop] in fp32, standardised per clip (mean 0, std 1 over its
    bins and real frames; padded frames 0). "logmel": log(power mel + 1e-6) of a Hann-windowed STFT; "cqt":
    log(magnitude CQT + 1e-6) (nnAudio's CQT2010v2). Frame t is centred on sample hop t + hop / 2.
    Its filters are fixed (no parameters, no state_dict entries) and made in fp32 whatever the model's precision."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self._fixed = {}  # device -> transform pieces, kept off the module tree: precision casts leave them alone

    def fixed(self, device: torch.device):
        if device not in self._fixed:
            c = self.cfg
            if c.frontend == "logmel":
                import torchaudio.functional as AF

                mel = AF.melscale_fbanks(c.n_fft // 2 + 1, 0.0, c.sample_rate / 2, c.n_mels, c.sample_rate,
                                         norm="slaney", mel_scale="slaney")
                self._fixed[device] = (torch.hann_window(c.n_fft, device=device), mel.T.contiguous().to(device))
            else:
                from nnAudio.features import CQT2010v2

                self._fixed[device] = CQT2010v2(sr=c.sample_rate, hop_length=c.hop, fmin=c.cqt_fmin, n_bins=c.cqt_bins,
                                                bins_per_octave=c.cqt_bins_per_octave, output_format="Magnitude", pad_mode="constant",
                                                verbose=False).to(device)
        return self._fixed[device]

    @torch.compiler.disable  # nnAudio pads in a try/except Dynamo cannot trace; fixed transforms, nothing to fuse
    def forward(self, audio: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """`frames` [B]: each clip's real frames (None: all)."""
        return standardise(self.log_power(audio), frames)

    def log_power(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, N] -> log(power mel + 1e-6) or log(magnitude CQT + 1e-6) [B, bins, N // hop], fp32 and unnormalised."""
        c, count = self.cfg, audio.shape[1] // self.cfg.hop
        with torch.autocast(audio.device.type, enabled=False):  # fp32 whatever the step's autocast
            audio = audio.float()
            if c.frontend == "logmel":
                window, mel = self.fixed(audio.device)
                left = (c.n_fft - c.hop) // 2  # frame t's window starts at hop t + hop / 2 - n_fft / 2
                spec = torch.stft(F.pad(audio, (left, c.n_fft - left)), c.n_fft, c.hop, window=window, center=False,
                                  return_complex=True)
                power = mel @ spec[..., :count].abs().square()
            else:  # nnAudio centres frame j on sample hop j: drop half a hop in front
                power = self.fixed(audio.device)(F.pad(audio, (0, c.hop // 2))[:, c.hop // 2:])[..., :count]
            return torch.log(power + 1e-6)


def standardise(x: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """x [B, C, T]: mean 0 and std 1 over each clip's C x (first `frames`) values; the frames after them become 0."""
    real = torch.ones_like(x[:, :1]) if frames is None else (
        torch.arange(x.shape[-1], device=x.device)[None, None] < frames.to(x.device)[:, None, None]).to(x.dtype)
    count = (real.sum((1, 2), keepdim=True) * x.shape[1]).clamp(min=1)
    mean = (x * real).sum((1, 2), keepdim=True) / count
    var = ((x - mean).square() * real).sum((1, 2), keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + 1e-5) * real


class SpectrogramStem(nn.Module):
    """[B, bins, T] -> [B, feature_dim, T], GELU after each conv, time stride 1 (75 Hz kept). "conv2d": two 3x3
    convs over frequency and time, each halving frequency (a conv subsampling stem as MusicFM's), channels x rows
    flattened per frame; "conv1d": two convs over 3 frames of all bins (as Whisper's)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c, self.two_d = cfg.stem_channels, cfg.stem == "conv2d"
        if self.two_d:
            self.convs = nn.Sequential(nn.Conv2d(1, c, 3, stride=(2, 1), padding=1), nn.GELU(),
                                       nn.Conv2d(c, c, 3, stride=(2, 1), padding=1), nn.GELU())
        else:
            self.convs = nn.Sequential(nn.Conv1d(cfg.spectrogram_bins, c, 3, padding=1), nn.GELU(),
                                       nn.Conv1d(c, c, 3, padding=1), nn.GELU())

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        spec = spec.to(self.convs[0].weight.dtype)
        if not self.two_d:
            return self.convs(spec)
        return self.convs(spec[:, None]).flatten(1, 2)  # [B, c, rows, T] -> [B, c x rows, T]


class _ChannelLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]: normalise over C
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvPositions(nn.Module):
    """Relative positions from a wide grouped convolution (weight-normalised), added to its input."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        conv = nn.Conv1d(cfg.dim, cfg.dim, cfg.pos_conv_kernel, padding=cfg.pos_conv_kernel // 2, groups=cfg.pos_conv_groups)
        nn.init.normal_(conv.weight, mean=0, std=math.sqrt(4 / (cfg.pos_conv_kernel * cfg.dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if cfg.pos_conv_kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        y = self.conv(x.transpose(1, 2))
        y = y[..., : y.shape[-1] - self.trim]
        return x + F.gelu(y).transpose(1, 2)


def relaxed_attention(q, k, v, alpha: float, attend: torch.Tensor | None, dropout: float = 0.0):
    """Softmax(q k^T / sqrt(d)) v without fp16 overflow: the product is formed from q / alpha (so it stays
    small), its row maximum is subtracted, and only then, in fp32, is it multiplied back by alpha.
    `attend` is a bool mask broadcastable to [B, H, T, T] (True: may attend)."""
    scores = (q / (alpha * math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if attend is not None:
        scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = torch.softmax(scores.float() * alpha, dim=-1)
    weights = F.dropout(weights, dropout, training=dropout > 0)
    return weights.to(v.dtype) @ v


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"EncoderConfig: dim {cfg.dim} is not a multiple of heads {cfg.heads}")
        self.heads, self.relax, self.dropout = cfg.heads, cfg.attention_relax, cfg.attention_dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if self.relax > 0 and q.dtype == torch.float16:  # only fp16 can overflow; bf16/fp32 keep the fused kernel
            y = relaxed_attention(q, k, v, self.relax, attend, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attn, self.ln1, self.ln2 = SelfAttention(cfg), nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Dropout(cfg.activation_dropout),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's output, its feed-forward output before dropout and the residual: data2vec's target)."""
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), attend))
            ffn = self.ffn(self.ln2(x))
            return x + self.drop(ffn), ffn
        x = self.ln1(x + self.drop(self.attn(x, attend)))
        ffn = self.ffn(x)
        return self.ln2(x + self.drop(ffn)), ffn


def layerdrop_choice(rate: float, layers: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[layers] bool, True: skip that block this step. A CPU tensor: deciding costs no device sync."""
    if rate <= 0:
        return torch.zeros(layers, dtype=torch.bool)
    return torch.rand(layers, generator=generator) < rate


def bert_init(module: nn.Module) -> None:
    """fairseq's init_bert_params for the transformer blocks: linear weights N(0, 0.02), biases zero."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        nn.init.zeros_(module.bias)


def real_frames(frames: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: the frames of an encoder output [B, T, ...] that are real audio, from its "padding" (None: all)."""
    return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device) if padding is None else ~padding


class Encoder(nn.Module):
    """forward(audio [B, N], lengths [B] | None, mask [B, T] | None) -> dict (see `forward`).
    `checkpoint_activations`: in training with gradients on, each block's activations are recomputed in the
    backward pass instead of kept (less memory, about one more forward of the blocks); how a step is computed,
    not what it computes, so it is no part of EncoderConfig."""

    def __init__(self, cfg: EncoderConfig, checkpoint_activations: bool = False):
        super().__init__()
        self.cfg, self.checkpoint_activations = cfg, checkpoint_activations
        if cfg.frontend not in FRONTENDS:
            raise ValueError(f"EncoderConfig.frontend={cfg.frontend!r}: use one of {FRONTENDS}")
        self.spectrogram = None if cfg.frontend == "waveform" else Spectrogram(cfg)
        self.extractor = ConvExtractor(cfg) if self.spectrogram is None else SpectrogramStem(cfg)
        self.feature_norm = nn.LayerNorm(cfg.feature_dim)
        self.projection = nn.Linear(cfg.feature_dim, cfg.dim)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.positions = ConvPositions(cfg)
        self.norm = nn.LayerNorm(cfg.dim)  # before the blocks (Post-LN) or after them (Pre-LN)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.blocks.apply(bert_init)
        self.feature_dropout, self.dropout = nn.Dropout(cfg.feature_dropout), nn.Dropout(cfg.dropout)

    def frames(self, num_samples):
        return conv_frames(num_samples, self.cfg)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                all_layers: bool = False, skip: torch.Tensor | None = None, keep_every: int = 1) -> dict:
        """Returns {"x": [B, T, D], "features": conv features [B, T, C] before
        their layer norm (for the feature penalty, as in HuBERT), "projected": the projected features [B, T, D]
        before dropout and masking (what an EMA teacher's blocks see: `contextualise`),
        "padding": [B, T] bool (True: padding) or None, "embedding": the first block's input [B, T, D],
        "layers": [x after each block] if all_layers,
        "ffn": [each block's feed-forward output] if all_layers}.
        `skip` ([layers] bool, training only) chooses the layers that layerdrop skips; data-parallel
        training must pass the same choice on every rank (see `layerdrop_choice`), otherwise it is drawn here.
        `keep_every` = T > 1 (inference) keeps 1 of every T frames after the conv extractor (MAEST-style patchout):
        the transformer sees T times fewer frames; "padding" and the outputs are at the reduced rate."""
        frames = None if lengths is None else self.frames(lengths)
        features = self.front_end(audio, frames).transpose(1, 2)
        mult = self.cfg.feature_grad_mult
        if mult != 1.0 and self.training:
            features = features * mult + features.detach() * (1 - mult)
        projected = self.projection(self.feature_norm(features))
        x = self.feature_dropout(projected)
        padding = None
        if lengths is not None:
            padding = torch.arange(x.shape[1], device=x.device)[None] >= frames[:, None]
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        if keep_every > 1:
            x = x[:, ::keep_every]
            padding = None if padding is None else padding[:, ::keep_every]
        out = self.contextualise(x, padding, all_layers, skip)
        return {**out, "features": features, "projected": projected, "padding": padding}

    def hidden_states(self, audio: torch.Tensor, lengths: torch.Tensor, keep_every: int = 1,
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What a frozen encoder offers downstream: [the first block's input ("embedding"), block 1's output, ...,
        the last block's output (after the final norm in Pre-LN)], each [B, T, D], and each clip's real frames [B]."""
        out = self.forward(audio, lengths, all_layers=True, keep_every=keep_every)
        return [out["embedding"]] + out["layers"][:-1] + [out["x"]], (~out["padding"]).sum(1)

    def front_end(self, audio: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """[B, N] audio -> the front end's frames [B, feature_dim, T] (the conv features, or the stem's maps);
        `frames` [B]: each clip's real frames (None: all)."""
        if self.spectrogram is None:
            return self.extractor(audio.to(self.projection.weight.dtype))
        return self.extractor(self.spectrogram(audio, frames))

    def contextualise(self, x: torch.Tensor, padding: torch.Tensor | None, all_layers: bool = False,
                      skip: torch.Tensor | None = None) -> dict:
        """The positional conv and the blocks on projected (and masked) frames x [B, T, D]: {"x", "layers", "ffn",
        "embedding"}."""
        if padding is not None:
            x = x.masked_fill(padding[..., None], 0.0)
        x = self.positions(x)
        if not self.cfg.pre_ln:
            x = self.norm(x)
        x = self.dropout(x)
        embedding = x  # the first block's input
        attend = None if padding is None else ~padding[:, None, None, :]
        layers, ffns = [], []
        if skip is None:
            skip = layerdrop_choice(self.cfg.layerdrop, self.cfg.layers)
        for block, skipped in zip(self.blocks, skip.tolist()):
            ffn = None
            if not (self.training and skipped):
                x, ffn = self.run_block(block, x, attend)
            if all_layers:
                layers.append(x)
                ffns.append(ffn)
        if self.cfg.pre_ln:
            x = self.norm(x)
        return {"x": x, "layers": layers, "ffn": ffns, "embedding": embedding}

    def run_block(self, block: Block, x: torch.Tensor, attend: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing stashes the CPU and CUDA RNG states and restores them for the
            # recomputation: dropout draws the same bits twice, so the gradients are those of the plain run.
            return torch.utils.checkpoint.checkpoint(block, x, attend, use_reentrant=False, preserve_rng_state=True)
        return block(x, attend)
