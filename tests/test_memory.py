"""Peak extra memory: coordinate-wise rules use O(d) beyond their input, the
streaming Aggregator holds one copy of the updates and no more.

NumPy reports its allocations to tracemalloc; the native kernels' scratch is
O(n * 64) per thread, far below the bounds checked here.
"""

import tracemalloc

import numpy as np
import pytest

import fedagg

N, D = 32, 200_000
ROW_BYTES = D * 4


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(7).standard_normal((N, D), dtype=np.float32)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_coordinate_rules_use_o_d_memory(X, rule):
    kwargs = {"f": 3} if rule == "trimmed_mean" else {}
    peak = peak_bytes(lambda: fedagg.aggregate(X, rule, **kwargs))
    # The result (d floats) plus small bookkeeping; an n x d copy would be 32x this.
    assert peak < 3 * ROW_BYTES, f"{rule}: peak {peak} bytes"


@pytest.mark.parametrize("rule", ["krum", "geometric_median", "bulyan"])
def test_distance_rules_do_not_copy_the_input(X, rule):
    peak = peak_bytes(lambda: fedagg.aggregate(X, rule, f=2))
    assert peak < 3 * ROW_BYTES, f"{rule}: peak {peak} bytes"


def test_list_input_is_not_stacked(X):
    rows = list(X)
    peak = peak_bytes(lambda: fedagg.median(rows))
    assert peak < 3 * ROW_BYTES


@pytest.mark.parametrize("rule", ["mean", "median", "krum"])
def test_aggregator_holds_at_most_one_copy(X, rule):
    def run():
        agg = fedagg.Aggregator(rule, f=0 if rule == "mean" else 2)  # the mean takes no f
        for x in X:
            agg.add(x)
        agg.result()

    peak = peak_bytes(run)
    # mean: a float64 running sum (2 rows), the copy being added, the result; O(d).
    bound = 5 * ROW_BYTES if rule == "mean" else (N + 3) * ROW_BYTES
    assert peak < bound, f"{rule}: peak {peak} bytes, bound {bound}"
