"""EnCodec teacher (MERT's acoustic targets): 24 kHz EnCodec RVQ codes, 8 codebooks x 1024 at 75 Hz at 6 kbps.

    python -m teachers.encodec dump --shards SHARDS --weights encodec_24khz-d7cc33bc.th [--labels DIR]
                                    [--bandwidth 6] [--device auto] [--workers N] [--batch B] [--rank R --world W]

Code frame t of EnCodec's 320x-downsampling encoder is label frame t
(samples [320 t, 320 t + 320)); a segment of N samples keeps N // 320 frames.
Weights: `--weights PATH` (the official `encodec_24khz-d7cc33bc.th`), else the
encodec package's own download (torch hub cache) when the network allows.
`--random-init` builds a randomly initialised model (seeded) for tests and
smoke runs only; the manifest records `random_init: true`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys

import torch

from data.audio import FRAME_SAMPLES
from data.cluster import local_device
from data.logs import logger, setup_logging
from teachers.dump import dump, format_report, restart_with_tuned_malloc
from teachers import TeacherError

WEIGHTS_NAME = "encodec_24khz-d7cc33bc.th"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + WEIGHTS_NAME
BANDWIDTH_CODEBOOKS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
log = logger(__name__)


def load_state(weights: str | None) -> dict:
    if weights is not None:
        if not os.path.isfile(weights):
            raise TeacherError(f"{weights}: no such EnCodec weights file; download {WEIGHTS_URL} and pass its path")
        return torch.load(weights, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location="cpu", check_hash=True)
    except Exception as e:  # no network, proxy refusal, bad cache: all end in the same advice
        raise TeacherError(
            f"could not get the pretrained EnCodec weights ({type(e).__name__}: {e}). On a machine with internet access "
            f"download {WEIGHTS_URL}, copy it here and pass --weights PATH (or put it in "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}). --random-init exists for tests only."
        ) from None


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def init_codebooks(model, seconds: float = 20.0) -> None:
    """Random init leaves every RVQ codebook at zero (training k-means-initialises it on the first batch),
    so every code would be 0; instead make each codebook's entries residual latents of seeded noise."""
    residual = model.encoder(0.1 * torch.randn(1, 1, int(seconds * model.sample_rate)))
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        latents = layer.project_in(residual.transpose(1, 2)).reshape(-1, book.embed.shape[1])
        book.embed.copy_(latents[torch.randperm(len(latents))[: len(book.embed)]])
        book.inited.fill_(1.0)
        residual = residual - layer.decode(layer.encode(residual))


class EncodecTeacher:
    """encode(wave [N]) -> RVQ codes [N // 320, codebooks] from the 24 kHz EnCodec encoder."""

    name = "encodec"
    cardinality = 1024

    def __init__(self, weights: str | None = None, bandwidth: float = 6.0, device: str = "cpu",
                 random_init: bool = False, seed: int = 0):
        from encodec import EncodecModel  # imports torchaudio; keep it out of the import of this module

        if float(bandwidth) not in BANDWIDTH_CODEBOOKS:
            raise TeacherError(f"bandwidth {bandwidth}: use one of {sorted(BANDWIDTH_CODEBOOKS)} kbps")
        if random_init:
            torch.manual_seed(seed)
        model = EncodecModel.encodec_model_24khz(pretrained=False)
        if random_init:
            init_codebooks(model)
        else:
            model.load_state_dict(load_state(weights))
        model.set_target_bandwidth(float(bandwidth))
        self.model = model.eval().to(device)
        self.device, self.random_init = torch.device(device), random_init
        self.codebooks = BANDWIDTH_CODEBOOKS[float(bandwidth)]
        # A random-init model is named by its seed: its codebooks come from running the encoder, whose float
        # results (so a hash of the weights) vary with the thread count, and a re-run must match its folder.
        weights_id = f"random-init seed {seed}" if random_init else state_hash(model)
        self.config_hash = hashlib.sha256(f"{weights_id} {float(bandwidth)}".encode()).hexdigest()

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        return self.encode_batch([wave])[0]

    def encode_batch(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Codes [len // 320, codebooks] of each wave, encoded together: zero-padded at the end to the longest,
        which leaves every real frame's codes as they are alone, since the 24 kHz model is causal (up to
        float rounding: a batch's other kernels flip ~0.1% of near-tied codes, as another device does)."""
        frames = [len(wave) // FRAME_SAMPLES for wave in waves]
        x = torch.zeros(len(waves), 1, max(frames) * FRAME_SAMPLES, pin_memory=self.device.type == "cuda")
        for row, wave, count in zip(x, waves, frames):
            row[0, : count * FRAME_SAMPLES] = wave[: count * FRAME_SAMPLES]
        codes = self.model.encode(x.to(self.device, non_blocking=True))[0][0]  # one frame (no segmenting): [B, K, T]
        return [book[:, :count].T for book, count in zip(codes, frames)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m teachers.encodec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["dump"])
    parser.add_argument("--shards", required=True, help="shard folder (data.shards build --out)")
    parser.add_argument("--labels", help="where sidecars go (default: SHARDS/labels/encodec)")
    parser.add_argument("--weights", help=f"local {WEIGHTS_NAME}")
    parser.add_argument("--random-init", action="store_true", help="TESTS ONLY: random weights (seeded), marked in the manifest")
    parser.add_argument("--bandwidth", type=float, default=6.0, help="kbps: 1.5, 3, 6 (8 codebooks), 12 or 24")
    parser.add_argument("--device", default=default_device(),
                        help="cuda (the default with a GPU: cuda:LOCAL_RANK when a node shows several) or cpu")
    parser.add_argument("--workers", type=int, default=1, help="CPU processes (one process on a GPU)")
    parser.add_argument("--batch", type=int, help="segments encoded together (default: 16 on a GPU, 1 on CPU)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    args = parser.parse_args(argv)
    setup_logging(args.rank)
    if args.random_init and args.weights:
        parser.error("--random-init and --weights exclude each other")
    workers = 1 if args.device.startswith("cuda") else args.workers
    device = local_device(args.device)
    make_teacher = functools.partial(EncodecTeacher, args.weights, args.bandwidth, device, args.random_init)
    labels = args.labels or os.path.join(args.shards, "labels", "encodec")
    batch = args.batch if args.batch is not None else (16 if args.device.startswith("cuda") else 1)
    if batch < 1:
        parser.error(f"--batch {batch}: use 1 or more segments")
    try:
        report = dump(make_teacher, args.shards, labels, workers, args.rank, args.world, batch=batch)
    except (TeacherError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if args.random_init:
        log.warning("random-init EnCodec: the codes in %s are for tests, not for pretraining", labels)
    print(format_report(report), file=sys.stderr)


if __name__ == "__main__":
    restart_with_tuned_malloc(["-m", "teachers.encodec", *sys.argv[1:]])
    main()
