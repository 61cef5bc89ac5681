"""The op contract (fedagg/_ops.py) on one coordinate range of every update.

Ops that return n or n x n values (squared distances, norms, distances to a
point, non-finite flags) are sums over coordinates: each rank computes its
range's part with the backend of its rows and the group adds the parts in
float64, so every rank gets the same matrix and makes the same selection.
Flags that make a rule raise (a non-finite result) are agreed on the same way,
so no rank raises alone. Ops that return d values (weighted sums, sorted
reductions, mixing, copies) are per coordinate and stay local.

A rank whose range is empty still takes part in every collective with zeros.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from .group import Group


class ShardedOps:
    """`inner` (the rows' own ops) on this rank's range; n / n x n results summed over `group`."""

    def __init__(self, inner: Any, group: Group, width: int):
        self.inner = inner
        self.group = group
        self.width = width
        self.name = f"sharded({inner.name})"

    def _empty(self) -> bool:
        return self.width == 0

    # n and n x n values: partial sums over coordinates, added over the group
    def pairwise_sqdist(self, rows: Any) -> np.ndarray:
        m = len(rows)
        part = np.zeros((m, m)) if self._empty() else self.inner.pairwise_sqdist(rows)
        return self.group.sum(part)

    def sqdist_to(self, rows: Any, x: Any) -> np.ndarray:
        part = np.zeros(len(rows)) if self._empty() else self.inner.sqdist_to(rows, x)
        return self.group.sum(part)

    def sqnorms(self, rows: Any) -> np.ndarray:
        part = np.zeros(len(rows)) if self._empty() else self.inner.sqnorms(rows)
        return self.group.sum(part)

    def nonfinite_rows(self, rows: Any) -> np.ndarray:
        part = np.zeros(len(rows), dtype=bool) if self._empty() else self.inner.nonfinite_rows(rows)
        return self.group.sum(np.asarray(part, dtype=np.float64)) > 0

    # d values: per coordinate, local; the flags that make a rule raise are agreed
    def weighted_sum(self, rows: Any, coef: np.ndarray) -> Tuple[Any, bool]:
        if self._empty():
            return np.zeros(0, dtype=np.float32), self.group.all(True)
        out, finite = self.inner.weighted_sum(rows, coef)
        return out, self.group.all(finite)

    def sorted_reduce(self, rows: Any, mode: str, f: int) -> Tuple[Any, bool]:
        if self._empty():
            return np.zeros(0, dtype=np.float32), not self.group.all(True)
        out, bad = self.inner.sorted_reduce(rows, mode, f)
        return out, not self.group.all(not bad)

    def mix(self, rows: Any, A: np.ndarray) -> Any:
        if self._empty():
            return np.zeros((A.shape[0], 0), dtype=np.float32)
        return self.inner.mix(rows, A)

    def zeros(self, d: int) -> Any:
        return self.inner.zeros(d)

    def copy(self, x: Any) -> Any:
        return self.inner.copy(x)

    def scaled(self, x: Any, s: float) -> Any:
        return self.inner.scaled(x, s)

    def to_device(self, x: np.ndarray) -> Any:
        return self.inner.to_device(x)

    def stack(self, rows) -> Any:
        return self.inner.stack(rows)

    def accumulator(self, d: int) -> Any:
        return self.inner.accumulator(d)

    def axpy(self, acc: Any, x: Any, w: float) -> None:
        self.inner.axpy(acc, x, w)

    def finish_mean(self, acc: Any, total: float) -> Any:
        return self.inner.finish_mean(acc, total)
