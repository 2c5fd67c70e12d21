"""Atomic writes and readable JSON errors, shared by every stage that writes files."""
from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """`write(tmp)` fills a temporary file (a path in the same folder as `path`, named `NAME.XXXX.tmp`), which is
    then fsynced and renamed over `path`: `path` is never half written, and a killed write leaves only the
    temporary file (`remove_temporaries`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, payload: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def remove_temporaries(paths: list[str]) -> int:
    """Removes the `NAME.XXXX.tmp` files that atomic writes of these final paths left when killed before their
    rename; returns how many. Only for paths this process alone writes (another writer's may be live)."""
    removed = 0
    for path in paths:
        for leftover in glob.glob(glob.escape(path) + ".*.tmp"):
            os.remove(leftover)
            removed += 1
    return removed


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str, what: str) -> Any:
    """Read JSON, or fail with a message that names the file and what it should hold."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing {what}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}. Delete it and re-run the stage that writes it.") from None


def fingerprint(path: str) -> str:
    """sha256 of what a model path holds: a checkpoint folder's manifest (complete.json lists every file's size
    and crc32, so it changes with any of them), or a file's bytes."""
    import hashlib

    target = os.path.join(path, "complete.json") if os.path.isdir(path) else path
    digest = hashlib.sha256()
    with open(target, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
