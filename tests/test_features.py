"""Teacher features: frame count and centring, dims, chroma pitch classes, batching, numerics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.features import KINDS, FeatureConfig, FeatureExtractor, num_frames, pad_for_frames

SR, HOP, N_FFT = 24000, 320, 2048


def extractor(kind: str = "logmel_chroma", **kw) -> FeatureExtractor:
    return FeatureExtractor(FeatureConfig(kind=kind, **kw))


def tones(freqs, seconds: float = 0.5, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    return sum(amp * torch.sin(2 * torch.pi * f * t) for f in freqs).float()


def interior(frames: int) -> slice:
    """Frames whose whole n_fft window lies inside the signal (no padding involved)."""
    first = -(-(N_FFT // 2 - HOP // 2) // HOP)
    last = (frames * HOP - N_FFT // 2 - HOP // 2) // HOP
    return slice(first, last + 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 319, 320, 321, 639, 640, 1000, 2047, 2048, 2049, 7 * 320 + 17])
def test_frame_count_is_samples_floor_hop(kind, n):
    fe = extractor(kind)
    torch.manual_seed(n)
    out = fe(torch.randn(2, n) * 0.1)
    assert num_frames(n) == n // HOP
    assert out.shape == (2, n // HOP, fe.cfg.dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert fe(torch.randn(n) * 0.1).shape == (n // HOP, fe.cfg.dim)


def test_power_frame_i_is_window_centred_on_320i_plus_160():
    """Interior frames equal a numpy rfft of the Hann window centred on sample 320 i + 160."""
    torch.manual_seed(0)
    x = torch.randn(12 * HOP + 77)
    power = extractor().power_spectrogram(x[None])[0].T.double().numpy()  # [T, n_freqs]
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, like torch.hann_window
    sig = x.double().numpy()
    for i in range(interior(12).start, interior(12).stop):
        start = HOP * i + HOP // 2 - N_FFT // 2
        ref = np.abs(np.fft.rfft(window * sig[start:start + N_FFT])) ** 2
        np.testing.assert_allclose(power[i], ref, rtol=1e-3, atol=1e-3 * ref.max())
    # Edge frame 0: the left edge is reflect-padded by (n_fft - hop) // 2 samples.
    left = (N_FFT - HOP) // 2
    padded = np.pad(sig, (left, 0), mode="reflect")
    ref0 = np.abs(np.fft.rfft(window * padded[:N_FFT])) ** 2
    np.testing.assert_allclose(power[0], ref0, rtol=1e-3, atol=1e-3 * ref0.max())


@pytest.mark.parametrize("frame", [0, 1, 5, 9])
def test_noise_burst_in_frame_i_peaks_at_frame_i(frame):
    total = 10 * HOP + 123  # 10 frames, trailing partial hop dropped
    x = torch.zeros(total)
    gen = torch.Generator().manual_seed(frame)
    x[HOP * frame:HOP * (frame + 1)] = torch.rand(HOP, generator=gen) * 2 - 1
    logmel = extractor("logmel")(x)
    assert logmel.shape[0] == 10
    assert logmel.exp().sum(-1).argmax().item() == frame
    c0 = extractor("mfcc")(x)[:, 0]  # c0 ~ mean log-mel energy
    assert c0.argmax().item() == frame


def test_short_input_pads_reflect_then_zeros():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert pad_for_frames(x, 5, 2).tolist() == [[0, 0, 4, 3, 2, 1, 2, 3, 4, 3, 2]]
    assert pad_for_frames(x, 2, 6).tolist() == [[3, 2, 1, 2, 3, 4, 3, 2, 1, 0, 0, 0]]


@pytest.mark.parametrize(
    "kw, dim",
    [
        ({"kind": "mfcc"}, 39),
        ({"kind": "mfcc", "n_mfcc": 20}, 60),
        ({"kind": "mfcc", "n_mfcc": 20, "deltas": False}, 20),
        ({"kind": "logmel"}, 229),
        ({"kind": "chroma"}, 12),
        ({"kind": "logmel_chroma"}, 241),
        ({"kind": "logmel_chroma", "n_mels": 128}, 140),
    ],
)
def test_dims(kw, dim):
    fe = FeatureExtractor(FeatureConfig(**kw))
    assert fe.cfg.dim == dim
    assert fe(tones([440.0], 0.1)).shape == (7, dim)


def test_mfcc_deltas_are_time_derivatives_of_the_base_coefficients():
    x = tones([220.0, 1000.0], 0.5) * torch.linspace(0, 1, SR // 2)  # rising loudness
    plain = extractor("mfcc", deltas=False)(x)
    full = extractor("mfcc")(x)
    torch.testing.assert_close(full[:, :13], plain)
    mid = slice(5, -5)
    assert (full[mid, 13] > 0).all()  # c0 rises with loudness -> positive delta
    assert full[mid, 26].abs().mean() < full[mid, 13].abs().mean()


def test_a440_chroma_is_pitch_class_9_in_every_frame():
    chroma = extractor("chroma")(tones([440.0]))
    assert (chroma.argmax(-1) == 9).all()
    assert torch.allclose(chroma.amax(-1), torch.ones(chroma.shape[0]))


@pytest.mark.parametrize("octave_freqs", [(261.63, 329.63, 392.00), (523.25, 659.26, 783.99)])
def test_c_major_triad_top3_pitch_classes(octave_freqs):
    chroma = extractor("chroma")(tones(octave_freqs))
    inner = chroma[interior(chroma.shape[0])]
    assert inner.shape[0] > 20
    for frame in inner:
        assert set(frame.topk(3).indices.tolist()) == {0, 4, 7}
    assert set(chroma.mean(0).topk(3).indices.tolist()) == {0, 4, 7}


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_each_item_alone(kind):
    fe = extractor(kind)
    torch.manual_seed(1)
    a = tones([330.0, 1200.0], 0.3)
    b = torch.randn(a.shape[0]) * 0.2
    batch = fe(torch.stack([a, b]))
    assert not torch.allclose(batch[0], batch[1])
    torch.testing.assert_close(batch[0], fe(a[None])[0])
    torch.testing.assert_close(batch[1], fe(b))


def test_deterministic_and_float64_is_cast_to_float32():
    fe = extractor("logmel_chroma")
    torch.manual_seed(2)
    x = torch.randn(3, 4000, dtype=torch.float64) * 0.3
    out = fe(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, fe(x))
    torch.testing.assert_close(out, fe(x.float()))


@pytest.mark.parametrize("kind", KINDS)
def test_silence_and_full_scale_square_are_finite(kind):
    fe = extractor(kind)
    silence = fe(torch.zeros(2, 5000))
    assert torch.isfinite(silence).all()
    if kind == "chroma":
        assert (silence == 0).all()
        whisper = fe(torch.randn(1, 5000, generator=torch.Generator().manual_seed(3)) * 1e-7)
        assert (whisper == 0).all()  # below the log_offset floor: treated as silence, not blown up to max 1
    if kind == "logmel":
        assert torch.allclose(silence, torch.full_like(silence, float(np.log(fe.cfg.log_offset))))
    square = torch.sign(tones([110.0], 0.3, amp=1.0))
    loud = fe(square)
    assert torch.isfinite(loud).all()
    if kind in ("chroma", "logmel_chroma"):
        assert (loud[:, -12:].amax(-1) == 1).all()


def test_unknown_kind_raises_naming_valid_kinds():
    with pytest.raises(ValueError) as err:
        FeatureConfig(kind="cqt")
    for kind in KINDS:
        assert kind in str(err.value)
