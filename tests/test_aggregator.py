"""The streaming Aggregator gives the functional results, round after round."""

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
    rule_kwargs,
    updates,
)


def _f(rule, n):
    return max(0, min(2, max_f(rule, n)))


def _stream(rule, X, f, weights=None, ids=None, **kw):
    agg = fedagg.Aggregator(rule, f, **kw)
    for i, x in enumerate(X):
        idx = agg.add(x, weight=None if weights is None else weights[i],
                      client_id=None if ids is None else ids[i])
        assert idx == i
    assert len(agg) == len(X)
    return agg


def _assert_same(out_s, info_s, out_f, info_f, X):
    assert_close(out_s, out_f, X)
    if info_f.selected is not None:
        np.testing.assert_array_equal(info_s.selected, info_f.selected)
    if info_f.weights is not None:
        np.testing.assert_allclose(info_s.weights, info_f.weights, rtol=1e-6, atol=1e-12)
    assert info_s.clipped == info_f.clipped
    assert info_s.n == info_f.n and info_s.f == info_f.f and info_s.rule == info_f.rule


@pytest.mark.parametrize("rule,n,d", [
    pytest.param(rule, n, d, id=f"{rule}-n{n}-d{d}")
    for rule in ALL_RULES
    for n, d in [(1, 5), (9, 7), (20, 65), (64, 300)]
    if max_f(rule, n) >= 0  # n = 1 only for the rules that accept it
])
def test_stream_equals_functional(rule, n, d):
    f = _f(rule, n)
    X = updates(n * 3 + d, n, d)
    kw = rule_kwargs(rule)
    agg = _stream(rule, X, f, **kw)
    out_s, info_s = agg.result(return_info=True)
    out_f, info_f = fedagg.aggregate(X, rule, f, return_info=True, **kw)
    _assert_same(out_s, info_s, out_f, info_f, X)
    assert_close(out_s, ref.aggregate(X, rule, f, **kw), X)
    assert info_s.client_ids == (None,) * n


@pytest.mark.parametrize("rule", WEIGHTED_RULES)
def test_stream_weights(rule):
    n, d = 12, 40
    f = _f(rule, n)
    rng = np.random.default_rng(1)
    X = updates(2, n, d)
    w = rng.uniform(0.0, 3.0, size=n)
    kw = rule_kwargs(rule)
    agg = _stream(rule, X, f, weights=w, **kw)
    out_s, info_s = agg.result(return_info=True)
    out_f, info_f = fedagg.aggregate(X, rule, f, weights=w, return_info=True, **kw)
    _assert_same(out_s, info_s, out_f, info_f, X)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_stream_clip_norm(rule):
    n, d = 13, 50
    f = _f(rule, n)
    X = updates(3, n, d)
    X[::3] *= 8.0
    c = float(np.median(np.linalg.norm(X, axis=1)))
    kw = rule_kwargs(rule)
    out_s, info_s = _stream(rule, X, f, clip_norm=c, **kw).result(return_info=True)
    out_f, info_f = fedagg.aggregate(X, rule, f, clip_norm=c, return_info=True, **kw)
    _assert_same(out_s, info_s, out_f, info_f, X)
    assert info_s.clipped == int(np.count_nonzero(np.linalg.norm(X.astype(np.float64), axis=1) > c))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_stream_nnm(rule):
    n, d = 13, 30
    f = _f(rule, n)
    X = updates(4, n, d)
    kw = rule_kwargs(rule)
    out_s, info_s = _stream(rule, X, f, nnm=True, **kw).result(return_info=True)
    out_f, info_f = fedagg.aggregate(X, rule, f, nnm=True, return_info=True, **kw)
    _assert_same(out_s, info_s, out_f, info_f, X)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_client_ids_and_duplicates(rule):
    n, d = 9, 12
    f = _f(rule, n)
    X = updates(5, n, d)
    ids = [f"client-{i}" for i in range(n)]
    agg = _stream(rule, X, f, ids=ids, **rule_kwargs(rule))
    with pytest.raises(ValueError, match=r"client_id 'client-3' already submitted this round"):
        agg.add(X[0], client_id="client-3")
    assert len(agg) == n
    out, info = agg.result(return_info=True)
    assert info.client_ids == tuple(ids)
    assert_close(out, fedagg.aggregate(X, rule, f, **rule_kwargs(rule)), X)
    if info.selected is not None:
        chosen = [info.client_ids[i] for i in info.selected]
        assert chosen == [ids[i] for i in info.selected]


def test_client_id_must_be_hashable():
    agg = fedagg.Aggregator("mean")
    with pytest.raises(TypeError, match="client_id must be hashable"):
        agg.add(np.ones(3, np.float32), client_id=["x"])


