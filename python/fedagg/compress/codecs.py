"""Sparsifying codecs: top-k (exact, or a sampled-threshold estimate) and random-k.

Each codec encodes one update on the participant (``encode(update, state)``)
and is decoded, or aggregated without decoding, on the aggregator. With error
feedback (Stich et al. 2018; Karimireddy et al. 2019) the participant keeps
what it did not send and adds it to its next update, so no signal is lost
over rounds: ``state = codec.state(d)`` once, then pass it to every encode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from .. import _core
from .._arrays import convert
from .payload import Payload, PayloadError, _expect, check_buffers

_REGISTRY: Dict[str, Any] = {}


def codec_for(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PayloadError(f"unknown codec {name!r}; known: {sorted(_REGISTRY)}") from None


def _register(cls):
    _REGISTRY[cls.name] = cls
    return cls


@dataclass
class ErrorFeedback:
    """The residual a participant carries to its next round (float32, length d)."""

    residual: np.ndarray

    @classmethod
    def zeros(cls, d: int) -> "ErrorFeedback":
        return cls(np.zeros(d, dtype=np.float32))


def _vector(update: Any) -> np.ndarray:
    arr, _, ops = convert(update, "update")
    if getattr(ops, "name", "cpu") != "cpu":
        raise ValueError("the compression codecs take host arrays for now (CUDA codecs are not built yet)")
    x = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if x.size == 0:
        raise ValueError("update has no coordinates")
    return x


def _require_finite(values: np.ndarray) -> None:
    if _core.nonfinite_rows([np.ascontiguousarray(values)])[0]:
        raise ValueError("update contains NaN or Inf")


def _k_of(k: Optional[int], ratio: Optional[float], d: int) -> int:
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k and ratio")
    if k is None:
        k = max(1, int(round(ratio * d)))
    if not 1 <= k <= d:
        raise ValueError(f"k must satisfy 1 <= k <= d = {d}, got {k}")
    return k


def _check_sparse(p: Payload, count: int) -> None:
    idx, val = p.buffers["indices"], p.buffers["values"]
    _expect(idx.size == count and val.size == count, f"{p.codec}: expected {count} indices and values")
    expected = np.uint32 if p.d <= 0xFFFFFFFF else np.uint64
    _expect(idx.dtype == expected, f"{p.codec}: indices must be {np.dtype(expected).name} for d = {p.d}")
    if count:
        _expect(int(idx[-1]) < p.d, f"{p.codec}: index {int(idx[-1])} out of range for d = {p.d}")
        _expect(bool(np.all(idx[1:] > idx[:-1])), f"{p.codec}: indices must be strictly increasing")
        _expect(not bool(_core.nonfinite_rows([np.ascontiguousarray(val)])[0]), f"{p.codec}: values must be finite")


class _Sparse:
    """Shared decode / aggregate of payloads carrying (indices, values)."""

    error_feedback: bool

    def state(self, d: int) -> Optional[ErrorFeedback]:
        return ErrorFeedback.zeros(d) if self.error_feedback else None

    def _corrected(self, x: np.ndarray, state: Optional[ErrorFeedback]) -> np.ndarray:
        if state is None:
            return x
        if state.residual.shape != x.shape:
            raise ValueError(f"state is for d = {state.residual.size}, update has d = {x.size}")
        return x + state.residual

    @staticmethod
    def _remember(state: Optional[ErrorFeedback], corrected: np.ndarray, idx: np.ndarray, sent: np.ndarray) -> None:
        if state is not None:
            state.residual[...] = corrected
            state.residual[idx] -= sent

    @classmethod
    def sparse(cls, p: Payload):
        """(indices, values) of a checked payload of this codec."""
        return p.buffers["indices"], p.buffers["values"]

    @classmethod
    def decode(cls, p: Payload) -> np.ndarray:
        out = np.zeros(p.d)
        idx, val = cls.sparse(p)
        _core.scatter_add(out, np.ascontiguousarray(idx), np.ascontiguousarray(val), 1.0)
        return out.astype(np.float32)


@_register
class TopK(_Sparse):
    """Top-k sparsification: the k coordinates of largest magnitude (Aji & Heafield 2017).

    ``method="exact"`` selects exactly k (ties: lowest indices); ``"threshold"``
    estimates the k-th magnitude from a strided sample of 65536 coordinates and
    sends every coordinate at or above it (about k; one pass, no selection).
    """

    name = "topk"

    def __init__(self, k: Optional[int] = None, *, ratio: Optional[float] = None,
                 method: str = "exact", error_feedback: bool = True):
        if method not in ("exact", "threshold"):
            raise ValueError(f"method must be 'exact' or 'threshold', got {method!r}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.k, self.ratio, self.method, self.error_feedback = k, ratio, method, error_feedback

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None) -> Payload:
        x = _vector(update)
        k = _k_of(self.k, self.ratio, x.size)
        c = self._corrected(x, state)
        # NaN and Inf have the largest magnitude keys: if the update holds any,
        # the selection does, so checking the selected values is enough.
        if self.method == "exact":
            idx, val = _core.topk(c, k)
        else:
            stride = max(1, c.size // 65536)
            sample = np.abs(c[::stride])
            q = 1.0 - min(1.0, k / c.size)
            threshold = float(np.quantile(sample, q)) if q > 0 else 0.0
            if not np.isfinite(threshold):  # the sample met NaN or Inf
                raise ValueError("update contains NaN or Inf")
            idx, val = _core.gather_at_least(c, threshold)
        _require_finite(val)
        self._remember(state, c, idx, val)
        return Payload(self.name, x.size, {"k": int(idx.size)}, {"indices": idx, "values": val})

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("indices", "values"))
        k = p.params.get("k")
        _expect(set(p.params) == {"k"} and isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= p.d,
                f"topk: params must be {{'k': 0 <= k <= d}}, got {p.params}")
        _check_sparse(p, k)


@_register
class RandK(_Sparse):
    """Random-k sparsification with a shared seed: only the values travel.

    The k indices are drawn without replacement by NumPy's PCG64 from the
    payload's seed, so the aggregator regenerates them. ``unbiased=True``
    scales the values by d/k (an unbiased estimate of the update; use without
    error feedback); otherwise error feedback carries the rest.
    """

    name = "randk"

    def __init__(self, k: Optional[int] = None, *, ratio: Optional[float] = None,
                 unbiased: bool = False, error_feedback: Optional[bool] = None):
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.k, self.ratio, self.unbiased = k, ratio, unbiased
        self.error_feedback = (not unbiased) if error_feedback is None else error_feedback

    @staticmethod
    def indices(d: int, k: int, seed: int) -> np.ndarray:
        idx = np.random.default_rng(seed).choice(d, size=k, replace=False)
        idx.sort()
        return idx.astype(np.uint32 if d <= 0xFFFFFFFF else np.uint64)

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None, seed: Optional[int] = None) -> Payload:
        x = _vector(update)
        _require_finite(x)
        k = _k_of(self.k, self.ratio, x.size)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        c = self._corrected(x, state)
        idx = self.indices(x.size, k, seed)
        sent = c[idx]
        self._remember(state, c, idx, sent)
        scale = x.size / k if self.unbiased else 1.0
        val = (sent * np.float32(scale)).astype(np.float32) if self.unbiased else sent
        return Payload(self.name, x.size, {"k": k, "seed": int(seed), "scale": float(scale)}, {"values": val})

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("values",))
        k, seed, scale = p.params.get("k"), p.params.get("seed"), p.params.get("scale")
        _expect(set(p.params) == {"k", "seed", "scale"}, f"randk: params must be k, seed, scale; got {p.params}")
        _expect(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= p.d, f"randk: bad k {k!r}")
        _expect(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63, f"randk: bad seed {seed!r}")
        _expect(isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0, f"randk: bad scale {scale!r}")
        _expect(p.buffers["values"].size == k, f"randk: expected {k} values")
        _expect(not bool(_core.nonfinite_rows([np.ascontiguousarray(p.buffers["values"])])[0]),
                "randk: values must be finite")

    @classmethod
    def sparse(cls, p: Payload):
        return cls.indices(p.d, p.params["k"], p.params["seed"]), p.buffers["values"]


def decode(payload: Payload) -> np.ndarray:
    """The dense float32 update a payload stands for."""
    return codec_for(payload.codec).decode(payload)


def mean(payloads, weights=None) -> np.ndarray:
    """Weighted mean of sparse payloads, scatter-added into one float64 vector.

    Never builds n dense updates: memory is O(d) plus the payloads. Payloads
    parsed by Payload.from_frames were checked; others are checked here.
    """
    payloads = list(payloads)
    if not payloads:
        raise ValueError("no payloads")
    d = payloads[0].d
    w = np.ones(len(payloads)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(payloads),) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weights must be one finite non-negative number per payload, with a positive sum")
    acc = np.zeros(d)
    for i, p in enumerate(payloads):
        if not isinstance(p, Payload):
            raise TypeError(f"payloads[{i}] is not a Payload")
        if p.d != d:
            raise ValueError(f"payloads[{i}] has d = {p.d}, payloads[0] has d = {d}")
        codec = codec_for(p.codec)
        codec.check(p)
        idx, val = codec.sparse(p)
        _core.scatter_add(acc, np.ascontiguousarray(idx), np.ascontiguousarray(val), w[i] / w.sum())
    return acc.astype(np.float32)
