"""Does pretraining teach the encoder anything? Train a preset, then probe it against its own random init and baselines.

    python bench/learning.py [--config configs/small.yaml] [--minutes 30 | --corpus AUDIO_DIR] [--steps N]
                             [--scale 2.5] [--teacher logmel_chroma|mfcc] [--name NAME]
                             [--work bench_out/learning] [key=value ...]
    python bench/learning.py --smoke     # tiny preset, 1 minute of audio, 20 steps, probe scale 0.1 (work: *-smoke)
    python bench/learning.py --run RUN_DIR --work DIR [--scale S]   # only probe a finished run (the demo does)
    python bench/learning.py --compare WORK [WORK ...]   # one table of finished benchmarks (their learning.json)

Every stage is a subprocess of the real CLIs, logged to WORK/logs/, and skipped when its output exists, so a re-run
resumes: the training corpus (the synthetic demo corpus, or any folder of recordings with --corpus), shards, the
k-means teacher (fit + dump), pretraining (key=value overrides go to pretrain.train), the labelled probe corpus
(pitch, instrument, key), embeddings of each probe task (one window per clip) from the trained encoder, the same
architecture at the trainer's step-0 init (its saved config and train.seed) and MFCC / chroma / log-mel frames,
each pooled over the clip twice, like for like: by the mean, and by the mean and standard deviation; then
MARBLE-style probes. The table gives each task's primary metric (accuracy; key: MIREX weighted score) for the
probe with the best validation score among every single layer and the weighted sum of layers, and the effective
rank (principal components holding 95% of the variance of the centred final-layer clip means). The targets ask
the trained encoder to reach the best hand-made statistic and 1.2x its random init, at mean+std pooling. Figures
go to WORK/learning.json and WORK/results/NAME.json (bench/report.py makes the docs' tables of those), a
chart to WORK/learning.png. The exit code is 0 whether the targets pass or fail.

The objective is the preset's: configs/small_data2vec.yaml and configs/small_bestrq.yaml are configs/small.yaml
with another objective.kind and its reference settings; they need no k-means teacher (--teacher is for MERT's
labels). Each run keeps its own trained features (WORK/features/TASK/trained-NAME), so objectives compare on one
probe corpus and one random init.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import soundfile as sf  # noqa: E402

from data.files import atomic_write_json  # noqa: E402
from pretrain.config import reads_labels  # noqa: E402

TASKS = ("pitch", "instrument", "key")
BASELINES = ("mfcc", "chroma", "logmel")
FEATURE_SETS = ("trained", "random") + BASELINES
POOLINGS = ("mean", "mean_std")  # every feature set is probed with both (pretrain.downstream.extract --pooling)
PRIMARY = "mean_std"  # the pooling the targets compare at
SMOKE = {"config": "configs/tiny.yaml", "minutes": 1.0, "steps": 20, "scale": 0.1}
TIMES: dict[str, float] = {}


def run_stage(name: str, done: bool, commands: list[list[str]], work: str) -> None:
    """Runs `commands` in turn (output to WORK/logs/NAME.log) unless `done`; prints the time and last output line."""
    if done:
        print(f"-- {name}: done already, skipped", flush=True)
        return
    log_path = os.path.join(work, "logs", name.replace(" ", "_").replace("/", "_") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": ROOT}
    started = time.perf_counter()
    with open(log_path, "a") as log:
        for command in commands:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode:
                tail = open(log_path).read().splitlines()[-25:]
                sys.exit("\n".join(tail) + f"\nstage {name!r} failed: {' '.join(command)} (log: {log_path})")
    TIMES[name] = time.perf_counter() - started
    last = [line for line in open(log_path).read().splitlines() if line.strip()][-1:] or [""]
    print(f"-- {name}: {TIMES[name]:.1f} s | {last[0][:150]}", flush=True)


def py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def prepare_training(args, work: str) -> str:
    """Corpus, shards and teacher labels; returns the labels folder ("" for a self-targeted objective)."""
    corpus, shards = os.path.join(work, "corpus"), os.path.join(work, "shards")
    stamp = os.path.join(work, "corpus.json")
    if args.corpus:
        audio, wanted = os.path.abspath(args.corpus), {"corpus": os.path.abspath(args.corpus)}
        check_corpus(stamp, wanted)
        if not os.path.exists(os.path.join(shards, "index.json")):
            atomic_write_json(stamp, wanted)
    else:
        audio, wanted = os.path.join(corpus, "audio"), {"minutes": args.minutes, "timbres": args.timbres}
        check_corpus(stamp, wanted)
        corpus_done = os.path.exists(os.path.join(corpus, "labels.jsonl"))
        if not corpus_done:  # stamped before it is made, so a killed stage re-runs under the same check; a corpus
            atomic_write_json(stamp, wanted)  # from before the stamp existed is kept unchecked, never stamped by guess
        run_stage("corpus", corpus_done,
                  [py("synth.demo", "--out", corpus, "--minutes", str(args.minutes), "--timbres", args.timbres)], work)
    run_stage("shards", os.path.exists(os.path.join(shards, "index.json")),
              [py("data.shards", "build", "--input", audio, "--out", shards, "--workers", "2", "--shard-size", "8M")],
              work)
    labels = os.path.join(shards, "labels", args.teacher)
    teacher = ["--config", f"configs/teachers/{args.teacher}.yaml", f"shards={shards}",
               f"out={os.path.join(work, 'teachers', args.teacher)}", "--workers", "2"]
    if not reads_labels(args.config):  # bestrq and data2vec make their targets in the step
        return ""
    run_stage(f"teacher {args.teacher}", os.path.exists(os.path.join(labels, "teacher.json")),
              [py("teachers.kmeans", stage, *teacher) for stage in ("fit", "dump")], work)
    return labels


def train(args, work: str, labels: str) -> str:
    from pretrain.config import load_config

    run_dir = os.path.join(work, "runs", args.name)
    overrides = [f"data.shards={os.path.join(work, 'shards')}", *([f"data.labels=[{labels}]"] if labels else []),
                 f"train.run_dir={run_dir}", *([f"train.steps={args.steps}"] if args.steps else []), *args.overrides]
    steps = load_config(args.config, overrides).train.steps
    status = read(os.path.join(run_dir, "status.json")) or {}
    done = status.get("state") == "finished" and status.get("step", -1) >= steps
    run_stage("train", done, [py("pretrain.train", "--config", args.config, *overrides)], work)
    return run_dir


def read(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def check_probe_scale(probe_dir: str, scale: float) -> None:
    """Stops when WORK/probe holds a probe corpus of another --scale: its clips and the features extracted from them
    would be reused under the wrong scale (the default was 1 before it became 2.5)."""
    built = (read(os.path.join(probe_dir, "probe.json")) or {}).get("scale", scale)
    if built != scale:
        sys.exit(f"{probe_dir}/probe.json: this work folder's probe corpus was built with --scale {built:g}, not "
                 f"{scale:g}; pass --scale {built:g} to compare with its runs, or use another --work for scale {scale:g}")


def check_corpus(stamp: str, wanted: dict) -> None:
    """Stops when WORK's training corpus was made from another --corpus or with another --minutes or --timbres
    (WORK/corpus.json): the corpus, its shards and labels would be reused for a run that asked for another."""
    built = read(stamp) or wanted
    if built != wanted:
        flags = " ".join(f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}" for key, value in built.items())
        sys.exit(f"{stamp}: this work folder's training corpus was made with {flags}; pass those to train on it, "
                 f"or use another --work")


def window_seconds(folder: str) -> float:
    """The longest clip, rounded up to whole label frames (data.audio): every clip is one window."""
    from data.audio import FRAME_RATE

    longest = max(sf.info(path).duration for path in glob.glob(os.path.join(folder, "audio", "*")))
    return math.ceil(longest * FRAME_RATE + 1e-6) / FRAME_RATE


def extract_all(work: str, run_dir: str) -> dict[str, dict[str, dict[str, str]]]:
    """Features of every task for every feature set and pooling; returns {task: {pooling: {name: folder}}} (mean+std
    first: the mean-pooled folders are made from them)."""
    from dataclasses import asdict

    step = (read(os.path.join(run_dir, "status.json")) or {}).get("step")
    config = run_config(run_dir)
    sources = {"trained": ["--ckpt", run_dir], "random": ["--random-init", os.path.join(run_dir, "config.yaml")],
               **{name: ["--baseline", name] for name in BASELINES}}
    # the random init is the encoder config and seed's, whichever run (objective) it is read from
    made_from = {"trained": (sources["trained"], step), "random": ([asdict(config.model), config.train.seed], None),
                 **{name: (source, None) for name, source in sources.items() if name in BASELINES}}
    folders = {}
    for task in TASKS:
        audio, window = os.path.join(work, "probe", task), window_seconds(os.path.join(work, "probe", task))
        for pooling in ("mean_std", "mean"):  # mean: the first half of the mean+std features, not a second extraction
            for name, source in sources.items():
                folder = f"trained-{os.path.basename(os.path.normpath(run_dir))}" if name == "trained" else name
                out = os.path.join(work, "features", task, pooling, folder)
                what, at = made_from[name]
                marker = json.loads(json.dumps({"source": what, "window_seconds": window, "step": at}))  # as read back
                saved = read(os.path.join(out, "bench.json"))
                if saved is not None and saved != marker:
                    shutil.rmtree(out)  # made from another checkpoint or with other settings: redo (unfinished: resume)
                if pooling == "mean_std":
                    run_stage(f"extract {task}/{pooling}/{name}", saved == marker,
                              [py("pretrain.downstream.extract", *source, "--input", audio, "--out", out,
                                  "--window-seconds", str(window), "--pooling", pooling)], work)
                elif saved != marker:
                    means_of(folders[task]["mean_std"][name], out)
                atomic_write_json(os.path.join(out, "bench.json"), marker)
                folders.setdefault(task, {}).setdefault(pooling, {})[name] = out
    return folders


def means_of(source: str, out: str) -> None:
    """The mean-pooled features folder of a mean+std one (pretrain.downstream.extract writes [mean, std] per layer):
    each example's first half, written under a temporary name and renamed when complete."""
    import numpy as np

    staged = out + ".partial"
    shutil.rmtree(staged, ignore_errors=True)
    info = {**read(os.path.join(source, "info.json")), "pooling": "mean"}
    rows = [json.loads(line) for line in open(os.path.join(source, "index.jsonl"))]
    for row in rows:
        features = np.load(os.path.join(source, row["path"]))
        os.makedirs(os.path.dirname(os.path.join(staged, row["path"])), exist_ok=True)
        np.save(os.path.join(staged, row["path"]), features[:, : features.shape[1] // 2])
    atomic_write_json(os.path.join(staged, "info.json"), info)
    shutil.copyfile(os.path.join(source, "index.jsonl"), os.path.join(staged, "index.jsonl"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staged, out)


def best_by_validation(rows: list[dict]) -> dict:
    """Among every single-layer probe and the weighted sum, the one with the best validation score."""
    from pretrain.downstream.probe import rank

    best = max(rows, key=rank)
    return {"layer": best["layer"], "valid": best["valid"], "test": best["test"], "metric": best["metric"],
            "lr": best["lr"], "by_layer": {row["layer"]: {"valid": row["valid"], "test": row["test"]} for row in rows}}


def probe_all(work: str, folders: dict) -> dict:
    """{task: {pooling: {name: the best probe by validation}}}, each cached beside its features."""
    import torch

    from pretrain.downstream.probe import probe
    from pretrain.downstream.probe_data import load_task

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores = {}
    for task, by_pooling in folders.items():
        labels = os.path.join(work, "probe", task, "labels.jsonl")
        config = load_task(f"configs/probe/{task}.yaml", [f"labels={labels}"])
        for pooling, by_name in by_pooling.items():
            for name, folder in by_name.items():
                cache, what = os.path.join(folder, "bench-probe.json"), f"{task}/{pooling}/{name}"
                if not os.path.exists(cache):
                    started = time.perf_counter()
                    result = best_by_validation(probe(folder, config, verbose=False, device=device))
                    atomic_write_json(cache, result)  # killed mid-write, a plain write left JSON that stopped every rerun
                    TIMES[f"probe {what}"] = time.perf_counter() - started
                    print(f"-- probe {what}: {TIMES[f'probe {what}']:.1f} s | test {result['metric']} "
                          f"{result['test']:.3f} ({result['layer']})", flush=True)
                scores.setdefault(task, {}).setdefault(pooling, {})[name] = read(cache)
    return scores


def clip_rank(folder: str) -> int:
    """Principal components holding 95% of the variance of the centred final-layer clip embeddings
    (pretrain.validate.effective_rank, the training-time collapse signal)."""
    import torch

    from pretrain.downstream.probe_data import load_features
    from pretrain.validate import effective_rank

    return effective_rank(torch.from_numpy(load_features(folder).x[:, -1]))


HANDMADE_AT = 2.0  # within this many standard errors below the best hand-made statistic counts as at it
HANDMADE_THIRD = 0.9  # the third task: at least this fraction of its best hand-made statistic
RANDOM_FACTOR = 1.2  # trained >= this x random init, wherever random init leaves room


def test_clips(work: str) -> dict[str, int]:
    """Each probe task's number of test clips (the probe corpus's probe.json)."""
    tasks = read(os.path.join(work, "probe", "probe.json"))["tasks"]
    return {task: tasks[task]["splits"]["test"] for task in TASKS}


def standard_error(score: float, clips: int) -> float:
    """The binomial standard error of a test score in [0, 1] over `clips` test clips: exact for accuracy, an upper
    bound for the key score (a clip's score lies in [0, 1], so its variance is at most score x (1 - score))."""
    return math.sqrt(max(score * (1 - score), 0.0) / clips) if clips else math.nan


def in_errors(difference: float, error: float) -> float:
    """`difference` in units of `error`; with no error (scores of 0 or 1) any difference is certain."""
    if math.isnan(error):
        return math.nan
    return difference / error if error > 0 else math.copysign(math.inf, difference) if difference else 0.0


def test(scores: dict, task: str, name: str, pooling: str = PRIMARY) -> float:
    return scores[task][pooling][name]["test"]


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf if a > 0 else math.nan


def best_handmade(scores: dict, task: str, pooling: str = PRIMARY) -> str:
    """The hand-made statistic (MFCC, chroma, log-mel) that scores best on `task`."""
    return max(BASELINES, key=lambda name: test(scores, task, name, pooling))


def margin(scores: dict, task: str, other: str, factor: float, clips: int) -> float:
    """trained - factor x other, in standard errors of that difference."""
    trained, compared = test(scores, task, "trained"), test(scores, task, other)
    error = math.hypot(standard_error(trained, clips), factor * standard_error(compared, clips))
    return in_errors(trained - factor * compared, error)


def targets(scores: dict, ranks: dict, clips: dict[str, int]) -> list[dict]:
    """Each target as {"label", "ok" (True, False, or None: not applicable), "margin" (standard errors, or None),
    "note"}, at mean+std pooling."""
    rows, at, near = [], {}, {}
    for task in TASKS:
        best = best_handmade(scores, task)
        m = margin(scores, task, best, 1.0, clips[task])
        at[task] = m >= -HANDMADE_AT
        near[task] = test(scores, task, "trained") >= HANDMADE_THIRD * test(scores, task, best)
        rows.append({"label": f"{task}: trained at or above the best hand-made ({best})", "ok": at[task], "margin": m,
                     "note": f"{ratio(test(scores, task, 'trained'), test(scores, task, best)):.2f}x"})
    rows.append({"label": f"hand-made: at or above on >= 2 tasks, >= {HANDMADE_THIRD:g}x on the third",
                 "ok": sum(at.values()) >= 2 and all(at[t] or near[t] for t in TASKS), "margin": None,
                 "note": f"at or above on {sum(at.values())}"})
    for task in TASKS:
        needed, count = RANDOM_FACTOR * test(scores, task, "random"), clips[task]
        room = not count or needed <= (count - 1) / count
        rows.append({"label": f"{task}: trained >= {RANDOM_FACTOR:g} x random", "margin": margin(
            scores, task, "random", RANDOM_FACTOR, count), "ok": test(scores, task, "trained") >= needed if room else None,
            "note": "" if room else f"no room: needs {needed:.3f}" + (", above a perfect score" if needed > 1 else
                                                                      f", all {count} test clips right")})
    rows += [{"label": f"{task}: effective rank trained >= random", "ok": ranks[task]["trained"] >= ranks[task]["random"],
              "margin": None, "note": f"{ranks[task]['trained']} vs {ranks[task]['random']}"} for task in TASKS]
    return rows


def targets_met(verdicts: dict) -> tuple[int, int]:
    """(targets met, targets judged) of learning.json's "targets" ({label: True, False or None: not applicable})."""
    judged = [ok for ok in verdicts.values() if ok is not None]
    return sum(judged), len(judged)


def print_table(scores: dict, ranks: dict, clips: dict[str, int]) -> None:
    header = ["task", "pooling", "trained", "random", "ratio", *BASELINES, "best hand-made", "tr/best"]
    lines = [header]
    for task in TASKS:
        for pooling in POOLINGS:
            values = [test(scores, task, name, pooling) for name in FEATURE_SETS]
            trained, random = (f"{v:.3f} ±{standard_error(v, clips[task]):.3f}" for v in values[:2])
            best = best_handmade(scores, task, pooling)
            lines.append([task, pooling, trained, random, f"{ratio(values[0], values[1]):.2f}",
                          *(f"{v:.3f}" for v in values[2:]), best,
                          f"{ratio(values[0], test(scores, task, best, pooling)):.2f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:  # task and pooling left-aligned, numbers right-aligned
        cells = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths))]
        print("  ".join(cells))
    metrics = ", ".join(f"{task} {scores[task][PRIMARY]['trained']['metric']} ({clips[task]} test clips)" for task in TASKS)
    print(f"Test score ({metrics}) of the probe with the best validation score among every single layer and the "
          "weighted\nsum of layers. Every feature set pooled over the clip the same way: mean, or mean and standard "
          "deviation\n(one window per clip). ±: the binomial standard error of sampling the test clips (for the key "
          "score an upper\nbound); it leaves out the training seed, which can move a score by more.")
    print("effective rank of the final-layer clip means, trained / random: "
          + ", ".join(f"{task} {ranks[task]['trained']} / {ranks[task]['random']}" for task in TASKS))


def plot(scores: dict, clips: dict[str, int], path: str, title: str) -> None:
    """learning.png: per task, every feature set's test score at both poolings, with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.8), sharey=True)
    width = 0.8 / len(POOLINGS)
    for ax, task in zip(axes, TASKS):
        for j, pooling in enumerate(POOLINGS):
            values = [test(scores, task, name, pooling) for name in FEATURE_SETS]
            centres = [i + (j - (len(POOLINGS) - 1) / 2) * width for i in range(len(FEATURE_SETS))]
            ax.bar(centres, values, width, yerr=[standard_error(v, clips[task]) for v in values], capsize=2,
                   label={"mean": "mean", "mean_std": "mean + std"}[pooling])
        ax.set_xticks(range(len(FEATURE_SETS)), FEATURE_SETS, rotation=30)
        ax.set_title(f"{task} ({scores[task][PRIMARY]['trained']['metric']}, {clips[task]} test clips)", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("test score")
    axes[0].legend(title="clip pooling", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def run_config(run_dir: str):
    """The run's resolved config (its config.yaml)."""
    from pretrain.config import from_yaml

    with open(os.path.join(run_dir, "config.yaml")) as file:
        return from_yaml(file.read())


def training_summary(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [row for row in rows if "loss" in row]  # training rows (not the collapse/ and eval/ ones)
    keys = sorted(key for key in rows[-1] if key.startswith(("acc/", "prior_gap/")))
    keys += [key for key in ("loss/data2vec", "loss/cqt") if key in rows[-1]]
    summary = {key: {"first": rows[0].get(key), "last": rows[-1].get(key)} for key in keys}
    print(f"training {run_dir}: steps {rows[0]['step']} -> {rows[-1]['step']}")
    names = {"acc/": "masked accuracy ", "prior_gap/": "masked CE below the label prior's (nats) ", "loss/cqt": "CQT loss",
             "loss/data2vec": "data2vec regression loss"}
    for key, value in summary.items():
        prefix = next(p for p in names if key.startswith(p))
        name = names[prefix] + key[len(prefix):]
        first, last = (math.nan if v is None else v for v in (value["first"], value["last"]))
        print(f"  {name}: {first:.4f} -> {last:.4f}")
    return {"first_step": rows[0]["step"], "last_step": rows[-1]["step"], **summary}


def compare(works: list[str]) -> None:
    """One row per finished benchmark: its objective and overrides, each task's trained score (mean+std pooling)
    with its ratio to the best hand-made statistic and to random init, the final-layer ranks (trained / random) and
    the targets met."""
    rows = [["run", "objective", *TASKS, "ranks", "targets", "overrides"]]
    for work in works:
        results = read(os.path.join(work, "learning.json"))
        if results is None:
            sys.exit(f"{work}: no learning.json; run python bench/learning.py --work {work} first")
        scores, ranks, overrides = results["scores"], results["effective_rank"], results["overrides"]
        kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("objective.kind=")]
        cells = [f"{test(scores, t, 'trained'):.3f} ({ratio(test(scores, t, 'trained'), test(scores, t, best_handmade(scores, t))):.2f}x "
                 f"best, {ratio(test(scores, t, 'trained'), test(scores, t, 'random')):.2f}x rnd)" for t in TASKS]
        rank = ",".join(str(ranks[t]["trained"]) for t in TASKS) + " / " + ",".join(str(ranks[t]["random"]) for t in TASKS)
        rows.append([os.path.basename(os.path.normpath(work)), (kinds or [results.get("objective", "mert")])[-1], *cells,
                     rank, "{}/{}".format(*targets_met(results["targets"])), " ".join(overrides)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))
    print("Trained test score at mean+std pooling (x the best hand-made statistic, x random init); ranks: final-layer "
          "effective rank per task, trained / random.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="default bench_out/learning (bench_out/learning-smoke with --smoke)")
    parser.add_argument("--config", help="default configs/small.yaml")
    parser.add_argument("--minutes", type=float, help="training corpus (default 30)")
    parser.add_argument("--corpus", help="train on this folder of recordings instead of the synthetic corpus")
    parser.add_argument("--scale", type=float, help="probe corpus: clips per class multiplier (default 2.5: 250 "
                        "instrument test clips; at 1, the 1.2x target on instrument family is within one test set's noise)")
    parser.add_argument("--teacher", choices=("logmel_chroma", "mfcc"), default="logmel_chroma")
    parser.add_argument("--timbres", choices=("fixed", "random"), default="fixed",
                        help="training corpus voices (python -m synth.demo --timbres); the probe corpus always has random ones")
    parser.add_argument("--steps", type=int, help="shortcut for train.steps=N")
    parser.add_argument("--name", help="run name (default: the config's file name)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1 minute, 20 steps, probe scale 0.1")
    parser.add_argument("--run", help="probe this finished run directory instead of training one (its config.yaml)")
    parser.add_argument("--compare", nargs="+", metavar="WORK", help="print one table of finished benchmarks and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to pretrain.train")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else {"config": "configs/small.yaml", "minutes": 30.0, "steps": None, "scale": 2.5}
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.work = args.work or ("bench_out/learning-smoke" if args.smoke else "bench_out/learning")
    if args.run:
        args.config = os.path.join(args.run, "config.yaml")
    args.name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    if not os.path.isfile(os.path.join(ROOT, args.config)) and not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file")
    if args.corpus and not os.path.isdir(args.corpus):
        parser.error(f"--corpus {args.corpus}: no such folder; pass a folder of audio files")
    if any("=" not in item for item in args.overrides):
        parser.error(f"overrides must be key=value, got {args.overrides}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    os.chdir(ROOT)
    work, started = os.path.abspath(args.work), time.perf_counter()
    probe_dir = os.path.join(work, "probe")
    check_probe_scale(probe_dir, args.scale)  # before training, not 20 minutes later
    if args.run:
        run_dir = os.path.abspath(args.run)
        print(f"learning benchmark: probing {run_dir}, work {work}")
    else:
        teacher = f"teacher {args.teacher}" if reads_labels(args.config) else "no teacher"
        corpus = f"corpus {args.corpus}" if args.corpus else f"{args.minutes:g} min synthetic corpus"
        print(f"learning benchmark: {args.config}, {corpus}, {teacher}, work {work}")
        run_dir = train(args, work, prepare_training(args, work))
    run_stage("probe corpus", os.path.exists(os.path.join(probe_dir, "probe.json")),
              [py("synth.probe", "--out", probe_dir, "--scale", str(args.scale))], work)
    folders = extract_all(work, run_dir)
    scores = probe_all(work, folders)
    ranks = {task: {name: clip_rank(folders[task]["mean"][name]) for name in ("trained", "random")} for task in TASKS}
    print()
    training = training_summary(run_dir)
    print()
    clips = test_clips(work)
    print_table(scores, ranks, clips)
    checks = targets(scores, ranks, clips)
    print("\ntargets, at mean+std pooling (margin in standard errors; within 2 is noise, not a result):")
    for row in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[row["ok"]]
        m = row["margin"]
        shown = f" ({m:+.1f} se{', within noise' if abs(m) < 2 else ''})" if m is not None and not math.isnan(m) else ""
        print(f"  {verdict}  {row['label']}{shown}{'; ' + row['note'] if row['note'] else ''}")
    total = time.perf_counter() - started
    corpus = os.path.abspath(args.corpus) if args.corpus else (
        f"the training corpus of {run_dir}" if args.run else f"synthetic, {args.minutes:g} min, {args.timbres} timbres")
    cfg = run_config(run_dir)
    results = {"config": args.config, "name": args.name, "objective": cfg.objective.kind, "frontend": cfg.model.frontend,
               "seed": cfg.train.seed, "steps": cfg.train.steps,
               "teacher": args.teacher, "corpus": corpus,
               "scale": args.scale, "overrides": args.overrides, "training": training, "scores": scores,
               "effective_rank": ranks, "targets": {row["label"]: row["ok"] for row in checks}, "test_clips": clips,
               "margins_se": {row["label"]: round(row["margin"], 2) for row in checks if row["margin"] is not None},
               "target_notes": {row["label"]: row["note"] for row in checks if row["note"]},
               "stage_seconds": {**(read(os.path.join(work, "learning.json")) or {}).get("stage_seconds", {}),
                                 **{name: round(seconds, 2) for name, seconds in TIMES.items()}},  # stages run before too
               "seconds": round(total, 1)}
    atomic_write_json(os.path.join(work, "learning.json"), results)
    atomic_write_json(os.path.join(work, "results", f"{args.name}.json"), results)  # each run's, kept (bench/report.py)
    plot(scores, clips, os.path.join(work, "learning.png"), f"{args.name}: {results['corpus']}")
    met, judged = targets_met(results["targets"])
    print(f"\nlearning benchmark: {met}/{judged} targets met ({'PASS' if met == judged else 'FAIL'}"
          f"{f'; {len(checks) - judged} not applicable' if judged < len(checks) else ''}); {total:.0f} s this "
          f"run; figures in {work}/learning.json, chart {work}/learning.png")


if __name__ == "__main__":
    main()