@pytest.mark.parametrize("rule", ALL_RULES)
def test_wrong_size_raises_and_state_stays_usable(rule):
    n, d = 9, 8
    f = _f(rule, n)
    X = updates(6, n, d)
    agg = fedagg.Aggregator(rule, f, **rule_kwargs(rule))
    for i, x in enumerate(X):
        if i == 5:
            with pytest.raises(ValueError, match=r"update has 7 coordinates, this round has 8"):
                agg.add(np.ones(7, np.float32), client_id=5)
            assert len(agg) == 5
        assert agg.add(x, client_id=i) == i  # the rejected update's client id was not consumed
    out = agg.result()
    assert_close(out, fedagg.aggregate(X, rule, f, **rule_kwargs(rule)), X)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_update_raises_by_default(rule, value):
    n, d = 9, 8
    f = _f(rule, n)
    X = updates(7, n, d)
    agg = fedagg.Aggregator(rule, f, **rule_kwargs(rule))
    for i, x in enumerate(X[:5]):
        agg.add(x, client_id=i)
    bad = X[5].copy()
    bad[3] = value
    with pytest.raises(ValueError, match=r"update from client 5 contains NaN or Inf"):
        agg.add(bad, client_id=5)
    assert len(agg) == 5
    for i, x in enumerate(X[5:], start=5):  # the same client may resubmit a finite update
        agg.add(x, client_id=i)
    out = agg.result()
    assert_close(out, fedagg.aggregate(X, rule, f, **rule_kwargs(rule)), X)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_nonfinite_update_excluded_with_policy_exclude(rule):
    n, d = 11, 8
    f = _f(rule, n - 2)
    X = updates(8, n, d)
    X[2, 0] = np.nan
    X[7, 7] = -np.inf
    agg = fedagg.Aggregator(rule, f, nonfinite="exclude", **rule_kwargs(rule))
    returned = [agg.add(x, client_id=f"c{i}") for i, x in enumerate(X)]
    assert returned[2] == -1 and returned[7] == -1
    assert [r for r in returned if r >= 0] == list(range(n - 2))
    assert len(agg) == n - 2
    out, info = agg.result(return_info=True)
    rest = np.delete(X, [2, 7], axis=0)
    assert info.details["excluded_ids"] == ("c2", "c7")
    assert info.client_ids == tuple(f"c{i}" for i in range(n) if i not in (2, 7))
    assert_close(out, fedagg.aggregate(rest, rule, f, **rule_kwargs(rule)), rest)
    assert_close(out, ref.aggregate(rest, rule, f, **rule_kwargs(rule)), rest)
    with pytest.raises(ValueError, match="already submitted"):
        agg.add(X[0], client_id="c2")


@pytest.mark.parametrize("rule", ALL_RULES)
def test_reset_starts_a_new_round(rule):
    n, d = 9, 10
    f = _f(rule, n)
    X1, X2 = updates(9, n, d), updates(10, n + 2, d)
    kw = rule_kwargs(rule)
    agg = _stream(rule, X1, f, ids=list(range(n)), **kw)
    out1 = agg.result()
    agg.reset()
    assert len(agg) == 0
    with pytest.raises(ValueError, match="no updates were added this round"):
        agg.result()
    for i, x in enumerate(X2):
        agg.add(x, client_id=i)  # ids may repeat across rounds
    out2, info2 = agg.result(return_info=True)
    assert info2.n == n + 2
    if rule == "centered_clipping":
        expected = fedagg.centered_clipping(X2, f, center=out1, **kw)
    else:
        expected = fedagg.aggregate(X2, rule, f, **kw)
    assert_close(out2, expected, X2)


def test_reset_allows_a_new_size():
    agg = fedagg.Aggregator("median")
    for x in updates(11, 3, 4):
        agg.add(x)
    agg.reset()
    X = updates(12, 3, 6)
    for x in X:
        agg.add(x)
    assert_close(agg.result(), ref.median(X), X)


def test_centered_clipping_center_carries_over_rounds():
    d, tau = 16, 0.3
    rounds = [updates(20 + r, 7, d) + r for r in range(4)]
    agg = fedagg.Aggregator("centered_clipping", tau=tau, iterations=2)
    center = None
    for X in rounds:
        for x in X:
            agg.add(x)
        out = agg.result()
        expected = ref.centered_clipping(X, tau, 2, center)
        assert_close(out, expected, X)
        assert_close(out, fedagg.centered_clipping(X, tau=tau, iterations=2, center=center), X)
        center = out
        agg.reset()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_result_twice_in_a_round_is_the_same(rule):
    """result() aggregates the updates of this round; asking twice gives the same answer."""
    X = updates(13, 9, 6)
    f = _f(rule, 9)
    agg = _stream(rule, X, f, **rule_kwargs(rule))
    first = agg.result()
    np.testing.assert_array_equal(agg.result(), first)


@pytest.mark.parametrize("center", [np.zeros(6), [0.5] * 6, np.full(6, 0.5, np.float32)],
                         ids=["float64", "list", "float32"])
