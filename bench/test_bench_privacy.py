"""pytest-benchmark suite of the privacy noise against NumPy's and torch's generators.

    FEDAGG_BENCH_D=10000000 python -m pytest bench/test_bench_privacy.py
    python -m pytest bench --benchmark-disable        # answers checked only

Size from FEDAGG_BENCH_D (default 1,000,000). Each generator's output is
checked for mean ~ 0 and variance ~ 1 before it is timed.
"""

import math
import os

import numpy as np
import pytest

from fedagg import _core, privacy

D = int(os.environ.get("FEDAGG_BENCH_D", "1000000"))


def _gbps(benchmark, nbytes):
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("impl", ["fedagg", "numpy", "torch"])
def test_gaussian_noise(benchmark, impl):
    benchmark.group = "Gaussian noise, float32"
    out = np.empty(D, dtype=np.float32)
    rng = np.random.default_rng(0)
    if impl == "torch":
        torch = pytest.importorskip("torch")
        t = torch.empty(D)
        fn = lambda: torch.randn(D, out=t).numpy()  # noqa: E731
    else:
        fn = {
            "fedagg": lambda: (_core.gaussian_noise(out, 1.0, 7, 0, False), out)[1],
            "numpy": lambda: rng.standard_normal(D, dtype=np.float32, out=out),
        }[impl]
    x = fn().astype(np.float64)
    assert abs(x.mean()) < 6 / math.sqrt(D) and abs(x.var() - 1) < 6 * math.sqrt(2 / D)
    benchmark(fn)
    _gbps(benchmark, 4 * D)


def test_discrete_gaussian(benchmark):
    benchmark.group = "discrete Gaussian, int64"
    d = min(D, 200_000)
    x = privacy.discrete_gaussian(d, 1.0e4, seed=1)
    assert abs(x.var() / 1.0e4 - 1) < 6 * math.sqrt(2 / d)
    benchmark(lambda: privacy.discrete_gaussian(d, 1.0e4, seed=1))
    _gbps(benchmark, 8 * d)
