"""Ties, NaN/Inf, huge finite values, n = 1, d = 1."""

import numpy as np
import pytest

import fedagg
import reference as ref
from helpers import (
    ALL_RULES,
    SELECTION_RULES,
    WEIGHTED_RULES,
    assert_close,
    max_f,
    min_n,
    rule_kwargs,
    run_rule,
    updates,
)

# ===================================================================== ties


@pytest.mark.parametrize("n,f,d,a,b", [(12, 0, 7, 4, 6), (8, 1, 8, 0, 5), (9, 2, 5, 1, 7),
                                       (10, 1, 4, 2, 8)])
def test_krum_duplicated_update_lowest_index(n, f, d, a, b):
    """Two identical updates near the centre tie exactly: Krum picks the lower index."""
    hits = 0
    for seed in range(30):
        X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
        X[a] = 0.0
        X[b] = 0.0
        out, info = run_rule(X, "krum", f)
        _, best, scores = ref.krum(X, f)
        hits += best == a
        assert info.scores[a] == info.scores[b], f"seed {seed}: duplicates scored differently"
        assert info.selected.tolist() == [best], f"seed {seed}: got {info.selected}, expected [{best}]"
    assert hits > 10  # the duplicated pair is usually the best one


@pytest.mark.parametrize("n,f,d,a,b", [(12, 0, 7, 4, 6), (10, 1, 4, 2, 8)])
def test_multi_krum_duplicates_stable_order(n, f, d, a, b):
    for seed in range(30):
        X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
        X[a] = 0.0
        X[b] = 0.0
        _, info = run_rule(X, "multi_krum", f, m=3)
        expected = ref.multi_krum(X, f, 3)[1]
        np.testing.assert_array_equal(info.selected, expected, err_msg=f"seed {seed}")


@pytest.mark.parametrize("n,f,d,a,b", [(12, 0, 7, 4, 6), (13, 2, 8, 0, 5)])
def test_bulyan_duplicates_lowest_index_first(n, f, d, a, b):
    for seed in range(30):
        X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
        X[a] = 0.0
        X[b] = 0.0
        out, info = run_rule(X, "bulyan", f)
        agg, sel = ref.bulyan(X, f)
        np.testing.assert_array_equal(info.selected, sel, err_msg=f"seed {seed}")
        assert_close(out, agg, X)


@pytest.mark.parametrize("rule", SELECTION_RULES)
@pytest.mark.parametrize("seed", range(6))
def test_selection_ties_on_integer_data(rule, seed):
    """Integer data: distances and scores are exact, so ties are real and broken by index."""
    rng = np.random.default_rng(seed)
    n, d = 11, 3
    f = 2 if rule != "bulyan" else 1
    X = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
    X[5] = X[2]  # and a duplicate for good measure
    out, info = run_rule(X, rule, f)
    np.testing.assert_array_equal(info.selected, ref.selection(X, rule, f))
    assert_close(out, ref.aggregate(X, rule, f), X)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9, 10, 64, 65])
@pytest.mark.parametrize("d", [1, 7, 65])
def test_median_integer_data_exact(n, d):
    X = np.random.default_rng(n * d).integers(-3, 4, size=(n, d)).astype(np.float32)
    np.testing.assert_array_equal(fedagg.median(X), ref.median(X))


@pytest.mark.parametrize("n,f", [(3, 1), (5, 2), (8, 3), (10, 2), (64, 20)])
def test_trimmed_mean_integer_data(n, f):
    X = np.random.default_rng(n + f).integers(-2, 3, size=(n, 65)).astype(np.float32)
    assert_close(fedagg.trimmed_mean(X, f), ref.trimmed_mean(X, f), X)


@pytest.mark.parametrize("n,f", [(7, 1), (8, 1), (13, 2), (16, 2), (40, 5)])
@pytest.mark.parametrize("seed", range(3))
def test_bulyan_integer_data_ties(n, f, seed):
    """Many equal distances to the median: the right end goes first on a tie."""
    X = np.random.default_rng(seed * 100 + n).integers(-2, 3, size=(n, 130)).astype(np.float32)
    out, info = run_rule(X, "bulyan", f)
    agg, sel = ref.bulyan(X, f)
    np.testing.assert_array_equal(info.selected, sel)
    assert_close(out, agg, X)


