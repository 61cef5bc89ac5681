"""The CUDA backend's Python side (fedagg/_gpu.py) on the CPU.

No GPU is needed: a stand-in for fedagg._cuda implements its pointer-based
API over host memory (computing with fedagg._core), and a stand-in array
library plays the device framework with NumPy arrays. This checks what the
GPU tests cannot check without a device: the row-pointer tables (matrix rows
with any stride, lists of rows, subsets), coefficient and output buffers,
the sorting network handed to the kernels, the upper-triangle distance
matrix, flags, and the rules and streaming on top, against the CPU backend.
"""

import contextlib
import ctypes

import numpy as np
import pytest

import fedagg
from fedagg import _core, _gpu, rules
from fedagg._arrays import Batch
from helpers import ALL_RULES, assert_close, rule_kwargs


def _view(addr, ctype, count):
    return np.ctypeslib.as_array((ctype * count).from_address(addr))


def _rows(table, n, d):
    return [_view(int(p), ctypes.c_float, d) for p in _view(table, ctypes.c_int64, n)]


class FakeCuda:
    """fedagg._cuda's API over host memory."""

    calls = []

    @staticmethod
    def max_sorted_n():
        return 1024

    @staticmethod
    def device_count():
        return 1

    def weighted_sum(self, rows, n, d, coef, out, stream):
        self.calls.append("weighted_sum")
        _view(out, ctypes.c_float, d)[:] = _core.weighted_sum(_rows(rows, n, d), _view(coef, ctypes.c_double, n).copy())

    def pairwise_sqdist(self, rows, n, d, D, stream):
        self.calls.append("pairwise_sqdist")
        full = _core.pairwise_sqdist(_rows(rows, n, d))
        _view(D, ctypes.c_double, n * n)[:] = np.triu(full, 1).reshape(-1)  # the kernel writes i < k only

    def sqdist_to(self, rows, n, d, x, out, stream):
        self.calls.append("sqdist_to")
        r = _rows(rows, n, d)
        _view(out, ctypes.c_double, n)[:] = _core.sqnorms(r) if x == 0 else _core.sqdist_to(r, _view(x, ctypes.c_float, d))

    def nonfinite_rows(self, rows, n, d, out, stream):
        _view(out, ctypes.c_int32, n)[:] = _core.nonfinite_rows(_rows(rows, n, d))

    def sorted_reduce(self, rows, n, d, mode, f, lo, hi, size, out, flag, stream):
        self.calls.append("sorted_reduce")
        want_lo, want_hi = _core.sorting_network(n)
        assert size == len(want_lo)
        np.testing.assert_array_equal(_view(lo, ctypes.c_uint32, size), want_lo)
        np.testing.assert_array_equal(_view(hi, ctypes.c_uint32, size), want_hi)
        r = _rows(rows, n, d)
        res, bad = (_core.coordinate_median(r) if mode == 0 else
                    _core.trimmed_mean(r, f) if mode == 1 else _core.bulyan_reduce(r, f))
        _view(out, ctypes.c_float, d)[:] = res
        _view(flag, ctypes.c_int32, 1)[0] = int(bad)


class FakeLib:
    """The device framework, played by NumPy."""

    def empty(self, shape, dtype):
        return np.full(shape, np.nan if dtype.startswith("float") else -7, dtype=dtype)  # poisoned

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def from_host(self, a):
        return np.array(a, copy=True)

    def to_host(self, x):
        return np.array(x, copy=True)

    def ptr(self, x):
        return x.ctypes.data

    def row_stride(self, x):
        return x.strides[0]

    def stream(self):
        return 0

    def all_finite(self, x):
        return bool(np.isfinite(x).all())

    def activate(self):
        return contextlib.nullcontext()

    def copy_f32(self, x):
        return np.array(x, dtype=np.float32, copy=True).reshape(-1)

    def axpy(self, acc, x, w):
        acc += x.astype(np.float64) * w

    def finish_mean(self, acc, total):
        return (acc / total).astype(np.float32)

    def stack(self, rows):
        return np.stack(rows)


@pytest.fixture
def gpu_ops(monkeypatch):
    monkeypatch.setattr(_gpu, "_cuda", FakeCuda())
    FakeCuda.calls.clear()
    return _gpu.GpuOps(FakeLib())


def run(ops, X, rule, f, **kw):
    p = rules._params(rule, f, None, None, X.shape[-1], kw)
    batch = Batch(X, X.shape[0], X.shape[1], lambda out: out, ops=ops)
    return rules._run(rule, batch, p, weights=None, nonfinite="raise", clip_norm=None, nnm=False,
                      return_info=True)


def f_for(rule, n):
    return {"trimmed_mean": 2, "krum": 2, "multi_krum": 2, "bulyan": 2}.get(rule, 0)


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("layout", ["matrix", "strided", "list"])
def test_rules_through_the_gpu_ops_match_cpu(gpu_ops, rule, layout):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((26, 517)).astype(np.float32)
    X = {"matrix": base[:13], "strided": base[::2], "list": None}[layout]
    kw = rule_kwargs(rule)
    f = f_for(rule, 13)
    if layout == "list":
        X = base[:13]
        p = rules._params(rule, f, None, None, 517, kw)
        batch = Batch([x.copy() for x in X], 13, 517, lambda out: out, ops=gpu_ops)
        out, info = rules._run(rule, batch, p, weights=None, nonfinite="raise", clip_norm=None,
                               nnm=False, return_info=True)
    else:
        out, info = run(gpu_ops, X, rule, f, **kw)
    cpu, cinfo = fedagg.aggregate(np.ascontiguousarray(X), rule, f, return_info=True, **kw)
    assert_close(out, cpu, X)
    if cinfo.selected is not None:
        assert info.selected.tolist() == cinfo.selected.tolist()
    assert FakeCuda.calls, "the GPU ops were not used"


def test_large_n_network_and_nonfinite_flag(gpu_ops):
    X = np.random.default_rng(5).standard_normal((80, 129)).astype(np.float32)
    out, _ = run(gpu_ops, X, "median", 0)
    assert_close(out, fedagg.median(X), X)
    X[7, 3] = np.inf
    with pytest.raises(ValueError, match=r"updates \[7\] contain NaN or Inf"):
        run(gpu_ops, X, "trimmed_mean", 3)


def test_nnm_and_clip_through_gpu_ops(gpu_ops):
    X = np.random.default_rng(6).standard_normal((9, 300)).astype(np.float32)
    p = rules._params("krum", 2, None, None, 300, {})
    batch = Batch(X, 9, 300, lambda out: out, ops=gpu_ops)
    out, info = rules._run("krum", batch, p, weights=None, nonfinite="raise", clip_norm=3.0,
                           nnm=True, return_info=True)
    cpu, cinfo = fedagg.krum(X, 2, clip_norm=3.0, nnm=True, return_info=True)
    assert_close(out, cpu, X)
    assert info.selected.tolist() == cinfo.selected.tolist() and info.clipped == cinfo.clipped
