"""The collectives a sharded round needs, over a torch.distributed process group.

Every value that crosses ranks is float64 (sums of partial distances, norms)
or a small picklable object (the agreement on a round's parameters). A group
whose backend is NCCL takes CUDA tensors: host values go through the current
CUDA device. Time and bytes spent in collectives are counted for the benchmark.
"""

from __future__ import annotations

import time
from typing import Any, List

import numpy as np


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is an extra
        raise ImportError("fedagg.distributed needs torch (pip install 'fedagg[torch]')") from None
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    return dist


def init_process_group(backend: str = "gloo", timeout: float = 120.0) -> None:
    """``torch.distributed.init_process_group`` for a process started by torchrun, restart-safe.

    After torchrun restarts a group (``--max-restarts``), torch 2.13's workers meet again in the
    agent's store under the same keys as the failed attempt's, and a worker can read a dead
    peer's address (gloo: "connectFullMesh failed ... Connection refused") or hang. The keys
    here are prefixed with the run and the attempt. Outside torchrun's agent store: the usual
    ``env://`` rendezvous.
    """
    import os
    from datetime import timedelta

    dist = _dist()
    if dist.is_initialized():
        return
    wait = timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=wait)
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False,
                          timeout=wait)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"fedagg/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=wait)


class Group:
    """A torch.distributed process group as fedagg uses it (``None``: the default group)."""

    def __init__(self, group: Any = None):
        dist = _dist()
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                               "(or start under torchrun) before fedagg.distributed.aggregate")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.cuda = dist.get_backend(group) == "nccl"
        self.seconds = 0.0
        self.calls = 0
        self.bytes = 0

    def _tensor(self, a: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.cuda() if self.cuda else t

    def _gather(self, a: np.ndarray) -> List[np.ndarray]:
        """Every rank's array `a` (the same shape and dtype everywhere), in rank order, on the host."""
        t0 = time.perf_counter()
        if self.size == 1:
            parts = [a.copy()]
        else:
            out = [self._tensor(np.empty_like(a)) for _ in range(self.size)]
            self.dist.all_gather(out, self._tensor(a), group=self.group)
            parts = [t.cpu().numpy() for t in out]
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.bytes += a.nbytes * self.size
        return parts

    def sum(self, a: np.ndarray) -> np.ndarray:
        """The element-wise float64 sum over the group of every rank's `a` (same shape everywhere).

        Gathered, then added in rank order on every rank: an all-reduce adds each
        chunk in its own order (ring), which would make a symmetric distance
        matrix asymmetric and turn an exact tie between two updates into a
        near-tie broken differently than by one process.
        """
        parts = self._gather(np.ascontiguousarray(a, dtype=np.float64))
        out = parts[0].copy()
        for p in parts[1:]:
            out += p
        return out

    def rows(self, values) -> np.ndarray:
        """Every rank's row of int64 `values` (the same length everywhere), one row per rank."""
        return np.concatenate(self._gather(np.asarray(values, dtype=np.int64).reshape(1, -1)))

    def all(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on every rank."""
        return bool(self.sum(np.array([0.0 if flag else 1.0]))[0] == 0.0)

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order (small picklable values: shapes, fingerprints, errors)."""
        if self.size == 1:
            return [obj]
        t0 = time.perf_counter()
        out: List[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def broadcast(self, obj: Any, src_rank: int = 0) -> Any:
        """Rank `src_rank`'s `obj` (a group rank) on every rank."""
        return self.gather(obj)[src_rank]