def test_bulyan_coordinate_tie_removes_right_end():
    """Rows whose selection is all but 2f; one coordinate with an exact tie."""
    # theta = 5 selected values per coordinate, f = 1: two are excluded.
    # values -2, -1, 0, 2, 9 -> median 0; 9 goes first, then |-2| == |2|: the right end (2) goes.
    S = np.array([[-2.0], [-1.0], [0.0], [2.0], [9.0]], dtype=np.float32)
    out, bad = fedagg._core.bulyan_reduce(S, 1)
    assert not bad
    np.testing.assert_array_equal(out, [-1.0])
    np.testing.assert_array_equal(ref.bulyan_reduce(S, 1), [-1.0])


@pytest.mark.parametrize("rule", ALL_RULES)
def test_all_updates_equal(rule):
    n = max(min_n(rule, 1), 3)
    x = updates(3, 1, 33)[0]
    X = np.tile(x, (n, 1))
    out = fedagg.aggregate(X, rule, 0 if rule == "mean" else 1, **rule_kwargs(rule))
    expected = ref.aggregate(X, rule, 0 if rule == "mean" else 1, **rule_kwargs(rule))
    assert_close(out, expected, X)
    if rule != "centered_clipping":
        assert_close(out, x, X)


# ============================================================= NaN and Inf
NONFINITE = [np.nan, np.inf, -np.inf]


def _n_for(rule):
    return max(min_n(rule, 1) + 2, 6)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [0, 40, 64])
