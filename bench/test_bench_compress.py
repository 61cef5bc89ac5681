"""pytest-benchmark suite of the compression codecs against the NumPy / torch idioms.

    FEDAGG_BENCH_D=10000000 python -m pytest bench/test_bench_compress.py
    python -m pytest bench --benchmark-disable        # answers checked only

Size from FEDAGG_BENCH_D (default 1,000,000); k = 1% for top-k.
"""

import os

import numpy as np
import pytest

from fedagg import compress

D = int(os.environ.get("FEDAGG_BENCH_D", "1000000"))
K = max(1, D // 100)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal(D, dtype=np.float32)


def _gbps(benchmark, nbytes):
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


def _topk_numpy(x):
    idx = np.argpartition(np.abs(x), -K)[-K:]
    return np.sort(idx)


def _topk_torch(x):
    torch = pytest.importorskip("torch")
    return np.sort(torch.topk(torch.from_numpy(x).abs(), K, sorted=False).indices.numpy())


@pytest.mark.parametrize("impl", ["fedagg", "fedagg-threshold", "numpy", "torch"])
def test_topk_encode(benchmark, x, impl):
    benchmark.group = "top-k encode"
    exact = set(compress.TopK(K, error_feedback=False).encode(x).buffers["indices"].tolist())
    fn = {
        "fedagg": lambda: compress.TopK(K, error_feedback=False).encode(x).buffers["indices"],
        "fedagg-threshold": lambda: compress.TopK(K, method="threshold", error_feedback=False).encode(x),
        "numpy": lambda: _topk_numpy(x),
        "torch": lambda: _topk_torch(x),
    }[impl]
    out = fn()
    if impl in ("fedagg", "numpy", "torch"):  # random normal data: no ties at the k-th magnitude
        assert set(np.asarray(out).tolist()) == exact
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    _gbps(benchmark, x.nbytes)


@pytest.mark.parametrize("impl", ["fedagg", "numpy"])
def test_uniform8_quantize(benchmark, x, impl):
    benchmark.group = "8-bit quantize"
    bucket = 512
    xb = x[: D - D % bucket].reshape(-1, bucket)
    rng = np.random.default_rng(1)

    def numpy_quantize():
        lo = xb.min(1, keepdims=True)
        step = (xb.max(1, keepdims=True) - lo) / 255
        return np.floor((xb - lo) / np.where(step > 0, step, 1) + rng.random(xb.shape, dtype=np.float32))

    fn = (lambda: compress.Uniform(8, bucket=bucket).encode(x, seed=1)) if impl == "fedagg" else numpy_quantize
    if impl == "fedagg":
        y = compress.decode(fn())
        step = (xb.max(1) - xb.min(1)) / 255
        assert np.all(np.abs(y[: xb.size].reshape(xb.shape) - xb) <= step[:, None] * (1 + 1e-5) + 1e-6)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    _gbps(benchmark, x.nbytes)


@pytest.mark.parametrize("impl", ["fedagg", "decode-then-mean"])
def test_mean_of_topk_payloads(benchmark, x, impl):
    benchmark.group = "mean of 8 top-k payloads"
    payloads = [compress.TopK(K, error_feedback=False).encode(np.roll(x, 7 * i)) for i in range(8)]
    fn = (lambda: compress.mean(payloads)) if impl == "fedagg" else (
        lambda: np.mean(np.stack([compress.decode(p) for p in payloads]), axis=0))
    np.testing.assert_allclose(compress.mean(payloads),
                               np.mean(np.stack([compress.decode(p).astype(np.float64) for p in payloads]), 0),
                               rtol=1e-6, atol=1e-7)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _gbps(benchmark, sum(p.nbytes for p in payloads))
