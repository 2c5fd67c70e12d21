"""From a folder of recordings to a trained, exported and probed encoder: every stage of the pipeline in one command.

    bash launch/recipe.sh AUDIO_DIR PRESET [--work DIR] [--encodec-weights FILE] [--probe TASK.yaml [--probe ...]]
                          [--probe-root DIR] [--workers N] [--slurm] [--dry-run] [key=value ...]
    bash launch/recipe.sh --status WORK        # which stages are done, running or failed, and which log to read

PRESET is a file or a name under configs/ (tiny, small, mert_95m, tiny_data2vec, ...); key=value go to
pretrain.train. The stages, each a subprocess of the project's own command (logged to WORK/logs/STAGE.log):

    shards        python -m data.shards build             WORK/shards (unreadable files are skipped and listed)
    fit-NAME      python -m teachers.kmeans fit            WORK/teachers/NAME   } for each label folder .../NAME
    dump-NAME     python -m teachers.kmeans dump           WORK/shards/labels/NAME } the preset's data.labels names:
                  (encodec: python -m teachers.encodec dump --weights FILE)        none for data2vec and BEST-RQ
    pretrain      python -m pretrain.train                 WORK/runs/PRESET
    export        python -m pretrain.export                WORK/encoder.pt
    export-hf     python -m pretrain.downstream.export_hf  WORK/hf (AutoModel.from_pretrained)
    probe-TASK    pretrain.downstream.extract + probe      WORK/probes/TASK, for each --probe TASK.yaml

A stage whose output is complete is skipped, so after a kill, a failure or a preemption the same command finishes
what is left without redoing anything (the stages' own commands resume inside a stage too). It ends with a report
(WORK/report.json): each stage, when it finished, its time and its output; the probes' test scores.

A probe task is a YAML of configs/probe/ (or your own): its labels file names the clips relative to the folder it
lies in, which is the audio extracted; with --probe-root DIR, task NAME reads DIR/NAME/labels.jsonl instead.

--slurm submits the stages that are not done as a chain of jobs (sbatch --dependency=afterok), the per-shard ones
as array jobs of --world tasks, pretraining through launch/slurm_pretrain.sh (its NODES, GPUS_PER_NODE, ...
environment variables apply), and prints the job ids and the --status command. PARTITION, ACCOUNT, TIME and
CPUS_PER_TASK (environment) go to every job. --dry-run prints the commands (or sbatch scripts) without running.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.files import atomic_write_json, read_json  # noqa: E402
from pretrain.config import ConfigError, load_config, to_yaml  # noqa: E402

SETTINGS_FILE = "recipe.json"


class RecipeError(Exception):
    pass


# ---------------------------------------------------------------- the settings and the stages


def preset_path(preset: str) -> str:
    for path in (preset, os.path.join(ROOT, "configs", f"{preset}.yaml")):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise RecipeError(f"preset {preset}: neither a file nor configs/{preset}.yaml; the presets are in configs/")


WORK_PATHS = ("data.shards=", "train.run_dir=")  # the recipe sets these from --work; the user may not
OWNED = WORK_PATHS + ("data.labels=",)  # ... and data.labels' folders, from the teacher names a user may give


def label_teachers(settings: dict) -> list[str]:
    """The teachers whose labels the preset trains on: NAME for each data.labels folder .../NAME (the preset's, or
    a data.labels=[NAME,...] override's); none for a self-targeted objective (data2vec, BEST-RQ)."""
    from pretrain.config import read_preset, reads_labels

    preset, overrides = settings["preset"], [o for o in settings["overrides"] if not o.startswith(WORK_PATHS)]
    if not reads_labels(preset, overrides):
        return []
    if not read_preset(preset).get("data", {}).get("labels") and not any(o.startswith("data.labels=") for o in overrides):
        raise RecipeError(f"{preset} trains on teacher labels and names none: add data.labels=[encodec] (EnCodec "
                          "codes; with --encodec-weights FILE) or data.labels=[logmel_chroma] (k-means over log-mel + "
                          "chroma; configs/teachers/ has the others)")
    labels = load_config(preset, ["data.shards=unused", *overrides]).data.labels
    return [os.path.basename(os.path.normpath(folder)) for folder in labels]


def teacher_commands(name: str, settings: dict, work: str) -> list[tuple[str, str, list[list[str]], bool]]:
    """(stage, done marker, commands, per shard) for the teacher NAME: a k-means config of configs/teachers/, or
    EnCodec with the weights file given."""
    shards, labels = os.path.join(work, "shards"), os.path.join(work, "shards", "labels", name)
    workers = ["--workers", str(settings["workers"])]
    if name == "encodec":
        weights = settings.get("encodec_weights")
        if not weights:
            raise RecipeError("the preset trains on EnCodec codes (data.labels .../encodec): pass --encodec-weights "
                              "FILE, the official encodec_24khz-d7cc33bc.th (its download needs network)")
        command = ["teachers.encodec", "dump", "--shards", shards, "--weights", weights, *workers]
        return [(f"dump-{name}", os.path.join(labels, "teacher.json"), [command], True)]
    config = os.path.join(ROOT, "configs", "teachers", f"{name}.yaml")
    if not os.path.isfile(config):
        raise RecipeError(f"the preset's data.labels names a teacher {name!r}: neither encodec nor "
                          f"configs/teachers/{name}.yaml")
    teacher = ["--config", config, f"shards={shards}", f"out={os.path.join(work, 'teachers', name)}", f"labels={labels}"]
    from teachers import TeacherError
    from teachers.kmeans import load_config as teacher_config

    try:  # a config with values to fill in (configs/teachers/hubert_iter2.yaml: a run's layer) fails here, not later
        teacher_config(config, teacher[2:])
    except TeacherError as error:
        raise RecipeError(f"teacher {name}: {error}; the recipe runs teachers whose config is complete (run this one "
                          "with python -m teachers.kmeans and pass its labels folder's name in data.labels)") from None
    return [(f"fit-{name}", os.path.join(work, "teachers", name, "kmeans.json"),
             [["teachers.kmeans", "fit", *teacher, *workers]], False),
            (f"dump-{name}", os.path.join(labels, "teacher.json"), [["teachers.kmeans", "dump", *teacher, *workers]],
             True)]


def run_dir(settings: dict, work: str) -> str:
    return os.path.join(work, "runs", os.path.splitext(os.path.basename(settings["preset"]))[0])


def train_overrides(settings: dict, work: str) -> list[str]:
    shards = os.path.join(work, "shards")
    labels = [os.path.join(shards, "labels", name) for name in label_teachers(settings)]
    return [f"data.shards={shards}", f"data.labels=[{','.join(labels)}]",
            f"train.run_dir={run_dir(settings, work)}", *[o for o in settings["overrides"] if not o.startswith(OWNED)]]


def probe_task(path: str, probe_root: str | None) -> dict:
    """The task's name, its file, its labels file and the audio folder its clips are relative to."""
    from pretrain.downstream.probe_data import load_task

    task = load_task(path, [])
    labels = os.path.join(probe_root, task.name, "labels.jsonl") if probe_root else task.labels
    if not os.path.isfile(labels):
        raise RecipeError(f"probe task {path}: no labels file {labels}" + ("" if probe_root else
                          " (pass --probe-root DIR for DIR/NAME/labels.jsonl)"))
    return {"name": task.name, "file": os.path.abspath(path), "labels": os.path.abspath(labels),
            "audio": os.path.dirname(os.path.abspath(labels))}


def stages(settings: dict, work: str) -> list[dict]:
    """Every stage in order: name, the file whose presence means done, commands (module + arguments), per shard."""
    shards, run, encoder = os.path.join(work, "shards"), run_dir(settings, work), os.path.join(work, "encoder.pt")
    rows = [("shards", os.path.join(shards, "index.json"),
             [["data.shards", "build", "--input", settings["audio"], "--out", shards,
               "--workers", str(settings["workers"])]], True)]
    for name in label_teachers(settings):
        rows += teacher_commands(name, settings, work)
    rows += [("pretrain", os.path.join(run, "status.json"),
              [["pretrain.train", "--config", settings["preset"], *train_overrides(settings, work)]], False),
             ("export", encoder, [["pretrain.export", "--ckpt", run, "--out", encoder]], False),
             ("export-hf", os.path.join(work, "hf", "config.json"),
              [["pretrain.downstream.export_hf", "--ckpt", encoder, "--out", os.path.join(work, "hf")]], False)]
    for task in settings["probes"]:
        features, out = os.path.join(work, "features", task["name"]), os.path.join(work, "probes", task["name"])
        rows.append((f"probe-{task['name']}", os.path.join(out, "summary.json"),
                     [["pretrain.downstream.extract", "--ckpt", encoder, "--input", task["audio"], "--out", features,
                       "--pooling", "mean_std"],
                      ["pretrain.downstream.probe", "--features", features, "--task", task["file"], "--out", out,
                       f"labels={task['labels']}"]], False))
    return [{"name": name, "marker": marker, "commands": commands, "per_shard": per_shard}
            for name, marker, commands, per_shard in rows]


def is_done(stage: dict) -> bool:
    if stage["name"] != "pretrain":
        return os.path.exists(stage["marker"])
    status = read_json(stage["marker"], "the run's status") if os.path.exists(stage["marker"]) else {}
    return status.get("state") == "finished"


# ---------------------------------------------------------------- on this machine


def python_command(module_and_args: list[str]) -> list[str]:
    return [sys.executable, "-m", *module_and_args]


def run_stage(stage: dict, work: str) -> float:
    """Runs the stage's commands in turn, output appended to WORK/logs/STAGE.log; returns the seconds taken."""
    log_path = os.path.join(work, "logs", f"{stage['name']}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not os.environ.get("MUSICPT_RECIPE_JOB"):  # run here, not as a job of a --slurm chain: one process, whatever
        env = {key: value for key, value in env.items()  # scheduler or launcher variables are around (else a
               if not key.startswith("SLURM_") and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}  # stage does 1/N)
    started = time.perf_counter()
    with open(log_path, "a") as log:
        for command in stage["commands"]:
            log.write("$ " + shlex.join(python_command(command)) + "\n")
            log.flush()
            returncode, stopped_by = run_forwarding_signals(python_command(command), log, env)
            if stopped_by:
                raise RecipeError(f"stopped by {stopped_by.name} in stage {stage['name']} (which was asked to stop too, "
                                  "and did); run the same command again to finish: the stages done are kept")
            if returncode:
                tail = "\n".join(open(log_path).read().splitlines()[-20:])
                raise RecipeError(f"{tail}\nstage {stage['name']} failed (log: {log_path}); fix what it says and run "
                                  "the same command again: the stages done are kept")
    return time.perf_counter() - started


def run_forwarding_signals(command: list[str], log, env: dict) -> tuple[int, signal.Signals | None]:
    """Runs the command. A SIGTERM or SIGINT sent to the recipe alone is passed on to it as SIGTERM (the trainer
    saves a checkpoint and exits; an offline stage stops, and a re-run resumes it) and waited for; whatever it had
    started (pool workers) and left running is then killed, so no part of a stage outlives the recipe. Returns its
    exit code and the signal that stopped the recipe, if one did. (A signal to the whole process group, a terminal's
    Ctrl-C or a scheduler's kill, reaches the stage directly.)"""
    import psutil

    received: list[signal.Signals] = []
    started: list[psutil.Process] = []

    def forward(number, frame):
        received.append(signal.Signals(number))
        try:
            started.extend(psutil.Process(child.pid).children(recursive=True))
            child.send_signal(signal.SIGTERM)
        except (NameError, psutil.NoSuchProcess):  # not started yet, or gone already
            pass

    previous = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if received:  # arrived while it was starting
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return code, (received[0] if received else None)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def record_path(work: str, name: str) -> str:
    return os.path.join(work, "stages", f"{name}.json")


def run_one(stage: dict, work: str) -> float:
    """Runs a stage and records when it finished and how long it took (WORK/stages/NAME.json) once its output is
    complete (an array task of a per-shard stage may finish before the others: then nothing is recorded). Returns
    the seconds taken."""
    seconds = run_stage(stage, work)
    if is_done(stage):
        atomic_write_json(record_path(work, stage["name"]), {"seconds": round(seconds, 1), "job": os.environ.get(
            "SLURM_JOB_ID"), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return seconds


def run_here(settings: dict, work: str, dry_run: bool) -> None:
    for stage in stages(settings, work):
        if is_done(stage):
            print(f"-- {stage['name']}: done, skipped", flush=True)
        elif dry_run:
            print("\n".join(shlex.join(python_command(command)) for command in stage["commands"]))
        else:
            print(f"== {stage['name']} (log: {os.path.join(work, 'logs', stage['name'] + '.log')})", flush=True)
            seconds = run_one(stage, work)
            if not is_done(stage):
                raise RecipeError(f"stage {stage['name']} ended without its output {stage['marker']}; see its log")
            print(f"-- {stage['name']}: {seconds:.1f} s", flush=True)
    if not dry_run:
        report(settings, work)


# ---------------------------------------------------------------- the report


def probe_scores(work: str, settings: dict) -> list[dict]:
    """Each probe's test score: the best single layer or the weighted sum of layers, whichever validated better
    (WORK/probes/TASK/summary.json)."""
    rows = []
    for task in settings["probes"]:
        path = os.path.join(work, "probes", task["name"], "summary.json")
        if not os.path.exists(path):
            continue
        summary = read_json(path, "the probe's summary")
        candidates = [(summary.get(f"{kind}_valid"), summary.get(f"{kind}_test"), name)
                      for kind, name in (("best_layer", summary.get("best_layer")), ("weighted_sum", "weighted sum"))
                      if summary.get(f"{kind}_valid") is not None]
        if not candidates:
            continue
        valid, test, layer = max(candidates, key=lambda c: -math.inf if math.isnan(c[0]) else c[0])
        rows.append({"task": task["name"], "metric": summary["metric"], "layer": layer, "valid": valid, "test": test})
    return rows


def report(settings: dict, work: str) -> None:
    """Prints what was made, where, and how long each stage took; the probes' scores; writes WORK/report.json."""
    lines = [f"recipe: {settings['audio']} -> {work} ({os.path.basename(settings['preset'])})",
             f"{'stage':<18} {'finished':<20} {'seconds':>9}  output"]
    rows = []
    for stage in stages(settings, work):
        ran = read_json(record_path(work, stage["name"]), "a stage record") if os.path.exists(
            record_path(work, stage["name"])) else {}
        state = ran.get("finished", "done" if is_done(stage) else "not done")
        seconds = f"{ran['seconds']:.1f}" if ran.get("seconds") is not None else "-"
        lines.append(f"{stage['name']:<18} {state:<20} {seconds:>9}  {os.path.relpath(output_of(stage), work)}")
        rows.append({"stage": stage["name"], "done": is_done(stage), **ran, "output": output_of(stage)})
    shard_reports = sorted(glob.glob(os.path.join(work, "shards", "report*.json")))  # report.rankR.json per part
    skipped = [item for path in shard_reports for item in read_json(path, "the sharder's report").get("skipped", [])]
    if skipped:
        lines.append(f"{len(skipped)} input file(s) or segment(s) skipped, each with its reason in "
                     + ", ".join(shard_reports))
    probes = probe_scores(work, settings)
    for row in probes:
        lines.append(f"probe {row['task']}: test {row['metric']} {row['test']:.3f} ({row['layer']}, "
                     f"valid {row['valid']:.3f})")
    atomic_write_json(os.path.join(work, "report.json"), {"settings": settings, "stages": rows, "probes": probes,
                                                          "skipped_inputs": len(skipped)})
    print("\n".join(lines))


def output_of(stage: dict) -> str:
    """What a user opens: the stage's folder or file (its marker's folder for the marker files)."""
    marker = stage["marker"]
    return marker if stage["name"] == "export" else os.path.dirname(marker)


# ---------------------------------------------------------------- as a chain of SLURM jobs


def sbatch_script(stage: dict, settings: dict, work: str) -> str:
    """The job of one stage: this script again with --run-stage (per shard: an array of --world tasks, each
    stage command reading its part from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)."""
    env = os.environ
    options = [f"--job-name=recipe-{stage['name']}", "--ntasks=1",
               f"--cpus-per-task={env.get('CPUS_PER_TASK', settings['workers'])}",
               f"--time={env.get('TIME', '12:00:00')}", "--open-mode=append", "--kill-on-invalid-dep=yes",
               f"--output={os.path.join(work, 'logs', stage['name'])}-%A{'_%a' if stage['per_shard'] else ''}.out"]
    options += [f"--{name.lower()}={env[name]}" for name in ("PARTITION", "ACCOUNT") if env.get(name)]
    options += [f"--array=0-{settings['world'] - 1}"] if stage["per_shard"] else []
    if env.get("GPUS_PER_TASK") and stage["name"].startswith(("dump-encodec", "probe-")):  # the stages a GPU speeds up
        options.append(f"--gpus-per-task={env['GPUS_PER_TASK']}")
    command = shlex.join([sys.executable, os.path.abspath(__file__), "--work", work, "--run-stage", stage["name"]])
    return "\n".join(["#!/bin/bash", *[f"#SBATCH {option}" for option in options],
                      "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MUSICPT_RECIPE_JOB=1", f"exec {command}", ""])


def submit(stage: dict, settings: dict, work: str, after: str | None, dry_run: bool) -> str:
    """Submits the stage's job after job `after` succeeded; returns its id (or a placeholder when dry)."""
    dependency = [f"--dependency=afterok:{after}"] if after else []
    if stage["name"] == "pretrain":  # one process per task across nodes, preemption and requeue: that launcher's
        command = ["bash", os.path.join(ROOT, "launch", "slurm_pretrain.sh"), settings["preset"],
                   *train_overrides(settings, work), *(["--dry-run"] if dry_run else []),
                   *(["--dependency", f"afterok:{after}"] if after else [])]
        env = {"PYTHON": sys.executable, "JOB_NAME": f"recipe-{os.path.basename(run_dir(settings, work))}"}
    else:
        script = os.path.join(work, "slurm", f"{stage['name']}.sbatch")
        os.makedirs(os.path.dirname(script), exist_ok=True)
        with open(script, "w") as file:
            file.write(sbatch_script(stage, settings, work))
        if dry_run:
            print(f"# {script}\n{open(script).read()}", end="")
            return f"<{stage['name']}>"
        command, env = ["sbatch", "--parsable", *dependency, script], {}
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise RecipeError(f"submitting {stage['name']} failed: {done.stderr.strip() or done.stdout.strip()}")
    if dry_run:
        print(done.stdout, end="")
        return f"<{stage['name']}>"
    return done.stdout.strip().split(";")[0] if command[0] == "sbatch" else done.stdout.split()[2].rstrip(":")


def submit_chain(settings: dict, work: str, dry_run: bool) -> None:
    for folder in ("logs", "slurm"):  # where the jobs write: SLURM does not make folders
        os.makedirs(os.path.join(work, folder), exist_ok=True)
    jobs_path = os.path.join(work, "slurm", "jobs.json")
    jobs, after = (read_json(jobs_path, "the submitted jobs") if os.path.exists(jobs_path) else {}), None
    live = {name: job for name, job in jobs.items() if job_states(job)}
    if live:
        raise RecipeError(f"jobs of this recipe are still queued or running ({', '.join(f'{n}: {j}' for n, j in live.items())}); "
                          f"bash launch/recipe.sh --status {work} follows them (scancel them to start over)")
    for stage in stages(settings, work):
        if is_done(stage):
            print(f"-- {stage['name']}: done, skipped", flush=True)
            continue
        after = submit(stage, settings, work, after, dry_run)
        print(f"submitted {stage['name']}: job {after}", flush=True)
        if not dry_run:
            jobs[stage["name"]] = after
            atomic_write_json(jobs_path, jobs)  # after each: a failed submission keeps the ids of those queued
    if not dry_run:
        print(f"follow it with: bash launch/recipe.sh --status {work}")


def run_job(work: str, name: str) -> None:
    """A --slurm job: one stage, after checking that the stage before it is complete. Of a per-shard stage the last
    array task writes the index or manifest; where it could not see the others' parts (a shared filesystem's
    caching) the stage is finished here, as one part of one: every shard is done, so only the index is written."""
    chain = stages(read_settings(work), work)
    position = [stage["name"] for stage in chain].index(name)
    before = chain[position - 1] if position else None
    if before is not None and not is_done(before) and before["per_shard"]:
        run_stage(before, work)
    if before is not None and not is_done(before):
        raise RecipeError(f"stage {before['name']} is not complete (no {before['marker']}): read its log in "
                          f"{os.path.join(work, 'logs')} and submit the recipe again")
    run_one(chain[position], work)


def job_states(job: str) -> list[str]:
    """squeue's state (and reason, while pending) of each task of the job; [] once it has left the queue."""
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def status(work: str) -> None:
    """Which stages are done, queued, running or failed, and which log to read; the report once all are done."""
    settings = read_settings(work)
    jobs_path = os.path.join(work, "slurm", "jobs.json")
    jobs = read_json(jobs_path, "the submitted jobs") if os.path.exists(jobs_path) else {}
    chain = stages(settings, work)
    if all(is_done(stage) for stage in chain):
        return report(settings, work)
    for stage in chain:
        job = jobs.get(stage["name"])
        logs = os.path.join(run_dir(settings, work), f"slurm-{job}.out") if stage["name"] == "pretrain" else \
            os.path.join(work, "logs", f"{stage['name']}-{job}{'_*' if stage['per_shard'] else ''}.out")
        if is_done(stage):
            state = "done"
        elif job is None:
            state, logs = "not submitted", os.path.join(work, "logs", f"{stage['name']}.log")
        else:
            states = job_states(job)
            state = f"job {job}: " + ("; ".join(sorted(set(states))) if states else
                                      "ended without its output: failed or cancelled, read the log")
        print(f"{stage['name']:<18} {state}" + ("" if state == "done" else f"\n{'':<18} log: {logs}"))


# ---------------------------------------------------------------- the command line


def read_settings(work: str) -> dict:
    path = os.path.join(work, SETTINGS_FILE)
    if not os.path.exists(path):
        raise RecipeError(f"{work}: no {SETTINGS_FILE}; it is made by bash launch/recipe.sh AUDIO_DIR PRESET --work {work}")
    return read_json(path, "the recipe's settings")


def settings_of(args) -> dict:
    if not os.path.isdir(args.audio):
        raise RecipeError(f"{args.audio}: no such folder; pass the folder of your recordings (searched recursively)")
    preset = preset_path(args.preset)
    owned = [item for item in args.overrides if item.startswith(WORK_PATHS)]
    if owned:
        raise RecipeError(f"{owned}: the recipe sets these from --work; data.labels=[NAME,...] names the teachers")
    settings = {"audio": os.path.abspath(args.audio), "preset": preset, "overrides": args.overrides,
                "probes": [probe_task(path, args.probe_root) for path in args.probe], "workers": args.workers,
                "world": args.world, "encodec_weights": os.path.abspath(args.encodec_weights) if args.encodec_weights
                else None}
    if settings["encodec_weights"] and not os.path.isfile(settings["encodec_weights"]):
        raise RecipeError(f"--encodec-weights {args.encodec_weights}: no such file")
    return settings


def stamp(settings: dict, work: str) -> None:
    """Writes WORK/recipe.json, or refuses a work folder made from other recordings or another run configuration
    (the preset and overrides resolved: the same settings in another order, or spelled otherwise, are the same)."""
    path = os.path.join(work, SETTINGS_FILE)
    if os.path.exists(path):
        saved = read_json(path, "the recipe's settings")
        if saved.get("audio") != settings["audio"]:
            raise RecipeError(f"{work} holds a recipe made from other recordings ({saved.get('audio')}); use another "
                              "--work, or the same recordings to finish it")
        differ = [line.strip() for line in settings["config"].splitlines()
                  if line not in str(saved.get("config", "")).splitlines()]
        if differ:
            raise RecipeError(f"{work} holds a recipe made with other settings (here: {'; '.join(differ[:6])}); use "
                              "another --work, or the same preset and overrides to finish it")
    os.makedirs(work, exist_ok=True)
    atomic_write_json(path, settings)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1])
    parser.add_argument("audio", nargs="?", help="the folder of recordings")
    parser.add_argument("preset", nargs="?", help="configs/NAME.yaml or NAME")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to pretrain.train")
    parser.add_argument("--work", help="where everything goes (default recipe_out/PRESET)")
    parser.add_argument("--encodec-weights", help="the EnCodec teacher's weights (encodec_24khz-d7cc33bc.th)")
    parser.add_argument("--probe", action="append", default=[], metavar="TASK.yaml",
                        help="a probe task (configs/probe/); repeat for more")
    parser.add_argument("--probe-root", help="task NAME reads DIR/NAME/labels.jsonl (python -m synth.probe)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes per stage")
    parser.add_argument("--world", type=int, default=4, help="--slurm: array tasks per per-shard stage")
    parser.add_argument("--slurm", action="store_true", help="submit the stages as a chain of SLURM jobs")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--status", metavar="WORK", help="where a recipe stands, and which log to read")
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)  # a SLURM job's one stage (with --work)
    args = parser.parse_intermixed_args(argv)
    if not (args.status or args.run_stage) and not (args.audio and args.preset):
        parser.error("pass AUDIO_DIR PRESET (or --status WORK)")
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.status:
            return status(os.path.abspath(args.status))
        if args.run_stage:
            run_job(os.path.abspath(args.work), args.run_stage)
            return
        settings = settings_of(args)
        name = os.path.splitext(os.path.basename(settings["preset"]))[0]
        work = os.path.abspath(args.work or os.path.join("recipe_out", name))
        try:  # the preset and overrides valid, every teacher known, every weights file given: before anything runs
            settings["config"] = to_yaml(load_config(settings["preset"], train_overrides(settings, work)))
            stages(settings, work)
        except ConfigError as error:
            raise RecipeError(str(error)) from None
        if not args.dry_run:
            stamp(settings, work)
        (submit_chain if args.slurm else run_here)(settings, work, args.dry_run)
    except (RecipeError, ConfigError, ValueError, OSError) as error:  # a bad file, path or value: say which
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
