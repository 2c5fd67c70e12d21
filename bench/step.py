"""Forward + backward time of our encoder and objective against torchaudio's HuBERT pretraining model.

    python bench/step.py [--batch 2] [--seconds 5] [--rounds 5] [--threads 2]

Both sides are the base size (12 x 768, the same 7-layer conv stack), one
500-class target, HuBERT masking, same batch of audio, same process;
our CQT head and mixup are off so the work is the same. Steps alternate
between the two models; the median step time of each is printed with the
ratio ours / torchaudio (target <= 1.0) and audio-seconds per second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchaudio  # noqa: E402

from pretrain.model import Encoder, EncoderConfig  # noqa: E402
from pretrain.objectives import ObjectiveConfig  # noqa: E402
from pretrain.objectives.mert import MertObjective  # noqa: E402


def ours(batch: int, frames: int):
    model = MertObjective(ObjectiveConfig(cqt_weight=0.0, mixup_prob=0.0), Encoder(EncoderConfig()), {"km": [500]}).train()
    labels = {"km": torch.randint(0, 500, (batch, frames + 2, 1))}
    return model, lambda audio, lengths: model(audio, lengths, labels)[0]


def theirs(batch: int, frames: int):
    model = torchaudio.models.hubert_pretrain_base(num_classes=500).train()
    labels = torch.randint(0, 500, (batch, frames))

    def step(audio, lengths):  # torchaudio's hubert_loss: the positive logit is column 0; masked frames only
        logit_m, _, feature_penalty = model(audio, labels, lengths)
        targets = torch.zeros(len(logit_m), dtype=torch.long)
        return F.cross_entropy(logit_m, targets, reduction="sum") / len(logit_m) + 10 * feature_penalty
    return model, step


def time_step(step, model, audio, lengths) -> float:
    started = time.perf_counter()
    loss = step(audio, lengths)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = int(args.seconds * 24000)
    audio, lengths = 0.1 * torch.randn(args.batch, samples), torch.full((args.batch,), samples)
    frames = int(Encoder(EncoderConfig()).frames(samples))
    sides = {"ours": ours(args.batch, frames), "torchaudio": theirs(args.batch, frames)}
    times = {name: [] for name in sides}
    for round_ in range(args.rounds + 1):
        for name, (model, step) in sides.items():
            elapsed = time_step(step, model, audio, lengths)
            if round_:  # the first round warms up allocators and kernels
                times[name].append(elapsed)
    audio_seconds = args.batch * args.seconds
    print(f"batch {args.batch} x {args.seconds} s, {args.threads} threads, median of {args.rounds} steps")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<11} {median:7.3f} s/step   {audio_seconds / median:7.2f} audio-s/s")
    print(f"ratio ours / torchaudio: {statistics.median(times['ours']) / statistics.median(times['torchaudio']):.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
