"""The probe corpus (python -m synth.probe): every class in every split, timbres held out, deterministic,
named as pretrain.downstream.extract names clips, readable by pretrain.downstream.probe, and audibly what its labels say."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from synth import probe as pc
from pretrain.downstream.extract import clips
from pretrain.downstream.probe_data import load_task, match_clips, read_labels
from pretrain.downstream.probe_metrics import KEY_NAMES, key_index

SCALE = 0.1  # the smallest corpus: 3 clips per class, one round of each split
LABEL_FIELDS = {"pitch": "pitch", "instrument": "family", "key": "key"}
CLASSES = {"pitch": set(range(36, 97)), "instrument": set(pc.FAMILY_NAMES), "key": set(KEY_NAMES)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    summary = pc.generate_probe(out, seed=0, scale=SCALE, workers=2)
    rows = {task: [json.loads(line) for line in (out / task / "labels.jsonl").read_text().splitlines()]
            for task in pc.TASKS}
    return out, summary, rows


def test_every_class_is_in_every_split(corpus):
    out, summary, rows = corpus
    for task in pc.TASKS:
        assert len(rows[task]) == pc.num_clips(task, SCALE) == summary["tasks"][task]["clips"]
        for split in ("train", "valid", "test"):
            labels = {row[LABEL_FIELDS[task]] for row in rows[task] if row["split"] == split}
            assert labels == CLASSES[task], (task, split)
    assert json.loads((out / "probe.json").read_text()) == summary
    assert summary["seed"] == 0 and summary["scale"] == SCALE
    scaled = {task: pc.num_clips(task, 1.0) for task in pc.TASKS}
    assert scaled == {"pitch": 61 * 12, "instrument": 10 * 60, "key": 24 * 36}


def test_timbres_never_cross_splits(corpus):
    _, _, rows = corpus
    for task in pc.TASKS:
        split_of = {}
        for row in rows[task]:
            for timbre in (row["timbre"], row.get("melody_timbre")):
                if timbre is not None:
                    assert split_of.setdefault(timbre, row["split"]) == row["split"], (task, timbre)
    # pitch: NSynth-like, a timbre plays several pitches spread over the range
    pitches = {}
    for row in rows["pitch"]:
        pitches.setdefault(row["timbre"], set()).add(row["pitch"])
    assert min(len(p) for p in pitches.values()) >= 7 and min(max(p) - min(p) for p in pitches.values()) >= 48


def test_files_are_what_extract_calls_the_clips_and_probe_reads_them(corpus):
    out, _, rows = corpus
    for task in pc.TASKS:
        names = [name for name, _ in clips(str(out / task))]
        assert names == [row["file"] for row in rows[task]]
        config = load_task(f"configs/probe/{task}.yaml")
        assert config.labels == f"demo_out/probe/{task}/labels.jsonl"
        assert config.label_field == LABEL_FIELDS[task] and config.type == ("key" if task == "key" else "multiclass")
        config = load_task(f"configs/probe/{task}.yaml", [f"labels={out / task / 'labels.jsonl'}"])
        assert len(match_clips(names, read_labels(config), config, str(out))) == len(names)
        info = sf.info(str(out / task / rows[task][0]["file"]))
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert abs(info.duration - pc.CLIP_SECONDS[task]) < 1e-3
    assert all(key_index(row["key"]) == KEY_NAMES.index(row["key"]) for row in rows["key"])


def test_same_seed_same_bytes_and_rerun_does_nothing(corpus, tmp_path):
    out, summary, _ = corpus
    for task, index in (("pitch", 5), ("instrument", 13), ("key", 30)):
        record, payload = pc.make_clip(task, 0, index)  # in this process; the corpus was made by 2 workers
        assert payload == (out / task / record["file"]).read_bytes()
        assert pc.make_clip(task, 1, index)[1] != payload
    stamps = {path: os.stat(path).st_mtime_ns for path in out.rglob("*")}
    assert pc.generate_probe(out, seed=0, scale=SCALE) == summary
    pc.main(["--out", str(out), "--scale", str(SCALE)])
    assert {path: os.stat(path).st_mtime_ns for path in out.rglob("*")} == stamps
    with pytest.raises(ValueError, match="other settings"):
        pc.generate_probe(out, seed=1, scale=SCALE)
    with pytest.raises(ValueError, match="other settings"):
        pc.generate_probe(out, seed=0, scale=0.2)


def test_an_unfinished_corpus_is_finished_and_keeps_its_clips(corpus, tmp_path):
    out, summary, _ = corpus
    for task in ("pitch", "key"):  # a copy killed before the end: two clips and the done-marker missing
        shutil.copytree(out / task, tmp_path / task)
    (tmp_path / "pitch" / "audio" / "pitch_0007.wav").unlink()
    (tmp_path / "key" / "labels.jsonl").unlink()
    kept = os.stat(tmp_path / "pitch" / "audio" / "pitch_0008.wav").st_mtime_ns
    resumed = pc.generate_probe(tmp_path, seed=0, scale=SCALE, workers=1)
    assert resumed["tasks"] == summary["tasks"]
    assert os.stat(tmp_path / "pitch" / "audio" / "pitch_0008.wav").st_mtime_ns == kept
    for path in [p for p in out.rglob("*") if p.is_file() and p.name != "probe.json"]:
        assert (tmp_path / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def yin_midi(audio: np.ndarray, sr: int, fmin: float = 55.0, fmax: float = 2300.0) -> float:
    """YIN f0 (cumulative mean normalised difference, threshold 0.15) of 0.06-0.56 s of a clip, in MIDI."""
    x = audio[int(0.06 * sr):int(0.56 * sr)].astype(np.float64)
    w, taus = len(x) // 2, np.arange(1, int(sr / fmin) + 1)
    energy = np.concatenate([[0.0], np.cumsum(x**2)])
    corr = np.fft.irfft(np.fft.rfft(x, 2 * len(x)) * np.conj(np.fft.rfft(x[:w], 2 * len(x))))[:len(x)]
    diff = energy[w] + energy[taus + w] - energy[taus] - 2 * corr[taus]
    cmnd = diff * taus / np.maximum(np.cumsum(diff), 1e-12)
    low = int(sr / fmax)
    below = np.nonzero(cmnd[low:] < 0.15)[0]
    i = low + (below[0] if len(below) else int(np.argmin(cmnd[low:])))
    while i + 1 < len(cmnd) and cmnd[i + 1] < cmnd[i]:
        i += 1
    return 69 + 12 * np.log2(sr / taus[i] / 440.0)


def test_the_labelled_note_sounds_at_its_pitch_and_stands_above_its_accompaniment(corpus):
    """The label is the predominant note's: alone it sounds at the labelled pitch (YIN); in the clip, the notes
    under it are of other pitch classes and at least 6 dB quieter. The clip itself is that mix in a noisy room."""
    out, _, rows = corpus
    errors = []
    for index, row in enumerate(rows["pitch"]):
        audio, sr = sf.read(str(out / "pitch" / row["file"]))
        assert 0.45 <= np.max(np.abs(audio)) <= 0.95 and len(audio) == sr * pc.CLIP_SECONDS["pitch"]
        _, notes = pc.plan_pitch(0, index)
        (_, hold, midi, velocity, voice), *under = notes
        assert midi == row["pitch"] and [n[2] for n in under] == row["background"] and 1 <= len(under) <= 2
        assert all(n[2] % 12 != midi % 12 and velocity / n[3] >= 0.6 / 0.8 * 10 ** (6 / 20) for n in under)
        alone = pc.render_note(voice, midi, hold, sr, np.random.default_rng(index))
        errors.append(yin_midi(alone, sr) - row["pitch"])
    assert np.mean(np.abs(errors) <= 1.0) >= 0.9, np.round(errors, 1)


def test_a_room_adds_reverberation_and_noise_at_the_chosen_levels():
    rng = np.random.default_rng(0)
    click = np.zeros(pc.SR)
    click[100] = 1.0
    wet = pc.in_a_room(click, rng)
    tail = wet[200 + int(0.05 * pc.SR):]  # 50 ms after the click: reverberation and noise only
    assert np.sqrt(np.mean(tail**2)) > 1e-4 and len(wet) == len(click)
    silence_snr = [10 * np.log10(np.mean(x**2) / np.mean((pc.in_a_room(x, np.random.default_rng(i)) - x) ** 2))
                   for i, x in enumerate(np.random.default_rng(1).standard_normal((20, 4000)))]
    assert min(silence_snr) > -10 and max(silence_snr) < 30  # reverberation plus noise: below the dry signal's level


MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])  # Krumhansl-Kessler
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def test_progressions_sound_in_their_key(corpus):
    """A plain chroma key-finder (Krumhansl profiles) agrees with most key labels (chance: 1 in 24)."""
    out, _, rows = corpus
    hits = []
    for row in rows["key"]:
        audio, sr = sf.read(str(out / "key" / row["file"]))
        power, freqs = np.abs(np.fft.rfft(audio)) ** 2, np.fft.rfftfreq(len(audio), 1 / sr)
        keep = (freqs > 60) & (freqs < 2000)
        chroma = np.bincount(np.round(12 * np.log2(freqs[keep] / 440) + 9).astype(int) % 12, power[keep], 12)
        scores = [np.corrcoef(chroma, np.roll(profile, tonic))[0, 1] for profile in (MAJOR, MINOR)
                  for tonic in range(12)]
        hits.append(int(np.argmax(scores)) == key_index(row["key"]))
    assert np.mean(hits) >= 0.4, np.mean(hits)


def test_instrument_phrases_stay_in_their_family_register(corpus):
    _, _, rows = corpus
    for row in rows["instrument"]:
        low, high = pc.FAMILIES[row["family"]].register
        assert row["notes"] and all(low <= note <= high for note in row["notes"])
