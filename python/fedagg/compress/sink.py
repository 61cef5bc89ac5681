"""Where decoded payloads accumulate: a float64 vector on the host or on a GPU.

Every codec decodes by adding ``w * decode(payload)`` into a sink, straight
from the payload's buffers, so the aggregator never forms a dense float32
copy of a compressed update. ``HostSink`` runs fedagg._core's multithreaded
kernels; ``DeviceSink`` uploads the (small) payload buffers and runs
fedagg._cuda's kernels on the caller's current stream, into a float64
accumulator allocated by the caller's framework (torch or CuPy).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import numpy as np

from .. import _core, _gpu
from .._arrays import is_torch_tensor


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


class HostSink:
    """acc: float64 NumPy vector."""

    def __init__(self, length: int, like: Any = None):
        self.acc = np.zeros(length)
        self._torch = like is not None and is_torch_tensor(like)

    def scratch(self, length: int) -> "HostSink":
        return HostSink(length)

    def reset(self) -> None:
        self.acc[...] = 0.0

    def scatter_add(self, idx: np.ndarray, val: np.ndarray, w: float) -> None:
        _core.scatter_add(self.acc, _c(idx), _c(val), w)

    def uniform_add(self, lo, step, codes, bits: int, bucket: int, w: float) -> None:
        _core.dequantize_uniform_add(self.acc, _c(lo), _c(step), _c(codes), bits, bucket, w)

    def qsgd_add(self, norm, codes, s: int, bucket: int, w: float) -> None:
        _core.dequantize_qsgd_add(self.acc, _c(norm), _c(codes), s, bucket, w)

    def sign_add(self, scale, signs, bucket: int, w: float) -> None:
        _core.dequantize_sign_add(self.acc, _c(scale), _c(signs), bucket, w)

    def levels_add(self, scale, codes, levels: np.ndarray, bits: int, block: int, w: float) -> None:
        per, mask = 8 // bits, (1 << bits) - 1
        nb = scale.size
        idx = ((codes[:, None] >> (np.arange(per, dtype=np.uint8) * bits)) & mask).reshape(nb, block)
        self.acc += (w * scale.astype(np.float64)[:, None] * levels[idx]).reshape(-1)

    def dense_add(self, off: int, values: np.ndarray, w: float) -> None:
        self.acc[off:off + values.size] += w * values.astype(np.float64)

    def add_rotated_back(self, z: "HostSink", block: int, seed: int) -> None:
        """acc += the inverse rotation of z (float32, as the encoder rotated), cut to len(acc)."""
        y = z.acc.astype(np.float32)
        _core.hadamard_rotate(y, block, seed, True)
        self.acc += y[: self.acc.size]

    def sign_votes(self, payloads) -> Any:
        votes = np.zeros(self.acc.size, dtype=np.int32)
        for p in payloads:
            _core.sign_vote_add(votes, _c(p.buffers["signs"]))
        return self._out(np.sign(votes).astype(np.float32))

    def empty_rows(self, n: int) -> Any:
        return self._out(np.empty((n, self.acc.size), dtype=np.float32))

    def copy_row(self, out, i: int) -> None:
        out[i] = self.acc if isinstance(out, np.ndarray) else self._out(self.acc)

    def result(self) -> Any:
        return self._out(self.acc.astype(np.float32))

    def _out(self, x: np.ndarray) -> Any:
        return sys.modules["torch"].from_numpy(x) if self._torch else x


class DeviceSink:
    """acc: float64 vector on the device of `lib` (a _gpu._TorchLib or _CupyLib)."""

    def __init__(self, length: int, lib):
        if _gpu._cuda is None:
            raise RuntimeError("fedagg was built without the CUDA backend (fedagg.backends())")
        self.lib = lib
        self.acc = lib.zeros((length,), "float64")
        self._keep = []  # uploaded buffers, alive until the sink is dropped (stream order)

    def scratch(self, length: int) -> "DeviceSink":
        return DeviceSink(length, self.lib)

    def reset(self) -> None:
        self.acc[...] = 0.0

    def _up(self, a: np.ndarray) -> int:
        buf = self.lib.from_host(_c(a))
        self._keep.append(buf)
        return self.lib.ptr(buf)

    def _launch(self, fn, *args) -> None:
        with self.lib.activate():
            fn(*args, self.lib.stream())

    @property
    def _acc(self) -> int:
        return self.lib.ptr(self.acc)

    def scatter_add(self, idx: np.ndarray, val: np.ndarray, w: float) -> None:
        if idx.size:
            self._launch(_gpu._cuda.scatter_add, self._acc, self._up(idx), idx.dtype.itemsize, self._up(val),
                         idx.size, w)

    def uniform_add(self, lo, step, codes, bits: int, bucket: int, w: float) -> None:
        self._launch(_gpu._cuda.dequantize_uniform_add, self._acc, self._up(lo), self._up(step), self._up(codes),
                     self.acc.shape[0], bits, bucket, w)

    def qsgd_add(self, norm, codes, s: int, bucket: int, w: float) -> None:
        self._launch(_gpu._cuda.dequantize_qsgd_add, self._acc, self._up(norm), self._up(codes),
                     self.acc.shape[0], s, bucket, w)

    def sign_add(self, scale, signs, bucket: int, w: float) -> None:
        self._launch(_gpu._cuda.dequantize_sign_add, self._acc, self._up(scale), self._up(signs),
                     self.acc.shape[0], bucket, w)

    def levels_add(self, scale, codes, levels: np.ndarray, bits: int, block: int, w: float) -> None:
        self._launch(_gpu._cuda.dequantize_levels_add, self._acc, self._up(scale), self._up(codes),
                     self._up(np.asarray(levels, dtype=np.float64)), self.acc.shape[0], bits, block, w)

    def dense_add(self, off: int, values: np.ndarray, w: float) -> None:
        self.lib.axpy(self.acc[off:off + values.size], self.lib.from_host(values), w)

    def add_rotated_back(self, z: "DeviceSink", block: int, seed: int) -> None:
        y = self.lib.to_f32(z.acc)
        self._launch(_gpu._cuda.hadamard_rotate, self.lib.ptr(y), y.shape[0], block, seed, True)
        self._keep.append(y)
        self.lib.axpy(self.acc, y[: self.acc.shape[0]], 1.0)

    def sign_votes(self, payloads) -> Any:
        votes = self.lib.zeros((self.acc.shape[0],), "int32")
        for p in payloads:
            self._launch(_gpu._cuda.sign_vote_add, self.lib.ptr(votes), self._up(p.buffers["signs"]),
                         self.acc.shape[0])
        return self.lib.sign_f32(votes)

    def empty_rows(self, n: int) -> Any:
        return self.lib.empty((n, self.acc.shape[0]), "float32")

    def copy_row(self, out, i: int) -> None:
        out[i] = self.acc  # the framework casts float64 -> float32 on the device

    def result(self) -> Any:
        return self.lib.to_f32(self.acc)


def sink_for(length: int, like: Optional[Any]):
    """A sink whose result has the type and device of `like` (None: NumPy)."""
    if like is None or isinstance(like, np.ndarray):
        return HostSink(length)
    lib = _gpu.library_of(like)
    if lib is not None:
        return DeviceSink(length, lib)
    if is_torch_tensor(like):
        return HostSink(length, like)
    raise TypeError(f"like must be a NumPy array, a torch tensor or a CuPy array, got {type(like).__name__}")
