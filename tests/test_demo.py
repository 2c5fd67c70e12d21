"""The demo corpus: deterministic, labelled, in the formats the sharder must handle, and musically what it says."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from synth import demo


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    records = demo.generate(out, minutes=3.0, seed=0)
    return out, records


def test_labels_describe_the_files(corpus):
    out, records = corpus
    on_disk = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert on_disk == records
    assert sum(r["duration_s"] for r in records) >= 180
    for r in records:
        info = sf.info(str(out / r["file"]))
        assert info.samplerate == r["sample_rate"] and info.channels == r["channels"]
        assert abs(info.duration - r["duration_s"]) < 0.1  # lossy codecs may pad a few ms
        assert demo.MIN_TRACK_S <= r["duration_s"] <= demo.MAX_TRACK_S
        assert demo.MIN_TEMPO_BPM <= r["tempo_bpm"] <= demo.MAX_TEMPO_BPM
        assert r["key"] == f"{demo.PITCH_NAMES[r['tonic']]} {r['mode']}"
        assert 2 <= len(r["instruments"]) <= 4 and r["lead"] in r["instruments"]
    assert {r["format"] for r in records} >= {"WAV", "FLAC", "OGG"}
    assert {r["sample_rate"] for r in records} >= {22050, 44100, 48000}
    assert {r["channels"] for r in records} == {1, 2}


def test_each_run_of_24_tracks_covers_all_24_keys():
    keys = [demo.track_key(seed=3, index=i) for i in range(48)]
    assert len(set(keys[:24])) == 24 and len(set(keys[24:])) == 24
    assert keys != [demo.track_key(seed=4, index=i) for i in range(48)]


def test_same_seed_same_audio_and_longer_corpus_extends_shorter(tmp_path, corpus):
    out, records = corpus
    short = demo.generate(tmp_path, minutes=0.5, seed=0)
    assert short == records[: len(short)]
    for r in short:
        if r["format"] in demo.LOSSLESS_FORMATS:
            a, _ = sf.read(str(tmp_path / r["file"]))
            b, _ = sf.read(str(out / r["file"]))
            np.testing.assert_array_equal(a, b)
    assert demo.generate(tmp_path / "other", minutes=0.5, seed=1) != short


def chroma(audio: np.ndarray, sr: int) -> np.ndarray:
    """Energy per pitch class from an FFT of the whole track (60 Hz to 2 kHz)."""
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / sr)
    keep = (freqs > 60) & (freqs < 2000)
    pitch_class = np.round(12 * np.log2(freqs[keep] / 440.0) + 69).astype(int) % 12
    return np.bincount(pitch_class, weights=spectrum[keep], minlength=12)


def test_tonal_energy_lies_on_the_labelled_scale(corpus):
    out, records = corpus
    for r in records[:8]:
        audio, sr = sf.read(str(out / r["file"]), always_2d=True)
        energy = chroma(audio.mean(axis=1), sr)
        scale = [(r["tonic"] + step) % 12 for step in demo.SCALE_STEPS[r["mode"]]]
        on_scale = energy[scale].sum() / energy.sum()
        assert on_scale > 0.7, (r["file"], r["key"], on_scale)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--out", "x", "--minutes", "0"])
    assert "--minutes must be > 0" in capsys.readouterr().err


def test_random_timbres_change_the_voices_not_the_music(tmp_path):
    """--timbres random: same tracks, keys and labels as the fixed-synth corpus, other sounds, finite audio."""
    import soundfile as sf

    from synth.demo import generate

    fixed = generate(tmp_path / "fixed", 0.3, seed=3)
    random = generate(tmp_path / "random", 0.3, seed=3, timbres="random")
    assert fixed == random  # labels do not depend on the voices
    for record in fixed:
        a, _ = sf.read(tmp_path / "fixed" / record["file"])
        b, _ = sf.read(tmp_path / "random" / record["file"])
        assert a.shape == b.shape and np.isfinite(b).all() and 0.3 < np.abs(b).max() <= 1.0
        assert not np.allclose(a, b, atol=1e-2)
