"""Every rule against the float64 reference on random data, over n, d and f."""

import numpy as np
import pytest

import fedagg
import reference as ref
from helpers import (
    ALL_RULES,
    WEIGHTED_RULES,
    assert_close,
    max_f,
    min_n,
    rule_kwargs,
    run_rule,
    updates,
)

NS = (1, 2, 3, 4, 5, 8, 9, 11, 64, 100)
DS = (1, 7, 63, 65, 1000)


def _cases():
    cases = []
    for rule in ALL_RULES:
        for n in NS:
            top = max_f(rule, n)
            if top < 0:
                continue
            # f = 0, f at the rule's limit for n, and one in between.
            fs = sorted({0, top // 2, top})
            if rule in ("mean", "geometric_median", "centered_clipping"):
                fs = sorted({0, top})  # f only enters the precondition
            for d in DS:
                for f in fs:
                    cases.append(pytest.param(rule, n, d, f, id=f"{rule}-n{n}-d{d}-f{f}"))
    return cases


@pytest.mark.parametrize("rule,n,d,f", _cases())
def test_rule_matches_reference(rule, n, d, f):
    X = updates(7919 * n + d, n, d)
    kw = rule_kwargs(rule)
    out, info = run_rule(X, rule, f, **kw)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (d,)
    assert_close(out, ref.aggregate(X, rule, f, **kw), X)
    assert info.rule == rule and info.n == n and info.f == f
    assert info.excluded.size == 0 and info.clipped == 0
    sel = ref.selection(X, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)
    else:
        assert info.selected is None


def test_functions_equal_aggregate():
    X = updates(1, 11, 33)
    pairs = [
        (fedagg.mean(X), fedagg.aggregate(X, "mean")),
        (fedagg.median(X, 2), fedagg.aggregate(X, "median", 2)),
        (fedagg.trimmed_mean(X, 2), fedagg.aggregate(X, "trimmed_mean", 2)),
        (fedagg.krum(X, 2), fedagg.aggregate(X, "krum", 2)),
        (fedagg.multi_krum(X, 2, 5), fedagg.aggregate(X, "multi_krum", 2, m=5)),
        (fedagg.bulyan(X, 1), fedagg.aggregate(X, "bulyan", 1)),
        (fedagg.geometric_median(X), fedagg.aggregate(X, "geometric_median")),
        (fedagg.centered_clipping(X, tau=0.5, iterations=2),
         fedagg.aggregate(X, "centered_clipping", tau=0.5, iterations=2)),
    ]
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------- mean
@pytest.mark.parametrize("n,d", [(1, 5), (3, 1), (10, 63), (64, 65), (100, 1000)])
def test_weighted_mean(n, d):
    rng = np.random.default_rng(n + d)
    X = updates(n * 31 + d, n, d, scale=10.0)
    w = rng.uniform(0.0, 5.0, size=n)
    w[0] = 0.5  # positive sum even for n = 1
    out, info = run_rule(X, "mean", weights=w)
    assert_close(out, ref.mean(X, w), X)
    np.testing.assert_allclose(info.weights, w / w.sum(), rtol=1e-12)


def test_mean_zero_weight_ignores_update():
    X = updates(3, 4, 17)
    out = fedagg.mean(X, weights=[1.0, 0.0, 2.0, 1.0])
    assert_close(out, ref.mean(X[[0, 2, 3]], [1.0, 2.0, 1.0]), X)


def test_mean_weights_are_scale_free():
    X = updates(4, 6, 40)
    w = np.arange(1.0, 7.0)
    assert_close(fedagg.mean(X, weights=w), fedagg.mean(X, weights=1e6 * w), X)


# ------------------------------------------------------------- trimmed mean
@pytest.mark.parametrize("n", [1, 5, 10, 64, 100])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.3, 0.49])
@pytest.mark.parametrize("d", [1, 65])
def test_trimmed_mean_beta(n, beta, d):
    X = updates(n * 7 + d, n, d)
    out, info = run_rule(X, "trimmed_mean", beta=beta)
    assert_close(out, ref.trimmed_mean(X, beta=beta), X)
    assert info.details["trimmed_per_side"] == int(np.floor(beta * n))


