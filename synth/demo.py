"""Deterministic demo corpus of synthetic, music-like audio (no network needed).

Every track is a short piece in one of the 24 keys: a diatonic chord
progression, a melody on the key's scale, an optional bass line on the chord
roots and optional drums, played by 2-4 synthesised instruments (plucked,
strings, organ, bass, mallet, drums). Tracks are written as real audio files
in a deterministic cycle of formats, sample rates and channel counts, next to
``labels.jsonl`` holding the key, tempo, instruments, format and split of each.

    python -m synth.demo --out DIR --minutes N [--seed 0] [--timbres fixed|random]

(The labelled probe corpus is synth/probe.py's.)

Track ``i`` depends only on ``(seed, i)``, so a longer corpus starts with the
same tracks as a shorter one, and the lossless files (wav, flac) decode to
identical samples on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from data.files import atomic_write, atomic_write_bytes
from synth.music import NYQUIST_MARGIN, PITCH_NAMES, SCALE_STEPS, SR, midi_to_hz, random_timbre, render_note

ROMAN_NUMERALS = {
    "major": ("I", "ii", "iii", "IV", "V", "vi", "vii°"),
    "minor": ("i", "ii°", "III", "iv", "v", "VI", "VII"),
}
# Chord progressions as 0-based scale degrees of diatonic triads (natural minor).
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4), (1, 4, 0, 0), (0, 2, 3, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (0, 5, 3, 4)),
}
TONAL_INSTRUMENTS = ("pluck", "strings", "organ", "mallet")
SUSTAINED_INSTRUMENTS = ("strings", "organ")
EXTRA_INSTRUMENTS = TONAL_INSTRUMENTS + ("bass", "drums")
INSTRUMENT_GAINS = {"pluck": 0.9, "strings": 0.6, "organ": 0.45, "mallet": 0.9,
                    "bass": 0.9, "drums": 0.5}
MIN_TRACK_S, MAX_TRACK_S = 15.0, 30.0
MIN_TEMPO_BPM, MAX_TEMPO_BPM = 70.0, 170.0
NOISE_STD = 1e-3
KEY_STREAM = 0x6B6579  # spawn key tag of the key-plan random stream ("key")
SPLIT_SALT = "demo-split"


@dataclass(frozen=True)
class OutputFormat:
    """One entry of the file-format cycle."""

    ext: str
    format: str
    subtype: str
    sample_rate: int
    channels: int


FORMAT_CYCLE = (
    OutputFormat("wav", "WAV", "PCM_16", 44100, 2),
    OutputFormat("flac", "FLAC", "PCM_16", 48000, 1),
    OutputFormat("ogg", "OGG", "VORBIS", 22050, 2),
    OutputFormat("wav", "WAV", "PCM_16", 22050, 1),
    OutputFormat("flac", "FLAC", "PCM_24", 44100, 2),
    OutputFormat("mp3", "MP3", "MPEG_LAYER_III", 48000, 2),
    OutputFormat("wav", "WAV", "FLOAT", 48000, 1),
)
LOSSLESS_FORMATS = ("WAV", "FLAC")


@dataclass(frozen=True)
class TrackPlan:
    """Everything about a track that goes into its label."""

    index: int
    tonic: int
    mode: str
    tempo_bpm: float
    duration_s: float
    lead: str
    instruments: tuple[str, ...]
    progression: tuple[int, ...]
    bars_per_chord: int
    fmt: OutputFormat

    @property
    def key_name(self) -> str:
        return f"{PITCH_NAMES[self.tonic]} {self.mode}"

    @property
    def num_frames(self) -> int:
        return int(round(self.duration_s * self.fmt.sample_rate))


# --------------------------------------------------------------------------
# Instrument synthesis: each returns a mono note of round(duration_s * sr) samples.


def _note_time(duration_s: float, sr: int) -> np.ndarray:
    return np.arange(int(round(duration_s * sr))) / sr


def _attack_release(num_samples: int, sr: int, attack_s: float, release_s: float) -> np.ndarray:
    """Linear attack and release ramps, shortened to fit very short notes."""
    attack = min(int(attack_s * sr), num_samples // 2)
    release = min(int(release_s * sr), num_samples - attack)
    envelope = np.ones(num_samples)
    envelope[:attack] = np.linspace(0.0, 1.0, attack, endpoint=False)
    envelope[num_samples - release:] = np.linspace(1.0, 0.0, release)
    return envelope


def _additive(freqs, amps, t, sr, decay_rates) -> np.ndarray:
    """Sum of decaying sine partials (for inharmonic partials; costs O(partials * n))."""
    audible = freqs < NYQUIST_MARGIN * sr
    partials = np.sin(2.0 * np.pi * np.outer(freqs[audible], t))
    partials *= np.exp(-np.outer(decay_rates[audible], t))
    return amps[audible] @ partials


def _harmonic_amps(freq: float, amps: np.ndarray, sr: int) -> np.ndarray:
    """Partial amplitudes (partial k = amps[k - 1]) with those above Nyquist zeroed."""
    k = np.arange(1, len(amps) + 1)
    return np.where(freq * k < NYQUIST_MARGIN * sr, amps, 0.0)


def _wavetable(freq, amps, phase_time, sr, table_size=2048) -> np.ndarray:
    """Steady harmonic tone: one period built from the partials, then looked up."""
    k = np.arange(1, len(amps) + 1)
    grid = np.arange(table_size + 1) / table_size
    table = _harmonic_amps(freq, amps, sr) @ np.sin(2.0 * np.pi * np.outer(k, grid))
    position = (freq * phase_time % 1.0) * table_size
    index = position.astype(np.int64)
    frac = position - index
    return table[index] + frac * (table[index + 1] - table[index])


def _decaying_harmonics(freq, amps, t, sr, decay_per_partial) -> np.ndarray:
    """sum_k amps[k-1] * exp(-decay_per_partial * k * t) * sin(2 pi k freq t).

    Evaluated as Im(P(z)) with z = exp((-decay + 2 pi i freq) t) by Horner's
    rule, so partial k decays k times faster than the fundamental.
    """
    cycles = (freq * t % 1.0).astype(np.float32)
    z = np.exp(-decay_per_partial * t).astype(np.float32) * np.exp(2j * np.pi * cycles)
    acc = np.zeros_like(z)
    for amp in _harmonic_amps(freq, amps, sr)[::-1]:
        acc += amp
        acc *= z
    return acc.imag.astype(np.float64)


def _plucked(freq, duration_s, sr, num_partials, rolloff, decay_per_hz):
    """Harmonic partials with a fast attack; brighter partials decay faster."""
    t = _note_time(duration_s, sr)
    k = np.arange(1, num_partials + 1)
    amps = np.sin(np.pi * k * 0.23) / k**rolloff  # pluck position colours the spectrum
    tone = _decaying_harmonics(freq, amps, t, sr, decay_per_hz * freq) * np.exp(-1.5 * t)
    return tone * _attack_release(len(t), sr, 0.003, 0.02)


def synth_pluck(freq: float, duration_s: float, sr: int) -> np.ndarray:
    return _plucked(freq, duration_s, sr, num_partials=12, rolloff=1.0, decay_per_hz=0.004)


def synth_bass(freq: float, duration_s: float, sr: int) -> np.ndarray:
    return _plucked(freq, duration_s, sr, num_partials=8, rolloff=1.3, decay_per_hz=0.012)


def synth_strings(freq: float, duration_s: float, sr: int) -> np.ndarray:
    """Bowed pad: slow attack, vibrato, sawtooth-like 1/k partial rolloff."""
    t = _note_time(duration_s, sr)
    rate_hz, depth = 5.5, 0.004
    vibrato_time = t + depth * (1.0 - np.cos(2 * np.pi * rate_hz * t)) / (2 * np.pi * rate_hz)
    tone = _wavetable(freq, 1.0 / np.arange(1, 15), vibrato_time, sr)
    attack_s = min(0.3, duration_s / 3)
    return tone * _attack_release(len(t), sr, attack_s, min(0.25, duration_s / 3))


def synth_organ(freq: float, duration_s: float, sr: int) -> np.ndarray:
    """Sustained drawbar-like tone: strong odd partials, softer even ones."""
    t = _note_time(duration_s, sr)
    k = np.arange(1, 9)
    amps = np.where(k % 2 == 1, 1.0, 0.45) / k**0.8
    tone = _wavetable(freq, amps, t, sr)
    return tone * _attack_release(len(t), sr, 0.01, 0.05)


def synth_mallet(freq: float, duration_s: float, sr: int) -> np.ndarray:
    """Struck bar: slightly stretched (inharmonic) partials, fast high decay."""
    t = _note_time(duration_s, sr)
    k = np.arange(1, 7)
    freqs = freq * k * np.sqrt(1.0 + 0.0008 * k**2)
    decays = 2.5 + 1.5 * k**2
    tone = _additive(freqs, 1.0 / k**1.5, t, sr, decays)
    return tone * _attack_release(len(t), sr, 0.001, 0.02)


INSTRUMENT_SYNTHS = {
    "pluck": synth_pluck,
    "strings": synth_strings,
    "organ": synth_organ,
    "bass": synth_bass,
    "mallet": synth_mallet,
}


def synth_kick(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sine burst whose pitch drops from ~155 Hz to ~45 Hz."""
    t = _note_time(0.35, sr)
    freq = 45.0 + 110.0 * np.exp(-t / 0.03)
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.12)
    click = rng.standard_normal(len(t)) * np.exp(-t / 0.002) * 0.3
    return body + click


