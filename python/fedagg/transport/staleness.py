"""How much an update computed on an older model counts in a buffered round.

In buffered mode (FedBuff, Nguyen et al. 2022) an update computed on model version b and
accepted while version v is current has staleness s = v - b; it enters the buffer as
``weight(s) * update``. The weights a server can use (``ServerConfig.staleness``):

- ``"sqrt"``: 1 / sqrt(1 + s), FedBuff's choice (the default);
- ``"constant"``: 1 (staleness ignored; FedBuff's ablation);
- ``"poly:a"``: (1 + s) ** -a, FedAsync's polynomial weight (Xie et al. 2019), a > 0;
- ``"hinge:a:b"``: 1 for s <= b, else 1 / (a (s - b) + 1), FedAsync's hinge weight, a > 0, b >= 0.

Every weight is 1 at s = 0 and in (0, 1] after, so a weighted update's norm never grows (a
clipping bound still holds after it).
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["staleness_weight"]


def staleness_weight(spec: str) -> Callable[[int], float]:
    """The weight function named by `spec` (see the module doc); ValueError names what is wrong."""
    if not isinstance(spec, str):
        raise TypeError(f"staleness must be a string such as 'sqrt', 'constant', 'poly:0.5' or 'hinge:10:4', "
                        f"got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"staleness {spec!r}: its parameters must be numbers") from None
    if any(not math.isfinite(a) for a in args):
        raise ValueError(f"staleness {spec!r}: its parameters must be finite")
    if name == "sqrt" and not args:
        return lambda s: 1.0 / math.sqrt(1.0 + s)
    if name == "constant" and not args:
        return lambda s: 1.0
    if name == "poly" and len(args) == 1:
        (a,) = args
        if not a > 0:
            raise ValueError(f"staleness {spec!r}: the exponent must be > 0")
        return lambda s: (1.0 + s) ** -a
    if name == "hinge" and len(args) == 2:
        a, b = args
        if not (a > 0 and b >= 0):
            raise ValueError(f"staleness {spec!r}: hinge:a:b needs a > 0 and b >= 0")
        return lambda s: 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    raise ValueError(f"unknown staleness weight {spec!r}: use 'sqrt' (FedBuff), 'constant', 'poly:A' or "
                     "'hinge:A:B'")
