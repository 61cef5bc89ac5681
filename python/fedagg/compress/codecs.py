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
from .sink import sink_for

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
        # Encoding runs on the host: the payload travels from host memory anyway,
        # so a device update is copied once (float32) and encoded by the CPU kernels.
        arr = ops.lib.to_host(arr)
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


class _Codec:
    """What every codec shares: the error-feedback state and seeds."""

    error_feedback: bool

    def state(self, d: int) -> Optional[ErrorFeedback]:
        return ErrorFeedback.zeros(d) if self.error_feedback else None

    @staticmethod
    def _corrected(x: np.ndarray, state: Optional[ErrorFeedback]) -> np.ndarray:
        """The update plus what earlier rounds did not send."""
        if state is None:
            return x
        if state.residual.shape != x.shape:
            raise ValueError(f"state is for d = {state.residual.size}, update has d = {x.size}")
        return x + state.residual

    @staticmethod
    def _seed(seed: Optional[int]) -> int:
        if seed is None:
            return int.from_bytes(os.urandom(8), "little") >> 1
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        return int(seed)


class _Sparse(_Codec):
    """Shared decode / aggregate of payloads carrying (indices, values)."""

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
    def add(cls, sink, p: Payload, w: float) -> None:
        """sink += w * decode(p), without forming decode(p)."""
        idx, val = cls.sparse(p)
        sink.scatter_add(idx, val, w)


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
        seed = self._seed(seed)
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


class _Dense(_Codec):
    """Quantizers: every coordinate travels, in fewer bits; reproducible stochastic rounding."""

    error_feedback = False

    def _prepare(self, update: Any, state: Optional[ErrorFeedback]) -> np.ndarray:
        # No finiteness pass here: each quantizer's per-bucket statistics (range,
        # norm, mean |x|) turn non-finite on NaN or Inf, and _stats_finite checks them.
        return self._corrected(_vector(update), state)

    def _finish(self, state: Optional[ErrorFeedback], corrected: np.ndarray, p: Payload) -> Payload:
        if state is not None:  # what this payload does not carry goes to the next round
            state.residual[...] = corrected - decode(p)
        return p

    @staticmethod
    def _stats_finite(*stats: np.ndarray) -> None:
        if not all(np.isfinite(a).all() for a in stats):
            raise ValueError("update contains NaN or Inf")

def _check_bucket_arg(bucket: Any) -> None:
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 8 or bucket % 8 or bucket > (1 << 20):
        raise ValueError(f"bucket must be a multiple of 8 in [8, 2^20], got {bucket!r}")


def _check_int_param(p: Payload, name: str, ok) -> int:
    v = p.params.get(name)
    _expect(isinstance(v, int) and not isinstance(v, bool) and ok(v), f"{p.codec}: bad {name} {v!r}")
    return v


def _check_bucket(p: Payload) -> int:
    return _check_int_param(p, "bucket", lambda b: 8 <= b <= (1 << 20) and b % 8 == 0)


