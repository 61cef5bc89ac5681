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

    def weighted_sum(self, rows, n, d, coef, out, nonfinite, stream):
        self.calls.append("weighted_sum")
        o = _view(out, ctypes.c_float, d)
        o[:] = _core.weighted_sum(_rows(rows, n, d), _view(coef, ctypes.c_double, n).copy())
        if nonfinite and not np.isfinite(o).all():
            _view(nonfinite, ctypes.c_int32, 1)[0] |= 1

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


    # ---- compression codecs (fedagg/compress/sink.py's DeviceSink)
    def scatter_add(self, acc, idx, index_bytes, val, m, w, stream):
        self.calls.append("scatter_add")
        itype = ctypes.c_uint32 if index_bytes == 4 else ctypes.c_uint64
        index = _view(idx, itype, m).copy()
        a = _view(acc, ctypes.c_double, int(index.max()) + 1)
        _core.scatter_add(a, index, _view(val, ctypes.c_float, m).copy(), w)

    def dequantize_uniform_add(self, acc, lo, step, codes, d, bits, bucket, w, stream):
        self.calls.append("dequantize_uniform_add")
        nb = -(-d // bucket)
        _core.dequantize_uniform_add(_view(acc, ctypes.c_double, d), _view(lo, ctypes.c_float, nb).copy(),
                                     _view(step, ctypes.c_float, nb).copy(),
                                     _view(codes, ctypes.c_uint8, -(-d * bits // 8)).copy(), bits, bucket, w)

    def dequantize_qsgd_add(self, acc, norm, codes, d, s, bucket, w, stream):
        self.calls.append("dequantize_qsgd_add")
        _core.dequantize_qsgd_add(_view(acc, ctypes.c_double, d), _view(norm, ctypes.c_float, -(-d // bucket)).copy(),
                                  _view(codes, ctypes.c_int8, d).copy(), s, bucket, w)

    def dequantize_sign_add(self, acc, scale, signs, d, bucket, w, stream):
        self.calls.append("dequantize_sign_add")
        _core.dequantize_sign_add(_view(acc, ctypes.c_double, d), _view(scale, ctypes.c_float, -(-d // bucket)).copy(),
                                  _view(signs, ctypes.c_uint8, -(-d // 8)).copy(), bucket, w)

    def dequantize_levels_add(self, acc, scale, codes, levels, length, bits, block, w, stream):
        self.calls.append("dequantize_levels_add")
        nb = length // block
        lv = _view(levels, ctypes.c_double, 1 << bits)
        code = _view(codes, ctypes.c_uint8, length * bits // 8)
        idx = ((code[:, None] >> (np.arange(8 // bits, dtype=np.uint8) * bits)) & ((1 << bits) - 1)).reshape(-1)
        sc = np.repeat(_view(scale, ctypes.c_float, nb).astype(np.float64), block)
        _view(acc, ctypes.c_double, length)[:] += w * sc * lv[idx]

    def sign_vote_add(self, votes, signs, d, stream):
        self.calls.append("sign_vote_add")
        _core.sign_vote_add(_view(votes, ctypes.c_int32, d), _view(signs, ctypes.c_uint8, -(-d // 8)).copy())

    def hadamard_rotate(self, x, length, block, seed, inverse, stream):
        self.calls.append("hadamard_rotate")
        _core.hadamard_rotate(_view(x, ctypes.c_float, length), block, seed, inverse)


    def gaussian_noise(self, out, d, stddev, seed, offset, add, stream):
        self.calls.append("gaussian_noise")
        _core.gaussian_noise(_view(out, ctypes.c_float, d), stddev, seed, offset, add)


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

    def to_f32(self, x):
        return x.astype(np.float32)

    def sign_f32(self, x):
        return np.sign(x).astype(np.float32)


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
    for rule in ("mean", "geometric_median", "centered_clipping"):  # the weighted sum's own flag
        with pytest.raises(ValueError, match=r"updates \[7\] contain NaN or Inf"):
            run(gpu_ops, X, rule, 0)


def test_nnm_and_clip_through_gpu_ops(gpu_ops):
    X = np.random.default_rng(6).standard_normal((9, 300)).astype(np.float32)
    p = rules._params("krum", 2, None, None, 300, {})
    batch = Batch(X, 9, 300, lambda out: out, ops=gpu_ops)
    out, info = rules._run("krum", batch, p, weights=None, nonfinite="raise", clip_norm=3.0,
                           nnm=True, return_info=True)
    cpu, cinfo = fedagg.krum(X, 2, clip_norm=3.0, nnm=True, return_info=True)
    assert_close(out, cpu, X)
    assert info.selected.tolist() == cinfo.selected.tolist() and info.clipped == cinfo.clipped


# ---------------------------------------------------------------- compression codecs on the GPU path
class Device:
    """Stands for a CUDA tensor: compress's `like=` resolves it to the fake device."""


@pytest.fixture
def fake_device(monkeypatch):
    monkeypatch.setattr(_gpu, "_cuda", FakeCuda())
    monkeypatch.setattr(_gpu, "library_of", lambda x: FakeLib() if isinstance(x, Device) else None)
    FakeCuda.calls.clear()
    return Device()


def _codecs():
    from fedagg import compress as c

    return [c.TopK(ratio=0.05), c.TopK(ratio=0.05, method="threshold"), c.RandK(ratio=0.1), c.Uniform(8, bucket=64),
            c.Uniform(2, bucket=64), c.QSGD(15, bucket=64), c.Sign(bucket=64), c.Rotation(1, block=256),
            c.Rotation(4, block=256)]


def _payloads(codec, n, d, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.standard_normal(d).astype(np.float32)
        out.append(codec.encode(x, seed=seed * 100 + i) if "seed" in codec.encode.__code__.co_varnames
                   else codec.encode(x))
    return out


@pytest.mark.parametrize("codec", _codecs(), ids=lambda c: f"{c.name}-{getattr(c, 'bits', getattr(c, 'method', ''))}")
def test_compressed_mean_on_the_device_path_matches_host(fake_device, codec):
    from fedagg import compress

    ps = _payloads(codec, 5, 1000, 7)
    w = np.array([1.0, 2.0, 0.5, 0.0, 3.0])
    dev = compress.mean(ps, w, like=fake_device)
    host = compress.mean(ps, w)
    np.testing.assert_allclose(dev, host, rtol=1e-6, atol=1e-6)
    rows = compress.decode_into(ps, like=fake_device)
    np.testing.assert_allclose(rows, compress.decode_into(ps), rtol=1e-6, atol=1e-6)
    assert FakeCuda.calls, "the device kernels were not used"


def test_powersgd_and_votes_on_the_device_path(fake_device):
    from fedagg import compress

    rng = np.random.default_rng(2)
    ps = [compress.PowerSGD(rank=2).encode({"w": rng.standard_normal((20, 10)).astype(np.float32),
                                            "b": rng.standard_normal(10).astype(np.float32)},
                                           compress.PowerSGDState()) for _ in range(3)]
    np.testing.assert_allclose(compress.mean(ps, like=fake_device), compress.mean(ps), rtol=1e-6, atol=1e-7)
    signs = _payloads(compress.Sign(bucket=64), 4, 300, 3)
    np.testing.assert_array_equal(compress.majority_vote(signs, like=fake_device), compress.majority_vote(signs))
    assert "sign_vote_add" in FakeCuda.calls


def test_robust_rule_over_payloads_on_the_device_path(fake_device):
    from fedagg import compress

    ps = _payloads(compress.Uniform(8, bucket=64), 7, 400, 4)
    out = np.empty((7, 400), dtype=np.float32)
    dev = compress.aggregate(ps, "trimmed_mean", 2, like=fake_device)
    host = compress.aggregate(ps, "trimmed_mean", 2, out=out)
    np.testing.assert_allclose(dev, host, rtol=1e-6, atol=1e-6)


def test_gaussian_noise_on_the_device_path(fake_device):
    from fedagg import privacy

    for d, offset in [(1, 0), (1001, 3), (70_000, 2**40 + 1)]:
        np.testing.assert_array_equal(privacy.gaussian(d, 0.5, seed=9, offset=offset, like=fake_device),
                                      privacy.gaussian(d, 0.5, seed=9, offset=offset))
    assert "gaussian_noise" in FakeCuda.calls
