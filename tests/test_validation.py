"""Bad input raises the documented exception with a message naming the problem."""

import numpy as np
import pytest

import fedagg
from helpers import ALL_RULES, WEIGHTED_RULES, min_n, rule_kwargs, updates

X = updates(0, 9, 5)


# ---------------------------------------------------------------- updates
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
def test_non_float_dtype_is_type_error(dtype):
    with pytest.raises(TypeError, match="must be float16, float32 or float64"):
        fedagg.mean(np.ones((3, 4), dtype=dtype))
    with pytest.raises(TypeError, match=r"updates\[0\] must be float16, float32 or float64"):
        fedagg.mean([np.ones(4, dtype=dtype)] * 3)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_array_of_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"must be 2-D \(n updates x d coordinates\)"):
        fedagg.mean(np.ones(shape, dtype=np.float32))


def test_not_an_array():
    with pytest.raises(TypeError, match=r"must be an \(n, d\) array"):
        fedagg.mean("abc")
    with pytest.raises(TypeError, match=r"must be an \(n, d\) array"):
        fedagg.mean(3.0)


def test_mismatched_list_lengths_name_the_update():
    items = [np.ones(4, np.float32), np.ones(4, np.float32), np.ones(5, np.float32)]
    with pytest.raises(ValueError, match=r"updates\[2\] has shape \(5,\), but updates\[0\] has shape \(4,\)"):
        fedagg.mean(items)
    with pytest.raises(ValueError, match=r"updates\[1\] has shape \(2, 2\)"):
        fedagg.mean([np.ones(4, np.float32), np.ones((2, 2), np.float32)])


def test_empty_inputs():
    with pytest.raises(ValueError, match="empty"):
        fedagg.mean([])
    with pytest.raises(ValueError, match="empty"):
        fedagg.mean(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match=r"d = 0"):
        fedagg.mean(np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"d = 0"):
        fedagg.mean([np.zeros(0, np.float32)] * 3)


def test_coordinate_axis_must_be_contiguous():
    base = updates(1, 6, 10)
    with pytest.raises(ValueError, match="contiguous along the coordinate axis"):
        fedagg.mean(base[:, ::2])
    with pytest.raises(ValueError, match="contiguous along the coordinate axis"):
        fedagg.mean(np.asfortranarray(base))


# ------------------------------------------------------------------------ f
@pytest.mark.parametrize("rule", ALL_RULES)
def test_negative_f(rule):
    with pytest.raises(ValueError, match="f must be >= 0, got -1"):
        fedagg.aggregate(X, rule, -1)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None, 2.5])
def test_f_must_be_an_integer(rule, bad):
    with pytest.raises(TypeError, match="f must be an integer"):
        fedagg.aggregate(X, rule, bad)


@pytest.mark.parametrize("rule,condition", [
    ("median", r"n > 2f"),
    ("krum", r"n > 2f \+ 2"),
    ("multi_krum", r"n > 2f \+ 2"),
    ("bulyan", r"n >= 4f \+ 3"),
    ("geometric_median", r"n > 2f"),
    ("centered_clipping", r"n > 2f"),
])
@pytest.mark.parametrize("f", [1, 2, 5])
def test_n_below_the_limit(rule, condition, f):
    n = min_n(rule, f) - 1
    Y = updates(f, n, 4)
    with pytest.raises(ValueError, match=rf"{rule} with f = {f} needs {condition} \(n >= {n + 1}\); got n = {n}"):
        fedagg.aggregate(Y, rule, f)


@pytest.mark.parametrize("f", [1, 3])
def test_trimmed_mean_cuts_too_much(f):
    Y = updates(f, 2 * f, 4)
    with pytest.raises(ValueError, match=rf"cuts {f} updates per side, which needs n > {2 * f}; got n = {2 * f}"):
        fedagg.trimmed_mean(Y, f)


def test_nnm_needs_n_above_2f():
    Y = updates(2, 6, 4)
    with pytest.raises(ValueError, match=r"nnm with f = 3 needs n > 2f; got n = 6"):
        fedagg.nnm(Y, 3)
    with pytest.raises(ValueError, match=r"nnm with f = 3 needs n > 2f"):
        fedagg.aggregate(Y, "mean", 3, nnm=True)
    with pytest.raises(ValueError, match="f must be >= 0"):
        fedagg.nnm(Y, -1)
    with pytest.raises(TypeError, match="f must be an integer"):
        fedagg.nnm(Y, True)


# --------------------------------------------------------------- rule / policy
@pytest.mark.parametrize("rule", ["avg", "Median", "", "krum "])
def test_unknown_rule(rule):
    with pytest.raises(ValueError, match="unknown rule"):
        fedagg.aggregate(X, rule)


def test_rule_must_be_a_string():
    with pytest.raises(TypeError, match="rule must be a string"):
        fedagg.aggregate(X, None)


@pytest.mark.parametrize("policy", ["ignore", "Raise", None, ""])
def test_bad_nonfinite_policy(policy):
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'exclude'"):
        fedagg.aggregate(X, "mean", nonfinite=policy)
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'exclude'"):
        fedagg.Aggregator("mean", nonfinite=policy)


def test_nnm_flag_must_be_bool():
    with pytest.raises(TypeError, match="nnm must be True or False"):
        fedagg.aggregate(X, "mean", nnm=1)


def test_unexpected_parameter():
    with pytest.raises(TypeError, match=r"unexpected parameter\(s\) \['alpha'\]"):
        fedagg.aggregate(X, "mean", alpha=1)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize("rule", WEIGHTED_RULES)
