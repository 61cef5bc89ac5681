"""The CUDA backend against the CPU backend and the float64 references.

Collected everywhere; skipped with the reason where fedagg was built without
the CUDA backend or no CUDA device (or no CUDA-enabled torch) is present.
Every run draws fresh random inputs and poisons the device allocator's memory
with NaN first, so an output element the kernels fail to write shows up.
"""

import numpy as np
import pytest

import fedagg
import reference as ref
from helpers import ALL_RULES, assert_close, rule_kwargs

torch = pytest.importorskip("torch")

_backend = fedagg.backends()["cuda"]
_reason = (
    "fedagg was built without the CUDA backend" if not _backend["compiled"]
    else "no CUDA device visible to fedagg" if not _backend["usable"]
    else "torch has no CUDA support" if not torch.cuda.is_available()
    else None
)
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

_seed = iter(range(10**6))


def fresh(n, d, scale=1.0):
    """New random updates for every call: the same function on any valid input."""
    rng = np.random.default_rng(1000 + next(_seed))
    return (rng.standard_normal((n, d)) * scale).astype(np.float32)


def poison():
    """Fill memory the caching allocator will hand out next with NaN."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


def on_gpu(X):
    return torch.from_numpy(X).cuda()


def f_for(rule, n):
    return {"mean": 0, "median": 0, "trimmed_mean": (n - 1) // 4, "krum": (n - 3) // 2,
            "multi_krum": (n - 3) // 2, "bulyan": (n - 3) // 4,
            "geometric_median": 0, "centered_clipping": 0}[rule]


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("n,d", [(3, 1), (7, 1000), (16, 4099), (33, 513), (64, 100_003), (100, 2048)])
def test_rule_matches_cpu_and_reference(rule, n, d):
    if rule == "bulyan" and n < 3:
        pytest.skip("bulyan needs n >= 3")
    X = fresh(n, d)
    f = f_for(rule, n)
    kw = rule_kwargs(rule)
    poison()
    out, info = fedagg.aggregate(on_gpu(X), rule, f, return_info=True, **kw)
    assert out.is_cuda and out.dtype == torch.float32 and out.shape == (d,)
    host = out.cpu().numpy()
    assert np.isfinite(host).all(), "an output element was not written"
    cpu, cinfo = fedagg.aggregate(X, rule, f, return_info=True, **kw)
    assert_close(host, cpu, X)
    assert_close(host, ref.aggregate(X, rule, f, **kw), X)
    if info.selected is not None:
        assert info.selected.tolist() == cinfo.selected.tolist()


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "geometric_median"])
def test_list_of_device_tensors_is_not_stacked(rule):
    X = fresh(12, 3001)
    f = 2 if rule != "geometric_median" else 0
    rows = [on_gpu(x) for x in X]
    out = fedagg.aggregate(rows, rule, f)
    assert out.is_cuda
    assert_close(out.cpu().numpy(), fedagg.aggregate(X, rule, f), X)


def test_distances_of_nearly_equal_updates():
    rng = np.random.default_rng(next(_seed))
    common = rng.standard_normal(10_000)
    common *= 1e3 / np.linalg.norm(common)
    noise = rng.standard_normal((20, 10_000))
    noise *= 1e-3 / np.linalg.norm(noise, axis=1, keepdims=True)
    X = (common + noise).astype(np.float32)
    batch = fedagg._arrays.as_batch(on_gpu(X))
    D = batch.ops.pairwise_sqdist(batch.rows)
    D64 = ref.sqdist_matrix(X)
    off = ~np.eye(20, dtype=bool)
    np.testing.assert_allclose(D[off], D64[off], rtol=1e-4)
    _, info = fedagg.krum(on_gpu(X), 4, return_info=True)
    assert info.selected.tolist() == [ref.krum(X, 4)[1]]


def test_nonfinite_policy_on_gpu():
    X = fresh(9, 777)
    X[4, 5] = np.nan
    with pytest.raises(ValueError, match=r"updates \[4\] contain NaN or Inf"):
        fedagg.median(on_gpu(X))
    out, info = fedagg.median(on_gpu(X), nonfinite="exclude", return_info=True)
    assert info.excluded.tolist() == [4]
    assert_close(out.cpu().numpy(), fedagg.median(np.delete(X, 4, axis=0)), X)


def test_huge_values_fall_back_to_float64_distances():
    X = fresh(9, 300, scale=1e20)
    _, info = fedagg.krum(on_gpu(X), 2, return_info=True)
    assert info.selected.tolist() == [ref.krum(X, 2)[1]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_follows_input(dtype):
    X = fresh(9, 1000)
    T = on_gpu(X).to(getattr(torch, dtype))
    out = fedagg.median(T)
    assert out.is_cuda and out.dtype == T.dtype
    expected = fedagg.median(T.float().cpu().numpy())
    np.testing.assert_allclose(out.float().cpu().numpy(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_streaming_aggregator_on_gpu(rule):
    X = fresh(15, 2000)
    f = f_for(rule, 15)
    kw = rule_kwargs(rule)
    agg = fedagg.Aggregator(rule, f, **kw)
    for x in X:
        agg.add(on_gpu(x))
    out = agg.result()
    assert out.is_cuda
    assert_close(out.cpu().numpy(), fedagg.aggregate(X, rule, f, **kw), X)


def test_runs_on_the_callers_stream():
    X = fresh(16, 200_000)
    T = on_gpu(X)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = fedagg.trimmed_mean(T, 3)
    s.synchronize()
    assert_close(out.cpu().numpy(), fedagg.trimmed_mean(X, 3), X)


def test_cupy_arrays_when_installed():
    cp = pytest.importorskip("cupy")
    X = fresh(11, 1234)
    out = fedagg.median(cp.asarray(X))
    assert isinstance(out, cp.ndarray)
    assert_close(cp.asnumpy(out), fedagg.median(X), X)