def _buckets(d: int, bucket: int) -> int:
    return -(-d // bucket)


def _check_finite(p: Payload, name: str) -> None:
    v = np.ascontiguousarray(p.buffers[name])
    _expect(v.size == 0 or not bool(_core.nonfinite_rows([v])[0]), f"{p.codec}: {name} must be finite")


@_register
class Uniform(_Dense):
    """Stochastic uniform quantization to 8, 4, 2 or 1 bits with a range per bucket.

    Per bucket of ``bucket`` coordinates: lo = min, step = (max - min) / (2^bits - 1);
    each coordinate becomes floor((x - lo) / step + u), u ~ U[0, 1) from a hash of
    (seed, index): unbiased (E[decoded] = x), error at most one step.
    Bits per coordinate: bits + 64 / bucket.
    """

    name = "uniform"

    def __init__(self, bits: int = 8, *, bucket: int = 512, error_feedback: bool = False):
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits!r}")
        _check_bucket_arg(bucket)
        self.bits, self.bucket, self.error_feedback = bits, bucket, error_feedback

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None, seed: Optional[int] = None) -> Payload:
        x = self._prepare(update, state)
        lo, step, codes = _core.quantize_uniform(x, self.bits, self.bucket, self._seed(seed))
        self._stats_finite(lo, step)
        p = Payload(self.name, x.size, {"bits": self.bits, "bucket": self.bucket},
                    {"lo": lo, "step": step, "codes": codes})
        return self._finish(state, x, p)

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("lo", "step", "codes"))
        _expect(set(p.params) == {"bits", "bucket"}, f"uniform: params must be bits, bucket; got {p.params}")
        bits = _check_int_param(p, "bits", lambda b: b in (1, 2, 4, 8))
        nb = _buckets(p.d, _check_bucket(p))
        _expect(p.buffers["lo"].size == nb and p.buffers["step"].size == nb, f"uniform: expected {nb} lo and step")
        _expect(p.buffers["codes"].size == -(-p.d * bits // 8), "uniform: codes have the wrong size")
        _expect(p.buffers["lo"].dtype == np.float32 and p.buffers["step"].dtype == np.float32
                and p.buffers["codes"].dtype == np.uint8, "uniform: wrong buffer dtypes")
        _check_finite(p, "lo")
        _check_finite(p, "step")
        _expect(bool(np.all(p.buffers["step"] >= 0)), "uniform: steps must be >= 0")

    @staticmethod
    def add(sink, p: Payload, w: float) -> None:
        b = p.buffers
        sink.uniform_add(b["lo"], b["step"], b["codes"], p.params["bits"], p.params["bucket"], w)


@_register
class QSGD(_Dense):
    """QSGD (Alistarh et al. 2017): s levels of |x| / ||x_bucket||, stochastic, with sign.

    level = floor(|x| / norm * s + u): unbiased, variance at most
    min(bucket / s^2, sqrt(bucket) / s) * ||x||^2. Sent as int8 (s <= 127) plus a
    float32 norm per bucket.
    """

    name = "qsgd"

    def __init__(self, s: int = 127, *, bucket: int = 512, error_feedback: bool = False):
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 127:
            raise ValueError(f"s must be an integer in [1, 127], got {s!r}")
        _check_bucket_arg(bucket)
        self.s, self.bucket, self.error_feedback = s, bucket, error_feedback

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None, seed: Optional[int] = None) -> Payload:
        x = self._prepare(update, state)
        norm, codes = _core.quantize_qsgd(x, self.s, self.bucket, self._seed(seed))
        self._stats_finite(norm)
        p = Payload(self.name, x.size, {"s": self.s, "bucket": self.bucket}, {"norm": norm, "codes": codes})
        return self._finish(state, x, p)

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("norm", "codes"))
        _expect(set(p.params) == {"s", "bucket"}, f"qsgd: params must be s, bucket; got {p.params}")
        s = _check_int_param(p, "s", lambda v: 1 <= v <= 127)
        nb = _buckets(p.d, _check_bucket(p))
        _expect(p.buffers["norm"].size == nb and p.buffers["norm"].dtype == np.float32, f"qsgd: expected {nb} norms")
        codes = p.buffers["codes"]
        _expect(codes.size == p.d and codes.dtype == np.int8, "qsgd: expected one int8 code per coordinate")
        _check_finite(p, "norm")
        _expect(bool(np.all(p.buffers["norm"] >= 0)), "qsgd: norms must be >= 0")
        _expect(bool(np.all(np.abs(codes.astype(np.int16)) <= s)), f"qsgd: codes beyond s = {s}")

    @staticmethod
    def add(sink, p: Payload, w: float) -> None:
        sink.qsgd_add(p.buffers["norm"], p.buffers["codes"], p.params["s"], p.params["bucket"], w)


