"""The tables of figures in the README and docs, made from the JSON the benchmarks wrote (never typed in).

    python bench/report.py --update README.md docs/*.md      # rewrite every report block in them
    python bench/report.py learning-table 'bench/results/learning/*.json'   # print one block's table

A report block in a Markdown file is the lines between `<!-- report KIND: GLOB -->` and `<!-- /report -->`; GLOB
(relative to the repository root) names the JSON files it shows, and KIND the table made of them (`TABLES`):
  learning-table   one row per result of `python bench/learning.py` (WORK/results/NAME.json, copied into
                   bench/results/learning/ under a name that says what it is: corpus, preset, setting, seed)
  handmade         the hand-made statistics (MFCC / chroma / log-mel) of such a result, per pooling
  data-throughput  the loader against raw FLAC decoding, from `python bench/data_throughput.py --json FILE`
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.learning import BASELINES, POOLINGS, TASKS, best_handmade, ratio, targets_met, test  # noqa: E402

BLOCK = re.compile(r"(<!-- report (?P<kind>[\w-]+): (?P<glob>\S+) -->\n)(?P<table>.*?)(<!-- /report -->)", re.S)


def read(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def learning_cell(scores: dict, task: str) -> str:
    trained, best = test(scores, task, "trained"), best_handmade(scores, task)
    random = test(scores, task, "random")
    return f"{trained:.3f} ({ratio(trained, test(scores, task, best)):.2f}x {best}); rnd {random:.3f} ({ratio(trained, random):.2f}x)"


def learning_row(path: str) -> str:
    result = read(path)
    scores, ranks = result["scores"], result["effective_rank"]
    corpus = "synthetic" if str(result["corpus"]).startswith("synthetic") else "real"
    setting = " ".join(result["overrides"]) or "as configured"
    rank = ", ".join(f"{ranks[t]['trained']}/{ranks[t]['random']}" for t in TASKS)
    return (f"| {os.path.splitext(os.path.basename(path))[0]} | {corpus} | {result['frontend']} + {result['objective']}, "
            f"{os.path.basename(result['config'])} {result['steps']} steps, seed {result['seed']}: `{setting}` | "
            + " | ".join(learning_cell(scores, t) for t in TASKS) + f" | {rank} | {'{}/{}'.format(*targets_met(result['targets']))} |")


def learning_table(paths: list[str]) -> str:
    lines = ["| run | corpus | encoder, preset, overrides | pitch | instrument | key | clip ranks (trained/random) | targets |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [learning_row(path) for path in sorted(paths)]) + "\n"


def handmade_table(paths: list[str]) -> str:
    """The hand-made statistics' test scores per task and pooling (the same in every result of one probe corpus:
    name one file per probe corpus)."""
    lines = ["| result | pooling | " + " | ".join(f"{task}: " + " / ".join(BASELINES) for task in TASKS) + " |",
             "|---|---|" + "---|" * len(TASKS)]
    for path in sorted(paths):
        scores = read(path)["scores"]
        for pooling in POOLINGS:
            cells = [" / ".join(f"{test(scores, task, name, pooling):.3f}" for name in BASELINES) for task in TASKS]
            lines.append(f"| {os.path.splitext(os.path.basename(path))[0]} | {pooling} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def throughput_table(paths: list[str]) -> str:
    lines = ["| measured by | reader | audio-s/s per core | ratio to raw FLAC decode | kB per audio-second |",
             "|---|---|---|---|---|"]
    for path in sorted(paths):
        run = read(path)
        where = f"{os.path.basename(path)}: {run['cores']} cores, {run['crop_seconds']:g} s crops, batch {run['batch_size']}, " \
                f"{run['workers']} worker(s), {run['rounds']} rounds, {run['minutes']:g} min corpus"
        lines.append(f"| {where} | raw soundfile FLAC decode (the peer) | {run['raw']:,.0f} | 1.00 | |")
        lines.append(f"| | naive webdataset pipeline | {run['naive']:,.0f} | {run['naive_ratio_to_raw']:.2f} | |")
        for codec, loader in run["loader"].items():
            lines.append(f"| | loader over {codec.upper()} shards | {loader['rate']:,.0f} | {loader['ratio_to_raw']:.2f} | "
                         f"{loader['bytes_per_second'] / 1000:.1f} |")
    return "\n".join(lines) + "\n"


TABLES = {"learning-table": learning_table, "handmade": handmade_table, "data-throughput": throughput_table}  # block kind -> table of its files


def table(kind: str, pattern: str) -> str:
    if kind not in TABLES:
        raise ValueError(f"report block kind {kind!r}: use one of {sorted(TABLES)}")
    paths = glob.glob(os.path.join(ROOT, pattern))
    if not paths:
        raise ValueError(f"the {kind} block names {pattern}, which matches no file")
    return TABLES[kind](paths)


def update(path: str) -> bool:
    """Rewrites every report block of `path`; True if it changed."""
    with open(path) as file:
        text = file.read()
    try:
        new = BLOCK.sub(lambda m: m.group(1) + table(m["kind"], m["glob"]) + m.group(5), text)
    except ValueError as error:
        raise SystemExit(f"{path}: {error}")
    if new != text:
        with open(path + ".tmp", "w") as file:
            file.write(new)
        os.replace(path + ".tmp", path)
    return new != text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("block", nargs="*", metavar="KIND GLOB", help="print the table of one block")
    parser.add_argument("--update", nargs="+", metavar="FILE", help="rewrite the report blocks of these Markdown files")
    args = parser.parse_args(argv)
    if args.update:
        for path in args.update:
            print(f"{path}: {'updated' if update(path) else 'already up to date'}")
        return
    if len(args.block) != 2:
        parser.error("name a block (KIND GLOB), or --update FILE ...")
    try:
        print(table(*args.block), end="")
    except ValueError as error:
        raise SystemExit(str(error))


if __name__ == "__main__":
    main()
