"""A round's accepted updates, and how they become its aggregate.

Two forms, chosen by the rule (``collector_for``):

In buffered mode (transport/staleness.py) an update enters as ``scale * update``, its staleness
weight applied before any clipping, so a round's mean is FedBuff's (1 / K) sum of s(tau_i) Delta_i.

- ``MeanFold``: rule ``mean`` (weighted, clipped, or with ``CentralDP``; not ``nnm``). Each
  accepted update is folded into a float64 sum on the server's device as it is accepted,
  ``acc += (w * s) * x`` with w its weight and s its clipping factor, and its buffer is free
  at once: the round holds (uploads in flight + 2) x d, whatever n is. At the close the
  aggregate is ``acc / sum(w)`` (then DP noise). The float64 sum depends on the order the
  updates were accepted in, by about one float64 rounding per update: the float32 aggregate
  can differ from an order-sorted computation in its last bit.
- ``HeldUpdates``: every other rule needs all n updates at the close: one n x d buffer on the
  server's device.

Both run in the server's applier thread (durable.GroupCommit): ``add`` for each accepted
update, ``snapshot`` once per group (its write then runs in the writer thread); the event loop
reads them only once those threads are idle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..rules import AggregationInfo


@dataclass
class Job:
    """An update whose COMMIT passed the event loop's checks, on its way to being accepted."""

    pid: str
    rid: bytes
    address: str
    weight: float
    upload: Any  # buffers.Upload: its buffer and budget charge
    update: Any = None  # the dense float32 update (the raw buffer itself, or the decoded payload)
    error: Optional[Tuple[str, str]] = None  # (reason, detail) if it was refused in the applier thread
    spent: bool = False  # folded: its buffer can go back to the pool
    seq: int = 0  # the COMMIT's seq (a refusal names it)
    deferred: bool = False  # it completed the quorum: durable (and acknowledged) with the round's close
    started: float = 0.0  # when the upload's first chunk arrived
    base: Optional[int] = None  # buffered mode: the model version the update was computed on
    staleness: int = 0  # buffered mode: versions published since `base` when it was committed
    scale: float = 1.0  # buffered mode: its staleness weight; the round takes scale * update
    committed: float = 0.0  # when its COMMIT arrived (the first time, for one that waited for its buffer)


def is_foldable(rule: str, rule_params: Dict[str, Any]) -> bool:
    return rule == "mean" and not rule_params.get("nnm", False)


def collector_for(rule: str, rule_params: Dict[str, Any], device, clip_norm, held: bool = False) -> Any:
    """MeanFold for the mean family, HeldUpdates for the rest (and for every rule with `held`, a
    shard's: transport/shards.py). clip_norm: a function giving C or None."""
    return MeanFold(device, clip_norm) if is_foldable(rule, rule_params) and not held else HeldUpdates(device)


def _entry(job: Job) -> Dict[str, Any]:
    entry = {"id": job.pid, "address": job.address, "weight": job.weight}
    if job.base is not None:
        entry.update(base=job.base, staleness=job.staleness, scale=job.scale)
    return entry