def test_nonfinite_raises_naming_the_update(rule, value, pos):
    n = _n_for(rule)
    f = 0 if rule == "mean" else 1
    X = updates(11, n, 65)
    bad = n - 2
    X[bad, pos] = value
    with pytest.raises(ValueError, match=rf"updates \[{bad}\] contain NaN or Inf"):
        fedagg.aggregate(X, rule, f, **rule_kwargs(rule))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_nonfinite_raises_names_every_bad_update(rule):
    n = _n_for(rule) + 2
    f = 0 if rule == "mean" else 1
    X = updates(12, n, 20)
    X[1, 3] = np.nan
    X[4, 19] = np.inf
    with pytest.raises(ValueError, match=r"updates \[1, 4\]"):
        fedagg.aggregate(X, rule, f, **rule_kwargs(rule))


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("d", [1, 65])
def test_nonfinite_exclude_equals_reference_on_the_rest(rule, value, d):
    n = _n_for(rule) + 2
    f = 0 if rule == "mean" else 1
    X = updates(13 + d, n, d)
    bad = [0, n - 3]
    for i in bad:
        X[i, d // 2] = value
    keep = np.setdiff1d(np.arange(n), bad)
    kw = rule_kwargs(rule)
    weights = None
    if rule in WEIGHTED_RULES:
        weights = np.random.default_rng(d).uniform(0.5, 2.0, size=n)
    out, info = fedagg.aggregate(X, rule, f, weights=weights, nonfinite="exclude",
                                 return_info=True, **kw)
    rest = X[keep]
    w_rest = None if weights is None else weights[keep]
    assert np.all(np.isfinite(out))
    assert_close(out, ref.aggregate(rest, rule, f, weights=w_rest, **kw), rest)
    np.testing.assert_array_equal(info.excluded, bad)
    assert info.n == n
    sel = ref.selection(rest, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, keep[sel])  # indices of the caller's updates
    if info.scores is not None:
        assert np.all(np.isnan(info.scores[bad]))
        np.testing.assert_allclose(info.scores[keep], ref.krum_scores(rest, f), rtol=1e-5)
    if info.weights is not None:
        np.testing.assert_array_equal(info.weights[bad], 0.0)
        total = info.weights.sum() + info.details.get("center_weight", 0.0)
        np.testing.assert_allclose(total, 1.0, rtol=1e-9)


def test_exclude_checks_precondition_on_the_rest():
    X = updates(14, 7, 10)  # n = 7 = 2f + 3 for f = 2
    X[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        fedagg.krum(X, 2, nonfinite="exclude")
    out = fedagg.krum(X, 1, nonfinite="exclude")  # 6 updates are enough for f = 1
    assert_close(out, ref.krum(np.delete(X, 3, axis=0), 1)[0], X[[0, 1, 2, 4, 5, 6]])


def test_exclude_trimmed_mean_beta_uses_the_rest():
    X = updates(15, 10, 30)
    X[2, 5] = np.inf
    out = fedagg.trimmed_mean(X, beta=0.2, nonfinite="exclude")  # floor(0.2 * 9) = 1 per side
    rest = np.delete(X, 2, axis=0)
    assert_close(out, ref.trimmed_mean(rest, 1), rest)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_exclude_every_update_nonfinite_raises(rule):
    X = updates(16, 7, 5)
    X[:, 0] = np.nan
    with pytest.raises(ValueError, match="every update contains NaN or Inf"):
        fedagg.aggregate(X, rule, 0, nonfinite="exclude", **rule_kwargs(rule))


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rule,f", [("trimmed_mean", 2), ("median", 2), ("bulyan", 1)])
def test_nonfinite_that_would_be_trimmed_is_detected(rule, f, value):
    """A value the rule would discard (an extreme of a coordinate) still makes the update bad."""
    n = 9
    X = updates(17, n, 70)
    X[6, 66] = value  # in the tail beyond the last full 64-coordinate tile
    X[6, 3] = 1e3 if value != -np.inf else -1e3
    with pytest.raises(ValueError, match=r"updates \[6\]"):
        fedagg.aggregate(X, rule, f)


def test_nonfinite_in_zero_weight_update_is_detected():
    X = updates(18, 4, 9)
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"updates \[3\]"):
        fedagg.mean(X, weights=[1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_nonfinite_in_far_update_krum_would_not_select(rule):
    X = updates(19, 9, 12)
    X[8] = 1e6
    X[8, 11] = np.inf
    kw = {"m": 3} if rule == "multi_krum" else {}
    with pytest.raises(ValueError, match=r"updates \[8\]"):
        fedagg.aggregate(X, rule, 2, **kw)


@pytest.mark.parametrize("rule", ["mean", "median", "krum"])
def test_nonfinite_with_clip_norm_and_nnm(rule):
    f = 1 if rule != "mean" else 0
    X = updates(20, 9, 12)
    X[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"updates \[4\]"):
        fedagg.aggregate(X, rule, f, clip_norm=1.0)
    with pytest.raises(ValueError, match=r"updates \[4\]"):
        fedagg.aggregate(X, rule, f, nnm=True)
    out = fedagg.aggregate(X, rule, f, clip_norm=1.0, nonfinite="exclude")
    rest = np.delete(X, 4, axis=0)
    assert_close(out, ref.aggregate(ref.clip(rest, 1.0), rule, f), rest)
    out = fedagg.aggregate(X, rule, f, nnm=True, nonfinite="exclude")
    assert_close(out, ref.aggregate(ref.nnm(rest, f).astype(np.float32), rule, f), rest)


def test_nnm_function_rejects_nonfinite():
    X = updates(21, 5, 8)
    X[2, 7] = np.inf
    with pytest.raises(ValueError, match=r"\[2\] contain NaN or Inf"):
        fedagg.nnm(X, 1)


def test_clip_function_rejects_nonfinite():
    X = updates(22, 5, 8)
    X[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fedagg.clip(X, 1.0)


# ======================================================= huge finite values
HUGE = [1e20, 1e30, 3e38]


def _huge(seed, n, d, scale):
    """Finite float32 values of magnitude ~scale, whose float32 squares overflow."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, size=(n, d)) * scale
    return np.clip(X, -3.4e38, 3.4e38).astype(np.float32)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("scale", HUGE)
@pytest.mark.parametrize("d", [1, 7, 100])
def test_huge_values_match_reference(rule, scale, d):
    n = max(min_n(rule, 1), 9)
    f = 0 if rule == "mean" else 1
    X = _huge(int(np.log10(scale)) * 7 + d, n, d, scale)
    kw = {"tau": scale / 10} if rule == "centered_clipping" else {}
    out, info = run_rule(X, rule, f, **kw)
    assert np.all(np.isfinite(out))
    assert_close(out, ref.aggregate(X, rule, f, **kw), X)
    sel = ref.selection(X, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan", "geometric_median"])
@pytest.mark.parametrize("scale", HUGE)
def test_one_huge_update_among_normal_ones(rule, scale):
    """The float32 distances overflow only for the huge update; selections stay exact."""
    n, f = 13, 2
    X = updates(23, n, 64)
    X[7] = _huge(24, 1, 64, scale)[0]
    out, info = run_rule(X, rule, f)
    assert_close(out, ref.aggregate(X, rule, f), X)
    sel = ref.selection(X, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)
        assert 7 not in info.selected[: n - 2 * f - 1]


@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_huge_values_krum_scores_are_finite(scale):
    X = _huge(25, 9, 33, scale)
    _, info = run_rule(X, "krum", 2)
    assert np.all(np.isfinite(info.scores))
    np.testing.assert_allclose(info.scores, ref.krum_scores(X, 2), rtol=1e-5)


@pytest.mark.parametrize("scale", [1e20, 3e38])
@pytest.mark.parametrize("d", [7, 100])
def test_clip_huge_values(scale, d):
    """||x||^2 overflows float32 but ||x|| does not: clipping must still work."""
    X = _huge(26, 5, d, scale)
    Y = fedagg.clip(X, 1.0)
    assert_close(Y, ref.clip(X, 1.0), np.ones(1))


@pytest.mark.parametrize("rule", ["mean", "median", "krum"])
@pytest.mark.parametrize("d", [7, 100])
def test_clip_norm_huge_values(rule, d):
    X = _huge(27, 9, d, 1e20)
    f = 0 if rule == "mean" else 1
    out = fedagg.aggregate(X, rule, f, clip_norm=2.0)
    assert_close(out, ref.aggregate(ref.clip(X, 2.0), rule, f), np.full(1, 2.0))


def test_nnm_huge_values():
    X = _huge(28, 7, 40, 1e20)
    assert_close(fedagg.nnm(X, 2), ref.nnm(X, 2), X)


# ============================================================ n = 1, d = 1
@pytest.mark.parametrize("rule", [r for r in ALL_RULES if min_n(r, 0) == 1])
@pytest.mark.parametrize("d", [1, 7, 1000])
def test_single_update(rule, d):
    X = updates(29 + d, 1, d)
    kw = rule_kwargs(rule)
    out, info = run_rule(X, rule, 0, **kw)
    assert_close(out, ref.aggregate(X, rule, 0, **kw), X)
    if rule != "centered_clipping":
        np.testing.assert_array_equal(out, X[0])


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan"])
def test_smallest_n_for_selection_rules(rule):
    X = updates(30, 3, 5)  # n = 3 is the limit for f = 0
    out, info = run_rule(X, rule, 0)
    np.testing.assert_array_equal(info.selected, ref.selection(X, rule, 0))
    assert_close(out, ref.aggregate(X, rule, 0), X)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_d1_many_updates(rule):
    n = 64
    X = updates(31, n, 1, scale=3.0)
    f = max_f(rule, n) // 2
    kw = rule_kwargs(rule)
    out, info = run_rule(X, rule, f, **kw)
    assert out.shape == (1,)
    assert_close(out, ref.aggregate(X, rule, f, **kw), X)
    sel = ref.selection(X, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)


def test_zero_updates():
    X = np.zeros((9, 33), dtype=np.float32)
    for rule in ALL_RULES:
        out = fedagg.aggregate(X, rule, 1 if rule != "mean" else 0)
        np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(fedagg.clip(X, 1.0), 0.0)
    np.testing.assert_array_equal(fedagg.nnm(X, 2), 0.0)