def test_weights_wrong_length(rule):
    f = 0 if rule == "mean" else 1  # the mean takes no f
    with pytest.raises(ValueError, match=r"one entry per update \(9\)"):
        fedagg.aggregate(X, rule, f, weights=np.ones(8))
    with pytest.raises(ValueError, match=r"one entry per update"):
        fedagg.aggregate(X, rule, f, weights=np.ones((9, 1)))


@pytest.mark.parametrize("rule", WEIGHTED_RULES)
def test_weights_negative_nan_inf_zero_sum(rule):
    f = 0 if rule == "mean" else 1  # the mean takes no f
    w = np.ones(9)
    w[3] = -1.0
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fedagg.aggregate(X, rule, f, weights=w)
    w[3] = np.nan
    with pytest.raises(ValueError, match="weights must be finite"):
        fedagg.aggregate(X, rule, f, weights=w)
    w[3] = np.inf
    with pytest.raises(ValueError, match="weights must be finite"):
        fedagg.aggregate(X, rule, f, weights=w)
    with pytest.raises(ValueError, match="weights must have a positive sum"):
        fedagg.aggregate(X, rule, f, weights=np.zeros(9))


def test_weights_not_numbers():
    with pytest.raises(TypeError, match="weights must be a sequence of numbers"):
        fedagg.mean(X, weights=["a"] * 9)


@pytest.mark.parametrize("rule", sorted(set(ALL_RULES) - set(WEIGHTED_RULES)))
def test_weights_with_a_rule_that_takes_none(rule):
    with pytest.raises(ValueError, match=rf"rule '{rule}' does not take per-update weights"):
        fedagg.aggregate(X, rule, 1, weights=np.ones(9))


def test_multi_krum_selected_weights_sum_to_zero():
    w = np.zeros(9)
    w[0] = 1.0
    Y = updates(3, 9, 5)
    Y[0] = 1e3  # the only weighted update is far away, never selected
    with pytest.raises(ValueError, match="weights of the selected updates sum to zero"):
        fedagg.multi_krum(Y, 2, m=3, weights=w)


# ----------------------------------------------------------- rule parameters
@pytest.mark.parametrize("tau", [0.0, -1.0, np.nan, np.inf])
def test_tau_must_be_positive_finite(tau):
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        fedagg.centered_clipping(X, tau=tau)


def test_tau_must_be_a_number():
    with pytest.raises(TypeError, match="tau must be a number"):
        fedagg.centered_clipping(X, tau="1")
    with pytest.raises(TypeError, match="tau must be a number"):
        fedagg.centered_clipping(X, tau=True)


def test_iterations_maxiter_nu_tol():
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        fedagg.centered_clipping(X, iterations=0)
    with pytest.raises(TypeError, match="iterations must be an integer"):
        fedagg.centered_clipping(X, iterations=1.5)
    with pytest.raises(ValueError, match="maxiter must be >= 1"):
        fedagg.geometric_median(X, maxiter=0)
    with pytest.raises(ValueError, match="nu must be a finite number > 0"):
        fedagg.geometric_median(X, nu=0.0)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        fedagg.geometric_median(X, tol=-1e-3)
    with pytest.raises(ValueError, match="tol must be a finite number"):
        fedagg.geometric_median(X, tol=np.nan)


def test_center_checks():
    with pytest.raises(ValueError, match="center has 4 coordinates, expected 5"):
        fedagg.centered_clipping(X, center=np.zeros(4))
    with pytest.raises(ValueError, match="center must be finite"):
        fedagg.centered_clipping(X, center=np.array([0, 0, np.nan, 0, 0]))
    with pytest.raises(TypeError, match="center is a parameter of centered_clipping"):
        fedagg.aggregate(X, "mean", center=np.zeros(5))


def test_m_checks():
    with pytest.raises(ValueError, match=r"m must satisfy 1 <= m <= n = 9, got 10"):
        fedagg.multi_krum(X, 2, m=10)
    with pytest.raises(ValueError, match="m must be >= 1"):
        fedagg.multi_krum(X, 2, m=0)
    with pytest.raises(TypeError, match="m must be an integer"):
        fedagg.multi_krum(X, 2, m=2.0)
    with pytest.raises(TypeError, match="m is a parameter of multi_krum"):
        fedagg.aggregate(X, "krum", 2, m=3)


def test_beta_checks():
    with pytest.raises(ValueError, match=r"beta must satisfy 0 <= beta < 0.5"):
        fedagg.trimmed_mean(X, beta=0.5)
    with pytest.raises(ValueError, match=r"beta must satisfy 0 <= beta < 0.5"):
        fedagg.trimmed_mean(X, beta=-0.1)
    with pytest.raises(ValueError, match="either f .* or beta"):
        fedagg.trimmed_mean(X, 1, beta=0.1)
    with pytest.raises(TypeError, match="beta is a parameter of trimmed_mean"):
        fedagg.aggregate(X, "median", beta=0.1)


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, np.inf, np.nan])
def test_clip_norm_checks(clip_norm):
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
        fedagg.mean(X, clip_norm=clip_norm)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        fedagg.clip(X, clip_norm)
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
        fedagg.Aggregator("mean", clip_norm=clip_norm)


# -------------------------------------------------------------------- threads
@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_set_num_threads_checks(bad):
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        fedagg.set_num_threads(bad)


def test_all_rules_run_with_valid_minimal_input():
    """The validation above is not over-eager: each rule accepts its minimal valid input."""
    for rule in ALL_RULES:
        n = min_n(rule, 1) if rule != "mean" else 1
        out = fedagg.aggregate(updates(9, n, 2), rule, 1 if rule != "mean" else 0, **rule_kwargs(rule))
        assert out.shape == (2,) and np.all(np.isfinite(out))


def test_nnm_rejects_nonfinite_updates():
    Y = np.ones((5, 3), np.float32)
    Y[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"updates \[2\] contain NaN or Inf"):
        fedagg.nnm(Y, 1)
