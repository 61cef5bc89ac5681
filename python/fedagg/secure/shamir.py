"""Shamir's t-of-k secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (a Mersenne prime).

One field element holds a whole secret (secrets are below 2^256 < p), so a share is one
evaluation: splitting is t multiplications per share and combining t^2, in Python integers
(microseconds for the k <= 64 shares of a SecAgg+ neighbourhood; Flower's byte-wise sharing is
what made its rounds slow). Coefficients come from the OS CSPRNG.
"""

from __future__ import annotations

import secrets
from typing import Dict, Iterable, List, Tuple

P = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, t: int, xs: Iterable[int]) -> Dict[int, int]:
    """Shares of `secret` (32 bytes) at the distinct nonzero points `xs`: any t recover it,
    fewer reveal nothing about it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != 32:
        raise ValueError("the secret must be 32 bytes")
    xs = list(xs)
    if not 1 <= t <= len(xs):
        raise ValueError(f"need 1 <= t <= number of shares; got t = {t}, {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("share points must be distinct and in [1, p)")
    coef = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coef):  # Horner
            y = (y * x + c) % P
        out[x] = y
    return out


def combine(shares: Iterable[Tuple[int, int]]) -> bytes:
    """The secret from (x, y) shares (exactly t of them, or more of one polynomial): Lagrange
    interpolation at 0. Shares of another polynomial give another value, not an error: callers
    check the result against a commitment."""
    pts: List[Tuple[int, int]] = list(shares)
    xs = [x for x, _ in pts]
    if not pts or len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs) or any(not 0 <= y < P for _, y in pts):
        raise ValueError("shares must be (x, y) with distinct x in [1, p) and y in [0, p)")
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * xj % P
                den = den * (xj - xi) % P
        s = (s + yi * num * pow(den, -1, P)) % P
    if s >= 1 << 256:
        raise ValueError("the shares do not combine to a 32-byte secret")
    return s.to_bytes(32, "big")


def to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= P:
        raise ValueError("a share must be below p")
    return y
