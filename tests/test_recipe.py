"""launch/recipe.sh: a folder of recordings (mixed formats and rates, one unreadable file) to a trained tiny encoder,
both exports and a probe table in one command, killed with SIGKILL in a randomly chosen stage and run again."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["shards", "fit-logmel_chroma", "dump-logmel_chroma", "pretrain", "export", "export-hf", "probe-pitch"]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["synth.demo", "--out", str(folder / "corpus"), "--minutes", "1"],
                 ["synth.probe", "--out", str(folder / "probe"), "--scale", "0.1"]):
        subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    (folder / "corpus" / "audio" / "broken.wav").write_bytes(b"RIFF not really a wav file")
    return folder


def recipe(folder, *extra: str) -> list[str]:
    return ["bash", os.path.join(ROOT, "launch", "recipe.sh"), str(folder / "corpus" / "audio"), "tiny",
            "--work", str(folder / "work"), "--probe", os.path.join(ROOT, "configs", "probe", "pitch.yaml"),
            "--probe-root", str(folder / "probe"), "--workers", "2", "train.steps=20", "train.save_every=5",
            "data.crop_seconds=1.0", *extra]


def records(work) -> dict[str, str]:
    folder = work / "stages"
    return {path.name: path.read_text() for path in folder.iterdir()} if folder.exists() else {}


@pytest.mark.slow
def test_a_recipe_killed_in_any_stage_finishes_on_the_second_run_without_redoing_a_stage(recordings):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    work, victim = recordings / "work", os.environ.get("RECIPE_KILL_STAGE") or random.choice(STAGES)  # or all in turn
    running = subprocess.Popen(recipe(recordings), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (work / "logs" / f"{victim}.log").exists() and running.poll() is None:
        assert time.time() < deadline, f"stage {victim} never started"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere inside the stage
    os.killpg(running.pid, signal.SIGKILL)  # the recipe and the stage's process with it
    running.wait()
    before = records(work)

    done = subprocess.run(recipe(recordings), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"killed in {victim}; the second run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    after = records(work)
    assert {name: text for name, text in after.items() if name in before} == before, f"killed in {victim}: redone"
    assert sorted(after) == sorted(f"{stage}.json" for stage in STAGES)
    report = json.loads((work / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == STAGES and all(row["done"] for row in report["stages"])
    assert report["skipped_inputs"] >= 1 and "skipped" in done.stdout  # broken.wav: named in shards/report.json
    assert report["probes"][0]["task"] == "pitch" and 0.0 <= report["probes"][0]["test"] <= 1.0
    assert (work / "encoder.pt").exists() and (work / "hf" / "model.safetensors").exists()

    again = subprocess.run(recipe(recordings), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == len(STAGES) and records(work) == after


def test_a_work_folder_of_another_preset_and_missing_weights_are_refused_before_anything_runs(recordings, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({"audio": str(recordings / "corpus" / "audio"),
                                                  "preset": os.path.join(ROOT, "configs", "small.yaml"),
                                                  "overrides": []}))
    command = ["bash", os.path.join(ROOT, "launch", "recipe.sh"), str(recordings / "corpus" / "audio"), "tiny",
               "--work", str(work)]
    env = {**os.environ, "PYTHON": sys.executable}
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "holds a recipe made with other settings" in refused.stderr
    weights = subprocess.run(command[:-1] + [str(tmp_path / "other"), "data.labels=[encodec]"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert weights.returncode != 0 and "--encodec-weights FILE" in weights.stderr
    unnamed = subprocess.run(command[:3] + ["mert_95m", "--work", str(tmp_path / "third")], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert unnamed.returncode != 0 and "add data.labels=[encodec]" in unnamed.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "third").exists()


@pytest.mark.slow
def test_a_sigterm_to_the_recipe_stops_its_stage_too(recordings, tmp_path):
    """The scheduler or a user stops the recipe, not its children: the trainer must hear it, checkpoint and exit."""
    command = recipe(recordings, "train.steps=400")  # long enough to be stopped in the middle
    command[command.index("--work") + 1] = str(tmp_path / "work")
    running = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "work" / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and '"step": 10,' in metrics.read_text()):
        assert running.poll() is None and time.time() < deadline, "training never reached step 10"
        time.sleep(0.05)
    running.send_signal(signal.SIGTERM)  # to the recipe's process alone (bash execs python: the same process)
    _, err = running.communicate(timeout=120)
    assert running.returncode != 0 and "stopped by SIGTERM in stage pretrain" in err
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
    assert not left.strip(), f"stage processes outlived the recipe: {left}"
    status = json.loads((tmp_path / "work" / "runs" / "tiny" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < 400  # the trainer saved and stopped early


def test_a_work_folder_is_finished_by_the_same_settings_however_spelled_and_refuses_others(tmp_path):
    spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "launch", "recipe.py"))
    recipe_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_module)
    settings = {"audio": "/music", "preset": os.path.join(ROOT, "configs", "tiny.yaml"), "workers": 1}
    config = lambda *overrides: recipe_module.to_yaml(recipe_module.load_config(  # noqa: E731
        settings["preset"], ["data.shards=x", "data.labels=[x/l]", *overrides]))
    recipe_module.stamp({**settings, "config": config("train.steps=20", "data.crop_seconds=1.0")}, str(tmp_path))
    recipe_module.stamp({**settings, "config": config("data.crop_seconds=1", "train.steps=20")}, str(tmp_path))
    with pytest.raises(recipe_module.RecipeError, match="steps: 30"):
        recipe_module.stamp({**settings, "config": config("train.steps=30", "data.crop_seconds=1.0")}, str(tmp_path))
    with pytest.raises(recipe_module.RecipeError, match="other recordings"):
        recipe_module.stamp({**settings, "audio": "/other", "config": config()}, str(tmp_path))
