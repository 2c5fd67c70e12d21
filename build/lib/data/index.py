"""The shard index: which shards exist, how much audio they hold, and a content hash.

`index.json` is written once every planned shard is complete. Teachers record
its `content_hash` in their manifests; the loader refuses labels made from
another shard set.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from data.files import atomic_write_json, read_json

INDEX_NAME = "index.json"
INDEX_FORMAT = "musicpt-shards/1"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.tar"


def summary_path(out_dir: str, shard_id: int) -> str:
    """A shard's summary; it is written after the tar is renamed, so it marks the shard done."""
    return os.path.join(out_dir, f"shard-{shard_id:06d}.json")


def content_hash(shards: list[dict]) -> str:
    lines = "".join(f"{s['name']} {s['sha256']}\n" for s in shards)
    return hashlib.sha256(lines.encode()).hexdigest()


def try_write_index(out_dir: str, plan: dict) -> dict | None:
    """Write index.json if every planned shard is done; return it, else None."""
    summaries = []
    for shard_id in range(len(plan["shards"])):
        path = summary_path(out_dir, shard_id)
        if not os.path.exists(path):
            return None
        summaries.append(read_json(path, "a shard summary"))
    skipped: dict[str, int] = {}
    for item in plan["skipped"] + [s for summary in summaries for s in summary["skipped"]]:
        skipped[item["reason"]] = skipped.get(item["reason"], 0) + 1
    shards = [{k: s[k] for k in ("name", "samples", "seconds", "bytes", "sha256")} for s in summaries]
    index = {
        "format": INDEX_FORMAT,
        "config": plan["config"],
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "hours": sum(s["seconds"] for s in shards) / 3600,
        "bytes": sum(s["bytes"] for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "content_hash": content_hash(shards),
    }
    atomic_write_json(os.path.join(out_dir, INDEX_NAME), index)
    return index


def read_index(shard_dir: str) -> dict[str, Any]:
    """Load and check an index; errors say which file is wrong and what to run."""
    path = os.path.join(shard_dir, INDEX_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no shard index. Build shards with `python -m data.shards build --input AUDIO --out {shard_dir}` "
            "(the index is written when every shard is done; re-run the build to finish an interrupted one)."
        )
    index = read_json(path, "a shard index")
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}; rebuild the shards.")
    for shard in index["shards"]:
        tar = os.path.join(shard_dir, shard["name"])
        if not os.path.exists(tar):
            raise FileNotFoundError(f"{tar}: listed in {path} but missing; re-run `python -m data.shards build` for {shard_dir}.")
    return index
