"""Input handling at the boundary: array-likes in, zero-copy float32 rows out.

Updates arrive as one ``(n, d)`` array or as a sequence of ``n`` arrays of one
shape: NumPy arrays, torch tensors (CPU or CUDA) or CuPy arrays. float32 input
whose rows are contiguous reaches the kernels without a copy. On the CPU,
float16 and bfloat16 batches do too: the kernels read them through float32
tiles of a few thousand coordinates (bfloat16 travels as its uint16 bit
patterns, NumPy having no bfloat16), with the bits of a float32 batch widened
beforehand. float64 input, half precision on a GPU and single vectors are
converted to float32 (one copy, on the input's device). The result has the
caller's type, dtype and device: torch in, torch out; CUDA in, CUDA out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

from . import _gpu
from ._ops import CPU

_FLOAT_KINDS = ("float16", "float32", "float64")


def is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass
class Batch:
    """n updates of d coordinates as the kernels take them, with the ops of their device."""

    rows: Any  # a 2-D float32 array with contiguous rows, or a list of 1-D float32 arrays
    n: int
    d: int
    wrap: Callable[[Any], Any]  # float32 (d,) result -> caller's type, dtype and shape
    keepalive: List[Any] = field(default_factory=list)
    ops: Any = CPU

    def row(self, i: int) -> Any:
        return self.rows[i]

    def subset(self, index: Sequence[int]) -> "Batch":
        """The updates at `index`, as views (no data is copied)."""
        rows = [self.rows[int(i)] for i in index]
        return Batch(rows, len(rows), self.d, self.wrap, self.keepalive, self.ops)

    def with_rows(self, rows: Any) -> "Batch":
        """Other rows (clipped, mixed, ...) of the same d on the same device."""
        return Batch(rows, len(rows), self.d, self.wrap, self.keepalive, self.ops)


def convert(x: Any, name: str, keep_half: bool = False) -> Tuple[Any, Callable[[Any], Any], Any]:
    """A float32 view (or converted copy) of x, how to turn a float32 result back, and x's ops.

    keep_half: host float16 and bfloat16 stay as they are (a float16 or uint16 view), for the
    kernels that read them directly (a Batch's rows)."""
    lib = _gpu.library_of(x)
    if lib is not None and not _gpu.compiled():
        raise ValueError(
            f"{name} is a CUDA array, but fedagg was built without the CUDA backend "
            "(see fedagg.backends()); pass host arrays"
        )
    ops = CPU if lib is None else _gpu.GpuOps(lib)
    if is_torch_tensor(x):
        torch = sys.modules["torch"]
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        dtype = x.dtype
        t = x.detach()
        if keep_half and lib is None and dtype in (torch.float16, torch.bfloat16):
            half = t.numpy() if dtype == torch.float16 else t.view(torch.int16).numpy().view(np.uint16)
            return half, _torch_back(dtype, torch), ops
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        if lib is not None:  # a CUDA tensor stays on its device

            def back_cuda(out, dtype=dtype, torch=torch):
                return out if dtype == torch.float32 else out.to(dtype)

            return t, back_cuda, ops

        return t.numpy(), _torch_back(dtype, torch), ops
    if lib is not None:
        arr = x  # a CuPy array
    elif isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name} is not an array: {e}") from None
    if arr.dtype.name not in _FLOAT_KINDS:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {arr.dtype}")
    dtype = arr.dtype
    if dtype != np.float32 and not (keep_half and lib is None and dtype == np.float16):
        arr = arr.astype(np.float32)

    def back_array(out, dtype=dtype):  # NumPy or CuPy: the same methods
        return out if out.dtype == dtype else out.astype(dtype)

    return arr, back_array, ops


def _torch_back(dtype, torch) -> Callable[[np.ndarray], Any]:
    def back(out: np.ndarray, dtype=dtype, torch=torch):
        res = torch.from_numpy(out)
        return res if dtype == torch.float32 else res.to(dtype)

    return back


