"""Read-only windows on a file, so large archives are validated and loaded without reading them into memory.

A :class:`FileWindow` looks like ``bytes`` to the zip checks (``len``, slices, ``rfind``) and like a binary
file to :mod:`zipfile` (``read``/``seek``/``tell``); a stored zip member (a nested ``program.pt2``, a weight
payload) becomes another window on the same file, and :meth:`FileWindow.read_into` copies one straight into a
tensor's memory. The OS page cache holds the file, so nothing of it counts towards the process's own memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from typing import IO, Any

import torch

from lowrank_compiler.errors import LoadError

CHUNK = 16 << 20  # bytes per read when streaming a member into a tensor


class FileWindow(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open binary file, read with ``os.pread`` (no shared position)."""

    def __init__(self, f: IO[bytes], start: int = 0, size: int | None = None) -> None:
        super().__init__()
        self.f, self.fd, self.start = f, f.fileno(), start
        self.size = os.fstat(self.fd).st_size - start if size is None else size
        self.pos = 0

    # -- bytes-like, for the end-record checks
    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a FileWindow is sliced with [a:b] only")
        lo, hi, _ = key.indices(self.size)
        return os.pread(self.fd, max(0, hi - lo), self.start + lo) if hi > lo else b""

    def rfind(self, sub: bytes, start: int = 0) -> int:
        i = self[start:].rfind(sub)
        return i + start if i >= 0 else -1

    # -- file-like, for zipfile
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, {0: 0, 1: self.pos, 2: self.size}[whence] + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        data = self[self.pos:end]
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def read_into(self, out: torch.Tensor, crc: int, source: str) -> None:
        """Copy the whole window into ``out`` (a contiguous uint8 tensor of ``len(self)`` bytes), CRC-checked."""
        view = memoryview(out.numpy()).cast("B")
        got, done = 0, 0
        while done < self.size:
            n = os.preadv(self.fd, [view[done:done + min(CHUNK, self.size - done)]], self.start + done)
            if n <= 0:
                raise LoadError(f"{source}: the file ended inside a weight payload")
            got = zlib.crc32(view[done:done + n], got)
            done += n
        if got != crc:
            raise LoadError(f"{source}: a weight payload is corrupt (CRC mismatch)")


def check_crc(win: FileWindow, crc: int, source: str) -> None:
    """Stream the window through CRC-32 (a bounded buffer, reused) and compare with the zip's record."""
    buf = bytearray(min(CHUNK, max(1, len(win))))
    got, done = 0, 0
    while done < len(win):
        n = os.preadv(win.fd, [memoryview(buf)[:min(CHUNK, len(win) - done)]], win.start + done)
        if n <= 0:
            raise LoadError(f"{source}: the file ended inside a zip member")
        got = zlib.crc32(memoryview(buf)[:n], got)
        done += n
    if got != crc:
        raise LoadError(f"{source}: zip member is corrupt (CRC mismatch)")


def as_file(data: bytes | FileWindow) -> IO[bytes]:
    """``data`` as something :class:`zipfile.ZipFile` can read."""
    return data if isinstance(data, FileWindow) else io.BytesIO(data)  # type: ignore[return-value]


def member_window(z: zipfile.ZipFile, name: str, source: str, crc: bool = False) -> FileWindow:
    """A window on the bytes of the stored member ``name`` of ``z`` (which must read a :class:`FileWindow`);
    ``crc=True`` checks the member's CRC first (a streamed pass, no copy)."""
    win = z.fp
    try:
        info = z.getinfo(name)
    except KeyError:
        raise LoadError(f"{source}: missing zip member {name!r}") from None
    if not isinstance(win, FileWindow):  # zipfile keeps the file it was given as .fp
        raise LoadError(f"{source}: internal: member windows need an archive opened on a file")
    head = win[info.header_offset:info.header_offset + 30]
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise LoadError(f"{source}: zip member {name!r} has no local header where the directory says")
    n_name, n_extra = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + n_name + n_extra
    if start + info.file_size > len(win):
        raise LoadError(f"{source}: zip member {name!r} runs past the end of the file")
    out = FileWindow(win.f, win.start + start, info.file_size)
    out.crc = info.CRC  # type: ignore[attr-defined]
    if crc:
        check_crc(out, info.CRC, f"{source}: zip member {name!r}")
    return out


def weights_on_meta(config: Any) -> bytes:
    """A validated weights config with every tensor declared on the meta device (no bytes allocated)."""
    for entry in config["config"].values():
        entry["tensor_meta"]["device"] = {"type": "meta", "index": None}
    return json.dumps(config).encode()
