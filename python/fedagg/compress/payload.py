"""The wire format of a compressed update: one header frame plus raw buffers.

    header = b"FAGP" | version (uint16, little-endian) | n (uint32) | n bytes of UTF-8 JSON
    JSON   = {"codec": str, "d": int, "dtype": "float32", "params": {...},
              "buffers": [{"name", "dtype", "count"}]}
    (d and dtype: length and type of the decoded update; params: the codec's, seeds included)
    frames = [header, buffer_0, buffer_1, ...]   (each buffer: count * itemsize raw bytes, little-endian)

A transport sends the frames as they are (no copy of the buffers). Decoding
checks everything before touching the data: magic, version, header size, the
codec and its parameters, each buffer's dtype and exact byte length, and the
codec's own invariants (indices in range and increasing, finite values, ...).
Anything off raises PayloadError (a ValueError) naming the problem.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .. import _json

MAGIC = b"FAGP"
VERSION = 1
MAX_HEADER = 1 << 16  # bytes of JSON
MAX_D = 1 << 40
_DTYPES = {"int8": np.int8, "uint8": np.uint8, "uint32": np.uint32, "uint64": np.uint64, "float32": np.float32}
_PREFIX = struct.Struct("<4sHI")


class PayloadError(ValueError):
    """A payload that is truncated, oversized, inconsistent or not ours."""


@dataclass(frozen=True)
class Payload:
    codec: str
    d: int
    params: Dict[str, Any] = field(default_factory=dict)
    buffers: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (header included)."""
        return len(self.header()) + sum(b.nbytes for b in self.buffers.values())

    @property
    def bits_per_coordinate(self) -> float:
        return 8.0 * self.nbytes / self.d

    def header(self) -> bytes:
        meta = {
            "codec": self.codec,
            "d": int(self.d),
            "dtype": "float32",
            "params": self.params,
            "buffers": [{"name": k, "dtype": v.dtype.name, "count": int(v.size)} for k, v in self.buffers.items()],
        }
        body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        return _PREFIX.pack(MAGIC, VERSION, len(body)) + body

    def to_frames(self) -> List[Any]:
        """[header, buffer, ...]: the buffers as zero-copy memoryviews."""
        return [self.header()] + [memoryview(np.ascontiguousarray(b)).cast("B") for b in self.buffers.values()]

    @staticmethod
    def from_frames(frames: Sequence[Any]) -> "Payload":
        """Parse and check frames (bytes-like); raises PayloadError."""
        if not isinstance(frames, (list, tuple)) or len(frames) < 1:
            raise PayloadError("a payload is a non-empty list of frames")
        header = bytes(frames[0])
        if len(header) < _PREFIX.size:
            raise PayloadError(f"header truncated: {len(header)} bytes")
        magic, version, n = _PREFIX.unpack_from(header)
        if magic != MAGIC:
            raise PayloadError("not a fedagg payload (bad magic)")
        if version != VERSION:
            raise PayloadError(f"payload version {version} is not supported (this is {VERSION})")
        if n > MAX_HEADER or len(header) != _PREFIX.size + n:
            raise PayloadError(f"header length {len(header)} does not match its declared {n} + {_PREFIX.size}")
        try:
            meta = _json.loads(header[_PREFIX.size:], MAX_HEADER)
        except _json.UntrustedJSONError as e:
            raise PayloadError(f"header is not acceptable JSON: {e}") from None
        if not isinstance(meta, dict) or set(meta) != {"codec", "d", "dtype", "params", "buffers"}:
            raise PayloadError("header must hold exactly codec, d, dtype, params and buffers")
        if meta["dtype"] != "float32":
            raise PayloadError(f"decoded dtype {meta['dtype']!r} is not supported (float32)")
        codec, d, params, specs = meta["codec"], meta["d"], meta["params"], meta["buffers"]
        if not isinstance(codec, str) or not isinstance(params, dict) or not isinstance(specs, list):
            raise PayloadError("header fields have the wrong types")
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_D:
            raise PayloadError(f"d must be an integer in [1, 2^40], got {d!r}")
        if len(frames) != 1 + len(specs):
            raise PayloadError(f"header declares {len(specs)} buffers, {len(frames) - 1} frames follow")
        buffers: Dict[str, np.ndarray] = {}
        for spec, frame in zip(specs, frames[1:]):
            if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "count"}:
                raise PayloadError("each buffer spec holds exactly name, dtype and count")
            name, dtype, count = spec["name"], spec["dtype"], spec["count"]
            if not isinstance(name, str) or name in buffers:
                raise PayloadError(f"bad or repeated buffer name {name!r}")
            if dtype not in _DTYPES:
                raise PayloadError(f"buffer {name!r}: dtype {dtype!r} not allowed")
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_D:
                raise PayloadError(f"buffer {name!r}: bad count {count!r}")
            view = memoryview(frame).cast("B")
            want = count * np.dtype(_DTYPES[dtype]).itemsize
            if view.nbytes != want:
                raise PayloadError(f"buffer {name!r}: {view.nbytes} bytes, expected {want}")
            buffers[name] = np.frombuffer(view, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        from .codecs import codec_for  # the registry (codecs import this module)

        payload = Payload(codec, d, params, buffers)
        codec_for(codec).check(payload)
        return payload


def frames_nbytes(frames: Sequence[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames)


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise PayloadError(msg)


def check_buffers(p: Payload, names: Tuple[str, ...]) -> None:
    _expect(tuple(p.buffers) == names, f"{p.codec} payload needs buffers {names}, got {tuple(p.buffers)}")