def is_half(a: Any) -> bool:
    """Whether host rows hold float16 or bfloat16 (as uint16) elements."""
    return isinstance(a, np.ndarray) and a.dtype in (np.float16, np.uint16)


def _device_key(ops: Any) -> Any:
    lib = getattr(ops, "lib", None)
    return ("cpu",) if lib is None else (type(lib).__name__, str(getattr(lib, "device", getattr(lib, "device_id", ""))))


def _contiguous(a: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a)
    return a.contiguous() if hasattr(a, "contiguous") else sys.modules["cupy"].ascontiguousarray(a)


def _is_contiguous(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.flags.c_contiguous
    return a.is_contiguous() if hasattr(a, "is_contiguous") else a.flags.c_contiguous


def as_batch(updates: Any, name: str = "updates") -> Batch:
    """Validate `updates` and view them as float32 rows (copying only to convert dtype)."""
    if isinstance(updates, (list, tuple)):
        if len(updates) == 0:
            raise ValueError(f"{name} is empty: need at least one update")
        rows = []
        shape = back = ops = None
        for i, u in enumerate(updates):
            arr, b, o = convert(u, f"{name}[{i}]", keep_half=True)
            if shape is None:
                shape, back, ops = tuple(arr.shape), b, o
            elif tuple(arr.shape) != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(arr.shape)}, but {name}[0] has shape {shape}")
            elif _device_key(o) != _device_key(ops):
                raise ValueError(f"{name}[{i}] is on another device than {name}[0]")
            if not _is_contiguous(arr):
                arr = _contiguous(arr)
            rows.append(arr.reshape(-1))
        d = int(rows[0].shape[0])
        if d == 0:
            raise ValueError(f"{name} have no coordinates (d = 0)")

        def wrap(out, shape=shape, back=back):
            return back(out.reshape(shape))

        return Batch(rows, len(rows), d, wrap, list(updates), ops)

    if not (isinstance(updates, np.ndarray) or is_torch_tensor(updates) or _gpu.library_of(updates)):
        raise TypeError(
            f"{name} must be an (n, d) array or tensor, or a list of arrays; "
            f"got {type(updates).__name__}"
        )
    arr, back, ops = convert(updates, name, keep_half=True)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n updates x d coordinates), got shape {tuple(arr.shape)}; "
            "pass a list to give updates of another shape"
        )
    n, d = int(arr.shape[0]), int(arr.shape[1])
    if n == 0:
        raise ValueError(f"{name} is empty: need at least one update")
    if d == 0:
        raise ValueError(f"{name} have no coordinates (d = 0)")
    if d > 1 and not _rows_contiguous(arr):
        raise ValueError(
            f"{name} must be contiguous along the coordinate axis "
            "(use np.ascontiguousarray or tensor.contiguous())"
        )
    return Batch(arr, n, d, back, [updates], ops)


def _rows_contiguous(a: Any) -> bool:
    """Whether each row of a 2-D array is contiguous (any row stride is fine)."""
    if is_torch_tensor(a):
        return a.stride(1) == 1
    return a.strides[1] == a.itemsize


def as_vector(x: Any, d: int, name: str) -> np.ndarray:
    """One host d-vector as contiguous float32."""
    arr, _, ops = convert(x, name)
    if ops is not CPU:
        arr = ops.lib.to_host(arr)
    arr = np.ascontiguousarray(arr).reshape(-1)
    if arr.size != d:
        raise ValueError(f"{name} has {arr.size} coordinates, expected {d}")
    return arr


def as_weights(weights: Any, n: int, name: str = "weights") -> np.ndarray:
    """Validated float64 weights: n finite, non-negative values with a positive sum."""
    if is_torch_tensor(weights):
        weights = weights.detach().cpu().numpy()
    elif _gpu.library_of(weights) is not None:
        weights = _gpu.library_of(weights).to_host(weights)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have one entry per update ({n}), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be finite")
    if np.any(w < 0):
        raise ValueError(f"{name} must be non-negative")
    if not w.sum() > 0:
        raise ValueError(f"{name} must have a positive sum")
    return w
