"""One round's aggregation sharded by coordinates over a torch.distributed group."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Optional, Tuple

import numpy as np

from .._arrays import Batch, as_batch, as_vector, as_weights, convert, is_torch_tensor
from .._ops import CPU
from ..rules import _aggregate_batch, _check_options
from .group import Group
from .ops import ShardedOps


def shard_range(d: int, rank: int, size: int) -> Tuple[int, int]:
    """The even split of d coordinates over `size` ranks: rank's [lo, hi) (the first d % size get one more)."""
    for name, v in (("d", d), ("rank", rank), ("size", size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if d < 0 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"need d >= 0, size >= 1 and 0 <= rank < size; got d={d}, rank={rank}, size={size}")
    base, extra = divmod(int(d), int(size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's place in a sharded aggregate, as CentralDP.release takes it."""

    lo: int
    hi: int
    d: int  # coordinates of the whole aggregate
    group: Group

    def norm(self, out: Any) -> float:
        """The L2 norm of the whole aggregate, from every rank's slice."""
        return math.sqrt(float(self.group.sum(np.array([_sqnorm64(out)]))[0]))

    def common_seed(self, seed: int) -> int:
        return int(self.group.broadcast(seed))

    def all(self, flag: bool) -> bool:
        return self.group.all(flag)


def _sqnorm64(x: Any) -> float:
    if is_torch_tensor(x):
        return float((x.detach().double() ** 2).sum())
    from .. import _gpu

    lib = _gpu.library_of(x)
    if lib is not None:
        x = lib.to_host(x)
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    return float(a @ a)


def _local_batch(shard: Any) -> Batch:
    """The rank's rows as a Batch; a zero-width range (d < ranks, uneven splits) is allowed."""
    rows = shard if isinstance(shard, (list, tuple)) else None
    first = rows[0] if rows else shard
    try:
        width = int(np.prod(tuple(first.shape)[1:] if rows is None else tuple(first.shape)))
    except (AttributeError, TypeError):
        width = -1
    if width != 0:
        return as_batch(shard, "shard")
    # Nothing to compute here, but the rank still takes part in every collective.
    _arr, back, ops = convert(first, "shard")
    n = len(rows) if rows is not None else int(first.shape[0])
    if n == 0:
        raise ValueError("shard is empty: need at least one update")
    if ops is not CPU:
        lib = ops.lib

        def wrap(out, lib=lib, back=back):
            return back(lib.from_host(np.asarray(out, dtype=np.float32)))
    else:
        def wrap(out, back=back):
            return back(out)
    return Batch(np.zeros((n, 0), dtype=np.float32), n, 0, wrap, [shard], CPU)


def _fingerprint(rule, f, n, weights, nonfinite, clip_norm, nnm, dp, params) -> bytes:
    """What every rank must agree on for the round to mean anything (not the data, not `center`)."""
    h = hashlib.sha256()
    w = None if weights is None else as_weights(weights, n).tobytes()
    dp_key = None if dp is None else (type(dp).__name__, dp.round, dp.noise_multiplier, dp.clip_norm, dp.mode,
                                      dp.expected_participants, dp.sampling_rate, dp._fixed_seed)
    shown = {k: v for k, v in params.items() if k != "center"}
    h.update(repr((rule, f, n, w, nonfinite, clip_norm, nnm, dp_key, sorted(shown.items()),
                   "center" in params and params["center"] is not None)).encode())
    return h.digest()


def aggregate(shard: Any, rule: str = "mean", f: int = 0, *, group: Any = None, weights: Any = None,
              nonfinite: str = "raise", clip_norm: Optional[float] = None, nnm: bool = False,
              dp: Any = None, return_info: bool = False, **params):
    """This rank's slice of ``fedagg.aggregate(rows, rule, f, ...)``, where ``shard = rows[:, lo:hi]``.

    Call it on every rank of `group` (a torch.distributed process group, or a
    ``fedagg.distributed.Group`` over one, which counts the collectives' time;
    None: the default group) with the same rule and options. Ranks hold contiguous
    coordinate ranges in rank order (rank 0 the first; widths may differ, and
    may be 0); ``shard_range(d, rank, size)`` gives the even split. `shard` is
    any input ``fedagg.aggregate`` takes: an ``(n, hi - lo)`` array or tensor,
    or a list of n arrays of hi - lo coordinates. ``center`` (centered
    clipping) is this rank's slice too; ``dp`` a CentralDP configured alike on
    every rank (the noise is the slice of the whole aggregate's noise).

    Returns the slice (and an ``AggregationInfo`` identical on every rank).
    Concatenated over the ranks it equals the single-process aggregate: bit
    for bit for mean, median and trimmed mean, and for Krum, Multi-Krum and
    Bulyan given the same selection (the per-coordinate kernels compute every
    coordinate alike wherever a range starts). The distances and norms are
    float64 sums of the ranks' parts, in another order than one process adds
    them, so the selections agree except on near-ties within float32
    rounding, and results that depend on norms or distances continuously
    (clipping, ``dp``'s clipping, NNM, geometric median, centered clipping)
    agree to float32 rounding. DP noise is the whole aggregate's noise, sliced.

    A rank whose input or options are invalid raises its own error and every
    other rank raises ``RuntimeError`` naming it, instead of waiting forever.
    """
    g = group if isinstance(group, Group) else Group(group)
    # One collective agrees on the round: (failed, n, width, fingerprint) from every rank.
    try:
        _check_options(rule, nonfinite, nnm)
        batch = _local_batch(shard)
        if params.get("center") is not None:  # checked here, where a wrong one cannot stall the others
            as_vector(params["center"], batch.d, "center")
        key = _fingerprint(rule, f, batch.n, weights, nonfinite, clip_norm, nnm, dp, params)
        mine, error = [0, batch.n, batch.d, *np.frombuffer(key, dtype=np.int64)], None
    except (TypeError, ValueError) as e:
        mine, error = [1, 0, 0, 0, 0, 0, 0], e
    table = g.rows(mine)
    if table[:, 0].any():  # someone refused: say who and why, on every rank
        messages = g.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        r = int(np.flatnonzero(table[:, 0])[0])
        raise RuntimeError(f"rank {r} of {g.size} refused the round: {messages[r]}")
    for r in range(g.size):
        if table[r, 1] != table[0, 1]:
            raise ValueError(f"rank {r} holds {table[r, 1]} updates but rank 0 holds {table[0, 1]}: "
                             "every rank needs every update")
        if (table[r, 3:] != table[0, 3:]).any():
            raise ValueError(f"rank {r} was called with another rule, f, weights or options than rank 0")
    widths = table[:, 2].tolist()
    lo = sum(widths[: g.rank])
    d = sum(widths)
    if d == 0:
        raise ValueError("every rank's range is empty (d = 0)")
    batch.ops = ShardedOps(batch.ops, g, batch.d)
    return _aggregate_batch(batch, rule, f, weights=weights, nonfinite=nonfinite, clip_norm=clip_norm,
                            nnm=nnm, dp=dp, return_info=return_info, params=params,
                            shard=Shard(lo, lo + batch.d, d, g))
