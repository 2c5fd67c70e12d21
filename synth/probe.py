"""Labelled probe corpus: pitch, instrument family and key clips whose test timbres are never heard in train.

    python -m synth.probe --out DIR [--seed 0] [--scale 1.0] [--workers N]

Three tasks, each a folder ``DIR/TASK`` with ``audio/TASK_NNNN.wav`` (24 kHz
mono 16-bit) and ``labels.jsonl`` (``file`` as ``pretrain.downstream.extract --input
DIR/TASK`` names the clip, the label, ``split``, the ``timbre`` ids):

* ``pitch``: the predominant note of a 1 s clip, MIDI 36-96 (61 classes),
  each played by a randomly generated timbre (``random_timbre``); a timbre
  plays ~8 pitches across the range and belongs to one split only. Under it,
  6-15 dB quieter, one or two other notes of another random timbre.
* ``instrument``: ~3 s melodic phrases by 10 families (``FAMILIES``), each a
  synthesis recipe with its own parameter ranges and register; every clip is
  played by its own random member of the family, over a chord 8-16 dB
  quieter played by a random timbre.
* ``key``: ~4 s chord progressions (block or arpeggiated, bass, optional
  melody) in the 24 keys, played by random timbres of their clip only.

Every clip is then played in a room (``in_a_room``: a random exponentially
decaying reverb, RT60 0.2-1.2 s) and recorded with coloured background noise
at 10-30 dB SNR. Without the mixes, the room and the noise, log-mel and MFCC
statistics scored above 0.99 on pitch and instrument family: too easy to tell
encoders apart (version 1 of the corpus).

Clips of a class come in rounds; round ``r`` of every class is in split
``SPLIT_CYCLE[r % 12]`` (8 train, 2 valid, 2 test), and the first three rounds
are train, valid and test, so every class is in every split at any scale.
Clip ``i`` of a task depends only on ``(seed, task, i)``: a larger ``--scale``
adds rounds and keeps the clips of a smaller one. ``DIR/probe.json`` (the
settings and counts) is written last and marks the corpus complete.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from data.files import atomic_write_bytes
from synth.music import PITCH_NAMES, SCALE_STEPS as SCALES, SR, Voice, _lu, _u, midi_to_hz, random_timbre, render_note

FORMAT = "musicpt-probe/1"
VERSION = 2  # bump when the synthesis changes what a (seed, task, i) sounds like (2: mixes, rooms, noise)
TASKS = ("pitch", "instrument", "key")
TASK_TAGS = {"pitch": 0x7069, "instrument": 0x696E, "key": 0x6B65}
TIMBRE_TAG = 0x74696D
BACKGROUND_TAG = 0x626B67  # the accompaniment's timbre: one of the clip's own
BACKGROUND_DB = {"pitch": (6.0, 15.0), "instrument": (8.0, 16.0)}  # the accompaniment this far below the foreground
RT60_S = (0.2, 1.2)  # the room's reverberation time
DIRECT_TO_REVERB_DB = (-3.0, 9.0)
SNR_DB = (10.0, 30.0)  # the background noise
SPLIT_CYCLE = ("train", "valid", "test", "train", "train", "train",
               "train", "train", "valid", "test", "train", "train")
PITCH_LOW, PITCH_HIGH = 36, 96
PITCH_TIMBRES_PER_ROUND = 8  # in a round, timbre c plays the pitches p with p % 8 == c
CLIP_SECONDS = {"pitch": 1.0, "instrument": 3.0, "key": 4.0}
CLIPS_PER_CLASS = {"pitch": 12, "instrument": 60, "key": 36}  # at scale 1.0: ~100+ test clips per task
MIN_CLIPS_PER_CLASS = 3  # one round of each split


# Instrument families: (MIDI register, notes per 3 s phrase, legato, member sampler).


def _plucked_string(rng):
    return Voice(partials=int(rng.integers(15, 31)), rolloff=_u(rng, 0.8, 1.4), pluck=_u(rng, 0.1, 0.3),
                 stretch=_lu(rng, 1e-5, 1e-4), attack=_u(rng, 0.001, 0.004), decay=_u(rng, 0.4, 1.2), sustain=0.0,
                 release=_u(rng, 0.05, 0.2), damping=_u(rng, 0.0005, 0.002), filter="lowpass",
                 cutoff=_u(rng, 2500, 6000), noise=_u(rng, 0.02, 0.06), noise_band=(2, 20),
                 noise_burst=_u(rng, 0.004, 0.01))


def _bowed_string(rng):
    return Voice(partials=int(rng.integers(20, 36)), rolloff=_u(rng, 0.9, 1.2), even=_u(rng, 0.7, 1.0),
                 attack=_u(rng, 0.08, 0.25), decay=0.3, sustain=_u(rng, 0.8, 1.0), release=_u(rng, 0.15, 0.35),
                 tilt_start=_u(rng, 0.12, 0.32), tilt_time=_u(rng, 0.05, 0.15), filter="peak",
                 cutoff=_u(rng, 400, 900), q=1.5, peak_gain=_u(rng, 2, 4), vibrato_rate=_u(rng, 5, 6.5),
                 vibrato_depth=_u(rng, 0.15, 0.35), vibrato_delay=_u(rng, 0.1, 0.3), noise=_u(rng, 0.02, 0.05),
                 noise_band=(3, 12))


def _brass(rng):
    return Voice(partials=int(rng.integers(20, 31)), rolloff=_u(rng, 0.6, 1.0), attack=_u(rng, 0.03, 0.08),
                 decay=_u(rng, 0.1, 0.3), sustain=_u(rng, 0.7, 0.9), release=_u(rng, 0.05, 0.15),
                 tilt_start=_u(rng, 0.6, 1.0), tilt_end=_u(rng, 0.0, 0.16), tilt_time=_u(rng, 0.04, 0.12),
                 filter="peak", cutoff=_u(rng, 1000, 1600), q=1.0, peak_gain=_u(rng, 1.5, 2.5),
                 vibrato_depth=_u(rng, 0.05, 0.1) if rng.random() < 0.5 else 0.0, vibrato_delay=0.3,
                 noise=0.01, noise_band=(1, 6))


def _reed(rng):
    return Voice(partials=int(rng.integers(12, 26)), rolloff=_u(rng, 0.7, 1.2), even=_u(rng, 0.05, 0.5),
                 attack=_u(rng, 0.02, 0.06), decay=0.2, sustain=_u(rng, 0.8, 1.0), release=_u(rng, 0.05, 0.12),
                 filter="lowpass", cutoff=_u(rng, 2000, 4500), q=_u(rng, 0.7, 1.5),
                 vibrato_depth=_u(rng, 0.05, 0.15) if rng.random() < 0.5 else 0.0, vibrato_delay=0.2,
                 noise=_u(rng, 0.02, 0.05), noise_band=(1, 6))


def _flute(rng):
    return Voice(partials=int(rng.integers(3, 7)), rolloff=_u(rng, 1.8, 3.0), even=_u(rng, 0.4, 1.0),
                 attack=_u(rng, 0.04, 0.1), decay=0.2, sustain=_u(rng, 0.8, 1.0), release=_u(rng, 0.08, 0.15),
                 tilt_start=_u(rng, 0.2, 0.4), tilt_time=0.05, vibrato_rate=_u(rng, 4.5, 6),
                 vibrato_depth=_u(rng, 0.1, 0.25), vibrato_delay=_u(rng, 0.1, 0.3), noise=_u(rng, 0.06, 0.15),
                 noise_band=(1, 4))


def _organ(rng):
    return Voice(ratios=(1, 2, 3, 4, 6, 8), amps=(1.0, *rng.uniform(0.1, 1.0, 5)), attack=_u(rng, 0.005, 0.02),
                 decay=0.1, sustain=1.0, release=_u(rng, 0.02, 0.06), tremolo_rate=_u(rng, 5, 7),
                 tremolo_depth=_u(rng, 0.05, 0.2) if rng.random() < 0.5 else 0.0, noise=0.02, noise_band=(2, 20),
                 noise_burst=0.002)


MALLET_BARS = ((1.0, 3.93, 9.24), (1.0, 4.0, 10.0), (1.0, 2.76, 5.40, 8.93))


def _mallet(rng):
    bars = MALLET_BARS[int(rng.integers(len(MALLET_BARS)))]
    ratios = (1.0, *(r * _u(rng, 0.98, 1.02) for r in bars[1:]))
    return Voice(ratios=ratios, amps=(1.0, *rng.uniform(0.05, 0.5, len(ratios) - 1)), attack=0.001,
                 decay=_u(rng, 0.3, 1.2), sustain=0.0, release=_u(rng, 0.1, 0.3), damping=_u(rng, 0.001, 0.003),
                 tremolo_rate=_u(rng, 4, 7), tremolo_depth=_u(rng, 0.1, 0.3) if rng.random() < 0.3 else 0.0,
                 noise=0.05, noise_band=(1, 10), noise_burst=0.003)


def _piano(rng):
    return Voice(partials=int(rng.integers(20, 36)), rolloff=_u(rng, 1.0, 1.6), pluck=_u(rng, 0.1, 0.14),
                 stretch=_lu(rng, 1e-4, 5e-4), detune=_u(rng, 0.5, 3.0), attack=0.002, decay=_u(rng, 0.8, 2.0),
                 sustain=_u(rng, 0.05, 0.15), release=_u(rng, 0.1, 0.25), damping=_u(rng, 0.0008, 0.002),
                 tilt_end=_u(rng, 0.12, 0.24), tilt_time=_u(rng, 0.2, 0.5), noise=_u(rng, 0.03, 0.08),
                 noise_band=(1, 30), noise_burst=0.005)


def _synth_lead(rng):
    square = rng.random() < 0.5
    return Voice(partials=int(rng.integers(25, 41)), rolloff=1.0, even=0.0 if square else 1.0,
                 detune=_u(rng, 5, 15), attack=_u(rng, 0.005, 0.03), decay=_u(rng, 0.1, 0.4),
                 sustain=_u(rng, 0.6, 0.9), release=_u(rng, 0.05, 0.2), filter="lowpass", track=True,
                 cutoff=_u(rng, 3, 8), q=_u(rng, 2, 5), tilt_end=_u(rng, 0.2, 0.6), tilt_time=_u(rng, 0.1, 0.4),
                 vibrato_rate=_u(rng, 5, 7), vibrato_depth=_u(rng, 0.1, 0.3), vibrato_delay=_u(rng, 0.1, 0.4))


def _bass(rng):
    return Voice(partials=int(rng.integers(8, 17)), rolloff=_u(rng, 1.0, 1.6), pluck=_u(rng, 0.15, 0.3),
                 attack=_u(rng, 0.002, 0.008), decay=_u(rng, 0.3, 0.8), sustain=_u(rng, 0.0, 0.3),
                 release=_u(rng, 0.04, 0.1), damping=_u(rng, 0.002, 0.006), filter="lowpass",
                 cutoff=_u(rng, 500, 1500), q=_u(rng, 0.7, 1.5), noise=0.02, noise_band=(2, 10), noise_burst=0.005)


@dataclass(frozen=True)
class Family:
    register: tuple[int, int]  # MIDI range of the phrases
    notes: tuple[int, int]  # notes per phrase (inclusive)
    legato: bool
    member: object  # rng -> Voice


FAMILIES = {
    "plucked_string": Family((45, 76), (4, 7), False, _plucked_string),
    "bowed_string": Family((52, 84), (3, 5), True, _bowed_string),
    "brass": Family((45, 74), (3, 6), False, _brass),
    "reed": Family((50, 82), (3, 6), True, _reed),
    "flute": Family((60, 93), (3, 6), True, _flute),
    "organ": Family((48, 84), (3, 6), True, _organ),
    "mallet": Family((60, 96), (4, 8), False, _mallet),
    "piano": Family((40, 88), (4, 7), False, _piano),
    "synth_lead": Family((60, 88), (3, 7), True, _synth_lead),
    "bass": Family((28, 52), (3, 6), False, _bass),
}
FAMILY_NAMES = tuple(FAMILIES)


def render_clip(notes, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mix (start_s, hold_s, midi, velocity, voice) notes, fade out, play them in a room with background noise
    (`in_a_room`), peak-normalise to 0.5-0.9."""
    total = int(round(seconds * SR))
    out = np.zeros(total)
    for start_s, hold_s, midi, velocity, voice in notes:
        start = int(round(start_s * SR))
        length = min(int(round((hold_s + voice.release) * SR)), total - start)
        if length > 0:
            out[start:start + length] += velocity * render_note(voice, midi, hold_s, length, rng)
    fade = int(0.02 * SR)
    out[-fade:] *= np.linspace(1.0, 0.0, fade)
    out = in_a_room(out, rng)
    out *= rng.uniform(0.5, 0.9) / max(np.max(np.abs(out)), 1e-9)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def in_a_room(dry: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`dry` through a random room (an exponentially decaying noise impulse response of RT60 in RT60_S, mixed at a
    direct-to-reverberant ratio in DIRECT_TO_REVERB_DB), plus noise at an SNR in SNR_DB whose spectrum falls by
    0-6 dB an octave (white to brown); the same length as `dry`."""
    rt60 = _u(rng, *RT60_S)
    t = np.arange(int(rt60 * SR)) / SR
    response = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    wet = signal.fftconvolve(dry, response)[: len(dry)]
    wet *= np.sqrt(np.mean(dry**2) / max(np.mean(wet**2), 1e-20)) * 10 ** (-_u(rng, *DIRECT_TO_REVERB_DB) / 20)
    room = dry + wet
    slope = _u(rng, 0.0, 1.0)  # spectral slope of the noise: power ~ f ** -(2 slope), 0 white, 1 brown
    spectrum = np.fft.rfft(rng.standard_normal(len(dry)))
    spectrum[1:] *= np.arange(1, len(spectrum)) ** -slope
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, len(dry))
    noise *= np.sqrt(np.mean(room**2) / max(np.mean(noise**2), 1e-20)) * 10 ** (-_u(rng, *SNR_DB) / 20)
    return room + noise


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SR, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Planning: clip i of a task -> its labels row and its notes.


def clips_per_class(task: str, scale: float) -> int:
    return max(MIN_CLIPS_PER_CLASS, int(round(CLIPS_PER_CLASS[task] * scale)))


def num_classes(task: str) -> int:
    return {"pitch": PITCH_HIGH - PITCH_LOW + 1, "instrument": len(FAMILIES), "key": 24}[task]


def num_clips(task: str, scale: float) -> int:
    return num_classes(task) * clips_per_class(task, scale)


def split_of_round(round_: int) -> str:
    return SPLIT_CYCLE[round_ % len(SPLIT_CYCLE)]


def clip_rngs(seed: int, task: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (plan, audio) generators of clip `index` of `task`."""
    plan, audio = np.random.SeedSequence([seed, TASK_TAGS[task], index]).spawn(2)
    return np.random.default_rng(plan), np.random.default_rng(audio)


def timbre_rng(seed: int, task: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, TASK_TAGS[task], TIMBRE_TAG, *ids]))