def test_trimmed_mean_f0_is_mean_and_max_f_is_median_for_odd_n():
    X = updates(5, 9, 50)
    assert_close(fedagg.trimmed_mean(X, 0), ref.mean(X), X)
    assert_close(fedagg.trimmed_mean(X, 4), ref.median(X), X)


# --------------------------------------------------------------------- krum
@pytest.mark.parametrize("n,f", [(3, 0), (5, 1), (7, 2), (9, 3), (20, 4), (64, 30), (100, 48)])
def test_krum_scores_and_selection(n, f):
    X = updates(n * 13 + f, n, 63)
    out, info = run_rule(X, "krum", f)
    agg, best, scores = ref.krum(X, f)
    np.testing.assert_allclose(info.scores, scores, rtol=1e-5)
    np.testing.assert_array_equal(info.selected, [best])
    np.testing.assert_array_equal(out, X[best])  # Krum returns the update itself


# --------------------------------------------------------------- multi-krum
@pytest.mark.parametrize("n,f", [(3, 0), (7, 2), (12, 3), (64, 30), (100, 10)])
def test_multi_krum_m(n, f):
    X = updates(n * 17 + f, n, 65)
    for m in sorted({1, max(1, n - 2 * f), n - f, n}):
        out, info = run_rule(X, "multi_krum", f, m=m)
        agg, sel, scores = ref.multi_krum(X, f, m)
        np.testing.assert_array_equal(info.selected, sel)
        assert_close(out, agg, X)
        np.testing.assert_allclose(info.scores, scores, rtol=1e-5)
        expected_w = np.zeros(n)
        expected_w[sel] = 1.0 / m
        np.testing.assert_allclose(info.weights, expected_w, rtol=1e-12)


def test_multi_krum_default_m_is_n_minus_f():
    X = updates(8, 10, 20)
    out, info = run_rule(X, "multi_krum", 3)
    assert info.selected.size == 7
    assert_close(out, ref.multi_krum(X, 3)[0], X)


@pytest.mark.parametrize("n,f,m", [(7, 2, 3), (20, 4, 12), (64, 10, 40)])
def test_multi_krum_weights(n, f, m):
    rng = np.random.default_rng(n)
    X = updates(n * 19, n, 100)
    w = rng.uniform(0.1, 3.0, size=n)
    out, info = run_rule(X, "multi_krum", f, weights=w, m=m)
    agg, sel, _ = ref.multi_krum(X, f, m, w)
    np.testing.assert_array_equal(info.selected, sel)
    assert_close(out, agg, X)
    expected_w = np.zeros(n)
    expected_w[sel] = w[sel] / w[sel].sum()
    np.testing.assert_allclose(info.weights, expected_w, rtol=1e-12)


def test_multi_krum_m1_is_krum():
    X = updates(9, 9, 31)
    np.testing.assert_array_equal(fedagg.multi_krum(X, 2, m=1), fedagg.krum(X, 2))


# ------------------------------------------------------------------- bulyan
@pytest.mark.parametrize("f", [0, 1, 2, 3])
@pytest.mark.parametrize("extra", [0, 1, 4])
def test_bulyan_from_the_limit(f, extra):
    """n = 4f + 3 (the documented limit) and a little above it."""
    n = 4 * f + 3 + extra
    X = updates(100 * f + extra, n, 65)
    out, info = run_rule(X, "bulyan", f)
    agg, sel = ref.bulyan(X, f)
    np.testing.assert_array_equal(info.selected, sel)
    assert info.selected.size == n - 2 * f
    assert_close(out, agg, X)


# --------------------------------------------------------- geometric median
@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (5, 7), (9, 63), (64, 65), (100, 200)])
def test_geometric_median_weights_and_info(n, d):
    rng = np.random.default_rng(n * d)
    X = updates(n * 23 + d, n, d)
    w = rng.uniform(0.2, 2.0, size=n)
    out, info = run_rule(X, "geometric_median", weights=w)
    z, iters, obj = ref.geometric_median(X, w)
    assert_close(out, z, X)
    assert info.iterations == iters
    np.testing.assert_allclose(info.details["objective"], obj, rtol=1e-5)
    np.testing.assert_allclose(info.weights.sum(), 1.0, rtol=1e-12)
    assert np.all(info.weights >= 0)


