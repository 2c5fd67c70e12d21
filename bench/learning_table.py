"""The learning benchmark's tables in the docs, made from the results it wrote (never typed in).

    python bench/learning_table.py bench/results/learning/*.json      # print one Markdown table
    python bench/learning_table.py --update README.md docs/learning.md  # rewrite every table block in them

A table block in a Markdown file is the lines between `<!-- learning-table: GLOB -->` and `<!-- /learning-table -->`;
GLOB (relative to the repository root) names the result files it shows, one row each, in name order. A result
file is what `python bench/learning.py` writes to WORK/results/NAME.json; copy it into bench/results/learning/ under
a name that says what it is (corpus, preset, setting, seed) to keep it.
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

from bench.learning import TASKS, best_handmade, ratio, targets_met, test  # noqa: E402

BLOCK = re.compile(r"(<!-- learning-table: (?P<glob>\S+) -->\n)(?P<table>.*?)(<!-- /learning-table -->)", re.S)


def cell(scores: dict, task: str) -> str:
    trained, best = test(scores, task, "trained"), best_handmade(scores, task)
    random = test(scores, task, "random")
    return f"{trained:.3f} ({ratio(trained, test(scores, task, best)):.2f}x {best}); rnd {random:.3f} ({ratio(trained, random):.2f}x)"


def row(path: str) -> str:
    with open(path) as file:
        result = json.load(file)
    scores, ranks = result["scores"], result["effective_rank"]
    corpus = "synthetic" if str(result["corpus"]).startswith("synthetic") else "real"
    setting = " ".join(result["overrides"]) or "as configured"
    rank = ", ".join(f"{ranks[t]['trained']}/{ranks[t]['random']}" for t in TASKS)
    return (f"| {os.path.splitext(os.path.basename(path))[0]} | {corpus} | {result['frontend']} + {result['objective']}, "
            f"{os.path.basename(result['config'])} {result['steps']} steps, seed {result['seed']}: `{setting}` | "
            + " | ".join(cell(scores, t) for t in TASKS) + f" | {rank} | {'{}/{}'.format(*targets_met(result['targets']))} |")


def table(paths: list[str]) -> str:
    lines = ["| run | corpus | encoder, preset, overrides | pitch | instrument | key | clip ranks (trained/random) | targets |",
             "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [row(path) for path in sorted(paths)]) + "\n"


def update(path: str) -> bool:
    """Rewrites every table block of `path`; True if it changed."""
    with open(path) as file:
        text = file.read()

    def fill(match: re.Match) -> str:
        paths = glob.glob(os.path.join(ROOT, match["glob"]))
        if not paths:
            sys.exit(f"{path}: the table block names {match['glob']}, which matches no result file")
        return match.group(1) + table(paths) + match.group(4)

    new = BLOCK.sub(fill, text)
    if new != text:
        with open(path + ".tmp", "w") as file:
            file.write(new)
        os.replace(path + ".tmp", path)
    return new != text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="result files (bench/results/learning/*.json)")
    parser.add_argument("--update", nargs="+", metavar="FILE", help="rewrite the table blocks of these Markdown files")
    args = parser.parse_args(argv)
    if args.update:
        for path in args.update:
            print(f"{path}: {'updated' if update(path) else 'already up to date'}")
        return
    if not args.results:
        parser.error("name result files, or --update FILE ...")
    print(table(args.results), end="")


if __name__ == "__main__":
    main()
