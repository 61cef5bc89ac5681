"""Aggregation sharded by coordinates over processes and hosts, on torch.distributed.

Each rank of a process group (gloo for CPU tensors, NCCL for CUDA ones; from
``torchrun`` / ``init_process_group``) holds the same coordinate range of every
update, and ``aggregate`` returns its slice of the aggregate::

    import torch.distributed as dist, fedagg.distributed as fd
    fd.init_process_group("gloo")                    # under torchrun (restart-safe)
    lo, hi = fd.shard_range(d, dist.get_rank(), dist.get_world_size())
    out, info = fd.aggregate(rows[:, lo:hi], "krum", f=2, return_info=True)

The rules are not rewritten: the ops that give n or n x n values are summed
over the group in float64 (fedagg/distributed/ops.py), the others stay local.
"""

from .aggregate import Shard, aggregate, shard_range
from .group import Group, init_process_group
from .ops import ShardedOps

__all__ = ["aggregate", "shard_range", "init_process_group", "Group", "Shard", "ShardedOps"]
