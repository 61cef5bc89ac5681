"""The CUDA backend's ops (see _ops.py for the contract).

Updates that are CUDA tensors (torch) or CuPy arrays stay on their device:
the kernels of fedagg._cuda read them through their device pointers, on the
caller's current stream, and results are allocated by the caller's framework
on the same device (so they come from its caching allocator and keep its
stream semantics). Row-pointer tables, coefficients and scratch buffers are
allocated the same way and released in stream order.
"""

from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

from . import _core

try:
    from . import _cuda
except ImportError:  # built without the CUDA backend
    _cuda = None

_MODES = {"median": 0, "trimmed_mean": 1, "bulyan": 2}
_SMALL = 1 << 16  # host arrays up to this size are uploaded asynchronously from pinned memory


def compiled() -> bool:
    return _cuda is not None


def device_count() -> int:
    return _cuda.device_count() if _cuda is not None else 0


class _TorchLib:
    def __init__(self, device):
        self.torch = sys.modules["torch"]
        self.device = device

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def zeros(self, shape, dtype):
        return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def from_host(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if t.nbytes <= _SMALL:  # tables, coefficients: staged in pinned memory, not waited for
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def to_host(self, x) -> np.ndarray:
        return x.cpu().numpy()

    def ptr(self, x) -> int:
        return x.data_ptr()

    def row_stride(self, x) -> int:
        return x.stride(0) * x.element_size()

    def stream(self) -> int:
        return self.torch.cuda.current_stream(self.device).cuda_stream

    def activate(self):
        return self.torch.cuda.device(self.device)

    def copy_f32(self, x):
        return x.detach().reshape(-1).to(self.torch.float32, copy=True)

    def axpy(self, acc, x, w: float) -> None:
        acc.add_(x.double(), alpha=w)

    def finish_mean(self, acc, total: float):
        return (acc / total).float()

    def stack(self, rows):
        return self.torch.stack(rows)

    def to_f32(self, x):
        return x.to(self.torch.float32)

    def sign_f32(self, x):
        return self.torch.sign(x).to(self.torch.float32)


class _CupyLib:
    def __init__(self, device_id: int):
        self.cp = sys.modules["cupy"]
        self.device_id = device_id

    def empty(self, shape, dtype):
        with self.cp.cuda.Device(self.device_id):
            return self.cp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        with self.cp.cuda.Device(self.device_id):
            return self.cp.zeros(shape, dtype=dtype)

    def from_host(self, a: np.ndarray):
        with self.cp.cuda.Device(self.device_id):
            return self.cp.asarray(np.ascontiguousarray(a))

    def to_host(self, x) -> np.ndarray:
        return self.cp.asnumpy(x)

    def ptr(self, x) -> int:
        return x.data.ptr

    def row_stride(self, x) -> int:
        return x.strides[0]

    def stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def activate(self):
        return self.cp.cuda.Device(self.device_id)

    def copy_f32(self, x):
        return x.reshape(-1).astype(self.cp.float32, copy=True)

    def axpy(self, acc, x, w: float) -> None:
        acc += x.astype(self.cp.float64) * w

    def finish_mean(self, acc, total: float):
        return (acc / total).astype(self.cp.float32)

    def stack(self, rows):
        return self.cp.stack(rows)

    def to_f32(self, x):
        return x.astype(self.cp.float32)

    def sign_f32(self, x):
        return self.cp.sign(x).astype(self.cp.float32)


def library_of(x: Any):
    """The array library and device of a CUDA array, or None for host arrays."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _TorchLib(x.device) if x.is_cuda else None
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return _CupyLib(x.device.id)
    return None


class GpuOps:
    """fedagg._cuda on the device of `lib` (torch or CuPy)."""

    name = "cuda"

    def __init__(self, lib):
        if _cuda is None:
            raise RuntimeError("fedagg was built without the CUDA backend (fedagg.backends())")
        self.lib = lib

    # -- plumbing
    def _pointers(self, rows) -> Tuple[np.ndarray, int, int]:
        """Host table of row pointers (int64), n, d."""
        lib = self.lib
        if isinstance(rows, (list, tuple)):
            ptrs = np.array([lib.ptr(r) for r in rows], dtype=np.uint64)
            n, d = len(rows), int(rows[0].shape[0])
        else:
            n, d = int(rows.shape[0]), int(rows.shape[1])
            ptrs = np.uint64(lib.ptr(rows)) + np.arange(n, dtype=np.uint64) * np.uint64(lib.row_stride(rows))
        return ptrs.view(np.int64), n, d

    def _table(self, rows) -> Tuple[Any, int, int]:
        """Device table of row pointers, n, d."""
        ptrs, n, d = self._pointers(rows)
        return self.lib.from_host(ptrs), n, d

    def _launch(self, fn, *args):
        with self.lib.activate():
            fn(*args, self.lib.stream())

    # -- the op contract
    def weighted_sum(self, rows, coef: np.ndarray):
        lib = self.lib
        ptrs, n, d = self._pointers(rows)
        # One upload: the row pointers, the coefficients, and the zeroed flag the kernel raises
        # on a non-finite output (read back below: the call's only wait for the device).
        c = np.ascontiguousarray(coef, dtype=np.float64)
        blob = lib.from_host(np.concatenate([ptrs, c.view(np.int64), np.zeros(1, np.int64)]))
        base = lib.ptr(blob)
        out = lib.empty((d,), "float32")
        self._launch(_cuda.weighted_sum, base, n, d, base + 8 * n, lib.ptr(out), base + 16 * n)
        return out, not lib.to_host(blob[2 * n:]).any()

    def pairwise_sqdist(self, rows) -> np.ndarray:
        lib = self.lib
        table, n, d = self._table(rows)
        D = lib.empty((n, n), "float64")
        self._launch(_cuda.pairwise_sqdist, lib.ptr(table), n, d, lib.ptr(D))
        U = np.triu(lib.to_host(D), 1)
        U = U + U.T
        if not np.isfinite(U).all() and not self.nonfinite_rows(rows).any():
            # float32 squares overflowed (|x| >~ 1e19): the float64 distance kernel, row by row.
            listed = list(rows) if isinstance(rows, (list, tuple)) else [rows[i] for i in range(n)]
            U = np.stack([self.sqdist_to(rows, listed[k]) for k in range(n)])
        return U

    def sqdist_to(self, rows, x) -> np.ndarray:
        lib = self.lib
        table, n, d = self._table(rows)
        out = lib.empty((n,), "float64")
        self._launch(_cuda.sqdist_to, lib.ptr(table), n, d, 0 if x is None else lib.ptr(x), lib.ptr(out))
        return lib.to_host(out)

    def sqnorms(self, rows) -> np.ndarray:
        return self.sqdist_to(rows, None)

    def sorted_reduce(self, rows, mode: str, f: int):
        lib = self.lib
        table, n, d = self._table(rows)
        if n > _cuda.max_sorted_n():
            raise ValueError(f"{mode} on the GPU supports n <= {_cuda.max_sorted_n()}, got n = {n}")
        lo, hi = _core.sorting_network(n)
        lo_d, hi_d = lib.from_host(lo.view(np.int32)), lib.from_host(hi.view(np.int32))
        out = lib.empty((d,), "float32")
        flag = lib.zeros((1,), "int32")
        self._launch(_cuda.sorted_reduce, lib.ptr(table), n, d, _MODES[mode], f, lib.ptr(lo_d),
                     lib.ptr(hi_d), len(lo), lib.ptr(out), lib.ptr(flag))
        return out, bool(lib.to_host(flag)[0])

    def nonfinite_rows(self, rows) -> np.ndarray:
        lib = self.lib
        table, n, d = self._table(rows)
        out = lib.empty((n,), "int32")
        self._launch(_cuda.nonfinite_rows, lib.ptr(table), n, d, lib.ptr(out))
        return lib.to_host(out) != 0

    def mix(self, rows, A: np.ndarray):
        lib = self.lib
        table, n, d = self._table(rows)
        m = A.shape[0]
        Y = lib.empty((m, d), "float32")
        coef = lib.from_host(np.ascontiguousarray(A, dtype=np.float64))
        for i in range(m):
            self._launch(_cuda.weighted_sum, lib.ptr(table), n, d, lib.ptr(coef) + 8 * n * i,
                         lib.ptr(Y) + lib.row_stride(Y) * i, 0)
        return Y

    def zeros(self, d: int):
        return self.lib.zeros((d,), "float32")

    def copy(self, x):
        return self.lib.copy_f32(x)

    def scaled(self, x, s: float):
        return x * float(s)

    def to_device(self, x: np.ndarray):
        return self.lib.from_host(np.ascontiguousarray(x, dtype=np.float32))

    def stack(self, rows):
        return self.lib.stack(rows)

    def accumulator(self, d: int):
        return self.lib.zeros((d,), "float64")

    def axpy(self, acc, x, w: float) -> None:
        self.lib.axpy(acc, x, w)

    def finish_mean(self, acc, total: float):
        return self.lib.finish_mean(acc, total)
