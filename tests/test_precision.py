"""Nearly equal updates: a common vector of norm 1e3 plus per-client noise of norm 1e-3.

Squared distances are ~1e-6 while squared norms are ~1e6: any Gram-matrix
style ||x||^2 + ||y||^2 - 2<x, y> computation loses every digit. fedagg must
stay within 1e-4 relative of the float64 reference computed on the same
float32 inputs, and its selections must be those of the reference.
"""

import numpy as np
import pytest

import fedagg
import reference as ref
from fedagg import _core
from helpers import assert_close


def nearly_equal(seed: int, n: int = 20, d: int = 10000, common_norm: float = 1e3,
                 noise_norm: float = 1e-3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    common = rng.normal(size=d)
    common *= common_norm / np.linalg.norm(common)
    X = np.empty((n, d))
    for i in range(n):
        noise = rng.normal(size=d)
        X[i] = common + noise * (noise_norm / np.linalg.norm(noise))
    return X.astype(np.float32)


@pytest.fixture(scope="module", params=[0, 1])
def data(request):
    X = nearly_equal(request.param)
    return X, ref.sqdist_matrix(X)


def test_inputs_are_nearly_equal(data):
    X, D = data
    off = D[~np.eye(len(X), dtype=bool)]
    assert np.all(off > 0)  # distinct after the float32 rounding
    assert off.max() < 1e-4 and np.linalg.norm(X[0].astype(np.float64)) > 999.0


def test_pairwise_sqdist(data, isa):
    X, D = data
    got = _core.pairwise_sqdist(X)
    off = ~np.eye(len(X), dtype=bool)
    np.testing.assert_allclose(got[off], D[off], rtol=1e-4, atol=0)
    np.testing.assert_array_equal(np.diag(got), 0.0)
    np.testing.assert_array_equal(got, got.T)


def test_pairwise_sqdist_rows_as_list(data):
    X, D = data
    got = _core.pairwise_sqdist([x for x in X])
    off = ~np.eye(len(X), dtype=bool)
    np.testing.assert_allclose(got[off], D[off], rtol=1e-4, atol=0)


def test_sqdist_to(data, isa):
    X, D = data
    got = _core.sqdist_to(X[1:], np.ascontiguousarray(X[0]))
    np.testing.assert_allclose(got, D[0, 1:], rtol=1e-4, atol=0)


@pytest.mark.parametrize("f", [0, 3, 8])
def test_krum_selection(data, f):
    X, D = data
    _, info = fedagg.krum(X, f, return_info=True)
    assert info.selected.tolist() == [ref.krum(X, f)[1]]
    np.testing.assert_allclose(info.scores, ref.krum_scores(D=D, f=f), rtol=1e-4)


@pytest.mark.parametrize("f,m", [(3, None), (3, 5), (8, 4)])
def test_multi_krum_selection(data, f, m):
    X, D = data
    out, info = fedagg.multi_krum(X, f, m, return_info=True)
    agg, sel, _ = ref.multi_krum(X, f, m)
    np.testing.assert_array_equal(info.selected, sel)
    assert_close(out, agg, X)


@pytest.mark.parametrize("f", [1, 2, 4])
def test_bulyan_selection(data, f):
    X, D = data
    out, info = fedagg.bulyan(X, f, return_info=True)
    np.testing.assert_array_equal(info.selected, ref.bulyan_select(D, f))
    assert_close(out, ref.bulyan_reduce(X[info.selected], f), X)


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan"])
def test_streaming_selection(data, rule):
    """The Aggregator grows its distance matrix one update at a time (sqdist_to)."""
    X, _ = data
    f = 2
    agg = fedagg.Aggregator(rule, f)
    for x in X:
        agg.add(x)
    _, info = agg.result(return_info=True)
    np.testing.assert_array_equal(info.selected, ref.selection(X, rule, f))


def test_nnm_mixing_selection(data):
    X, D = data
    got = _core.nnm_mixing(_core.pairwise_sqdist(X), 5)
    np.testing.assert_array_equal(got, ref.nnm_mixing(D, 5))


def test_geometric_median_and_centered_clipping(data):
    X, _ = data
    # The noise is ~1e-5 per coordinate: compare the deviation from the common part tightly.
    base = X.astype(np.float64).mean(axis=0)
    gm = fedagg.geometric_median(X)
    z = ref.geometric_median(X)[0]
    np.testing.assert_allclose(gm - base, z - base, rtol=0, atol=2e-6)
    cc = fedagg.centered_clipping(X, tau=1e-4, iterations=3, center=base.astype(np.float32))
    v = ref.centered_clipping(X, 1e-4, 3, base.astype(np.float32))
    np.testing.assert_allclose(cc - base, v - base, rtol=0, atol=2e-6)