@_register
class Sign(_Dense):
    """1-bit sign with a scale per bucket (EF-signSGD, Karimireddy et al. 2019).

    Sends sign(x) packed 8 per byte and scale = mean |x| over each bucket; decodes to
    scale * sign(x). Biased: use with error feedback (the default). The signs alone
    aggregate by ``majority_vote`` (signSGD, Bernstein et al. 2018).
    """

    name = "sign"

    def __init__(self, *, bucket: int = 4096, error_feedback: bool = True):
        _check_bucket_arg(bucket)
        self.bucket, self.error_feedback = bucket, error_feedback

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None) -> Payload:
        x = self._prepare(update, state)
        scale, bits = _core.quantize_sign(x, self.bucket)
        self._stats_finite(scale)
        p = Payload(self.name, x.size, {"bucket": self.bucket}, {"scale": scale, "signs": bits})
        return self._finish(state, x, p)

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("scale", "signs"))
        _expect(set(p.params) == {"bucket"}, f"sign: params must be bucket; got {p.params}")
        nb = _buckets(p.d, _check_bucket(p))
        _expect(p.buffers["scale"].size == nb and p.buffers["scale"].dtype == np.float32, f"sign: expected {nb} scales")
        _expect(p.buffers["signs"].size == -(-p.d // 8) and p.buffers["signs"].dtype == np.uint8,
                "sign: signs have the wrong size")
        _check_finite(p, "scale")
        _expect(bool(np.all(p.buffers["scale"] >= 0)), "sign: scales must be >= 0")

    @staticmethod
    def add(sink, p: Payload, w: float) -> None:
        sink.sign_add(p.buffers["scale"], p.buffers["signs"], p.params["bucket"], w)


# Lloyd-Max quantizers of the standard normal (positive half; the rest is symmetric).
LLOYD_MAX = {
    1: (0.7979,),
    2: (0.4528, 1.5104),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326),
}


def _levels(bits: int) -> np.ndarray:
    pos = np.asarray(LLOYD_MAX[bits])
    return np.concatenate([-pos[::-1], pos])