def synth_snare(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Noise burst plus a short 185 Hz tone."""
    t = _note_time(0.2, sr)
    rattle = rng.standard_normal(len(t)) * np.exp(-t / 0.05) * 0.5
    tone = np.sin(2 * np.pi * 185.0 * t) * np.exp(-t / 0.03) * 0.6
    return rattle + tone


def synth_hat(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Very short high-passed noise."""
    t = _note_time(0.06, sr)
    sos = signal.butter(4, min(7000.0, 0.4 * sr), "highpass", fs=sr, output="sos")
    return signal.sosfilt(sos, rng.standard_normal(len(t))) * np.exp(-t / 0.015) * 0.4


DRUM_SYNTHS = {"kick": synth_kick, "snare": synth_snare, "hat": synth_hat}


# --------------------------------------------------------------------------
# Planning: key, tempo, duration, instruments, format of track i.


def available_format_cycle() -> tuple[OutputFormat, ...]:
    """The format cycle minus formats this libsndfile cannot write (e.g. MP3)."""
    writable = sf.available_formats()
    return tuple(fmt for fmt in FORMAT_CYCLE if fmt.format in writable)


def track_key(seed: int, index: int) -> tuple[int, str]:
    """(tonic, mode) of track ``index``: each run of 24 tracks covers all 24 keys."""
    cycle, position = divmod(index, 24)
    key_seq = np.random.SeedSequence(seed, spawn_key=(KEY_STREAM, cycle))
    key_id = int(np.random.default_rng(key_seq).permutation(24)[position])
    return key_id % 12, ("major", "minor")[key_id // 12]


def track_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (plan, audio) random generators of track ``index``."""
    plan_seq, audio_seq = np.random.SeedSequence([seed, index]).spawn(2)
    return np.random.default_rng(plan_seq), np.random.default_rng(audio_seq)


def plan_track(seed: int, index: int, formats=None) -> TrackPlan:
    """The label-level choices of track ``index`` (independent of corpus size)."""
    formats = formats or available_format_cycle()
    rng, _ = track_rngs(seed, index)
    tonic, mode = track_key(seed, index)
    lead = str(rng.choice(TONAL_INSTRUMENTS))
    extras = [name for name in EXTRA_INSTRUMENTS if name != lead]
    chosen = rng.choice(extras, size=int(rng.integers(1, 4)), replace=False)
    progressions = PROGRESSIONS[mode]
    return TrackPlan(
        index=index,
        tonic=tonic,
        mode=mode,
        tempo_bpm=round(float(rng.uniform(MIN_TEMPO_BPM, MAX_TEMPO_BPM)), 1),
        duration_s=round(float(rng.uniform(MIN_TRACK_S, MAX_TRACK_S)), 3),
        lead=lead,
        instruments=tuple(sorted([lead, *map(str, chosen)])),
        progression=progressions[int(rng.integers(len(progressions)))],
        bars_per_chord=int(rng.integers(1, 3)),
        fmt=formats[index % len(formats)],
    )


def plan_corpus(seed: int, minutes: float) -> list[TrackPlan]:
    """Tracks 0, 1, ... until their total duration reaches ``minutes`` (at least one)."""
    formats = available_format_cycle()
    plans, total_s = [], 0.0
    while not plans or total_s < minutes * 60.0:
        plans.append(plan_track(seed, len(plans), formats))
        total_s += plans[-1].duration_s
    return plans


def split_of(index: int) -> str:
    """Deterministic ~80/10/10 train/valid/test split from a hash of the index."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{index}".encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


# --------------------------------------------------------------------------
# Composition: notes are (start_s, duration_s, midi, velocity) tuples.


def degree_to_midi(plan: TrackPlan, degree: int, base_midi: int) -> int:
    """MIDI pitch of a (possibly > 7) scale degree above the tonic at/above base_midi."""
    octave, step = divmod(degree, 7)
    tonic_midi = base_midi + (plan.tonic - base_midi) % 12
    return tonic_midi + 12 * octave + SCALE_STEPS[plan.mode][step]


def chord_timeline(plan: TrackPlan) -> list[tuple[float, float, int]]:
    """(start_s, duration_s, root_degree) of each chord, looping the progression."""
    chord_s = plan.bars_per_chord * 4 * 60.0 / plan.tempo_bpm
    count = math.ceil(plan.duration_s / chord_s)
    return [(i * chord_s, chord_s, plan.progression[i % len(plan.progression)])
            for i in range(count)]


def _nearest_chord_tone(degree: int, root: int) -> int:
    chord_steps = {root % 7, (root + 2) % 7, (root + 4) % 7}
    candidates = [d for d in range(degree - 3, degree + 4) if d % 7 in chord_steps]
    return min(candidates, key=lambda d: (abs(d - degree), d))


def compose_melody(plan, chords, rng) -> list[tuple]:
    """Random walk on the scale, on an eighth-note grid, landing on chord tones."""
    step_s = 30.0 / plan.tempo_bpm
    chord_steps = int(round(chords[0][1] / step_s))
    notes, degree, step = [], 7, 0
    while step * step_s < plan.duration_s:
        length = int(rng.choice([1, 2, 2, 3, 4]))
        if rng.random() < 0.12:  # rest
            step += length
            continue
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 0, 14))
        if step % 4 == 0:
            degree = _nearest_chord_tone(degree, chords[step // chord_steps][2])
            degree = int(np.clip(degree, 0, 14))
        midi = degree_to_midi(plan, degree, base_midi=57)
        notes.append((step * step_s, length * step_s, midi, rng.uniform(0.7, 1.0)))
        step += length
    return notes


def compose_chords(plan, chords, sustained: bool, rng) -> list[tuple]:
    """Block triads (sustained instruments) or eighth-note arpeggios."""
    notes = []
    for start_s, chord_s, root in chords:
        pitches = [degree_to_midi(plan, root + k, base_midi=48) for k in (0, 2, 4)]
        if sustained:
            notes += [(start_s, chord_s, p, rng.uniform(0.6, 0.8)) for p in pitches]
            continue
        step_s = 30.0 / plan.tempo_bpm
        pattern = (0, 1, 2, 1) if rng.random() < 0.5 else (0, 2, 1, 2)
        for i in range(int(round(chord_s / step_s))):
            pitch = pitches[pattern[i % 4]]
            notes.append((start_s + i * step_s, 2 * step_s, pitch, rng.uniform(0.5, 0.7)))
    return notes


def compose_bass(plan, chords, rng) -> list[tuple]:
    """Chord roots on halves, quarters or eighths, sometimes jumping an octave."""
    beat_s = 60.0 / plan.tempo_bpm
    hit_s = beat_s * float(rng.choice([2.0, 1.0, 0.5]))
    notes = []
    for start_s, chord_s, root in chords:
        root_midi = degree_to_midi(plan, root % 7, base_midi=33)
        for i in range(int(round(chord_s / hit_s))):
            octave_up = i % 2 == 1 and rng.random() < 0.25
            midi = root_midi + (12 if octave_up else 0)
            notes.append((start_s + i * hit_s, hit_s, midi, rng.uniform(0.8, 1.0)))
    return notes


def compose_drums(plan, rng) -> list[tuple[float, str, float]]:
    """(start_s, drum, velocity): kick on 1 and 3, snare on 2 and 4, hats on a grid."""
    step_s = 30.0 / plan.tempo_bpm
    hat_every = int(rng.choice([1, 2]))
    extra_kick = int(rng.choice([3, 5, 7]))
    hits = []
    for step in range(int(plan.duration_s / step_s) + 1):
        in_bar = step % 8
        drums = ["hat"] if in_bar % hat_every == 0 else []
        if in_bar in (0, 4) or (in_bar == extra_kick and rng.random() < 0.5):
            drums.append("kick")
        if in_bar in (2, 6):
            drums.append("snare")
        hits += [(step * step_s, drum, rng.uniform(0.7, 1.0)) for drum in drums]
    return hits


# --------------------------------------------------------------------------
# Rendering and mixing.


def render_notes(notes, synth, num_samples: int, sr: int) -> np.ndarray:
    out = np.zeros(num_samples)
    for start_s, duration_s, midi, velocity in notes:
        start = int(round(start_s * sr))
        length = min(int(round(duration_s * sr)), num_samples - start)
        if length > 0:
            out[start:start + length] += velocity * synth(midi_to_hz(midi), length / sr, sr)
    return out


def render_drums(hits, num_samples: int, sr: int, rng) -> np.ndarray:
    out = np.zeros(num_samples)
    for start_s, drum, velocity in hits:
        start = int(round(start_s * sr))
        sound = DRUM_SYNTHS[drum](sr, rng)[: max(num_samples - start, 0)]
        out[start:start + len(sound)] += velocity * sound
    return out


def random_voice_synths(plan: TrackPlan, rng) -> dict:
    """{instrument: synth(freq, duration_s, sr)} playing a random timbre per instrument of this track
    (synth.music.random_timbre, drawn from the track's own audio stream, so no two tracks share one and
    none equals a probe-corpus timbre); rendered at 24 kHz and resampled to the track's rate."""
    def synth_for(voice):
        def synth(freq: float, duration_s: float, sr: int) -> np.ndarray:
            midi = 69 + 12 * math.log2(freq / 440.0)
            length = max(1, int(round(duration_s * SR)))
            note = render_note(voice, midi, duration_s * 0.85, length, rng).astype(np.float64)
            if sr != SR:
                note = signal.resample_poly(note, sr, SR)
            samples = int(round(duration_s * sr))
            return np.pad(note, (0, max(0, samples - len(note))))[:samples]
        return synth
    return {name: synth_for(random_timbre(rng)) for name in plan.instruments if name != "drums"}


def render_stems(plan: TrackPlan, rng, timbres: str = "fixed") -> dict[str, np.ndarray]:
    """One mono signal per instrument, each scaled by its mix gain. timbres="random": each instrument of the
    track plays a random timbre instead of the demo's five fixed synths."""
    sr, num_samples = plan.fmt.sample_rate, plan.num_frames
    chords = chord_timeline(plan)
    synths = dict(INSTRUMENT_SYNTHS, bass=synth_bass)
    if timbres == "random":
        synths.update(random_voice_synths(plan, rng))
    stems = {}
    for name in plan.instruments:
        if name == "drums":
            stem = render_drums(compose_drums(plan, rng), num_samples, sr, rng)
        elif name == "bass":
            stem = render_notes(compose_bass(plan, chords, rng), synths["bass"], num_samples, sr)
        else:
            notes = (compose_melody(plan, chords, rng) if name == plan.lead else
                     compose_chords(plan, chords, name in SUSTAINED_INSTRUMENTS, rng))
            stem = render_notes(notes, synths[name], num_samples, sr)
        stems[name] = INSTRUMENT_GAINS[name] * stem
    return stems


def mix(stems: dict[str, np.ndarray], channels: int, rng) -> np.ndarray:
    """Mono sum, or a constant-power stereo pan per instrument: shape (n, channels)."""
    if channels == 1:
        return sum(stems.values())[:, None]
    angles = {name: (rng.uniform(-0.7, 0.7) + 1.0) * np.pi / 4 for name in stems}
    left = sum(np.cos(angles[name]) * stem for name, stem in stems.items())
    right = sum(np.sin(angles[name]) * stem for name, stem in stems.items())
    return np.stack([left, right], axis=1)


def render_track(plan: TrackPlan, rng, timbres: str = "fixed") -> np.ndarray:
    """Final float audio of shape (frames, channels), peak in about [0.6, 0.8]."""
    audio = mix(render_stems(plan, rng, timbres), plan.fmt.channels, rng)
    sr = plan.fmt.sample_rate
    audio *= _attack_release(len(audio), sr, 0.02, 0.5)[:, None]
    audio *= rng.uniform(0.6, 0.8) / max(np.max(np.abs(audio)), 1e-9)
    audio += NOISE_STD * rng.standard_normal(audio.shape)
    return audio


# --------------------------------------------------------------------------
# Writing.


def write_track(plan: TrackPlan, audio: np.ndarray, path: Path) -> None:
    fmt = plan.fmt
    data = audio[:, 0] if fmt.channels == 1 else audio
    atomic_write(str(path), lambda tmp: sf.write(tmp, data, fmt.sample_rate, format=fmt.format, subtype=fmt.subtype))


def label_record(plan: TrackPlan, relative_path: str) -> dict:
    return {
        "file": relative_path,
        "key": plan.key_name,
        "tonic": plan.tonic,
        "mode": plan.mode,
        "tempo_bpm": plan.tempo_bpm,
        "instruments": list(plan.instruments),
        "lead": plan.lead,
        "progression": "-".join(ROMAN_NUMERALS[plan.mode][d] for d in plan.progression),
        "duration_s": round(plan.num_frames / plan.fmt.sample_rate, 6),
        "num_frames": plan.num_frames,
        "sample_rate": plan.fmt.sample_rate,
        "channels": plan.fmt.channels,
        "format": plan.fmt.format,
        "subtype": plan.fmt.subtype,
        "split": split_of(plan.index),
    }


def generate(out_dir, minutes: float, seed: int = 0, timbres: str = "fixed") -> list[dict]:
    """Write the corpus under ``out_dir`` (audio/ and labels.jsonl); return the labels."""
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    for plan in plan_corpus(seed, minutes):
        relative_path = f"audio/track_{plan.index:04d}.{plan.fmt.ext}"
        _, audio_rng = track_rngs(seed, plan.index)
        write_track(plan, render_track(plan, audio_rng, timbres), out_dir / relative_path)
        records.append(label_record(plan, relative_path))
    records.sort(key=lambda record: record["file"])
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write_bytes(str(out_dir / "labels.jsonl"), lines.encode("utf-8"))
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--minutes", type=float, help="total audio to make")
    parser.add_argument("--seed", type=int, default=0, help="non-negative corpus seed")
    parser.add_argument("--timbres", choices=("fixed", "random"), default="fixed",
                        help="training corpus: the five fixed demo synths, or a random timbre per instrument and track")
    args = parser.parse_args(argv)
    if args.minutes is None:
        parser.error("--minutes is required (python -m synth.probe makes the labelled probe corpus)")
    if not args.minutes > 0 or args.seed < 0:
        parser.error("--minutes must be > 0 and --seed >= 0")
    records = generate(args.out, args.minutes, args.seed, args.timbres)
    minutes = sum(record["duration_s"] for record in records) / 60.0
    formats = sorted({f"{r['format'].lower()}/{r['subtype']}" for r in records})
    rates = sorted({r["sample_rate"] for r in records})
    print(f"demo corpus: {len(records)} tracks, {minutes:.2f} min, formats {', '.join(formats)}, "
          f"rates {rates} Hz -> {args.out}")


if __name__ == "__main__":
    main()
