"""Music for the synthetic corpora: note names, scales, pitch, and one parametric synthesiser whose randomness is
all in its parameters (`Voice`, `random_timbre`, `render_note`). The demo corpus (synth/demo.py) and the probe
corpus (synth/probe.py) both play their notes with it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from data.audio import SAMPLE_RATE as SR

PITCH_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SCALE_STEPS = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
NYQUIST_MARGIN = 0.45  # partials above this fraction of the sample rate are dropped
DETUNE_GAIN = 0.8  # of a voice's detuned copy


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


# --------------------------------------------------------------------------
# Voices: one parametric synthesiser, all randomness in its parameters.


@dataclass(frozen=True)
class Voice:
    partials: int = 12  # harmonic partials (unless ratios is given)
    rolloff: float = 1.0  # partial n has amplitude n ** -rolloff
    even: float = 1.0  # gain of the even partials (odd/even balance)
    stretch: float = 0.0  # inharmonicity B: harmonic k sits at k f0 sqrt(1 + B k^2)
    ratios: tuple = ()  # explicit partial frequencies / f0 (bars, drawbars)
    amps: tuple = ()  # explicit amplitudes of the ratios
    pluck: float = 0.0  # pluck / strike position: amplitudes times |sin(pi k pluck)|
    attack: float = 0.01  # s, linear
    decay: float = 0.3  # s, time constant towards sustain
    sustain: float = 1.0
    release: float = 0.1  # s after note off
    damping: float = 0.0  # extra decay rate (1/s) per Hz of partial frequency
    tilt_start: float = 0.0  # brightness: partial at ratio r times exp(-tilt(t) (r - 1)), tilt(t) going
    tilt_end: float = 0.0  # from tilt_start at the onset to tilt_end
    tilt_time: float = 0.1  # with this time constant (s)
    filter: str = "none"  # none | lowpass | highpass | peak (gain at each partial's frequency)
    cutoff: float = 4000.0  # Hz; times f0 when track
    track: bool = False
    q: float = 0.7
    peak_gain: float = 3.0
    vibrato_rate: float = 5.0
    vibrato_depth: float = 0.0  # semitones
    vibrato_delay: float = 0.0
    tremolo_rate: float = 5.0
    tremolo_depth: float = 0.0
    noise: float = 0.0  # band noise level relative to the tone's RMS
    noise_band: tuple = (1.0, 8.0)  # in multiples of f0
    noise_burst: float = 0.0  # s: noise decays with this time constant (0: follows the envelope)
    detune: float = 0.0  # cents of a second, detuned copy of every partial (0: none)


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _lu(rng, lo, hi) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def random_timbre(rng: np.random.Generator) -> Voice:
    """A generic random instrument: partials, rolloff, inharmonicity, odd/even, ADSR, filter, vibrato, noise."""
    percussive = rng.random() < 0.4
    kind = str(rng.choice(["none", "lowpass", "lowpass", "highpass", "peak"]))
    cutoff, q = {"none": (4000.0, 0.7), "lowpass": (_lu(rng, 700, 8000), _u(rng, 0.5, 4.0)),
                 "highpass": (_lu(rng, 30, 250), _u(rng, 0.5, 1.2)),
                 "peak": (_lu(rng, 300, 4000), _u(rng, 0.7, 3.0))}[kind]
    return Voice(
        partials=int(round(_lu(rng, 3, 40))), rolloff=_u(rng, 0.5, 2.2), even=_u(rng, 0.1, 1.2),
        stretch=_lu(rng, 1e-6, 4e-4) if rng.random() < 0.5 else 0.0,
        pluck=_u(rng, 0.08, 0.4) if rng.random() < 0.3 else 0.0,
        attack=_lu(rng, 0.001, 0.01) if percussive else _lu(rng, 0.005, 0.2),
        decay=_u(rng, 0.15, 1.0) if percussive else _u(rng, 0.05, 0.5),
        sustain=_u(rng, 0.0, 0.1) if percussive else _u(rng, 0.4, 1.0),
        release=_lu(rng, 0.03, 0.4), damping=_u(rng, 0, 0.003) if percussive else 0.0,
        tilt_start=_u(rng, -0.05, 0.6) if rng.random() < 0.4 else 0.0,
        tilt_time=_lu(rng, 0.03, 0.4),
        filter=kind, cutoff=cutoff, q=q, peak_gain=_u(rng, 1.5, 5.0),
        vibrato_rate=_u(rng, 4, 7), vibrato_depth=_u(rng, 0.05, 0.3) if rng.random() < 0.4 else 0.0,
        vibrato_delay=_u(rng, 0, 0.3),
        tremolo_rate=_u(rng, 3, 8), tremolo_depth=_u(rng, 0.05, 0.3) if rng.random() < 0.2 else 0.0,
        noise=_lu(rng, 0.01, 0.12) if rng.random() < 0.5 else 0.0,
        noise_band=(_u(rng, 0.5, 3), _u(rng, 4, 20)),
        noise_burst=_lu(rng, 0.003, 0.05) if rng.random() < 0.5 else 0.0,
        detune=_u(rng, 2, 12) if rng.random() < 0.25 else 0.0,
    )


# --------------------------------------------------------------------------
# Rendering.


def _filter_gain(voice: Voice, freqs: np.ndarray, f0: float) -> np.ndarray:
    if voice.filter == "none":
        return np.ones_like(freqs)
    x = freqs / (voice.cutoff * f0 if voice.track else voice.cutoff)
    if voice.filter == "peak":
        return 1.0 + (voice.peak_gain - 1.0) / (1.0 + (voice.q * (x - 1.0 / x)) ** 2)
    response = 1.0 / np.sqrt((1.0 - x**2) ** 2 + (x / voice.q) ** 2)
    return response * x**2 if voice.filter == "highpass" else response


def _partials(voice: Voice, f0: float) -> tuple[np.ndarray, np.ndarray]:
    """(frequency ratios to f0, amplitudes) of the partials, 0 for those inaudible or above 0.45 x the sample
    rate; all copies (see detune) together have unit power."""
    if voice.ratios:
        ratios, amps = np.array(voice.ratios, float), np.array(voice.amps, float)
        index = np.arange(1, len(ratios) + 1)
    else:
        index = np.arange(1, voice.partials + 1)
        ratios = index * np.sqrt(1.0 + voice.stretch * index**2)
        amps = index ** -voice.rolloff * np.where(index % 2 == 0, voice.even, 1.0)
    if voice.pluck:
        amps = amps * (0.05 + np.abs(np.sin(np.pi * index * voice.pluck)))
    amps = amps * _filter_gain(voice, ratios * f0, f0)
    top = ratios * f0 * 2.0 ** ((voice.vibrato_depth + voice.detune / 100) / 12)
    amps = np.where((top < NYQUIST_MARGIN * SR) & (amps > 1e-2 * amps.max()), amps, 0.0)
    return ratios, amps / np.sqrt(np.sum(amps**2) * (1 + DETUNE_GAIN**2 if voice.detune else 1))


def _harmonic_sum(amps, cycles, fall, rng) -> np.ndarray:
    """sum_k amps[k-1] fall^(k-1) sin(2 pi k cycles + phi_k) by Horner's rule in z = fall exp(2 pi i cycles):
    Im(exp(2 pi i cycles) sum_k c_k z^(k-1)), c_k = amps[k-1] exp(i phi_k). O(partials x samples), no sines."""
    angle = ((cycles - np.floor(cycles)) * (2 * np.pi)).astype(np.float32)
    turn = np.empty(len(cycles), np.complex64)
    turn.real, turn.imag = np.cos(angle), np.sin(angle)
    z = turn if fall is None else turn * fall
    last = int(np.nonzero(amps)[0][-1])
    coeffs = (amps[:last + 1] * np.exp(1j * rng.uniform(0, 2 * np.pi, last + 1))).astype(np.complex64)
    acc = np.full(len(cycles), coeffs[last], np.complex64)
    for coeff in coeffs[last - 1::-1]:
        acc *= z
        acc += coeff
    acc *= turn
    return acc.imag


def _partial_matrix_sum(ratios, amps, cycles, log_fall, rng) -> np.ndarray:
    """sum_k amps_k exp(log_fall (ratio_k - 1)) sin(2 pi ratio_k cycles + phi_k), one row per partial (any ratios)."""
    keep = amps > 0
    ratios, amps = ratios[keep], amps[keep]
    # 2 pi ratio_k cycles = whole_k * 2 pi frac(cycles) + (ratio_k - whole_k) * 2 pi cycles: exact enough in
    # float32, as the whole part only ever multiplies a phase below 2 pi
    whole = np.round(ratios)
    frac = ((cycles - np.floor(cycles)) * (2 * np.pi)).astype(np.float32)
    phases = np.multiply(whole[:, None].astype(np.float32), frac[None])
    offsets = (ratios - whole).astype(np.float32)
    if np.any(offsets):
        phases += offsets[:, None] * (cycles * (2 * np.pi)).astype(np.float32)[None]
    phases += rng.uniform(0, 2 * np.pi, len(ratios)).astype(np.float32)[:, None]
    tones = np.sin(phases, out=phases)
    if log_fall is not None:
        gains = np.multiply((ratios - 1.0).astype(np.float32)[:, None], log_fall[None])
        tones *= np.exp(gains, out=gains)
    return np.einsum("k,kn->n", amps.astype(np.float32), tones)


def _envelope(voice: Voice, t: np.ndarray, hold_s: float) -> np.ndarray:
    """Linear attack, exponential decay to sustain, quadratic release after hold_s (float32 like t)."""
    attack = np.float32(max(voice.attack, 1e-3))
    env = np.exp((attack - t) / np.float32(max(voice.decay, 1e-3)))
    env *= np.float32(1.0 - voice.sustain)
    env += np.float32(voice.sustain)
    onset = t < attack
    env[onset] = t[onset] / attack
    release_start = int(hold_s * SR)
    if release_start < len(t):
        fall = np.clip(1.0 - (t[release_start:] - np.float32(hold_s)) / np.float32(max(voice.release, 0.005)), 0, 1)
        env[release_start:] *= fall * fall
    return env


def _bandpass(noise: np.ndarray, low: float, high: float) -> np.ndarray:
    """White noise through a biquad band-pass (RBJ cookbook, 0 dB peak) centred between low and high."""
    centre = np.sqrt(low * high)
    w0 = 2 * np.pi * centre / SR
    alpha = np.sin(w0) / (2 * centre / (high - low))
    b = np.array([alpha, 0.0, -alpha])
    a = np.array([1 + alpha, -2 * np.cos(w0), 1 - alpha])
    return signal.lfilter(b / a[0], a / a[0], noise)


def render_note(voice: Voice, midi: float, hold_s: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """One note of `length` samples: held for hold_s, then released (and cut at length); float32."""
    f0 = midi_to_hz(midi)
    t = np.arange(length, dtype=np.float64) / SR
    t32 = t.astype(np.float32)
    cycles = f0 * t  # of the fundamental, float64
    if voice.vibrato_depth:  # a phase wobble of +-depth semitones of frequency, faded in after the delay
        rate = np.float32(voice.vibrato_rate)
        swing = np.float32(f0 * (2.0 ** (voice.vibrato_depth / 12) - 1.0) / (2 * np.pi * voice.vibrato_rate))
        ramp = np.clip((t32 - np.float32(voice.vibrato_delay)) / np.float32(0.3), 0.0, 1.0)
        cycles = cycles + swing * ramp * ramp * (1.0 - np.cos(np.float32(2 * np.pi) * rate * t32))
    ratios, amps = _partials(voice, f0)
    # partial r loses damping * f0 * r per second and tilt(t) * (r - 1) nepers: log_fall * (r - 1), and the
    # fundamental's own damping
    log_fall, level = None, None
    if voice.damping or voice.tilt_start or voice.tilt_end:
        tilt = np.float32(voice.tilt_end) + np.float32(voice.tilt_start - voice.tilt_end) * np.exp(
            -t32 / np.float32(voice.tilt_time))
        damping = np.float32(voice.damping * f0) * t32
        log_fall, level = np.maximum(-(damping + tilt), np.float32(-30.0)), np.exp(-damping)
    harmonic = not voice.ratios and not voice.stretch
    copies = [(1.0, 1.0)] + ([(2.0 ** (voice.detune / 1200), DETUNE_GAIN)] if voice.detune else [])
    tone = np.zeros(length, np.float32)
    fall = None if log_fall is None or not harmonic else np.exp(log_fall)
    for ratio, gain in copies:
        if harmonic:
            part = _harmonic_sum(amps, cycles * ratio, fall, rng)
        else:
            part = _partial_matrix_sum(ratios * ratio, amps, cycles, log_fall, rng)
        tone += np.float32(gain) * part
    if level is not None:
        tone *= level
    if voice.tremolo_depth:
        tone *= 1.0 - np.float32(voice.tremolo_depth / 2) * (1 + np.sin(np.float32(2 * np.pi * voice.tremolo_rate)
                                                                           * t32))
    env = _envelope(voice, t32, hold_s)
    low, high = voice.noise_band[0] * f0, min(voice.noise_band[1] * f0, NYQUIST_MARGIN * SR)
    if not voice.noise or high < 1.2 * low:
        return tone * env
    noise = _bandpass(rng.standard_normal(length), low, high).astype(np.float32)
    noise *= np.float32(voice.noise * np.sqrt(np.mean(tone**2) / max(np.mean(noise**2), 1e-12)))
    if voice.noise_burst:  # a strike or pluck transient, apart from the envelope
        return tone * env + noise * np.exp(-t32 / np.float32(voice.noise_burst)) * np.minimum(t32 / 0.001, 1.0)
    return (tone + noise) * env  # breath or bow noise, following the envelope
