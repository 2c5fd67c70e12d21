"""What a checkpoint's checksums cost: streaming crc32 (pretrain.checkpoint.crc32_of, as saves and loads run
it) against reading the same file plainly, same file, same process, interleaved rounds.

    python bench/checkpoint_hash.py [--gb 1.0] [--rounds 5] [--dir /tmp]

A file of --gb gigabytes of random bytes is written to --dir (use the checkpoint filesystem to include
its read speed; the page cache holds the file after the first round, as it holds a checkpoint just
written), then each round reads it plainly in the same chunks and hashes it. Prints the medians in
GB/s, the ratio hash / read (1.0: the hash is free next to the read) and the seconds it adds to a
MERT-330M checkpoint (315M parameters, bf16 weights + fp32 master + Adam moments: 14 bytes each).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.checkpoint import HASH_CHUNK, crc32_of  # noqa: E402

MERT_330M_CHECKPOINT_BYTES = 315.4e6 * 14


def read_plainly(path: str) -> None:
    with open(path, "rb") as file:
        while file.read(HASH_CHUNK):
            pass


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as file:
        for start in range(0, size, HASH_CHUNK):
            file.write(os.urandom(min(HASH_CHUNK, size - start)))


def timed(job, path: str) -> float:
    started = time.perf_counter()
    job(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    path = os.path.join(args.dir, f"checkpoint_hash_bench.{os.getpid()}.bin")
    try:
        write_random(path, size)
        read_plainly(path)  # warm the page cache, as a save leaves it
        times = {"read": [], "crc32": []}
        for _ in range(args.rounds):
            times["read"].append(timed(read_plainly, path))
            times["crc32"].append(timed(crc32_of, path))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    read, crc = (statistics.median(times[k]) for k in ("read", "crc32"))
    print(f"file: {size / 1e9:.2f} GB in {args.dir}, {args.rounds} rounds, chunks of {HASH_CHUNK >> 20} MiB, one core")
    print(f"plain read  {size / read / 1e9:6.2f} GB/s")
    print(f"crc32       {size / crc / 1e9:6.2f} GB/s   ({crc / (size / 1e9):.2f} s per GB)")
    print(f"ratio crc32 / read time: {crc / read:.2f}")
    print(f"MERT-330M checkpoint ({MERT_330M_CHECKPOINT_BYTES / 1e9:.1f} GB): {MERT_330M_CHECKPOINT_BYTES / size * crc:.1f} s "
          "of crc32 in all, split over the ranks at a save and at a load")


if __name__ == "__main__":
    main()
