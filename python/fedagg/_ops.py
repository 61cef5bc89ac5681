"""The op contract, one implementation per backend.

Every rule in rules.py is written against these ops; a Batch carries the ops
of the device its updates live on. Arrays of n or n x n values (weights,
distance matrices, coefficients) are NumPy float64 on the host for every
backend: the selection math on them is tiny and shared. Arrays of d values
(updates, results) stay on the updates' device.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from . import _core


class CpuOps:
    """fedagg._core: NumPy arrays (and CPU torch tensors viewed as NumPy)."""

    name = "cpu"

    def weighted_sum(self, rows: Any, coef: np.ndarray) -> Tuple[np.ndarray, bool]:
        out = _core.weighted_sum(rows, coef)
        return out, bool(np.isfinite(out).all())

    def pairwise_sqdist(self, rows: Any) -> np.ndarray:
        return _core.pairwise_sqdist(rows)

    def sqdist_to(self, rows: Any, x: Any) -> np.ndarray:
        return _core.sqdist_to(rows, x)

    def sqnorms(self, rows: Any) -> np.ndarray:
        return _core.sqnorms(rows)

    def sorted_reduce(self, rows: Any, mode: str, f: int) -> Tuple[np.ndarray, bool]:
        if mode == "median":
            return _core.coordinate_median(rows)
        if mode == "trimmed_mean":
            return _core.trimmed_mean(rows, f)
        return _core.bulyan_reduce(rows, f)

    def nonfinite_rows(self, rows: Any) -> np.ndarray:
        return _core.nonfinite_rows(rows)

    def mix(self, rows: Any, A: np.ndarray) -> np.ndarray:
        return _core.mix(rows, A)

    def zeros(self, d: int) -> np.ndarray:
        return np.zeros(d, dtype=np.float32)

    def copy(self, x: np.ndarray) -> np.ndarray:
        """A float32 copy of a row (float16 and bfloat16-as-uint16 rows widened exactly)."""
        if x.dtype in (np.float16, np.uint16):
            return _core.widen(np.ascontiguousarray(x)).reshape(-1)
        return np.array(x, dtype=np.float32, copy=True).reshape(-1)

    def scaled(self, x: np.ndarray, s: float) -> np.ndarray:
        if x.dtype in (np.float16, np.uint16):
            x = self.copy(x)
        return (x * np.float32(s)).astype(np.float32, copy=False)

    def to_device(self, x: np.ndarray) -> np.ndarray:
        return x

    def stack(self, rows) -> np.ndarray:
        return np.stack(rows)

    def accumulator(self, d: int) -> np.ndarray:
        return np.zeros(d)

    def axpy(self, acc: np.ndarray, x: np.ndarray, w: float) -> None:
        _core.axpy_f64(acc, x, w)

    def finish_mean(self, acc: np.ndarray, total: float) -> np.ndarray:
        out = np.empty(acc.shape[0], dtype=np.float32)
        np.divide(acc, total, out=out, casting="unsafe")
        return out


CPU = CpuOps()
