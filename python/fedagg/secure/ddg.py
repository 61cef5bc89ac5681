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
from typing import List, Optional

import numpy as np

from .. import _core
from ..privacy.noise import discrete_gaussian, new_seed

RDP_ORDERS = tuple(range(2, 129)) + (256, 512, 1024)
MAX_ROUNDING_TRIES = 1000


MIN_BLOCK, MAX_BLOCK = 256, 1 << 20


def segments(d: int) -> List[int]:
    """The rotation's blocks: d rounded up to a multiple of 256, written as powers of two (at
    most 2^20 each), largest first. Padding is under 256 coordinates, so the ring vector costs
    4 bytes per coordinate (a single power-of-two block would cost up to 8)."""
    total = -(-d // MIN_BLOCK) * MIN_BLOCK
    out = [MAX_BLOCK] * (total // MAX_BLOCK)
    rest = total % MAX_BLOCK
    b = MAX_BLOCK >> 1
    while rest:
        if rest >= b:
            out.append(b)
            rest -= b
        b >>= 1
    return out


def _rotate(y: np.ndarray, seed: int, inverse: bool) -> None:
    pos = 0
    for i, b in enumerate(segments(y.size)):
        # each segment its own signs (a seed per segment, all from the group's seed)
        _core.hadamard_rotate(y[pos:pos + b], b, (seed * 1_000_003 + i) % (1 << 64), inverse)
        pos += b


@dataclass(frozen=True)
class Encoding:
    """clip: L2 norm bound of an update; sigma: each participant's noise stddev, in update units
    (the sum carries sqrt(n) sigma); gamma: the integer grid's step, in update units; n: the
    participants whose encodings are summed; bits: the ring Z_{2^bits}; beta: the conditional
    rounding's slack (the chance a plain randomized rounding exceeds the norm bound); seed: the
    rotation, shared by the group (public). The rotation works on power-of-two segments of the
    update padded to a multiple of 256 coordinates (``segments``)."""

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

    @classmethod
    def for_ring(cls, clip: float, sigma: float, n: int, d: int, *, bits: int = 32, wrap: float = 1e-9,
                 seed: int = 0) -> "Encoding":
        """The finest grid (smallest gamma) whose wrap-around bound (``wrap_probability``) is at most
        `wrap` (the sum of n encodings stays in Z_{2^bits} with probability >= 1 - wrap), and no
        finer than sigma / 2^19 (the exact noise sampler's range)."""
        if not 0 < wrap < 1:
            raise ValueError(f"wrap must be in (0, 1), got {wrap!r}")
        probe = cls(clip=clip, sigma=sigma, gamma=1.0, n=n, d=d, bits=bits, seed=seed)  # validates the rest
        room = (1 << (bits - 1)) - n
        if room <= 0:
            raise ValueError(f"a ring of {bits} bits cannot hold the sum of {n} encodings")
        spread = (n * clip) ** 2 / min(segments(d)) + n * sigma ** 2  # gamma^2 x the variance proxy
        gamma = math.sqrt(spread * 2 * math.log(2 * probe.padded / wrap)) / room
        # no finer than the exact noise sampler takes (sigma / gamma < 2^19.5): a finer grid adds
        # nothing the noise does not drown
        gamma = max(gamma * (1 + 1e-9), sigma / (1 << 19), clip * 1e-30)
        return cls(clip=clip, sigma=sigma, gamma=gamma, n=n, d=d, bits=bits, seed=seed)

    @property
    def padded(self) -> int:
        """Coordinates on the wire: d rounded up to a multiple of 256."""
        return -(-self.d // MIN_BLOCK) * MIN_BLOCK

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
        x = np.asarray(x).reshape(-1)
        if x.size != self.d:
            raise ValueError(f"the update has {x.size} coordinates, the encoding d = {self.d}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)  # the ring's grid is far coarser than float32's rounding
        norm2 = float(_core.sqnorms([x])[0])  # float64 accumulation; NaN/Inf make it non-finite
        if not math.isfinite(norm2):
            raise ValueError("the update holds NaN or Inf (or is beyond float32)")
        scale = min(1.0, self.clip / math.sqrt(norm2)) if norm2 > 0 else 1.0
        y = np.zeros(self.padded, dtype=np.float32)
        np.multiply(x, np.float32(scale), out=y[: self.d])
        _rotate(y, self.seed, False)
        rseed = new_seed() if seed is None else seed
        bound2 = self.norm_bound ** 2
        for attempt in range(MAX_ROUNDING_TRIES):
            # native unbiased randomized rounding (Philox uniforms), one fresh stream per try, and
            # the rounded vector's squared norm in the same pass
            ring, qnorm2, ok = _core.round_to_ring(y, self.gamma, rseed, attempt * self.padded, self.bits)
            if not ok:
                raise ValueError("the update does not fit the integer grid (gamma too small for clip)")
            if qnorm2 <= bound2:
                break
        else:  # pragma: no cover - probability beta^1000
            raise RuntimeError("conditional rounding did not meet its norm bound")
        if self.sigma > 0:
            noise = discrete_gaussian(ring.size, (self.sigma / self.gamma) ** 2,
                                      seed=new_seed() if seed is None else seed + 1)
            ring += noise.astype(np.uint32)  # both mod 2^32: uint32 adds wrap
            if self.bits < 32:
                ring &= np.uint32((1 << self.bits) - 1)
        return ring

    def decode(self, total: np.ndarray, count: Optional[int] = None) -> np.ndarray:
        """The ring sum of `count` (default n) encodings -> their mean (float64, d)."""
        t = np.asarray(total)
        if t.dtype != np.uint32 or t.shape != (self.padded,):
            raise ValueError(f"the sum must be a uint32 array of {self.padded} coordinates")
        count = self.n if count is None else count
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if self.bits < 32:  # sign-extend the ring's top bit: the signed lift, as int32
            shift = np.uint32(32 - self.bits)
            t = np.left_shift(t, shift).view(np.int32) >> np.int32(shift)
        y = np.empty(t.size, dtype=np.float32)
        # the signed lift (int32 for bits = 32) times gamma in float64, rounded once to float32, one pass
        np.multiply(t.view(np.int32), self.gamma, out=y, casting="unsafe")
        _rotate(y, self.seed, True)
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
        with variance proxy r^2 / b in a segment of b coordinates (the whole norm may sit in the
        smallest segment); rounding moves each by < 1; the noise is sub-Gaussian with variance
        sigma^2 / gamma^2 each (discrete Gaussians are). Union bound over coordinates."""
        d = self.padded
        var = (self.n * self.clip / self.gamma) ** 2 / min(segments(self.d)) + self.n * (self.sigma / self.gamma) ** 2
        room = (1 << (self.bits - 1)) - self.n
        if room <= 0:
            return 1.0
        return min(1.0, 2 * d * math.exp(-room * room / (2 * var)))