@pytest.mark.parametrize("n", [20, 64, 100])
def test_geometric_median_one_coordinate_even_n(n):
    """d = 1 and even n: every point between the two middle values minimizes the objective.

    The iterate reached there is not determined by the data (an update within ~1e-3 of the
    estimate gets a weight 1/r that float32 rounding of the distance matrix moves; see
    geometric_median's docstring), so the test checks what is: the answer is a minimizer
    and its objective equals the float64 reference's optimum.
    """
    for seed in range(20):
        X = updates(seed * 7 + n * 13 + 1, n, 1)
        out, info = run_rule(X, "geometric_median")
        z, iters, obj = ref.geometric_median(X)
        v = np.sort(X[:, 0].astype(np.float64))
        lo, hi = v[n // 2 - 1], v[n // 2]
        assert lo - 1e-6 <= out[0] <= hi + 1e-6, f"seed {seed}: not a minimizer"
        got = np.mean(np.abs(X[:, 0].astype(np.float64) - float(out[0])))
        assert got == pytest.approx(obj, rel=1e-7), f"seed {seed}: objective {got} vs {obj}"
        np.testing.assert_allclose(info.details["objective"], obj, rtol=1e-6)


@pytest.mark.parametrize("maxiter", [1, 2, 5])
def test_geometric_median_fixed_iterations(maxiter):
    """tol = 0: runs maxiter iterations (the objective still changes after 5)."""
    X = updates(77, 15, 40)
    out, info = run_rule(X, "geometric_median", maxiter=maxiter, tol=0.0)
    z, iters, _ = ref.geometric_median(X, maxiter=maxiter, tol=0.0)
    assert info.iterations == iters == maxiter
    assert_close(out, z, X)


def test_geometric_median_converges_with_many_iterations():
    X = updates(77, 15, 40)
    out, info = run_rule(X, "geometric_median", maxiter=300, tol=1e-12)
    assert 5 < info.iterations <= 300
    assert_close(out, ref.geometric_median(X, maxiter=300, tol=1e-12)[0], X)


@pytest.mark.parametrize("nu", [1e-6, 0.1, 10.0])
def test_geometric_median_smoothing(nu):
    X = updates(78, 12, 30)
    X[3] = X[5]  # a duplicated point: its distance to an iterate can reach nu
    out = fedagg.geometric_median(X, nu=nu, maxiter=50)
    assert_close(out, ref.geometric_median(X, nu=nu, maxiter=50)[0], X)


def test_geometric_median_huge_nu_is_the_mean():
    X = updates(79, 10, 20)
    assert_close(fedagg.geometric_median(X, nu=1e9), ref.mean(X), X)


# -------------------------------------------------------- centered clipping
@pytest.mark.parametrize("n,d", [(1, 4), (3, 1), (8, 63), (64, 65), (100, 300)])
@pytest.mark.parametrize("tau", [0.05, 1.0, 1e6])
@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clipping_params(n, d, tau, iterations):
    X = updates(n * 29 + d, n, d, scale=0.5)
    rng = np.random.default_rng(d)
    center = rng.normal(size=d).astype(np.float32)
    w = rng.uniform(0.5, 1.5, size=n)
    out, info = run_rule(X, "centered_clipping", tau=tau, iterations=iterations,
                         center=center, weights=w)
    expect = ref.centered_clipping(X, tau, iterations, center, w)
    assert_close(out, expect, np.vstack([X, center]))
    assert info.iterations == iterations
    np.testing.assert_allclose(info.weights.sum() + info.details["center_weight"], 1.0, rtol=1e-9)


def test_centered_clipping_large_tau_one_step_is_weighted_mean():
    X = updates(5, 9, 30)
    w = np.arange(1.0, 10.0)
    out, info = run_rule(X, "centered_clipping", tau=1e9, weights=w)
    assert_close(out, ref.mean(X, w), X)
    assert info.details["clipped_by_tau"] == 0


def test_centered_clipping_counts_clipped():
    X = updates(6, 10, 50)
    X[:4] *= 100.0
    tau = 5.0 * np.sqrt(50)
    out, info = run_rule(X, "centered_clipping", tau=tau)
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    assert info.details["clipped_by_tau"] == int(np.count_nonzero(norms > tau))
    assert_close(out, ref.centered_clipping(X, tau), X)


# ----------------------------------------------------------------------- nnm
@pytest.mark.parametrize("n,f", [(1, 0), (2, 0), (3, 1), (8, 3), (9, 4), (64, 31), (100, 20)])
@pytest.mark.parametrize("d", [1, 65, 1000])
def test_nnm_function(n, f, d):
    X = updates(n * 37 + d + f, n, d)
    Y = fedagg.nnm(X, f)
    assert Y.shape == (n, d) and Y.dtype == np.float32
    assert_close(Y, ref.nnm(X, f), X)


def test_nnm_f0_rows_are_the_mean():
    X = updates(10, 6, 20)
    Y = fedagg.nnm(X, 0)
    for row in Y:
        assert_close(row, ref.mean(X), X)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("n,d", [(13, 7), (20, 65)])
def test_nnm_before_rule(rule, n, d):
    f = min(2, max_f(rule, n))
    X = updates(n * 41 + d, n, d)
    kw = rule_kwargs(rule)
    mixed = ref.nnm(X, f).astype(np.float32)  # the mixed updates are materialized in float32
    out, info = run_rule(X, rule, f, nnm=True, **kw)
    assert_close(out, ref.aggregate(mixed, rule, f, **kw), X)
    sel = ref.selection(mixed, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)


# --------------------------------------------------------------- clip / clip_norm
@pytest.mark.parametrize("n,d", [(1, 1), (5, 7), (64, 65), (100, 1000)])
@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 10.0, 1e9])
def test_clip_function(n, d, max_norm):
    X = updates(n * 43 + d, n, d, scale=0.3)
    Y = fedagg.clip(X, max_norm)
    assert Y.shape == X.shape and Y.dtype == np.float32
    assert_close(Y, ref.clip(X, max_norm), X)
    norms = np.linalg.norm(Y.astype(np.float64), axis=1)
    assert np.all(norms <= max_norm * (1 + 1e-5))


