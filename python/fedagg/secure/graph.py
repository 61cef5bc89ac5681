"""The SecAgg+ communication graph: a random k-regular graph on the n participants (Bell et al.
2020, a Harary graph on a random permutation). Each participant shares its secrets with, and masks
against, only its k neighbours; k = n - 1 is the complete graph of the original SecAgg."""

from __future__ import annotations

import hashlib
from typing import Dict, List, Set

import numpy as np


def neighbours(n: int, k: int, seed: bytes) -> Dict[int, Set[int]]:
    """index -> its k neighbours, from `seed` (public; fixed before keys are advertised).

    Positions on a ring follow a permutation drawn from the seed; each is joined to the k / 2
    nearest positions on either side (k even), or to everyone (k = n - 1)."""
    if not (isinstance(n, int) and isinstance(k, int)) or n < 2:
        raise ValueError(f"need n >= 2 participants; got n = {n}")
    if k == n - 1:
        return {i: set(range(n)) - {i} for i in range(n)}
    if not (2 <= k < n - 1 and k % 2 == 0):
        raise ValueError(f"k must be even with 2 <= k < n - 1, or k = n - 1; got k = {k}, n = {n}")
    digest = hashlib.sha256(b"fedagg secagg graph" + seed).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
    order: List[int] = [int(i) for i in rng.permutation(n)]
    out: Dict[int, Set[int]] = {i: set() for i in range(n)}
    for pos, i in enumerate(order):
        for step in range(1, k // 2 + 1):
            j = order[(pos + step) % n]
            out[i].add(j)
            out[j].add(i)
    return out
