"""A sharded server: K servers, each owning one coordinate range of the model, deciding rounds together.

An unsharded server is the case K = 1: it decides with ``decide`` on its own view, every
iteration of its loop, with no collective.

Each shard is an ordinary ``Server`` bound to its own endpoint, receiving every participant's
slice ``update[lo:hi]`` of its range and serving ``model[lo:hi]``. What must be the same on
every shard is decided over the shards' torch.distributed group (``fedagg.distributed.Group``):

- every ``tick`` seconds each shard's event loop gathers every shard's view (its round, the
  participants it has accepted, in order, whether its deadline passed, whether it was asked to
  stop). Every shard computes the same decision from the same gathered views: the round's
  participants are those *every* shard accepted, in shard 0's acceptance order; the quorum and
  the deadline are shard 0's; a stop asked of any shard stops all (once a round that is due
  has closed).
- the close aggregates with ``fedagg.distributed.aggregate`` over the same group (the rules'
  distances and norms summed over the shards, DP noise sliced from one stream), and a
  non-finite new model anywhere keeps the model everywhere.

A participant accepted by some shards but not all is left out of the round on every shard
and told so (``excluded`` in its next ``STATE``). A shard that dies breaks the group's
collectives: the others exit with an error and the launcher (torchrun, ``--max-restarts``)
restarts the group, each shard from its own state directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..distributed.aggregate import shard_range


@dataclass(frozen=True)
class ShardSpec:
    """This server's place among the shards: its rank, every shard's endpoint, the whole model's d."""

    rank: int
    endpoints: Tuple[str, ...]
    d: int
    group: Any = None  # a torch.distributed process group (None: the default one) or a fedagg Group
    tick: float = 0.1  # seconds between the shards' agreements

    def __post_init__(self):
        if not self.endpoints:
            raise ValueError("a sharded server needs every shard's endpoint")
        if not 0 <= self.rank < len(self.endpoints):
            raise ValueError(f"shard rank {self.rank} is not in [0, {len(self.endpoints)})")
        if self.d < len(self.endpoints):
            raise ValueError(f"{len(self.endpoints)} shards for a model of {self.d} parameters: each shard needs "
                             "at least one")
        if not self.tick > 0:
            raise ValueError("tick must be positive")

    @property
    def count(self) -> int:
        return len(self.endpoints)

    @property
    def range(self) -> Tuple[int, int]:
        return shard_range(self.d, self.rank, self.count)

    def table(self) -> List[Dict[str, Any]]:
        """What STATE tells participants: each shard's endpoint and range."""
        return [{"endpoint": e, "lo": shard_range(self.d, i, self.count)[0],
                 "hi": shard_range(self.d, i, self.count)[1]} for i, e in enumerate(self.endpoints)]


@dataclass(frozen=True)
class Decision:
    """What every shard does after a tick (the same on each: it is computed from the same views)."""

    action: str  # "wait", "close", "close_without_model", "stop"
    participants: List[str]  # the round's participants, in shard 0's order (close)
    incomplete: Dict[str, str]  # accepted somewhere but not everywhere -> why
    reason: str = ""  # "quorum" or "deadline" (close); why not (close_without_model)


def decide(views: List[Dict[str, Any]], quorum: int, min_updates: int, failed_at: int) -> Decision:
    """The round's decision from every shard's view (see the module doc)."""
    if len({v["round"] for v in views}) != 1:
        raise RuntimeError(f"the shards are in different rounds ({[v['round'] for v in views]}): their state "
                           "directories belong to different runs")
    held = [set(v["accepted"]) for v in views]
    complete = [p for p in views[0]["accepted"] if all(p in h for h in held[1:])]
    everywhere = set(complete)
    incomplete = {}
    for p in sorted(set().union(*held) - everywhere):
        missing = [i for i, h in enumerate(held) if p not in h]
        incomplete[p] = (f"shard(s) {missing} of {len(views)} did not accept this participant's range before the "
                         "round closed: it is left out of the round on every shard")
    n, late = len(complete), views[0]["late"]
    if n != failed_at and (n >= quorum or (late and n >= min_updates)):
        return Decision("close", complete, incomplete, "quorum" if n >= quorum else "deadline")
    if late:
        held_by = "accepted updates" if len(views) == 1 else "updates accepted by every shard"
        why = (f"the pipeline failed on the {n} accepted updates" if n == failed_at and n else
               f"{n} {held_by} at the deadline, {min_updates} needed")
        return Decision("close_without_model", complete, incomplete, why)
    if any(v["stop"] for v in views):  # a round that is due closes first (its last ACCEPTED is out already)
        return Decision("stop", [], {})
    return Decision("wait", complete, incomplete)


def group_of(spec: Optional[ShardSpec]):
    """The fedagg Group the shards agree over (None for an unsharded server)."""
    if spec is None:
        return None
    from ..distributed.group import Group

    g = spec.group if isinstance(spec.group, Group) else Group(spec.group)
    if g.size != spec.count or g.rank != spec.rank:
        raise ValueError(f"shard {spec.rank} of {spec.count}, but its process group has rank {g.rank} of {g.size}")
    return g
