"""Input handling at the boundary: array-likes in, zero-copy float32 row views out.

Updates arrive as one ``(n, d)`` array or as a sequence of ``n`` arrays of one
shape (NumPy arrays or CPU torch tensors). float32 input whose rows are
contiguous is passed to the native kernels without a copy; float16, bfloat16
and float64 input is converted to float32 (one copy) and the result is cast
back. The result has the caller's type: torch in, torch out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

_FLOAT_KINDS = ("float16", "float32", "float64")


def _torch():
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass
class Batch:
    """n updates of d coordinates as the native module takes them."""

    rows: Any  # a 2-D float32 ndarray with contiguous rows, or a list of 1-D float32 arrays
    n: int
    d: int
    wrap: Callable[[np.ndarray], Any]  # float32 (d,) result -> caller's type, dtype and shape
    keepalive: List[Any] = field(default_factory=list)

    def row(self, i: int) -> np.ndarray:
        return self.rows[i]

    def subset(self, index: Sequence[int]) -> "Batch":
        """The updates at `index`, as views (no data is copied)."""
        rows = [self.rows[int(i)] for i in index]
        return Batch(rows, len(rows), self.d, self.wrap, self.keepalive)


def _to_numpy(x: Any, name: str) -> Tuple[np.ndarray, Any]:
    """A NumPy float view of x, and how to turn a float32 result back into x's kind."""
    if is_torch_tensor(x):
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(
                f"{name} is on device {x.device}; fedagg was built without the CUDA backend, "
                "so pass CPU tensors (tensor.cpu())"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        dtype = x.dtype
        t = x.detach()
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        arr = t.numpy()

        def back(out: np.ndarray, dtype=dtype, torch=torch):
            res = torch.from_numpy(out)
            return res if dtype == torch.float32 else res.to(dtype)

        return arr, back
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{name} is not an array: {e}") from None
    if arr.dtype.name not in _FLOAT_KINDS:
        raise TypeError(
            f"{name} must be float16, float32 or float64, got dtype {arr.dtype}"
        )
    dtype = arr.dtype
    if dtype != np.float32:
        arr = arr.astype(np.float32)

    def back_np(out: np.ndarray, dtype=dtype):
        return out if dtype == np.float32 else out.astype(dtype)

    return arr, back_np


def as_batch(updates: Any, name: str = "updates") -> Batch:
    """Validate `updates` and view them as float32 rows (copying only to convert dtype)."""
    if isinstance(updates, (list, tuple)):
        if len(updates) == 0:
            raise ValueError(f"{name} is empty: need at least one update")
        rows = []
        shape = None
        back = None
        keep = []
        for i, u in enumerate(updates):
            arr, b = _to_numpy(u, f"{name}[{i}]")
            if shape is None:
                shape, back = arr.shape, b
            elif arr.shape != shape:
                raise ValueError(
                    f"{name}[{i}] has shape {arr.shape}, but {name}[0] has shape {shape}"
                )
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            keep.append(u)
            rows.append(arr.reshape(-1))
        d = rows[0].size
        if d == 0:
            raise ValueError(f"{name} have no coordinates (d = 0)")

        def wrap(out, shape=shape, back=back):
            return back(out.reshape(shape))

        return Batch(rows, len(rows), d, wrap, keep)

    if not (isinstance(updates, np.ndarray) or is_torch_tensor(updates)):
        raise TypeError(
            f"{name} must be an (n, d) array or tensor, or a list of arrays; "
            f"got {type(updates).__name__}"
        )
    arr, back = _to_numpy(updates, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n updates x d coordinates), got shape {arr.shape}; "
            "pass a list to give updates of another shape"
        )
    n, d = arr.shape
    if n == 0:
        raise ValueError(f"{name} is empty: need at least one update")
    if d == 0:
        raise ValueError(f"{name} have no coordinates (d = 0)")
    if d > 1 and arr.strides[1] != arr.itemsize:
        raise ValueError(
            f"{name} must be contiguous along the coordinate axis "
            "(use np.ascontiguousarray or tensor.contiguous())"
        )
    return Batch(arr, n, d, back, [updates])


def as_vector(x: Any, d: int, name: str) -> np.ndarray:
    """A contiguous float32 copy-free view (or converted copy) of one d-vector."""
    arr, _ = _to_numpy(x, name)
    arr = np.ascontiguousarray(arr).reshape(-1)
    if arr.size != d:
        raise ValueError(f"{name} has {arr.size} coordinates, expected {d}")
    return arr


def as_weights(weights: Any, n: int, name: str = "weights") -> np.ndarray:
    """Validated float64 weights: n finite, non-negative values with a positive sum."""
    if is_torch_tensor(weights):
        weights = weights.detach().cpu().numpy()
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
