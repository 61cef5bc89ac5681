"""Robust and secure together: participants are split into buckets by a seed fixed before the
round (from the ledger where there is one, so the server cannot pick the buckets); each bucket is
summed securely; a fedagg rule then runs over the bucket means. f Byzantine participants corrupt
at most f buckets, so the rule runs with f (as f_buckets) over the B bucket means.

The trade-off: larger buckets hide each update among more others (and need less noise per
participant for the same epsilon) but leave fewer, and so noisier, inputs for the rule: the rule
needs B > its minimum for f (Krum: B > 2f + 2; median: B > 2f).
"""

from __future__ import annotations

import hashlib
from typing import Hashable, List, Sequence

import numpy as np


def assign(ids: Sequence[Hashable], size: int, seed: bytes) -> List[List[Hashable]]:
    """Buckets of `size` (the last few one larger when size does not divide n), as lists of ids,
    from a public seed: a permutation of the sorted ids drawn from SHA-256(seed)."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("participant ids must be distinct")
    if not (isinstance(size, int) and size >= 2):
        raise ValueError(f"bucket size must be an integer >= 2 (one participant's bucket is its update), got {size!r}")
    if len(ids) < size:
        raise ValueError(f"{len(ids)} participants cannot fill one bucket of {size}")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) < 16:
        raise ValueError("the bucket seed must be at least 16 bytes, fixed before the round")
    order = sorted(ids, key=repr)
    digest = hashlib.sha256(b"fedagg buckets" + bytes(seed)).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
    perm = [order[int(i)] for i in rng.permutation(len(order))]
    count = len(perm) // size
    out = [perm[b * size:(b + 1) * size] for b in range(count)]
    for j, extra in enumerate(perm[count * size:]):  # spread the remainder
        out[j % count].append(extra)
    return out