def note_name(midi: int) -> str:
    return f"{PITCH_NAMES[midi % 12]}{midi // 12 - 1}"


def background(seed: int, task: str, index: int, rng, seconds: float, pitches: list[int], start: float = 0.02,
               ) -> list:
    """`pitches` held together for the clip by a random timbre of clip `index` alone, BACKGROUND_DB below the
    foreground (whose velocities are 0.6-1.0): the accompaniment a note or phrase is heard inside."""
    voice = random_timbre(timbre_rng(seed, task, BACKGROUND_TAG, index))
    velocity = 0.8 * 10 ** (-_u(rng, *BACKGROUND_DB[task]) / 20)
    return [(start, seconds - start - 0.1, midi, velocity, voice) for midi in pitches]


def plan_pitch(seed: int, index: int):
    classes = num_classes("pitch")
    position, round_ = index % classes, index // classes
    pitch = PITCH_LOW + position
    number = round_ * PITCH_TIMBRES_PER_ROUND + position % PITCH_TIMBRES_PER_ROUND
    voice = random_timbre(timbre_rng(seed, "pitch", number))
    rng, _ = clip_rngs(seed, "pitch", index)
    seconds = CLIP_SECONDS["pitch"]
    notes = [(_u(rng, 0.01, 0.05), _u(rng, 0.6, 0.8), pitch, _u(rng, 0.6, 1.0), voice)]
    others = [m for m in range(PITCH_LOW, PITCH_HIGH + 1) if m % 12 != pitch % 12]  # another pitch class
    under = [int(m) for m in rng.choice(others, size=int(rng.integers(1, 3)), replace=False)]
    record = {"pitch": pitch, "note": note_name(pitch), "f0_hz": round(midi_to_hz(pitch), 3),
              "timbre": f"pitch-{number:04d}", "background": under, "split": split_of_round(round_)}
    return record, notes + background(seed, "pitch", index, rng, seconds, under)


