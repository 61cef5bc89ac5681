"""Streaming aggregation: updates are added as they arrive; result() is cheap.

State is built on arrival: the mean keeps a float64 running sum (O(d), no
update is stored); the other rules keep one float32 copy of each update (at
most one n x d buffer in all) and the distance-based rules also grow the
n x n distance matrix one row per update, so result() only runs the n x n
selection and one pass to form the output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import numpy as np

from ._arrays import Batch, _device_key, as_vector, convert
from .rules import RULES, AggregationInfo, _check_f_used, _check_float, _check_policy, _params, _run


class Aggregator:
    """Collects one round of updates and aggregates them with `rule`.

    >>> import numpy as np, fedagg
    >>> agg = fedagg.Aggregator("median")
    >>> for x in ([1.0, 5.0], [2.0, 6.0], [9.0, -1.0]):
    ...     _ = agg.add(np.array(x, dtype=np.float32))
    >>> agg.result()
    array([2., 5.], dtype=float32)

    Parameters are those of :func:`fedagg.aggregate`. For centered clipping the
    state carries over: each round starts from the previous round's result.
    """

    def __init__(self, rule: str = "mean", f: int = 0, *, nonfinite: str = "raise",
                 clip_norm: Optional[float] = None, nnm: bool = False, dp: Any = None, **params):
        self.rule = rule
        self.nonfinite = _check_policy(nonfinite)
        if not isinstance(nnm, bool):
            raise TypeError("nnm must be True or False")
        self.nnm = nnm
        if dp is not None and clip_norm is not None:
            raise ValueError("dp sets the clipping norm; do not pass clip_norm with it")
        if dp is not None:
            dp.check_weights(rule, None)
        self.dp = dp  # fedagg.privacy.CentralDP: clip at its C, noise every result()
        self._clip_norm = None if clip_norm is None else _check_float(clip_norm, "clip_norm")
        self._p = _params(rule, f, None, None, None, params)
        _check_f_used(rule, self._p["f"], nnm)  # the mean refuses an f it would ignore
        self._spec = RULES[rule]
        self._center = self._p.get("center")  # checked against d when the first update arrives
        self._last_result: Optional[np.ndarray] = None
        self.reset()

    @property
    def clip_norm(self) -> Optional[float]:
        """The clipping norm of this round (the DP mechanism's, adaptive or not, when dp is set)."""
        return self.dp.clip_norm if self.dp is not None else self._clip_norm

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new round; centered clipping starts it from the last round's result."""
        if self._last_result is not None:
            self._center = self._last_result
            self._last_result = None
        self._rows: List[np.ndarray] = []
        self._weights: List[float] = []
        self._ids: List[Any] = []
        self._excluded: List[Any] = []
        self._d: Optional[int] = None
        self._ops = None
        self._wrap = None
        self._sum: Optional[np.ndarray] = None  # mean: float64 running sum
        self._total = 0.0
        self._count = 0
        self._clipped = 0
        self._D = np.zeros((0, 0))
        self._seen_ids = set()

    def __len__(self) -> int:
        return self._count

    @property
    def _streams_mean(self) -> bool:
        return self.rule == "mean" and not self.nnm

    def add(self, update: Any, weight: Optional[float] = None, client_id: Any = None) -> int:
        """Add one update (any shape; copied); returns its index in this round.

        Raises ValueError for a wrong size, a duplicate client_id, or (policy
        "raise") NaN/Inf, leaving the state unchanged. With policy "exclude" a
        non-finite update is recorded in ``info.details['excluded_ids']`` and
        returns -1.
        """
        if client_id is not None:
            try:
                dup = client_id in self._seen_ids
            except TypeError:
                raise TypeError("client_id must be hashable") from None
            if dup:
                raise ValueError(f"client_id {client_id!r} already submitted this round")
        if weight is not None:
            if not self._spec.weights:
                raise ValueError(f"rule {self.rule!r} does not take per-update weights")
            weight = _check_float(weight, "weight", positive=False)
            if weight < 0:
                raise ValueError(f"weight must be >= 0, got {weight}")
            if self.dp is not None and weight > 1:
                raise ValueError("with dp, weights must lie in [0, 1] (cap them): larger weights make the "
                                 "sensitivity unbounded")
        arr, back, ops = convert(update, "update")
        if self._ops is not None and _device_key(ops) != _device_key(self._ops):
            raise ValueError("update is on another device than this round's first update")
        x = ops.copy(arr)
        size = int(x.shape[0])
        if size == 0:
            raise ValueError("update has no coordinates")
        if self._d is not None and size != self._d:
            raise ValueError(f"update has {size} coordinates, this round has {self._d}")
        if ops.nonfinite_rows([x])[0]:
            if self.nonfinite == "raise":
                raise ValueError(f"update from client {client_id!r} contains NaN or Inf")
            self._excluded.append(client_id)
            if client_id is not None:
                self._seen_ids.add(client_id)
            return -1
        if self._d is None:
            if self._center is not None:
                center = as_vector(self._center, size, "center")
                if not np.all(np.isfinite(center)):
                    raise ValueError("center must be finite")
                self._center = center
            self._d = size
            self._ops = ops
            shape = tuple(arr.shape)
            self._wrap = lambda out, back=back, shape=shape: back(out.reshape(shape))
        if self.clip_norm is not None:
            norm = float(np.sqrt(ops.sqnorms([x])[0]))
            if norm > self.clip_norm:
                x = ops.scaled(x, self.clip_norm / norm)
                self._clipped += 1
        w = 1.0 if weight is None else weight
        if self._streams_mean:
            if self._sum is None:
                self._sum = ops.accumulator(self._d)
            ops.axpy(self._sum, x, w)
        else:
            if self._spec.distance_based and not self.nnm:
                self._grow_distances(x)
            self._rows.append(x)
        self._weights.append(w)
        self._ids.append(client_id)
        if client_id is not None:
            self._seen_ids.add(client_id)
        self._total += w
        self._count += 1
        return self._count - 1

    def _grow_distances(self, x: np.ndarray) -> None:
        k = len(self._rows)
        dist = self._ops.sqdist_to(self._rows, x) if k else np.zeros(0)
        D = np.zeros((k + 1, k + 1))
        D[:k, :k] = self._D
        D[k, :k] = dist
        D[:k, k] = dist
        self._D = D

    # ----------------------------------------------------------------- result
    def result(self, return_info: bool = False):
        """Aggregate the updates added since the last reset()."""
        if self._count == 0:
            raise ValueError("no updates were added this round")
        weights = np.asarray(self._weights)
        has_weights = self._spec.weights and np.any(weights != 1.0)
        if self._streams_mean:
            if not self._total > 0:
                raise ValueError("the weights of this round sum to zero")
            result = self._wrap(self._ops.finish_mean(self._sum, self._total))
            info = AggregationInfo(
                rule="mean", n=self._count, f=self._p["f"], weights=weights / self._total,
                clipped=self._clipped, client_ids=tuple(self._ids),
                details={"excluded_ids": tuple(self._excluded)},
            )
            out, info = self._private(result, info, float(self._total))
            return (out, info) if return_info else out
        p = dict(self._p)
        p["center"] = self._center
        batch = Batch(self._rows, len(self._rows), self._d, self._wrap, ops=self._ops)
        res = _run(self.rule, batch, p, weights=weights if has_weights else None,
                   nonfinite="raise", clip_norm=None, nnm=self.nnm, return_info=True,
                   client_ids=tuple(self._ids),
                   D=self._D if self._spec.distance_based and not self.nnm else None)
        out, info = res
        info = dataclasses.replace(info, clipped=self._clipped,
                                   details={**info.details, "excluded_ids": tuple(self._excluded)})
        out, info = self._private(out, info, float(weights.sum()))
        if self.rule == "centered_clipping":
            self._last_result = as_vector(out, self._d, "result")
        return (out, info) if return_info else out

    def _private(self, out, info, weight_sum: float):
        """The DP release of this round's result (each call is accounted), or the result as is."""
        if self.dp is None:
            return out, info
        out, record = self.dp.release(out, rule=self.rule, participants=self._count,
                                      unclipped=self._count - self._clipped, weight_sum=weight_sum)
        return out, dataclasses.replace(info, privacy=record)
