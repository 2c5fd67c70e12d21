"""Our FAISS k-means fit against scikit-learn MiniBatchKMeans as fairseq's HuBERT recipe runs it, on this machine.

    python bench/kmeans.py [--frames 50000] [--minutes M] [--cases logmel,mfcc] [--iterations 20]
                           [--threads N] [--seed 0]
    python bench/kmeans.py --frames 200000        # full size (sklearn alone takes ~15 min per case on 2 cores)

Needs the `bench` extra (`pip install -e '.[bench]'`, pins scikit-learn).

It generates the demo corpus (synth.demo) in a temporary folder, decodes every
track to mono 24 kHz as the sharder does (data.audio.stream_mono: soundfile + soxr) and
computes teacher features (data.features), then subsamples `--frames`
frames with a seeded RNG. Cases:
  logmel   229-d log-mel, k=300   (MERT v0's log-mel stream)
  mfcc     39-d MFCC + deltas, k=500 (MusicHuBERT)
Per case, on the same frames:
  faiss    teachers.kmeans.train_kmeans (standardises per dimension, FAISS k-means, `--iterations`)
  sklearn  MiniBatchKMeans with fairseq examples/hubert/simple_kmeans/learn_kmeans.py's settings
           (batch_size=10000, k-means++, n_init=20, max_iter=100, tol=0, max_no_improvement=100,
           init_size=None, reassignment_ratio=0, compute_labels=False), fitted on the data standardised
           with the mean/std train_kmeans returned, so both cluster identical data.
Both inertias are computed here the same way: the sum over all frames of the squared distance to
the nearest centroid (FAISS IndexFlatL2, summed in float64) on that standardised data.
It prints time ratio = sklearn s / faiss s and inertia ratio = faiss / sklearn inertia;
target: time ratio >= 10 with inertia ratio <= 1.01. Both libraries get `--threads` threads
(OMP/BLAS env vars set before numpy is imported, plus faiss.omp_set_num_threads and threadpoolctl).
Timings are single runs: on a shared, noisy CPU expect a few percent of jitter.
"""
from __future__ import annotations

import argparse
import os
import sys

CASES = {"logmel": ({"kind": "logmel", "n_mels": 229}, 300),
         "mfcc": ({"kind": "mfcc", "n_mfcc": 13, "deltas": True}, 500)}
SKLEARN_SETTINGS = dict(batch_size=10000, init="k-means++", n_init=20, max_iter=100, tol=0.0,
                        max_no_improvement=100, init_size=None, reassignment_ratio=0.0, compute_labels=False)
TARGET_SPEEDUP, TARGET_INERTIA = 10.0, 1.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50_000, help="frames k-means sees per case")
    parser.add_argument("--minutes", type=float, help="demo corpus size (default: enough for --frames, +10%%)")
    parser.add_argument("--cases", default="logmel,mfcc", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--iterations", type=int, default=20, help="FAISS k-means iterations (teacher default 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both libraries (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="frame sampling and both k-means seeds")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in args.cases if c not in CASES]:
        parser.error(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when numpy / sklearn / faiss load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
from sklearn.cluster import MiniBatchKMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from synth import demo  # noqa: E402
from data.audio import FRAME_RATE, SAMPLE_RATE, stream_mono  # noqa: E402
from data.features import FeatureConfig, FeatureExtractor  # noqa: E402
from teachers.kmeans import train_kmeans  # noqa: E402

if ARGS is not None and ARGS.minutes is None:  # after the imports: data.audio loads numpy
    ARGS.minutes = round(ARGS.frames / FRAME_RATE / 60 * 1.1 + 0.5, 1)


def load_corpus(minutes: float, seed: int) -> list[np.ndarray]:
    """The demo corpus as mono 24 kHz float32 tracks."""
    with tempfile.TemporaryDirectory() as folder:
        records = demo.generate(folder, minutes=minutes, seed=seed)
        return [np.concatenate(list(stream_mono(os.path.join(folder, record["file"])))) for record in records]


def sample_features(tracks: list[np.ndarray], features: dict, frames: int, seed: int) -> np.ndarray:
    extract = FeatureExtractor(FeatureConfig(**features))
    x = np.concatenate([extract(torch.from_numpy(t)).numpy() for t in tracks])
    if len(x) < frames:
        print(f"  (only {len(x)} frames in the corpus, fewer than --frames {frames}; raise --minutes)")
    keep = np.sort(np.random.default_rng(seed).choice(len(x), size=min(frames, len(x)), replace=False))
    return np.ascontiguousarray(x[keep], dtype=np.float32)


def inertia(xn: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over all rows of the squared L2 distance to the nearest centroid."""
    index = faiss.IndexFlatL2(xn.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, _ = index.search(xn, 1)
    return float(np.maximum(distances, 0).sum(dtype=np.float64))


def fit_faiss(x: np.ndarray, k: int, iterations: int, seed: int) -> tuple[dict, float]:
    started = time.perf_counter()
    result = train_kmeans(x, k, iterations, seed, normalize=True, what="bench")
    return result, time.perf_counter() - started


def fit_sklearn(xn: np.ndarray, k: int, seed: int, threads: int) -> tuple[np.ndarray, float]:
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, **SKLEARN_SETTINGS)
    with threadpool_limits(limits=threads):
        started = time.perf_counter()
        km.fit(xn)
        seconds = time.perf_counter() - started
    return km.cluster_centers_, seconds


def run_case(name: str, tracks: list[np.ndarray], args: argparse.Namespace) -> None:
    features, k = CASES[name]
    x = sample_features(tracks, features, args.frames, args.seed)
    faiss_fit, faiss_s = fit_faiss(x, k, args.iterations, args.seed)
    xn = np.ascontiguousarray((x - faiss_fit["mean"]) / faiss_fit["std"], dtype=np.float32)
    sk_centroids, sk_s = fit_sklearn(xn, k, args.seed, args.threads)
    faiss_inertia, sk_inertia = inertia(xn, faiss_fit["centroids"]), inertia(xn, sk_centroids)
    speedup, quality = sk_s / faiss_s, faiss_inertia / sk_inertia
    verdict = "PASS" if speedup >= TARGET_SPEEDUP and quality <= TARGET_INERTIA else "MISS"
    print(f"{name}: {len(x)} frames x {x.shape[1]}-d, k={k}, faiss iterations={args.iterations}")
    print(f"  seconds   faiss {faiss_s:8.1f}   sklearn {sk_s:8.1f}   time ratio (sklearn/faiss) {speedup:6.1f}x")
    print(f"  inertia   faiss {faiss_inertia:12.5g}   sklearn {sk_inertia:12.5g}   ratio (faiss/sklearn) {quality:.4f}"
          f"   per frame {faiss_inertia / len(x):.3f} vs {sk_inertia / len(x):.3f}")
    print(f"  {verdict}  (target: >= {TARGET_SPEEDUP:g}x faster at inertia ratio <= {TARGET_INERTIA})", flush=True)


def main(args: argparse.Namespace) -> None:
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads each; "
          f"faiss {faiss.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}")
    print(f"sklearn MiniBatchKMeans: {', '.join(f'{k}={v!r}' for k, v in SKLEARN_SETTINGS.items())}")
    started = time.perf_counter()
    tracks = load_corpus(args.minutes, args.seed)
    audio_s = sum(len(t) for t in tracks) / SAMPLE_RATE
    print(f"corpus: demo, {len(tracks)} tracks, {audio_s / 60:.1f} min ({time.perf_counter() - started:.0f} s to make)",
          flush=True)
    for name in args.cases:
        run_case(name, tracks, args)


if __name__ == "__main__":
    main(ARGS)
