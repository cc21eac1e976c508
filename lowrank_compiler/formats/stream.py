"""Writers that stream tensors to an open file, one tensor at a time (no whole-file bytes in memory).

- :func:`write_safetensors`: the safetensors layout (8-byte header length, JSON header, payloads), read back by
  ``safetensors.safe_open`` / ``load`` like the library's own ``save``; the only extra memory is one CPU,
  contiguous copy of a tensor that is not already one.
- :class:`ForwardStream`: a write-only "seekable" stream ``torch.export.save`` accepts, forwarding into any
  writable (a zip member, an open file), so a program archive is written as it is produced.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _payload(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 CPU tensor (a view when ``t`` is already CPU and contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def write_safetensors(f: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` to the open binary file ``f`` in the safetensors format; returns the bytes written.

    Tensors are ordered as ``safetensors.torch.save`` orders them (larger items first, then by name).
    Raises ValueError for a dtype safetensors has no name for.
    """
    bad = [f"{k}: {v.dtype}" for k, v in tensors.items() if v.dtype not in _DTYPES]
    if bad:
        raise ValueError(f"safetensors cannot hold {bad[:3]}; valid dtypes: {', '.join(map(str, _DTYPES))}")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # payloads start 8-byte aligned, as the library writes them
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for k in order:
        data = _payload(tensors[k])
        if data.numel():
            f.write(memoryview(data.numpy()))
    return 8 + len(raw) + offset


class ForwardStream(io.RawIOBase):
    """A write-only stream ``torch.export.save`` accepts (it asks for a seekable file and seeks to 0 when done).

    An OSError (disk full, file-size limit) is held and raised by :meth:`done`: raised inside torch's C++
    writer it would abort the process when the writer is destroyed.
    """

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out, self.n, self.error = out, 0, None

    def done(self) -> None:
        """Raise the OSError the target raised while torch was writing, if any."""
        if self.error is not None:
            raise self.error

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.error is None:
            try:
                self.out.write(b)
            except OSError as e:
                self.error = e
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.n  # only the final rewind comes here; nothing is written after it