def _phrase(family: Family, rng, seconds: float) -> tuple[str, list]:
    """A few notes of a random scale, inside the family's register: (key name, [(start, hold, midi, vel)])."""
    tonic, mode = int(rng.integers(12)), str(rng.choice(["major", "minor"]))
    low, high = family.register
    pitches = [m for m in range(low, high + 1) if (m - tonic) % 12 in SCALES[mode]]
    count = int(rng.integers(family.notes[0], family.notes[1] + 1))
    position = int(rng.integers(len(pitches) // 4, max(len(pitches) * 3 // 4, len(pitches) // 4 + 1)))
    gaps = rng.uniform(0.6, 1.4, count)
    onsets = 0.03 + np.concatenate([[0.0], np.cumsum(gaps[:-1])]) * (seconds - 0.45) / gaps.sum()
    holds = np.diff(np.append(onsets, seconds - 0.15)) * (rng.uniform(0.92, 1.0, count) if family.legato
                                                          else rng.uniform(0.35, 0.85, count))
    notes = []
    for start, hold in zip(onsets, holds):
        notes.append((float(start), float(hold), pitches[position], _u(rng, 0.7, 1.0)))
        step = int(rng.choice([-4, -2, -1, -1, 1, 1, 2, 3]))
        position = int(np.clip(position + step, 0, len(pitches) - 1))
    return f"{PITCH_NAMES[tonic]} {mode}", notes


def plan_instrument(seed: int, index: int):
    family_id, round_ = index % len(FAMILIES), index // len(FAMILIES)
    name = FAMILY_NAMES[family_id]
    family = FAMILIES[name]
    voice = family.member(timbre_rng(seed, "instrument", family_id, round_))
    rng, _ = clip_rngs(seed, "instrument", index)
    key, notes = _phrase(family, rng, CLIP_SECONDS["instrument"])
    tonic, mode = PITCH_NAMES.index(key.split()[0]), key.split()[1]
    chord = [48 + (tonic - 48) % 12 + o for o in CHORDS[mode]["I" if mode == "major" else "i"]]  # the phrase's tonic
    record = {"family": name, "timbre": f"{name}-{round_:04d}", "phrase_key": key,
              "notes": [n[2] for n in notes], "background": chord, "split": split_of_round(round_)}
    return record, [(*note, voice) for note in notes] + background(seed, "instrument", index, rng,
                                                                   CLIP_SECONDS["instrument"], chord)


# Triads as semitones above the tonic (minor uses the harmonic minor's major V).
CHORDS = {
    "major": {"I": (0, 4, 7), "ii": (2, 5, 9), "iii": (4, 7, 11), "IV": (5, 9, 12), "V": (7, 11, 14),
              "vi": (9, 12, 16)},
    "minor": {"i": (0, 3, 7), "ii°": (2, 5, 8), "III": (3, 7, 10), "iv": (5, 8, 12), "V": (7, 11, 14),
              "VI": (8, 12, 15), "VII": (10, 14, 17)},
}
KEY_PROGRESSIONS = {
    "major": (("I", "IV", "V", "I"), ("I", "vi", "IV", "V"), ("I", "V", "vi", "IV"), ("I", "ii", "V", "I"),
              ("I", "IV", "I", "V"), ("I", "iii", "IV", "V"), ("I", "vi", "ii", "V")),
    "minor": (("i", "iv", "V", "i"), ("i", "VI", "III", "VII"), ("i", "VII", "VI", "V"), ("i", "iv", "i", "V"),
              ("i", "III", "iv", "V"), ("i", "VI", "iv", "V"), ("i", "ii°", "V", "i")),
}


def plan_key(seed: int, index: int):
    key_id, round_ = index % 24, index // 24
    tonic, mode = key_id % 12, ("major", "minor")[key_id // 12]
    chord_voice = random_timbre(timbre_rng(seed, "key", index, 0))
    melody_voice = random_timbre(timbre_rng(seed, "key", index, 1))
    rng, _ = clip_rngs(seed, "key", index)
    seconds = CLIP_SECONDS["key"]
    progression = KEY_PROGRESSIONS[mode][int(rng.integers(len(KEY_PROGRESSIONS[mode])))]
    base = 48 + (tonic - 48) % 12 - (12 if rng.random() < 0.3 else 0)  # tonic at MIDI 36-59
    chord_s = (seconds - 0.1) / len(progression)
    arpeggio, melody, bass = rng.random() < 0.4, rng.random() < 0.6, rng.random() < 0.7
    notes = []
    for c, name in enumerate(progression):
        start = 0.02 + c * chord_s
        inversion = int(rng.integers(0, 3))  # raise the lowest 0-2 chord tones an octave
        offsets = sorted(o + 12 * (j < inversion) for j, o in enumerate(CHORDS[mode][name]))
        chord = [base + o for o in offsets]
        if arpeggio:
            step = chord_s / 4
            pattern = (0, 1, 2, 1) if rng.random() < 0.5 else (0, 2, 1, 2)
            notes += [(start + s * step, 2 * step, chord[pattern[s]], _u(rng, 0.5, 0.7), chord_voice)
                      for s in range(4)]
        else:
            notes += [(start, chord_s * 0.95, m, _u(rng, 0.5, 0.7), chord_voice) for m in chord]
        if bass:
            notes.append((start, chord_s * 0.9, base - 12 + CHORDS[mode][name][0] % 12, 0.7, chord_voice))
        if melody:
            scale = [(s + (1 if mode == "minor" and s == 10 and name == "V" else 0)) for s in SCALES[mode]]
            for beat in range(2):
                tones = CHORDS[mode][name] if beat == 0 or rng.random() < 0.5 else scale
                midi = base + 12 + int(rng.choice(tones)) % 12 + 12 * int(rng.integers(0, 2))
                notes.append((start + beat * chord_s / 2, chord_s / 2 * 0.9, midi, _u(rng, 0.7, 0.9), melody_voice))
    record = {"key": f"{PITCH_NAMES[tonic]} {mode}", "tonic": tonic, "mode": mode,
              "progression": "-".join(progression), "style": "arpeggio" if arpeggio else "block",
              "melody": melody, "bass": bass, "timbre": f"key-{index:04d}-chords",
              "melody_timbre": f"key-{index:04d}-melody" if melody else None, "split": split_of_round(round_)}
    return record, notes


PLANNERS = {"pitch": plan_pitch, "instrument": plan_instrument, "key": plan_key}


def clip_file(task: str, index: int) -> str:
    """The clip's path relative to DIR/TASK: what pretrain.downstream.extract --input DIR/TASK calls it ("clip")."""
    return f"audio/{task}_{index:04d}.wav"


def make_clip(task: str, seed: int, index: int, folder: str | None = None) -> tuple[dict, bytes | None]:
    """(labels row, WAV bytes) of clip `index`; with `folder`, the file is written there (skipped if it exists)
    and no bytes are returned."""
    record, notes = PLANNERS[task](seed, index)
    record = {"file": clip_file(task, index), **record, "duration_s": CLIP_SECONDS[task], "sample_rate": SR}
    path = Path(folder, record["file"]) if folder else None
    if path is not None and path.exists():
        return record, None
    payload = wav_bytes(render_clip(notes, CLIP_SECONDS[task], clip_rngs(seed, task, index)[1]))
    if path is None:
        return record, payload
    atomic_write_bytes(str(path), payload)
    return record, None


def _make_into(job) -> dict:
    task, seed, index, folder = job
    return make_clip(task, seed, index, folder)[0]


# --------------------------------------------------------------------------
# The corpus.


def settings_of(seed: int, scale: float) -> dict:
    return {"format": FORMAT, "version": VERSION, "seed": seed, "scale": scale, "sample_rate": SR}


def _check_settings(path: Path, settings: dict, out: Path) -> bool:
    """True if `path` exists with these settings; refuse (ValueError) other settings."""
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    changed = [key for key in settings if saved.get(key) != settings[key]]
    if changed:
        raise ValueError(f"{out}: holds a probe corpus made with other settings ({', '.join(changed)}: "
                         f"{[saved.get(k) for k in changed]}, now {[settings[k] for k in changed]}); "
                         "use another --out, or the same settings to finish it")
    return True


def generate_probe(out, seed: int = 0, scale: float = 1.0, workers: int | None = None) -> dict:
    """Write the probe corpus under `out` (pitch/, instrument/, key/ and probe.json); return probe.json's content.

    A complete corpus with the same settings is left as it is; an unfinished one is finished (clips on disk are
    kept); another seed or scale is refused."""
    if seed < 0 or not scale > 0:
        raise ValueError(f"seed must be >= 0 and scale > 0, got seed={seed}, scale={scale}")
    out = Path(out)
    settings = settings_of(seed, float(scale))
    marker, partial = out / "probe.json", out / ".probe-partial.json"
    if _check_settings(marker, settings, out):
        return json.loads(marker.read_text())
    _check_settings(partial, settings, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(partial), json.dumps(settings).encode())
    started = time.perf_counter()
    jobs = []
    for task in TASKS:
        (out / task / "audio").mkdir(parents=True, exist_ok=True)
        jobs += [(task, seed, i, str(out / task)) for i in range(num_clips(task, scale))]
    workers = max(1, min(workers or os.cpu_count() or 1, 8))
    if workers == 1:
        records = [_make_into(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(_make_into, jobs, chunksize=8))
    summary = {**settings, "tasks": {}}
    for task in TASKS:
        rows = [r for (t, *_), r in zip(jobs, records) if t == task]
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_bytes(str(out / task / "labels.jsonl"), lines.encode("utf-8"))
        summary["tasks"][task] = {"clips": len(rows), "classes": num_classes(task),
                                  "clips_per_class": clips_per_class(task, scale),
                                  "splits": {s: sum(r["split"] == s for r in rows) for s in ("train", "valid", "test")},
                                  "seconds": round(len(rows) * CLIP_SECONDS[task], 1)}
    summary["generation_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_bytes(str(marker), (json.dumps(summary, indent=1) + "\n").encode())
    partial.unlink()
    return summary


def describe(summary: dict, out) -> str:
    parts = [f"{task} {info['clips']} clips ({info['splits']['train']}/{info['splits']['valid']}/"
             f"{info['splits']['test']})" for task, info in summary["tasks"].items()]
    return f"probe corpus: {', '.join(parts)} (train/valid/test) -> {out}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="non-negative corpus seed")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the clips per class")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU, at most 8)")
    args = parser.parse_args(argv)
    if not args.scale > 0 or args.seed < 0:
        parser.error("--scale must be > 0 and --seed >= 0")
    try:
        print(describe(generate_probe(args.out, args.seed, args.scale, args.workers or None), args.out))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
