"""Extraction speed with and without patchout (keep 1 of every T frames after the conv extractor), and what it
costs a probe, on the demo corpus.

    python bench/extract.py [--ckpt demo_out/runs/tiny | --random-init configs/mert_95m.yaml]
                            [--input demo_out/corpus] [--patchout 2 4] [--rounds 3] [--task configs/probe/demo_key.yaml]

Rounds alternate between the settings (same process, same machine); the
median clips per second of each is printed with its ratio to no patchout.
Then the last round's features (2 s windows as examples) are probed on the
task and the test scores compared. Needs the demo corpus (bash launch/demo.sh).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pretrain.downstream.extract import ExtractConfig, extract, layers_source  # noqa: E402
from pretrain.downstream.probe import compare, probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default="demo_out/runs/tiny")
    source.add_argument("--random-init", metavar="CONFIG")
    parser.add_argument("--input", default="demo_out/corpus")
    parser.add_argument("--patchout", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--task", default="configs/probe/demo_key.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    settings, times, folders = [1] + args.patchout, {}, {}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for every in settings:
                source = {"random_init": args.random_init} if args.random_init else {"ckpt": args.ckpt}
                layers_of, info, _ = layers_source(torch.device(args.device), **source, seed=0, patchout=every)
                cfg = ExtractConfig(args.window_seconds, args.window_seconds, unit="window", patchout=every)
                folders[every] = os.path.join(work, f"round{round_}-T{every}")
                report = extract(args.input, folders[every], layers_of, cfg, info)
                times.setdefault(every, []).append(report["clips"] / report["seconds"])
        print(f"{report['clips']} clips ({report['audio_seconds']:.0f} s of audio), {args.window_seconds} s windows, "
              f"{args.device}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
        base = statistics.median(times[1])
        for every in settings:
            speed = statistics.median(times[every])
            print(f"patchout {every}: {speed:7.2f} clips/s  ({speed / base:.2f}x no patchout)")
        results = {f"patchout {every}": probe(folders[every], args.task, resplit=(0.6, 0.2, 0.2), verbose=False)
                   for every in settings}
        print(f"\n{os.path.basename(args.task)}\n{compare(results)}")


if __name__ == "__main__":
    main()