def test_centered_clipping_initial_center(center):
    """The center parameter is that of fedagg.centered_clipping (any array-like of d numbers)."""
    X = updates(14, 7, 6)
    agg = _stream("centered_clipping", X, 0, tau=0.4, center=center)
    expected = fedagg.centered_clipping(X, tau=0.4, center=center)
    assert_close(agg.result(), expected, X)
    assert_close(expected, ref.centered_clipping(X, 0.4, 1, np.asarray(center, np.float32)), X)


def test_result_without_updates_raises():
    for rule in ALL_RULES:
        with pytest.raises(ValueError, match="no updates were added this round"):
            fedagg.Aggregator(rule).result()
    agg = fedagg.Aggregator("mean", nonfinite="exclude")
    assert agg.add(np.array([np.nan, 1.0], np.float32)) == -1
    with pytest.raises(ValueError, match="no updates were added this round"):
        agg.result()


def test_precondition_checked_at_result_and_state_kept():
    X = updates(15, 7, 5)
    agg = fedagg.Aggregator("krum", 2)
    for x in X[:6]:
        agg.add(x)
    with pytest.raises(ValueError, match=r"krum with f = 2 needs n > 2f \+ 2"):
        agg.result()
    agg.add(X[6])
    _, info = agg.result(return_info=True)
    assert info.selected.tolist() == [ref.krum(X, 2)[1]]


def test_weight_checks():
    agg = fedagg.Aggregator("median")
    with pytest.raises(ValueError, match="rule 'median' does not take per-update weights"):
        agg.add(np.ones(3, np.float32), weight=2.0)
    agg = fedagg.Aggregator("mean")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        agg.add(np.ones(3, np.float32), weight=-1.0)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        agg.add(np.ones(3, np.float32), weight=np.nan)
    assert len(agg) == 0
    agg.add(np.ones(3, np.float32), weight=0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        agg.result()


def test_constructor_checks():
    with pytest.raises(ValueError, match="unknown rule"):
        fedagg.Aggregator("avg")
    with pytest.raises(ValueError, match="f must be >= 0"):
        fedagg.Aggregator("krum", -1)
    with pytest.raises(TypeError, match="f must be an integer"):
        fedagg.Aggregator("krum", 1.0)
    with pytest.raises(TypeError, match="nnm must be True or False"):
        fedagg.Aggregator("krum", 1, nnm="yes")
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        fedagg.Aggregator("centered_clipping", tau=0)


def test_stream_mean_info():
    X = updates(16, 5, 9)
    w = [1.0, 2.0, 0.0, 1.0, 4.0]
    agg = _stream("mean", X, 0, weights=w, ids="abcde")
    out, info = agg.result(return_info=True)
    assert_close(out, ref.mean(X, w), X)
    np.testing.assert_allclose(info.weights, np.array(w) / sum(w))
    assert info.client_ids == tuple("abcde") and info.n == 5


def test_stream_shapes_and_dtypes():
    X = updates(17, 6, 12)
    agg = fedagg.Aggregator("median", 1)
    for x in X:
        agg.add(x.reshape(3, 4).astype(np.float64))
    out = agg.result()
    assert out.shape == (3, 4) and out.dtype == np.float64
    assert_close(out.reshape(-1), ref.median(X), X)


def test_stream_copies_updates():
    X = updates(18, 5, 6)
    agg = fedagg.Aggregator("median", 1)
    buf = np.empty(6, np.float32)
    for x in X:
        buf[:] = x
        agg.add(buf)  # the caller reuses its buffer
    assert_close(agg.result(), ref.median(X), X)


@pytest.mark.parametrize("rule", SELECTION_RULES + ("geometric_median", "centered_clipping"))
@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_stream_huge_values(rule, scale):
    n, f = 13, 2
    X = updates(19, n, 70)
    X[4] = (np.random.default_rng(3).uniform(-1, 1, size=70) * scale).astype(np.float32)
    kw = {"tau": 1.0, "iterations": 2} if rule == "centered_clipping" else {}
    out, info = _stream(rule, X, f, **kw).result(return_info=True)
    assert_close(out, ref.aggregate(X, rule, f, **kw), X)
    assert_close(out, fedagg.aggregate(X, rule, f, **kw), X)
    if rule in SELECTION_RULES:
        np.testing.assert_array_equal(info.selected, ref.selection(X, rule, f))


@pytest.mark.parametrize("rule", ["mean", "median"])
def test_stream_clip_norm_huge_values(rule):
    """||x||^2 overflows float32 for 1e20 * (70 coordinates); the clipped update has norm 1."""
    X = (np.random.default_rng(4).uniform(-1, 1, size=(5, 70)) * 1e20).astype(np.float32)
    out = _stream(rule, X, 0, clip_norm=1.0).result()
    assert_close(out, ref.aggregate(ref.clip(X, 1.0), rule, 0), np.ones(1))
