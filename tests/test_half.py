"""float16 and bfloat16 updates read by the kernels directly (no float32 copy of the batch).

The contract (docs/precision.md): on the CPU a float16 or bfloat16 batch gives, bit for bit, what
the same batch widened to float32 beforehand gives, cast back to the input's dtype; the kernels
read it through float32 tiles. Checked for every rule, on every instruction set, against the
widened batch and against float64 references written here; the widening itself exhaustively.
"""

import math
import tracemalloc

import numpy as np
import pytest

import fedagg
from fedagg import _core

torch = pytest.importorskip("torch")

RULES = [
    ("mean", {}),
    ("mean", {"weights": np.arange(1.0, 13.0)}),
    ("mean", {"clip_norm": 3.0}),
    ("median", {}),
    ("trimmed_mean", {"f": 3}),
    ("krum", {"f": 3}),
    ("multi_krum", {"f": 3}),
    ("bulyan", {"f": 2}),
    ("geometric_median", {}),
    ("centered_clipping", {}),
    ("centered_clipping", {"iterations": 3}),
    ("median", {"f": 2, "nnm": True}),
]


def bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), by torch."""
    return torch.from_numpy(np.ascontiguousarray(x32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def widened(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, written plainly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_widen_is_exact_for_every_bit_pattern(isa):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f16 = h.view(np.float16)
    got, ref = _core.widen(f16), f16.astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])  # subnormals, zeros, Inf
    assert np.isnan(got[nan]).all()
    assert np.array_equal(_core.widen(h).view(np.uint32), widened(h).view(np.uint32))
    for n in (1, 7, 8, 15, 17, 33):  # lengths around the vector widths (the scalar tails)
        assert np.array_equal(_core.widen(h[-n:]).view(np.uint32), widened(h[-n:]).view(np.uint32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _core.widen(np.zeros(4, np.float32))


@pytest.mark.parametrize("rule,kw", RULES, ids=[f"{r}-{'-'.join(k)}" for r, k in RULES])
def test_every_rule_gives_the_bits_of_the_widened_batch(isa, rule, kw):
    rng = np.random.default_rng(7)
    x32 = rng.normal(size=(12, 5003)).astype(np.float32)  # d not a multiple of any tile or vector
    x32[:, :50] *= 1000.0  # a few large coordinates
    f16 = x32.astype(np.float16)
    b16 = bf16_bits(x32)
    for half, wide, back in ((f16, f16.astype(np.float32), np.float16), (b16, widened(b16), None)):
        ref = fedagg.aggregate(wide, rule, **kw)
        if back is np.float16:
            got = fedagg.aggregate(half, rule, **kw)
            assert got.dtype == np.float16
            assert np.array_equal(got, ref.astype(np.float16), equal_nan=True)
            got = fedagg.aggregate(list(half), rule, **kw)  # a list of rows
            assert np.array_equal(got, ref.astype(np.float16), equal_nan=True)
            got = fedagg.aggregate(torch.from_numpy(half), rule, **kw)
            assert got.dtype == torch.float16 and torch.equal(got, torch.from_numpy(ref).half())
        else:
            t = torch.from_numpy(half.view(np.int16)).view(torch.bfloat16)
            got = fedagg.aggregate(t, rule, **kw)
            assert got.dtype == torch.bfloat16 and torch.equal(got, torch.from_numpy(ref).to(torch.bfloat16))


def test_against_float64_references():
    rng = np.random.default_rng(11)
    n, d, f = 9, 4001, 2
    x = rng.normal(size=(n, d)).astype(np.float16)
    x64 = x.astype(np.float64)
    tol = dict(rtol=2 ** -10, atol=2 ** -24)  # one float16 rounding of the result
    np.testing.assert_allclose(fedagg.aggregate(x, "mean").astype(np.float64), x64.mean(0), **tol)
    np.testing.assert_allclose(fedagg.aggregate(x, "median").astype(np.float64), np.median(x64, 0), **tol)
    srt = np.sort(x64, 0)
    np.testing.assert_allclose(fedagg.aggregate(x, "trimmed_mean", f=f).astype(np.float64),
                               srt[f:n - f].mean(0), **tol)
    # Krum: the row with the smallest sum of squared distances to its n - f - 2 nearest
    D = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(D[i], i))[: n - f - 2].sum() for i in range(n)]
    out, info = fedagg.aggregate(x, "krum", f=f, return_info=True)
    assert info.selected.tolist() == [int(np.argmin(scores))]
    np.testing.assert_allclose(info.scores, scores, rtol=1e-5)
    assert np.array_equal(out, x[int(np.argmin(scores))])  # the selected row, exactly


def test_edge_cases():
    # n = 1, d = 1
    one = np.array([[1.5]], dtype=np.float16)
    assert fedagg.aggregate(one, "median").tolist() == [[1.5]][0]
    assert fedagg.aggregate(np.array([[3.0], [1.0], [2.0]], np.float16), "median").tolist() == [2.0]
    # exact duplicates (a mimic attack): Krum picks one of them, the bits of the widened batch
    x = np.tile(np.float16([0.1, 0.2, 0.3]), (7, 1))
    x[5] = 9.0
    out, info = fedagg.aggregate(x, "krum", f=1, return_info=True)
    assert int(info.selected[0]) != 5 and np.array_equal(out, x[0])
    # NaN and Inf: refused, or excluded with nonfinite="exclude", as for float32
    bad = np.random.default_rng(3).normal(size=(6, 40)).astype(np.float16)
    bad[1, 7] = np.nan
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        fedagg.aggregate(bad, "median")
    got = fedagg.aggregate(bad, "median", nonfinite="exclude")
    assert np.array_equal(got, np.median(np.delete(bad, [1, 4], 0).astype(np.float64), 0).astype(np.float16))
    b = bf16_bits(np.float32([[1.0, np.inf], [2.0, 3.0], [np.nan, 1.0]]))
    tb = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16)
    assert fedagg.aggregate(tb, "mean", nonfinite="exclude").float().tolist() == [2.0, 3.0]
    # bfloat16 reaches 3e38: squared distances overflow float32 and are redone in float64
    huge = bf16_bits(np.float32([[3e38, -3e38], [-3e38, 3e38], [3e38, -3e38], [1e38, 1e38]]))
    th = torch.from_numpy(huge.view(np.int16)).view(torch.bfloat16)
    _, info = fedagg.aggregate(th, "krum", f=0, return_info=True)
    w = widened(huge).astype(np.float64)
    D = ((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(D[i], i))[:2].sum() for i in range(4)]
    assert np.all(np.isfinite(info.scores)) and np.allclose(info.scores, scores, rtol=1e-6)
    assert int(info.selected[0]) == int(np.argmin(scores))


def test_permutation_invariance_and_mixed_element_types():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(11, 777)).astype(np.float16)
    perm = rng.permutation(11)
    # (not Bulyan: its last Krum step, with one neighbour, ties mutual nearest neighbours by index)
    for rule, kw in (("median", {}), ("trimmed_mean", {"f": 3})):
        assert np.array_equal(fedagg.aggregate(x, rule, **kw), fedagg.aggregate(x[perm], rule, **kw))
    # rows of several element types in one list: each read as its own, the result in the first's dtype
    x32 = rng.normal(size=(6, 300)).astype(np.float32)
    rows = [x32[0].astype(np.float16), x32[1], torch.from_numpy(x32[2]).to(torch.bfloat16), x32[3],
            x32[4].astype(np.float16), x32[5]]
    wide = np.stack([r.float().numpy() if torch.is_tensor(r) else r.astype(np.float32) for r in rows])
    got = fedagg.aggregate(rows, "geometric_median")
    assert got.dtype == np.float16
    assert np.array_equal(got, fedagg.aggregate(wide, "geometric_median").astype(np.float16))


def test_no_float32_copy_of_the_batch():
    """A 64 x 1M float16 batch is 128 MB; widened it would be 256 MB more. What NumPy allocates
    (traced) stays at the result's size: the kernels widen tiles of a few thousand coordinates."""
    x = np.random.default_rng(1).normal(size=(64, 1 << 20)).astype(np.float16)
    for rule, kw in (("mean", {}), ("median", {}), ("krum", {"f": 4}), ("geometric_median", {}),
                     ("centered_clipping", {})):
        tracemalloc.start()
        try:
            fedagg.aggregate(x, rule, **kw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 24 << 20, (rule, peak)


def test_kernels_that_take_float32_only_say_so():
    acc = np.zeros(8)
    with pytest.raises(TypeError, match="float32"):
        _core.fold_f64(acc, np.zeros((2, 8), np.float16), np.ones(2))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _core.weighted_sum(np.zeros((2, 8), np.int32), np.ones(2))
    assert math.isclose(float(fedagg.aggregate(np.float16([[1.0], [2.0]]), "mean")[0]), 1.5)
