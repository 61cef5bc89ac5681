"""Input forms: (n, d) arrays, lists of 1-D / 2-D arrays, strided views, dtypes."""

import numpy as np
import pytest

import fedagg
import reference as ref
from helpers import ALL_RULES, assert_close, max_f, rule_kwargs, updates


def _f(rule, n):
    return max(0, min(2, max_f(rule, n)))


def _agg(X, rule, **kw):
    n = len(X)
    return fedagg.aggregate(X, rule, _f(rule, n), **rule_kwargs(rule), **kw)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_list_of_1d_arrays_equals_matrix(rule):
    X = updates(1, 13, 65)
    out_m, info_m = _agg(X, rule, return_info=True)
    out_l, info_l = _agg([x for x in X], rule, return_info=True)
    out_t, _ = _agg(tuple(x.copy() for x in X), rule, return_info=True)
    np.testing.assert_array_equal(out_l, out_m)
    np.testing.assert_array_equal(out_t, out_m)
    if info_m.selected is not None:
        np.testing.assert_array_equal(info_l.selected, info_m.selected)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_list_of_2d_arrays_keeps_shape(rule):
    X = updates(2, 13, 3 * 21)
    shaped = [x.reshape(3, 21) for x in X]
    out = _agg(shaped, rule)
    assert out.shape == (3, 21) and out.dtype == np.float32
    np.testing.assert_array_equal(out.reshape(-1), _agg(X, rule))
    assert_close(out.reshape(-1), ref.aggregate(X, rule, _f(rule, 13), **rule_kwargs(rule)), X)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("view", ["every_other_row", "reversed", "column_block"])
def test_row_strided_views(rule, view):
    base = updates(3, 30, 80)
    V = {"every_other_row": base[::2], "reversed": base[::-1],
         "column_block": base[3:18, 7:72]}[view]
    assert not V.flags.c_contiguous
    out = _agg(V, rule)
    np.testing.assert_array_equal(out, _agg(np.ascontiguousarray(V), rule))
    assert_close(out, ref.aggregate(V, rule, _f(rule, len(V)), **rule_kwargs(rule)), V)


def test_d1_column_view_of_any_stride():
    base = updates(4, 9, 5)
    col = base[:, 2:3]  # d = 1: the coordinate stride does not matter
    np.testing.assert_array_equal(fedagg.median(col, 2), np.median(base[:, 2], keepdims=True))


def test_non_contiguous_list_items_are_accepted():
    X = updates(5, 7, 40)
    items = [x[::2] for x in X]
    out = fedagg.krum(items, 2)
    np.testing.assert_array_equal(out, fedagg.krum(np.ascontiguousarray(X[:, ::2]), 2))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_float64_input_returns_float64(rule):
    X64 = updates(6, 13, 33, dtype=np.float64)
    out = _agg(X64, rule)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, _agg(X64.astype(np.float32), rule).astype(np.float64))
    X32 = X64.astype(np.float32)
    assert_close(out, ref.aggregate(X32, rule, _f(rule, 13), **rule_kwargs(rule)), X32)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_float16_input_returns_float16(rule):
    X16 = updates(7, 13, 33, dtype=np.float16)
    out = _agg(X16, rule)
    assert out.dtype == np.float16 and out.shape == (33,)
    expected = ref.aggregate(X16.astype(np.float32), rule, _f(rule, 13), **rule_kwargs(rule))
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(out, _agg(X16.astype(np.float32), rule).astype(np.float16))


def test_list_dtypes_follow_the_first_update():
    X = updates(8, 5, 9)
    assert fedagg.median([x.astype(np.float64) for x in X]).dtype == np.float64
    assert fedagg.median([x.astype(np.float16) for x in X]).dtype == np.float16
    out = fedagg.median([x.tolist() for x in X])  # plain Python lists
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref.median(X), rtol=1e-6)


def test_nnm_and_clip_keep_type_dtype_and_shape():
    X = updates(9, 6, 12)
    for dtype in (np.float16, np.float32, np.float64):
        Xd = X.astype(dtype)
        assert fedagg.nnm(Xd, 1).dtype == dtype
        assert fedagg.clip(Xd, 1.0).dtype == dtype
    shaped = [x.reshape(3, 4) for x in X]
    mixed = fedagg.nnm(shaped, 1)
    assert isinstance(mixed, list) and len(mixed) == 6 and mixed[0].shape == (3, 4)
    assert_close(np.stack([m.reshape(-1) for m in mixed]), ref.nnm(X, 1), X)
    clipped = fedagg.clip(shaped, 1.0)
    assert isinstance(clipped, list) and clipped[0].shape == (3, 4)
    assert_close(np.stack([c.reshape(-1) for c in clipped]), ref.clip(X, 1.0), X)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_inputs_are_not_modified(rule):
    X = updates(10, 13, 40)
    X[::4] *= 50.0
    before = X.copy()
    _agg(X, rule, clip_norm=1.0)
    _agg(X, rule, nnm=True)
    np.testing.assert_array_equal(X, before)


def test_krum_result_does_not_alias_the_input():
    X = updates(11, 7, 10)
    out = fedagg.krum(X, 2)
    out[:] = 123.0
    assert not np.any(X == 123.0)


def test_return_info_false_returns_only_the_aggregate():
    X = updates(12, 7, 10)
    out = fedagg.aggregate(X, "krum", 1)
    assert isinstance(out, np.ndarray)
    out, info = fedagg.aggregate(X, "krum", 1, return_info=True)
    assert isinstance(info, fedagg.AggregationInfo)


def test_numpy_integer_f_is_accepted():
    X = updates(13, 9, 10)
    np.testing.assert_array_equal(fedagg.krum(X, np.int64(2)), fedagg.krum(X, 2))


def test_weights_as_list_tuple_and_array():
    X = updates(14, 4, 10)
    w = [1.0, 2.0, 3.0, 4.0]
    a = fedagg.mean(X, weights=w)
    np.testing.assert_array_equal(fedagg.mean(X, weights=tuple(w)), a)
    np.testing.assert_array_equal(fedagg.mean(X, weights=np.array(w, dtype=np.float32)), a)
    np.testing.assert_array_equal(fedagg.mean(X, weights=[1, 2, 3, 4]), a)


def test_center_as_list_or_float64():
    X = updates(15, 5, 6)
    center = np.linspace(-1, 1, 6)
    a = fedagg.centered_clipping(X, tau=0.5, center=center)
    b = fedagg.centered_clipping(X, tau=0.5, center=center.tolist())
    c = fedagg.centered_clipping(X, tau=0.5, center=center.astype(np.float32))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert_close(a, ref.centered_clipping(X, 0.5, 1, center.astype(np.float32)), X)