class MeanFold:
    """The mean's running float64 sum on the server's device (see the module doc)."""

    kind = "fold"  # how it is saved in a state directory
    keeps_updates = False

    def __init__(self, device, clip_norm):
        self.device, self.clip_norm = device, clip_norm
        # buffers kept from round to round (faulted in once): the snapshot's host copy of the sum
        # (the writer is done with it before the next snapshot is taken) and the mean's output
        self._copy = self._out = None
        self.reset()

    def reset(self) -> None:
        self.acc = None
        self.entries: List[Dict[str, Any]] = []
        self.weight_sum, self.clipped, self.gen = 0.0, 0, 0

    @property
    def count(self) -> int:
        return len(self.entries)

    def add(self, jobs: List[Job]) -> None:
        """Fold the jobs' updates, in order, in one pass over the sum (the rounding of one at a time)."""
        if not jobs:
            return
        if self.acc is None:
            self.acc = self.device.accumulator()
        if self._out is None:  # the mean's output, faulted in now (while uploads stream) rather than at the close
            self._out = self.device.mean(self.acc, 1.0)
        C = self.clip_norm()
        coef = []
        for job in jobs:
            self.device.ready(job.update)
            s = 1.0
            if C is not None:  # the clip applies to what enters the round: scale * update
                norm = job.scale * math.sqrt(self.device.sqnorm(job.update))
                s = min(1.0, C / max(norm, np.finfo(np.float64).tiny))
            coef.append(job.weight * job.scale * s)
            self.clipped += s < 1.0
        self.device.fold(self.acc, [job.update for job in jobs], np.array(coef, dtype=np.float64))
        for job in jobs:
            self.weight_sum += job.weight
            self.entries.append(_entry(job))
            job.spent = True

    def snapshot(self, store, rnd: int):
        """A copy of the fold as it stands, and how to write it (run by the writer thread)."""
        self.gen += 1
        acc = self.device.to_host(self.acc, self._copy)
        self._copy = acc  # a copy: the applier goes on folding into the sum meanwhile
        gen, meta = self.gen, {"accepted": list(self.entries), "weight_sum": self.weight_sum,
                               "clipped": self.clipped}
        return lambda cancelled=None: store.save_fold(rnd, gen, acc, meta, cancelled)

    def restore(self, saved: Dict[str, Any]) -> None:
        self.acc = self.device.from_host(np.ascontiguousarray(saved["acc"]))
        self.entries = list(saved["entries"])
        self.weight_sum, self.clipped, self.gen = saved["weight_sum"], saved["clipped"], saved["gen"]

    def aggregate(self, cfg, weights: Optional[np.ndarray], order=None, group=None) -> Tuple[Any, AggregationInfo]:
        """The round's mean (and DP release). `weights` is unused: each update's weight was folded in.
        (`order` and `group` are a shard's, which never folds.)"""
        if order is not None or group is not None:
            raise ValueError("a fold cannot leave updates out: a sharded server holds its updates")
        n = len(self.entries)
        w = np.array([e["weight"] for e in self.entries], dtype=np.float64)
        if not self.weight_sum > 0:
            raise ValueError("the accepted updates' weights sum to 0")
        out = self._out = self.device.mean(self.acc, self.weight_sum, self._out)
        privacy = None
        if cfg.dp is not None:
            cfg.dp.check_weights("mean", w)
            out, privacy = cfg.dp.release(out, rule="mean", participants=n, unclipped=n - self.clipped,
                                          weight_sum=self.weight_sum)
        return out, AggregationInfo(rule="mean", n=n, f=0, weights=w / self.weight_sum, clipped=self.clipped,
                                    privacy=privacy)


@dataclass
class HeldUpdates:
    """Every accepted update kept (on the server's device) until the close."""

    device: Any
    kind = "held"
    keeps_updates = True
    rows: List[Any] = field(default_factory=list)
    entries: List[Dict[str, Any]] = field(default_factory=list)
    saved: int = 0  # updates already on disk

    def reset(self) -> None:
        self.rows, self.entries, self.saved = [], [], 0

    @property
    def count(self) -> int:
        return len(self.entries)

    def add(self, jobs: List[Job]) -> None:
        for job in jobs:
            self.device.ready(job.update)
            if job.scale != 1.0:  # buffered: the row is the weighted update (its buffer is the round's)
                self.device.scale(job.update, job.scale)
            self.rows.append(job.update)
            self.entries.append(_entry(job))

    def snapshot(self, store, rnd: int):
        """The updates accepted since the last snapshot (they do not change), and how to write them."""
        end = len(self.rows)
        new = [(k, self.device.host_view(self.rows[k])) for k in range(self.saved, end)]
        entries = list(self.entries)

        def write(cancelled=None):
            store.save_held(rnd, entries, new, cancelled)
            self.saved = max(self.saved, end)  # only once on disk: a given-up write is redone by the next
        return write

    def restore(self, saved: Dict[str, Any]) -> None:
        self.rows = [self.device.from_host(u) for u in saved["updates"]]
        self.entries = list(saved["entries"])
        self.saved = len(self.rows)

    def aggregate(self, cfg, weights: Optional[np.ndarray], order=None, group=None) -> Tuple[Any, AggregationInfo]:
        """The rule on the held updates (those at `order`, in that order, if given); a shard's range
        aggregated over the shards' `group` (fedagg.distributed)."""
        from .. import aggregate as whole

        rows = self.rows if order is None else [self.rows[i] for i in order]
        aggregate = whole
        if group is not None:
            from ..distributed import aggregate as sharded

            aggregate = functools.partial(sharded, group=group)
        kw = dict(cfg.rule_params)
        if cfg.dp is not None:
            kw["dp"] = cfg.dp
        elif cfg.clip_norm is not None:
            kw["clip_norm"] = cfg.clip_norm
        if weights is not None:
            kw["weights"] = weights
        return aggregate(rows, cfg.rule, cfg.f, return_info=True, **kw)
