"""Sequential reading of WebDataset tar shards by sample, resumable from any sample's byte offset.

Our shards are plain USTAR archives written by `data.shards` (`name` is
`KEY.EXT`, members of one sample are adjacent), so the 512-byte headers are
parsed here directly: tarfile's generality costs more than decoding the
crop of a sample does.

Members named in `lazy` are not read: they come back as a `Member`, whose
`open()` gives a seekable file over just that member, so a decoder reads
only the bytes it needs and a shuffle buffer holds references, not audio.
`OpenFiles` keeps the last few shards open for `pread`s into members (a WAV crop is one read).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterator

BLOCK = 512
REGULAR_FILE = (b"0", b"\0")


@dataclass(frozen=True)
class Member:
    """Where one tar member's bytes lie."""

    path: str
    offset: int
    size: int

    def open(self, buffer_size: int = 1 << 16) -> io.BufferedReader:
        return io.BufferedReader(MemberFile(self), buffer_size)


class MemberFile(io.RawIOBase):
    """A read-only, seekable file over one member of a tar file."""

    def __init__(self, member: Member):
        self.member, self.position = member, 0
        self.file = open(member.path, "rb", buffering=0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.member.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.member.size - self.position))
        got = os.preadv(self.file.fileno(), [memoryview(buffer)[:count]], self.member.offset + self.position) if count else 0
        self.position += got
        return got

    def close(self) -> None:
        self.file.close()
        super().close()


class OpenFiles:
    """Read-only descriptors of the last `keep` tar files read from, for positional reads inside members.
    A process of its own (a forked loader worker) starts with none; pickling drops them."""

    def __init__(self, keep: int = 8):
        self.keep, self.fds, self.pid = keep, {}, os.getpid()

    def __getstate__(self) -> dict:
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])

    def _fd(self, path: str) -> int:
        if self.pid != os.getpid():  # inherited from the parent: its descriptors are not ours to reuse
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.fds) >= self.keep:
                os.close(self.fds.pop(next(iter(self.fds))))  # the least recently used
        self.fds[path] = fd
        return fd

    def read(self, member: Member, count: int, position: int = 0) -> bytes:
        """Up to `count` bytes of `member` from `position` (fewer at its end)."""
        count = max(0, min(count, member.size - position))
        return os.pread(self._fd(member.path), count, member.offset + position) if count else b""

    def read_into(self, member: Member, buffer, position: int) -> int:
        """Fills `buffer` (a writable buffer, e.g. a numpy array) from `member` at `position`; bytes read."""
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), member.size - position))
        return os.preadv(self._fd(member.path), [view[:count]], member.offset + position) if count else 0

    def close(self) -> None:
        if self.pid == os.getpid():
            for fd in self.fds.values():
                os.close(fd)
        self.fds = {}


def _header_size(header: bytes, path: str, at: int) -> int:
    """Member size after checking the header checksum; ValueError names the shard and byte."""
    stored = header[148:156].rstrip(b" \0")
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    try:
        ok = int(stored or b"-1", 8) == computed
        size = int(header[124:136].rstrip(b" \0") or b"0", 8)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{path}: corrupt tar header at byte {at}; rebuild this shard with `python -m data.shards build`")
    return size


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8").rsplit("/", 1)[-1]


def read_samples(path: str, offset: int = 0, lazy: tuple[str, ...] = ()) -> Iterator[tuple[int, int, str, dict]]:
    """(start, next_start, key, {ext: bytes, or Member if ext in lazy}) for each sample from byte `offset` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        at, start, key, parts = offset, offset, None, {}
        while len(header := f.read(BLOCK)) == BLOCK and header.count(0) < BLOCK:
            size = _header_size(header, path, at)
            padded = -(-size // BLOCK) * BLOCK
            if header[156:157] in REGULAR_FILE:
                member_key, _, ext = _member_name(header).partition(".")
                if key is not None and member_key != key:
                    yield start, at, key, parts
                    start, parts = at, {}
                key, parts[ext] = member_key, Member(path, at + BLOCK, size) if ext in lazy else f.read(size)
                if ext not in lazy and len(parts[ext]) < size:
                    raise ValueError(f"{path}: truncated at byte {at}; rebuild this shard with `python -m data.shards build`")
            at += BLOCK + padded
            f.seek(at)
        if key is not None:
            yield start, at, key, parts


def read_one(path: str, offset: int, lazy: tuple[str, ...] = ()) -> tuple[str, dict]:
    for _, _, key, parts in read_samples(path, offset, lazy):
        return key, parts
    raise ValueError(f"{path}: no sample at byte {offset}")
