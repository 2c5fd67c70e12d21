"""The encoder: frame counts, padding, attention relaxation in fp16, preset sizes, gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import Encoder, EncoderConfig, conv_frames, relaxed_attention

TINY = EncoderConfig(conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2, dim=48, layers=2, heads=4,
                     ffn_dim=96, pos_conv_kernel=16, pos_conv_groups=4, conv_norm="layer",
                     dropout=0.0, attention_dropout=0.0, layerdrop=0.0)


def test_stride_is_320_and_frame_counts_match_the_output():
    assert TINY.stride == 320 and EncoderConfig().stride == 320
    assert conv_frames(120000, EncoderConfig()) == 374  # 5 s at 24 kHz, as HF HubertModel with MERT's convs
    model = Encoder(TINY).eval()
    for samples in (400, 3200, 24000, 24321, 120000):
        out = model(torch.randn(2, samples))
        assert out["x"].shape == (2, conv_frames(samples, TINY), 48)
        assert out["features"].shape == (2, conv_frames(samples, TINY), 32)


def test_padded_items_match_running_them_alone():
    torch.manual_seed(0)
    model = Encoder(TINY).eval()
    long, short = torch.randn(24000), torch.randn(15000)
    batch = torch.stack([long, F.pad(short, (0, 9000))])
    with torch.no_grad():
        out = model(batch, lengths=torch.tensor([24000, 15000]))
        alone = model(short[None])
    frames = conv_frames(15000, TINY)
    assert out["padding"][1].sum() == out["x"].shape[1] - frames
    torch.testing.assert_close(out["x"][1, :frames], alone["x"][0], atol=1e-4, rtol=1e-4)


def test_relaxed_attention_stays_finite_where_fp16_overflows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 64) for _ in range(3))
    q, k = q * 60, k * 60  # products reach ~ 60 * 60 * 64 / 8 = 29k > fp16 range after summing
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    naive_scores = (q.half() @ k.half().transpose(-2, -1)) / 8
    assert not torch.isfinite(naive_scores).all()  # the reference's order overflows before it can relax
    relaxed = relaxed_attention(q.half(), k.half(), v.half(), alpha=32.0, attend=None).float()
    assert torch.isfinite(relaxed).all()
    torch.testing.assert_close(relaxed, exact, atol=2e-2, rtol=2e-2)


def test_relaxed_attention_equals_sdpa_in_fp32_with_padding():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 16) for _ in range(3))
    attend = (torch.arange(12)[None] < torch.tensor([12, 7])[:, None])[:, None, None, :]
    torch.testing.assert_close(relaxed_attention(q, k, v, 32.0, attend),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=attend), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, relaxed_calls", [(torch.float16, 2), (torch.bfloat16, 0), (torch.float32, 0)])
def test_relaxation_runs_only_in_fp16(monkeypatch, dtype, relaxed_calls):
    """Only fp16 can overflow the attention product; bf16 and fp32 keep the fused SDPA kernel."""
    import pretrain.model as model_module

    calls = []
    real = model_module.relaxed_attention
    monkeypatch.setattr(model_module, "relaxed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = Encoder(dataclasses.replace(TINY, attention_relax=32.0)).eval().to(dtype)
    with torch.no_grad():
        for block in model.blocks:  # each block's attention on fp16/bf16/fp32 inputs (CPU runs fp16 matmuls too)
            block.attn(torch.randn(1, 5, 48, dtype=dtype), None)
    assert len(calls) == relaxed_calls


@pytest.mark.parametrize("cfg, reference", [
    (EncoderConfig(), 94.4e6),
    (EncoderConfig(dim=1024, layers=24, heads=16, ffn_dim=4096, pre_ln=True, conv_norm="layer"), 315.4e6),
])
def test_presets_have_the_reference_sizes(cfg, reference):
    with torch.device("meta"):
        count = sum(p.numel() for p in Encoder(cfg).parameters())
    print(f"{cfg.layers}x{cfg.dim}: {count / 1e6:.1f}M parameters (reference {reference / 1e6:.1f}M)")
    assert abs(count / reference - 1) < 0.03


def test_every_parameter_gets_a_gradient_and_all_layers_come_back():
    model = Encoder(dataclasses.replace(TINY, pre_ln=True)).train()
    audio = torch.randn(2, 8000)
    mask = torch.zeros(2, conv_frames(8000, TINY), dtype=torch.bool)
    mask[:, 3:9] = True
    out = model(audio, mask=mask, all_layers=True)
    assert len(out["layers"]) == 2
    (out["x"].pow(2).mean() + out["features"].pow(2).mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_training_flops_match_the_mert_anchors():
    from pretrain.model import training_flops
    large = EncoderConfig(conv_norm="layer", dim=1024, layers=24, heads=16, ffn_dim=4096, pre_ln=True)
    assert abs(training_flops(EncoderConfig(), 120000) / 5 / 66e9 - 1) < 0.03
    assert abs(training_flops(large, 122880) / 5.12 / 171e9 - 1) < 0.03


def test_layerdrop_follows_the_given_choice():
    from pretrain.model import layerdrop_choice
    model = Encoder(dataclasses.replace(TINY, layerdrop=0.5)).train()
    audio = torch.randn(1, 3200)
    none_skipped = torch.zeros(2, dtype=torch.bool)
    torch.manual_seed(0)
    a = model(audio, skip=none_skipped)["x"]
    b = model(audio, skip=torch.tensor([True, False]))["x"]
    c = model(audio, skip=none_skipped)["x"]
    assert torch.equal(a, c) and not torch.equal(a, b)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731: one seed, the same choice on every rank
    assert torch.equal(layerdrop_choice(0.5, 12, g()), layerdrop_choice(0.5, 12, g()))
    assert not layerdrop_choice(0.0, 12).any() and 0 < layerdrop_choice(0.5, 1000).float().mean() < 1


def naive_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(d)) v, written out (no dropout): the reference the fused kernel must equal."""
    assert dropout_p == 0.0
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("relax", [0.0, 32.0])
def test_attention_outside_fp16_is_sdpa_eligible_for_a_fused_kernel_and_equals_the_written_out_softmax(
        monkeypatch, relax):
    """Whenever relaxation is off (relax 0, or any dtype but fp16) every block calls scaled_dot_product_attention,
    with the padding mask, in a layout a fused kernel takes: on CPU the flash kernel alone runs the whole encoder
    (it raises if a call would need the math fallback). On CUDA a bool padding mask sends SDPA to its fused
    memory-efficient kernel (flash takes no mask). The result equals the written-out softmax to fp32 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import pretrain.model as model_module

    torch.manual_seed(0)
    model = Encoder(dataclasses.replace(TINY, attention_relax=relax)).eval()
    audio, lengths = torch.randn(2, 24000), torch.tensor([24000, 15000])
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("attn_mask")) or real(*a, **k))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fused = model(audio, lengths)["x"]
    assert len(calls) == TINY.layers and all(mask is not None and mask.dtype == torch.bool for mask in calls)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", naive_attention)
    with torch.no_grad():
        reference = model(audio, lengths)["x"]
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