@_register
class Rotation(_Dense):
    """Quantization after a randomized Hadamard rotation (DRIVE, Vargaftik et al. 2021;
    EDEN, Vargaftik et al. 2022).

    Per block of ``block`` coordinates (a power of two; the last block zero-padded):
    y = H D x / sqrt(B) with D random signs from the seed. Its coordinates are close to
    N(0, ||y||^2 / B), so each is rounded to the nearest of the 2^bits Lloyd-Max levels
    of that normal, c; the block's scale S = ||y||^2 / <y, c> makes the decode
    x = D H (S c) / sqrt(B) unbiased over a uniformly random rotation. The randomized
    Hadamard rotation approximates one: measured unbiased for blocks of 1024 and more,
    while blocks of a few dozen coordinates (tiny updates) carry a measurable bias. 1 bit is DRIVE (S c = ||y||^2 /
    ||y||_1 sign(y)), with vNMSE E||x^ - x||^2 / ||x||^2 near pi/2 - 1 = 0.571; 2 and 4
    bits shrink it about 4x and 60x. bits + 32 / block bits per coordinate. Payloads
    that share a seed are summed in the rotated domain and rotated back once.
    """

    name = "rotation"

    def __init__(self, bits: int = 1, *, block: int = 1 << 16, error_feedback: bool = False):
        if bits not in LLOYD_MAX:
            raise ValueError(f"bits must be 1, 2 or 4, got {bits!r}")
        if not isinstance(block, int) or block < 8 or block & (block - 1) or block > (1 << 20):
            raise ValueError(f"block must be a power of two in [8, 2^20], got {block!r}")
        self.bits, self.block, self.error_feedback = bits, block, error_feedback

    @staticmethod
    def block_for(d: int, block: int) -> int:
        return min(block, max(8, 1 << max(0, (d - 1).bit_length())))

    def encode(self, update: Any, state: Optional[ErrorFeedback] = None, seed: Optional[int] = None) -> Payload:
        x = self._prepare(update, state)
        d, seed = x.size, self._seed(seed)
        B = self.block_for(d, self.block)
        nb = -(-d // B)
        y = np.zeros(nb * B, dtype=np.float32)
        y[:d] = x
        _core.hadamard_rotate(y, B, seed, False)
        sq = _core.sqnorms(y.reshape(nb, B))
        self._stats_finite(sq)
        params = {"bits": self.bits, "block": B, "seed": seed}
        if self.bits == 1:  # native sign packing: code bit 1 = negative
            mean_abs, codes = _core.quantize_sign(y, B)
            dot = B * mean_abs.astype(np.float64) * LLOYD_MAX[1][0]
        else:
            Y = y.reshape(nb, B).astype(np.float64)
            rms = np.sqrt(sq / B)
            levels = _levels(self.bits)
            u = Y / np.where(rms > 0, rms, 1.0)[:, None]
            idx = np.searchsorted((levels[1:] + levels[:-1]) / 2, u).astype(np.uint8)
            dot = np.einsum("ij,ij->i", Y, levels[idx] * rms[:, None]) / np.where(rms > 0, rms, 1.0)
            per = 8 // self.bits
            groups = idx.reshape(-1, per).astype(np.uint8)
            codes = np.zeros(groups.shape[0], dtype=np.uint8)
            for k in range(per):
                codes |= (groups[:, k] << (k * self.bits)).astype(np.uint8)
        scale = np.divide(sq, dot, out=np.zeros(nb), where=dot > 0).astype(np.float32)
        p = Payload(self.name, d, params, {"scale": scale, "codes": codes})
        return self._finish(state, x, p)

    @staticmethod
    def check(p: Payload) -> None:
        check_buffers(p, ("scale", "codes"))
        _expect(set(p.params) == {"bits", "block", "seed"}, f"rotation: params must be bits, block, seed; got {p.params}")
        bits = _check_int_param(p, "bits", lambda b: b in LLOYD_MAX)
        B = _check_int_param(p, "block", lambda b: 8 <= b <= (1 << 20) and b & (b - 1) == 0)
        _check_int_param(p, "seed", lambda v: 0 <= v < 2**63)
        nb = _buckets(p.d, B)
        _expect(p.buffers["scale"].size == nb and p.buffers["scale"].dtype == np.float32,
                f"rotation: expected {nb} scales")
        _expect(p.buffers["codes"].size == nb * B * bits // 8 and p.buffers["codes"].dtype == np.uint8,
                "rotation: codes have the wrong size")
        _check_finite(p, "scale")
        _expect(bool(np.all(p.buffers["scale"] >= 0)), "rotation: scales must be >= 0")

    @staticmethod
    def add_group(sink, items) -> None:
        """sink += sum_i w_i decode(p_i) for payloads sharing d, bits, block and seed: one inverse rotation."""
        p0 = items[0][0]
        bits, B, seed = p0.params["bits"], p0.params["block"], p0.params["seed"]
        z = sink.scratch(-(-p0.d // B) * B)  # the rotated domain
        for p, w in items:
            scale, codes = p.buffers["scale"], p.buffers["codes"]
            if bits == 1:  # S c = S * 0.7979 * sign
                z.sign_add((scale * np.float32(LLOYD_MAX[1][0])).astype(np.float32), codes, B, w)
            else:
                z.levels_add(scale, codes, _levels(bits), bits, B, w)
        sink.add_rotated_back(z, B, seed)

    @classmethod
    def add(cls, sink, p: Payload, w: float) -> None:
        cls.add_group(sink, [(p, w)])


def _checked(payloads) -> list:
    payloads = list(payloads)
    if not payloads:
        raise ValueError("no payloads")
    d = payloads[0].d if isinstance(payloads[0], Payload) else None
    for i, p in enumerate(payloads):
        if not isinstance(p, Payload):
            raise TypeError(f"payloads[{i}] is not a Payload")
        if p.d != d:
            raise ValueError(f"payloads[{i}] has d = {p.d}, payloads[0] has d = {d}")
        codec_for(p.codec).check(p)
    return payloads


def decode(payload: Payload, *, like: Any = None):
    """The dense float32 update a payload stands for (on the device of ``like``, if given)."""
    (p,) = _checked([payload])
    sink = sink_for(p.d, like)
    codec_for(p.codec).add(sink, p, 1.0)
    return sink.result()


def _weights(weights, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weights must be one finite non-negative number per payload, with a positive sum")
    return w / w.sum()


def mean(payloads, weights=None, *, like: Any = None):
    """Weighted mean of payloads (any codecs), each decoded into one float64 accumulator.

    Never builds n dense updates: memory is O(d) plus the payloads. With ``like``
    a CUDA tensor (torch) or CuPy array, the accumulator lives on its device and
    the payloads are decoded there by fedagg's CUDA kernels; the result is a
    float32 array of ``like``'s library and device (a CPU torch tensor for a CPU
    tensor, NumPy otherwise).
    """
    payloads = _checked(payloads)
    sink = sink_for(payloads[0].d, like)
    groups: Dict[Any, list] = {}  # rotation payloads sharing a rotation are decoded together
    for p, wi in zip(payloads, _weights(weights, len(payloads))):
        if p.codec == Rotation.name:
            groups.setdefault((p.params["bits"], p.params["block"], p.params["seed"]), []).append((p, float(wi)))
        else:
            codec_for(p.codec).add(sink, p, float(wi))
    for items in groups.values():
        Rotation.add_group(sink, items)
    return sink.result()


def majority_vote(payloads, *, like: Any = None):
    """signSGD with majority vote (Bernstein et al. 2018) on packed sign payloads.

    Returns sign(sum_i sign_i) per coordinate as float32 in {-1, 0, +1} (0 on a tie),
    counting votes straight from the packed bits (on ``like``'s device, if given).
    """
    payloads = _checked(payloads)
    for i, p in enumerate(payloads):
        if p.codec != Sign.name:
            raise ValueError(f"payloads[{i}] is {p.codec!r}, majority vote takes sign payloads")
    return sink_for(payloads[0].d, like).sign_votes(payloads)


def decode_into(payloads, out: Any = None, *, like: Any = None):
    """Decode n payloads into the rows of one (n, d) float32 buffer (reused if given).

    ``out`` may be a NumPy array or a CUDA tensor / CuPy array (decoded on its
    device); without ``out``, the buffer is made on ``like``'s device.
    """
    payloads = _checked(payloads)
    n, d = len(payloads), payloads[0].d
    if out is not None:
        if tuple(out.shape) != (n, d) or str(out.dtype).split(".")[-1] != "float32" or not _c_contiguous(out):
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(n, d)}")
        like = out
    sink = sink_for(d, like)
    if out is None:
        out = sink.empty_rows(n)
    for i, p in enumerate(payloads):
        sink.reset()
        codec_for(p.codec).add(sink, p, 1.0)
        sink.copy_row(out, i)
    return out


def _c_contiguous(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.flags.c_contiguous
    if hasattr(x, "is_contiguous"):
        return x.is_contiguous()
    return bool(x.flags.c_contiguous)


def aggregate(payloads, rule: str = "mean", f: int = 0, *, weights=None, out: Any = None, like: Any = None,
              **options):
    """Any fedagg rule over compressed updates.

    The mean is computed straight from the payloads (O(d) memory). Other rules
    decode into one (n, d) float32 buffer (``out``, reused across rounds if
    given) and run ``fedagg.aggregate`` on it: one dense n x d buffer at most.
    On a GPU: pass ``like`` (or a device ``out``) and both happen on its device.
    """
    if rule == "mean" and not options:
        return mean(payloads, weights, like=like if out is None else out)
    from ..rules import aggregate as dense_aggregate

    return dense_aggregate(decode_into(payloads, out, like=like), rule, f, weights=weights, **options)
