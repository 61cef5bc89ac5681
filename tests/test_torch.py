"""CPU torch tensors in, torch tensors of the same dtype out."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fedagg  # noqa: E402
import reference as ref  # noqa: E402
from fedagg._arrays import as_batch  # noqa: E402
from helpers import ALL_RULES, WEIGHTED_RULES, assert_close, max_f, rule_kwargs, updates  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Rounding of the result to the dtype (relative), on top of the float32 computation.
DTYPE_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _f(rule, n):
    return max(0, min(2, max_f(rule, n)))


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_in_tensor_out(rule, dtype):
    n, d = 13, 65
    X = updates(n + d, n, d)
    T = torch.from_numpy(X).to(dtype)
    f = _f(rule, n)
    out, info = fedagg.aggregate(T, rule, f, return_info=True, **rule_kwargs(rule))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == (d,) and out.device.type == "cpu"
    X32 = T.to(torch.float32).numpy()  # the values fedagg saw
    expected = ref.aggregate(X32, rule, f, **rule_kwargs(rule))
    tol = DTYPE_TOL[dtype]
    np.testing.assert_allclose(out.to(torch.float64).numpy(), expected, rtol=tol,
                               atol=tol * np.abs(X32).max())
    sel = ref.selection(X32, rule, f)
    if sel is not None:
        np.testing.assert_array_equal(info.selected, sel)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_float32_tensor_equals_numpy(rule):
    X = updates(3, 13, 40)
    f = _f(rule, 13)
    out_t = fedagg.aggregate(torch.from_numpy(X.copy()), rule, f, **rule_kwargs(rule))
    out_n = fedagg.aggregate(X, rule, f, **rule_kwargs(rule))
    np.testing.assert_array_equal(out_t.numpy(), out_n)


def test_float32_tensor_is_not_copied():
    T = torch.randn(7, 33, generator=torch.Generator().manual_seed(0))
    batch = as_batch(T)
    assert batch.rows.__array_interface__["data"][0] == T.data_ptr()
    rows = as_batch([t for t in T]).rows
    for i, r in enumerate(rows):
        assert r.__array_interface__["data"][0] == T[i].data_ptr()
    # Row-strided views are not copied either.
    V = T[::2]
    assert as_batch(V).rows.__array_interface__["data"][0] == V.data_ptr()
    out = fedagg.median(V, 1)
    assert_close(out.numpy(), ref.median(V.numpy()), V.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_list_of_tensors_keeps_shape_and_dtype(dtype):
    X = updates(4, 9, 24)
    items = [torch.from_numpy(x.reshape(4, 6)).to(dtype) for x in X]
    out = fedagg.krum(items, 2)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (4, 6)
    X32 = torch.stack([t.reshape(-1) for t in items]).to(torch.float32).numpy()
    np.testing.assert_array_equal(out.to(torch.float32).reshape(-1).numpy(), ref.krum(X32, 2)[0])


def test_requires_grad_tensor():
    T = torch.randn(9, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = fedagg.trimmed_mean(T, 2)
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    X = T.detach().numpy()
    assert_close(out.numpy(), ref.trimmed_mean(X, 2), X)


@pytest.mark.parametrize("rule", WEIGHTED_RULES)
def test_tensor_weights(rule):
    X = updates(5, 11, 20)
    w = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    f = 0 if rule == "mean" else 2  # the mean takes no f
    out = fedagg.aggregate(torch.from_numpy(X), rule, f, weights=w, **rule_kwargs(rule))
    assert_close(out.numpy(), ref.aggregate(X, rule, f, weights=w.numpy(), **rule_kwargs(rule)), X)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nnm_and_clip_tensors(dtype):
    X = updates(6, 8, 30)
    T = torch.from_numpy(X).to(dtype)
    X32 = T.to(torch.float32).numpy()
    tol = DTYPE_TOL[dtype]
    Y = fedagg.nnm(T, 2)
    assert isinstance(Y, torch.Tensor) and Y.dtype == dtype and Y.shape == (8, 30)
    np.testing.assert_allclose(Y.to(torch.float64).numpy(), ref.nnm(X32, 2), rtol=tol, atol=tol * 3)
    C = fedagg.clip(T, 1.0)
    assert isinstance(C, torch.Tensor) and C.dtype == dtype
    np.testing.assert_allclose(C.to(torch.float64).numpy(), ref.clip(X32, 1.0), rtol=tol, atol=tol)


def test_integer_and_non_contiguous_tensors():
    with pytest.raises(TypeError, match="must be floating point"):
        fedagg.mean(torch.ones(3, 4, dtype=torch.int64))
    T = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="contiguous along the coordinate axis"):
        fedagg.mean(T[:, ::2])
    with pytest.raises(ValueError, match="must be 2-D"):
        fedagg.mean(T[0])


def test_nonfinite_tensor():
    T = torch.randn(7, 8, generator=torch.Generator().manual_seed(3))
    T[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"updates \[2\]"):
        fedagg.median(T, 1)
    out, info = fedagg.median(T, 1, nonfinite="exclude", return_info=True)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(info.excluded, [2])
    rest = np.delete(T.numpy(), 2, axis=0)
    assert_close(out.numpy(), ref.median(rest), rest)


@pytest.mark.parametrize("rule", ["mean", "median", "krum", "centered_clipping"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_aggregator_with_tensors(rule, dtype):
    X = updates(7, 9, 12)
    agg = fedagg.Aggregator(rule, _f(rule, 9), **rule_kwargs(rule))
    for x in X:
        agg.add(torch.from_numpy(x.reshape(3, 4)).to(dtype))
    out = agg.result()
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (3, 4)
    X32 = torch.from_numpy(X).to(dtype).to(torch.float32).numpy()
    expected = ref.aggregate(X32, rule, _f(rule, 9), **rule_kwargs(rule))
    tol = DTYPE_TOL[dtype]
    np.testing.assert_allclose(out.to(torch.float64).reshape(-1).numpy(), expected, rtol=tol,
                               atol=tol * np.abs(X32).max())
