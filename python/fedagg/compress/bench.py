"""Compression section of ``fedagg bench``: codec encode / aggregate speed against
the NumPy and torch idioms, on the same vector in the same run.

>>> from fedagg.compress import bench
>>> r = bench.run(d=100_000, ratio=0.01, n=3, repeat=1)
>>> [c for c in sorted({row["case"] for row in r["rows"]}) if "top-k" in c]
['mean of 3 top-k payloads', 'top-k encode']
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from . import TopK, Uniform, decode, mean
from .._benchutil import add_speedups, median_time, optional_torch, table
from .sink import HostSink


_time = median_time


def run(d: int = 10_000_000, ratio: float = 0.01, n: int = 16, repeat: int = 5, seed: int = 0) -> Dict[str, Any]:
    """Times top-k encoding (k = ratio * d), the mean of n top-k payloads, and 8-bit
    quantization, each against the NumPy (and torch) idiom. (``fedagg bench`` measures the copy
    bandwidth, what GB/s compares against, once for all sections.)"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d, dtype=np.float32)
    k = max(1, int(ratio * d))
    nbytes = x.nbytes
    rows: List[Dict[str, Any]] = []

    def add(case, impl, seconds, work_bytes, agrees=None, note=""):
        rows.append({"case": case, "impl": impl, "seconds": seconds, "gbps": work_bytes / seconds / 1e9,
                     "agrees": agrees, "note": note})

    exact = TopK(k, error_feedback=False)
    ours = exact.encode(x)
    ref_set = set(ours.buffers["indices"].tolist())
    add("top-k encode", "fedagg exact", _time(lambda: exact.encode(x), repeat), nbytes)
    approx = TopK(k, method="threshold", error_feedback=False)
    sent = approx.encode(x).buffers["indices"].size
    add("top-k encode", "fedagg threshold", _time(lambda: approx.encode(x), repeat), nbytes,
        note=f"sends {sent} (k = {k})")

    def np_topk():
        idx = np.argpartition(np.abs(x), -k)[-k:]
        return idx, x[idx]

    got = set(np_topk()[0].tolist())
    add("top-k encode", "numpy argpartition", _time(np_topk, repeat), nbytes, got == ref_set,
        "ties may pick other indices" if got != ref_set else "")
    torch = optional_torch()
    if torch is not None:
        T = torch.from_numpy(x)

        def torch_topk():
            idx = torch.topk(T.abs(), k, sorted=False).indices
            return idx, T[idx]

        got = set(torch_topk()[0].tolist())
        add("top-k encode", "torch.topk", _time(torch_topk, repeat), nbytes, got == ref_set)

    payloads = [TopK(k, error_feedback=False).encode(rng.standard_normal(d, dtype=np.float32)) for _ in range(n)]
    wire_bytes = sum(p.nbytes for p in payloads)
    add(f"mean of {n} top-k payloads", "fedagg", _time(lambda: mean(payloads), repeat), wire_bytes)

    def np_mean():
        acc = np.zeros(d)
        for p in payloads:
            acc[p.buffers["indices"]] += p.buffers["values"]
        return (acc / n).astype(np.float32)

    agree = bool(np.allclose(np_mean(), mean(payloads), rtol=1e-6, atol=1e-7))
    add(f"mean of {n} top-k payloads", "numpy scatter", _time(np_mean, repeat), wire_bytes, agree)
    dense = _time(lambda: np.mean(np.stack([decode(p) for p in payloads]), axis=0), max(1, repeat // 2))
    add(f"mean of {n} top-k payloads", "decode then mean", dense, wire_bytes, None, f"{n} dense copies")

    # 8-bit stochastic quantization: fedagg's kernel against the NumPy idiom.
    bucket = 512
    q8 = Uniform(8, bucket=bucket)
    add("8-bit quantize", "fedagg", _time(lambda: q8.encode(x, seed=1), repeat), nbytes)
    xb = x[: d - d % bucket].reshape(-1, bucket)

    def np_quantize():
        lo = xb.min(1, keepdims=True)
        step = (xb.max(1, keepdims=True) - lo) / 255
        u = rng.random(xb.shape, dtype=np.float32)
        return lo, step, np.floor((xb - lo) / np.where(step > 0, step, 1) + u).astype(np.uint8)

    add("8-bit quantize", "numpy", _time(np_quantize, repeat), xb.nbytes)
    p8 = q8.encode(x, seed=1)
    sink = HostSink(d)
    acc = sink.acc
    add("8-bit dequantize (+= into float64)", "fedagg", _time(lambda: Uniform.add(sink, p8, 1.0), repeat), nbytes)
    lo, step, codes = np_quantize()
    add("8-bit dequantize (+= into float64)", "numpy",
        _time(lambda: np.add(acc[: xb.size].reshape(xb.shape), lo + step * codes,
                             out=acc[: xb.size].reshape(xb.shape)), repeat), xb.nbytes)
    add_speedups(rows)
    return {"d": d, "k": k, "ratio": ratio, "n": n, "repeat": repeat, "rows": rows}


def lines(res: Dict[str, Any]) -> List[str]:
    return table(f"compression: d = {res['d']:,} float32, top-k k = {res['k']:,} ({res['ratio']:g}), "
                 f"n = {res['n']}, median of {res['repeat']}", res["rows"])