def test_clip_zero_update_stays_zero():
    X = np.zeros((3, 10), dtype=np.float32)
    X[1] = 5.0
    Y = fedagg.clip(X, 1.0)
    np.testing.assert_array_equal(Y[0], 0.0)
    assert_close(Y, ref.clip(X, 1.0), X)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("n,d", [(13, 7), (20, 1000)])
def test_clip_norm_before_rule(rule, n, d):
    f = min(2, max_f(rule, n))
    X = updates(n * 47 + d, n, d)
    X[::3] *= 10.0  # some updates are long
    clip_norm = float(np.median(np.linalg.norm(X.astype(np.float64), axis=1)))
    kw = rule_kwargs(rule)
    clipped = ref.clip(X, clip_norm)
    out, info = run_rule(X, rule, f, clip_norm=clip_norm, **kw)
    assert_close(out, ref.aggregate(clipped, rule, f, **kw), X)
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    assert info.clipped == int(np.count_nonzero(norms > clip_norm))
    sel = ref.selection(clipped, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)


@pytest.mark.parametrize("rule", WEIGHTED_RULES)
def test_weighted_rules_with_clip_and_weights(rule):
    n, d, f = 12, 33, 0 if rule == "mean" else 2  # the mean takes no f
    rng = np.random.default_rng(3)
    X = updates(51, n, d)
    X[:3] *= 20.0
    w = rng.uniform(0.5, 2.0, size=n)
    kw = rule_kwargs(rule)
    out = fedagg.aggregate(X, rule, f, weights=w, clip_norm=3.0, **kw)
    assert_close(out, ref.aggregate(ref.clip(X, 3.0), rule, f, weights=w, **kw), X)


def test_rules_registry():
    assert set(fedagg.RULES) == set(ALL_RULES)
    for rule in ALL_RULES:
        assert fedagg.RULES[rule].weights == (rule in WEIGHTED_RULES)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("f", [0, 1, 2, 3])
def test_rule_accepted_at_its_limit(rule, f):
    n = min_n(rule, f)
    X = updates(f, n, 3)
    if rule == "mean" and f:  # the mean takes no f: refused, not ignored
        with pytest.raises(ValueError, match="'mean' does not use f"):
            fedagg.aggregate(X, rule, f)
        return
    out = fedagg.aggregate(X, rule, f, **rule_kwargs(rule))
    assert_close(out, ref.aggregate(X, rule, f, **rule_kwargs(rule)), X)
