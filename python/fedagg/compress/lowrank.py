"""PowerSGD-style low-rank compression of 2-D layers (Vogels et al. 2019).

Each 2-D layer M (m x n, with error feedback M = update + residual) is sent as
P (m x r) and Q (n x r): Q is warm-started from the previous round, P = M Q is
orthonormalized, Q = M^T P, and M is approximated by P Q^T (one power
iteration per round, so the subspace improves from round to round). Layers of
other shapes (biases, norms) travel uncompressed. The payload decodes to the
layers flattened and concatenated in the order given.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._arrays import convert
from .codecs import _check_finite, _expect, _register, _require_finite
from .payload import Payload, check_buffers


@dataclass
class PowerSGDState:
    """Per-layer warm start Q and residual, kept by the participant across rounds."""

    q: Dict[str, np.ndarray] = field(default_factory=dict)
    residual: Dict[str, np.ndarray] = field(default_factory=dict)


def _layers(layers: Any) -> List[Tuple[str, np.ndarray]]:
    items = list(layers.items()) if isinstance(layers, Mapping) else list(layers)
    if not items:
        raise ValueError("no layers")
    out, names = [], set()
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"layers[{i}] must be a (name, array) pair")
        name, arr = item
        if name in names:
            raise ValueError(f"layer name {name!r} repeated")
        names.add(name)
        a, _, ops = convert(arr, f"layer {name!r}")
        if getattr(ops, "name", "cpu") != "cpu":
            raise ValueError("PowerSGD takes host arrays for now")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.size == 0:
            raise ValueError(f"layer {name!r} is empty")
        _require_finite(a.reshape(-1))
        out.append((name, a))
    return out


@_register
class PowerSGD:
    name = "powersgd"

    def __init__(self, rank: int = 2, *, error_feedback: bool = True, seed: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        self.rank, self.error_feedback, self.seed = rank, error_feedback, seed

    def state(self, d: Optional[int] = None) -> PowerSGDState:
        return PowerSGDState()

    def encode(self, layers: Any, state: Optional[PowerSGDState] = None) -> Payload:
        """layers: a mapping or sequence of (name, array); 2-D arrays are compressed."""
        specs, buffers, d = [], {}, 0
        for i, (name, a) in enumerate(_layers(layers)):
            d += a.size
            if a.ndim != 2 or min(a.shape) <= self.rank:  # low rank would not save anything
                specs.append({"name": name, "shape": list(a.shape), "rank": 0})
                buffers[f"{i}.dense"] = a.reshape(-1)
                continue
            m, n = a.shape
            M = a.astype(np.float64)
            if state is not None and self.error_feedback:
                res = state.residual.get(name)
                if res is not None and res.shape == a.shape:
                    M = M + res
            q = state.q.get(name) if state is not None else None
            if q is None or q.shape != (n, self.rank):
                q = np.random.default_rng([self.seed, i]).standard_normal((n, self.rank))
            P, _ = np.linalg.qr(M @ q)
            Q = M.T @ P
            if state is not None:
                state.q[name] = Q
                if self.error_feedback:
                    state.residual[name] = (M - P @ Q.T).astype(np.float32)
            specs.append({"name": name, "shape": [m, n], "rank": self.rank})
            buffers[f"{i}.P"] = P.astype(np.float32).reshape(-1)
            buffers[f"{i}.Q"] = Q.astype(np.float32).reshape(-1)
        return Payload(self.name, d, {"layers": specs}, buffers)

    @staticmethod
    def check(p: Payload) -> None:
        specs = p.params.get("layers")
        _expect(set(p.params) == {"layers"} and isinstance(specs, list) and specs, "powersgd: params must be layers")
        names, total = [], 0
        for i, s in enumerate(specs):
            _expect(isinstance(s, dict) and set(s) == {"name", "shape", "rank"}, f"powersgd: bad layer spec {i}")
            shape, r = s["shape"], s["rank"]
            _expect(isinstance(shape, list) and 1 <= len(shape) <= 8
                    and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= (1 << 40) for v in shape),
                    f"powersgd: bad shape {shape!r}")
            _expect(math.prod(shape) <= p.d, f"powersgd: shape {shape!r} holds more than d = {p.d} values")
            _expect(isinstance(r, int) and not isinstance(r, bool) and r >= 0, f"powersgd: bad rank {r!r}")
            size = int(np.prod(shape, dtype=np.int64))
            total += size
            if r == 0:
                names.append((f"{i}.dense", size))
            else:
                _expect(len(shape) == 2 and r < min(shape), f"powersgd: rank {r} does not fit shape {shape}")
                names += [(f"{i}.P", shape[0] * r), (f"{i}.Q", shape[1] * r)]
        _expect(total == p.d, f"powersgd: layers hold {total} values, d = {p.d}")
        check_buffers(p, tuple(n for n, _ in names))
        for n, size in names:
            _expect(p.buffers[n].size == size and p.buffers[n].dtype == np.float32,
                    f"powersgd: buffer {n!r} needs {size} float32")
            _check_finite(p, n)

    @staticmethod
    def add(sink, p: Payload, w: float) -> None:
        off = 0
        for i, s in enumerate(p.params["layers"]):
            size = int(np.prod(s["shape"]))
            if s["rank"] == 0:
                sink.dense_add(off, p.buffers[f"{i}.dense"], w)
            else:
                m, n = s["shape"]
                P = p.buffers[f"{i}.P"].reshape(m, s["rank"]).astype(np.float64)
                Q = p.buffers[f"{i}.Q"].reshape(n, s["rank"]).astype(np.float64)
                sink.dense_add(off, (P @ Q.T).reshape(-1), w)  # one layer at a time
            off += size
