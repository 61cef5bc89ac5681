"""Updates into the integer ring and back: the distributed discrete Gaussian (Kairouz, Liu, Steinke
2021). Each participant clips its update to L2 norm `clip`, rotates it (randomized Hadamard, a
seed shared by the group), scales by 1 / gamma, rounds to integers conditionally (randomized
rounding, redrawn until the rounded norm is within the bound the privacy analysis uses), adds
discrete Gaussian noise N_Z(0, (sigma / gamma)^2) of its own and reduces mod 2^bits. The secure
sum of n such vectors carries noise of variance n sigma^2 (in update units); decoding lifts the
sum to signed integers, scales by gamma and rotates back.

``epsilon`` is the RDP bound of the paper (its Proposition 14, with tau for the sum of n discrete
Gaussians) converted by dp-accounting; ``wrap_probability`` bounds the chance that some coordinate
of the sum leaves the ring (it would then decode wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import _core
from ..privacy.noise import discrete_gaussian, new_seed

RDP_ORDERS = tuple(range(2, 129)) + (256, 512, 1024)
MAX_ROUNDING_TRIES = 1000


def _block(d: int) -> int:
    b = 2
    while b < d and b < 1 << 20:
        b <<= 1
    return b


@dataclass(frozen=True)
class Encoding:
    """clip: L2 norm bound of an update; sigma: each participant's noise stddev, in update units
    (the sum carries sqrt(n) sigma); gamma: the integer grid's step, in update units; n: the
    participants whose encodings are summed; bits: the ring Z_{2^bits}; beta: the conditional
    rounding's slack (the chance a plain randomized rounding exceeds the norm bound); seed: the
    rotation, shared by the group (public)."""

    clip: float
    sigma: float
    gamma: float
    n: int
    d: int
    bits: int = 32
    beta: float = math.exp(-0.5)
    seed: int = 0

    def __post_init__(self):
        for name in ("clip", "gamma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be >= 0, got {self.sigma!r}")
        if not (isinstance(self.n, int) and self.n >= 1 and isinstance(self.d, int) and self.d >= 1):
            raise ValueError(f"n and d must be positive integers, got n = {self.n!r}, d = {self.d!r}")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 32):
            raise ValueError(f"bits must be in [2, 32], got {self.bits!r}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")

    @property
    def block(self) -> int:
        return _block(self.d)

    @property
    def padded(self) -> int:
        """Coordinates on the wire: d rounded up to a multiple of the rotation block."""
        return -(-self.d // self.block) * self.block

    @property
    def norm_bound(self) -> float:
        """The rounded vector's L2 bound in grid units (the sensitivity the accountant uses)."""
        c, d = self.clip / self.gamma, self.padded
        plain = c + math.sqrt(d)
        if self.beta == 0:
            return plain
        cond = math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2))
        return min(plain, cond)

    def encode(self, x, *, seed: Optional[int] = None) -> np.ndarray:
        """One participant's update (float, d) -> its ring element (uint32, padded)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size != self.d:
            raise ValueError(f"the update has {x.size} coordinates, the encoding d = {self.d}")
        if not np.all(np.isfinite(x)):
            raise ValueError("the update holds NaN or Inf")
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        y = np.zeros(self.padded, dtype=np.float32)
        y[: self.d] = x
        _core.hadamard_rotate(y, self.block, self.seed, False)
        z = y.astype(np.float64) / self.gamma
        rng = np.random.default_rng(new_seed() if seed is None else seed)
        bound2 = self.norm_bound ** 2
        lo = np.floor(z)
        frac = z - lo
        for _ in range(MAX_ROUNDING_TRIES):
            r = lo + (rng.random(z.size) < frac)
            if float(np.dot(r, r)) <= bound2:
                break
        else:  # pragma: no cover - probability beta^1000
            raise RuntimeError("conditional rounding did not meet its norm bound")
        q = r.astype(np.int64)
        if self.sigma > 0:
            q += discrete_gaussian(q.size, (self.sigma / self.gamma) ** 2,
                                   seed=new_seed() if seed is None else seed + 1)
        return (q & ((1 << self.bits) - 1)).astype(np.uint32)

    def decode(self, total: np.ndarray, count: Optional[int] = None) -> np.ndarray:
        """The ring sum of `count` (default n) encodings -> their mean (float64, d)."""
        t = np.asarray(total)
        if t.dtype != np.uint32 or t.shape != (self.padded,):
            raise ValueError(f"the sum must be a uint32 array of {self.padded} coordinates")
        count = self.n if count is None else count
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be a positive integer, got {count!r}")
        v = t.astype(np.int64)
        half = 1 << (self.bits - 1)
        v[v >= half] -= 1 << self.bits
        y = (v.astype(np.float64) * self.gamma).astype(np.float32)
        _core.hadamard_rotate(y, self.block, self.seed, True)
        return y[: self.d].astype(np.float64) / count

    def tau(self) -> float:
        s = self.sigma / self.gamma
        return 10 * sum(math.exp(-2 * (math.pi * s) ** 2 * k / (k + 1)) for k in range(1, self.n))

    def rdp(self, orders=RDP_ORDERS) -> np.ndarray:
        """Renyi DP of one release of the sum, at each order (grid units throughout)."""
        if self.sigma == 0:
            return np.full(len(orders), np.inf)
        s = self.sigma / self.gamma
        l2 = self.norm_bound
        l1 = min(l2 * math.sqrt(self.padded), l2 * l2)  # integer vectors: |x|_1 <= |x|_2^2
        l2s, l1s = l2 / (math.sqrt(self.n) * s), l1 / (math.sqrt(self.n) * s)
        tau, d = self.tau(), self.padded
        out = []
        for a in orders:
            out.append(min(a / 2 * l2s ** 2 + tau * d,
                           a / 2 * (l2s ** 2 + 2 * l1s * tau + tau ** 2 * d),
                           a / 2 * (l2s + math.sqrt(d) * tau) ** 2))
        return np.array(out)

    def epsilon(self, delta: float, rounds: int = 1) -> float:
        """(epsilon, delta)-DP of `rounds` releases (add or remove one participant), via dp-accounting."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
        eps, _ = compute_epsilon(RDP_ORDERS, self.rdp() * rounds, delta)
        return float(eps)

    def wrap_probability(self) -> float:
        """An upper bound on P(some coordinate of the sum of n encodings leaves the ring).

        Per coordinate, in grid units: the n rotated, clipped updates add to at most n clip /
        gamma in norm, and a randomized Hadamard coordinate of a vector of norm r is sub-Gaussian
        with variance proxy r^2 / d; rounding moves each by < 1; the noise is sub-Gaussian with
        variance sigma^2 / gamma^2 each (discrete Gaussians are). Union bound over coordinates."""
        d = self.padded
        var = (self.n * self.clip / self.gamma) ** 2 / d + self.n * (self.sigma / self.gamma) ** 2
        room = (1 << (self.bits - 1)) - self.n
        if room <= 0:
            return 1.0
        return min(1.0, 2 * d * math.exp(-room * room / (2 * var)))
