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



@pytest.mark.parametrize("cols,bad", [(slice(0, 1026), 500), (slice(0, 1026), 1025), (slice(1, 1027), 10)],
                         ids=["vector-path", "tail", "unaligned-rows"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_mean_kernel_flags_nonfinite_output_on_every_path(cols, bad, value):
    """The weighted sum raises its own flag on NaN/Inf output (no second pass): 16-byte rows
    with a tail, and unaligned rows, must all report it."""
    X = fresh(9, 1028)
    X[4, cols][bad] = value
    T = on_gpu(X)[:, cols]
    with pytest.raises(ValueError, match=r"updates \[4\] contain NaN or Inf"):
        fedagg.mean(T)
    out, info = fedagg.mean(T, nonfinite="exclude", return_info=True)
    assert info.excluded.tolist() == [4]
    assert_close(out.cpu().numpy(), fedagg.mean(np.delete(X[:, cols], 4, axis=0)), X[:, cols])

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


# ---------------------------------------------------------------- compression codecs on the device
def _codec_payloads(codec, n, d):
    rng = np.random.default_rng(77)
    X = rng.standard_normal((n, d)).astype(np.float32)
    takes_seed = "seed" in codec.encode.__code__.co_varnames
    return [codec.encode(x, seed=11 + i) if takes_seed else codec.encode(x) for i, x in enumerate(X)]


def _all_codecs():
    from fedagg import compress as c

    return [c.TopK(ratio=0.01), c.RandK(ratio=0.02), c.Uniform(8), c.Uniform(4), c.Uniform(1), c.QSGD(),
            c.Sign(), c.Rotation(1, block=1 << 13), c.Rotation(2), c.Rotation(4)]


@pytest.mark.parametrize("codec", _all_codecs(), ids=lambda c: f"{c.name}-{getattr(c, 'bits', '')}")
def test_compressed_mean_on_gpu_matches_host(codec):
    from fedagg import compress

    ps = _codec_payloads(codec, 6, 300_001)
    w = np.arange(1.0, 7.0)
    poison()
    dev = compress.mean(ps, w, like=torch.empty(0, device="cuda"))
    assert dev.is_cuda and dev.dtype == torch.float32
    host = compress.mean(ps, w)
    np.testing.assert_allclose(dev.cpu().numpy(), host, rtol=1e-5, atol=1e-6 * float(np.abs(host).max()))
    rows = compress.decode_into(ps, torch.empty((6, 300_001), device="cuda"))
    np.testing.assert_allclose(rows.cpu().numpy(), compress.decode_into(ps), rtol=1e-5, atol=1e-6)


def test_hadamard_rotation_on_gpu_is_the_cpu_rotation_bit_for_bit():
    from fedagg import _core, _cuda

    for B in (8, 1024, 4096, 1 << 16):
        x = fresh(1, 4 * B)[0]
        for inverse in (False, True):
            want = x.copy()
            _core.hadamard_rotate(want, B, 12345, inverse)
            t = on_gpu(x.copy())
            _cuda.hadamard_rotate(t.data_ptr(), t.numel(), B, 12345, inverse, torch.cuda.current_stream().cuda_stream)
            np.testing.assert_array_equal(t.cpu().numpy(), want)


def test_majority_vote_and_device_encode_on_gpu():
    from fedagg import compress

    ps = _codec_payloads(compress.Sign(), 7, 100_003)
    dev = compress.majority_vote(ps, like=torch.empty(0, device="cuda"))
    np.testing.assert_array_equal(dev.cpu().numpy(), compress.majority_vote(ps))
    x = fresh(1, 50_000)[0]
    a = compress.Uniform(8).encode(on_gpu(x), seed=3)
    b = compress.Uniform(8).encode(x, seed=3)
    np.testing.assert_array_equal(a.buffers["codes"], b.buffers["codes"])


# ---------------------------------------------------------------- privacy noise on the device
@pytest.mark.parametrize("d,offset", [(1, 0), (7, 3), (1_000_003, 5), (4096, 2**40 + 2)])
def test_gaussian_noise_on_gpu_is_the_cpu_stream_bit_for_bit(d, offset):
    from fedagg import privacy

    poison()
    dev = privacy.gaussian(d, 1.7, seed=2**63 + 11, offset=offset, like=torch.empty(0, device="cuda"))
    assert dev.is_cuda and dev.dtype == torch.float32
    host = privacy.gaussian(d, 1.7, seed=2**63 + 11, offset=offset)
    np.testing.assert_array_equal(dev.cpu().numpy().view(np.uint32), host.view(np.uint32))


def test_dp_aggregation_on_gpu_matches_cpu():
    from fedagg import privacy

    z = torch.zeros(1000, device="cuda")
    assert privacy.add_gaussian(z, 1.0, seed=4) is z  # in place
    np.testing.assert_array_equal(z.cpu().numpy(), privacy.gaussian(1000, 1.0, seed=4))
    for rule, f in [("mean", 0), ("trimmed_mean", 2), ("krum", 2)]:
        mk = lambda: privacy.CentralDP(clip_norm=30.0, noise_multiplier=1.0, expected_participants=10, seed=3)
        X2 = fresh(10, 50_000)
        dev = fedagg.aggregate(on_gpu(X2), rule, f, dp=mk())
        host = fedagg.aggregate(X2, rule, f, dp=mk())
        assert dev.is_cuda
        np.testing.assert_allclose(dev.cpu().numpy(), host, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- torch integration on the device
def test_torch_integration_round_on_gpu_matches_cpu():
    from fedagg import compress
    from fedagg.integrations.torch import Participant, ParameterVector, ServerOptimizer

    def run(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)
        server = ParameterVector(model)
        glob = server.get()
        opt = ServerOptimizer("fedadam", lr=0.05)
        rng = np.random.default_rng(5)
        data = [(torch.from_numpy(rng.standard_normal((32, 20)).astype(np.float32)).to(device),
                 torch.from_numpy(rng.integers(0, 3, 32)).to(device)) for _ in range(4)]
        parts = [Participant(torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(),
                                                 torch.nn.Linear(16, 3)).to(device),
                             codec=compress.TopK(ratio=0.25)) for _ in data]
        for _ in range(3):
            payloads = []
            for p, (x, y) in zip(parts, data):
                p.begin(glob)
                loss = torch.nn.functional.cross_entropy(p.params.module(x), y)
                loss.backward()
                with torch.no_grad():
                    for t in p.params.tensors:
                        t -= 0.1 * t.grad
                        t.grad = None
                payloads.append(p.update())
            like = glob if device == "cuda" else None
            agg = compress.mean(payloads, like=like) if like is not None else compress.mean(payloads)
            glob = opt.step(glob, agg)
        assert glob.device.type == device
        return glob.cpu().numpy()

    np.testing.assert_allclose(run("cuda"), run("cpu"), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the server on the GPU
@pytest.mark.parametrize("rule,f", [("mean", 0), ("median", 1), ("trimmed_mean", 1), ("krum", 1),
                                    ("multi_krum", 1), ("geometric_median", 0)])
def test_server_on_the_gpu_matches_the_cpu_server(rule, f):
    """A loopback round with device="cuda" (pinned staging, copy stream, rules on the GPU) against
    the same round on a CPU server: bitwise for the mean's fold and the coordinate-wise rules."""
    pytest.importorskip("zmq")
    from test_server_scale import _one_round

    ups = np.random.default_rng(8).standard_normal((7, 300_001)).astype(np.float32)
    ups[2] *= 40
    gpu = _one_round("cuda", rule, f, ups)
    cpu = _one_round("cpu", rule, f, ups)
    assert gpu.history[0]["device"].startswith("cuda") and gpu.history[0]["model_updated"]
    assert gpu.history[0]["accepted"] == cpu.history[0]["accepted"]
    if rule in ("mean", "median", "trimmed_mean"):
        np.testing.assert_array_equal(gpu.model, cpu.model)
    else:
        np.testing.assert_allclose(gpu.model, cpu.model, rtol=1e-5, atol=1e-6)
        assert gpu.history[0]["excluded_by_rule"] == cpu.history[0]["excluded_by_rule"]


def test_server_on_the_gpu_folds_compressed_and_clipped_updates():
    pytest.importorskip("zmq")
    from fedagg import compress
    from test_server_scale import _one_round, fold_reference, start, stop

    ups = np.random.default_rng(9).standard_normal((5, 100_000)).astype(np.float32)
    clipped = _one_round("cuda", "mean", 0, ups, clip_norm=50.0).model
    np.testing.assert_allclose(clipped, fold_reference(list(ups), clip=50.0), rtol=1e-6, atol=1e-7)
    ps = [compress.Uniform(8, bucket=64).encode(x, seed=i) for i, x in enumerate(ups)]
    server, t = start(100_000, quorum=5, rounds=1, linger=3, device="cuda", chunk_bytes=16384)
    try:
        for i, p in enumerate(ps):
            with fedagg.Client(server.endpoint, f"p{i}", timeout=10) as c:
                c.submit(p, 0)
    finally:
        stop(server, t)
    np.testing.assert_allclose(server.model, fold_reference([compress.decode(p) for p in ps]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ fedagg.distributed on CUDA rows
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rule", ALL_RULES)
def test_distributed_aggregate_on_cuda_rows_equals_the_single_process_result(rule, one_rank_group):
    """ShardedOps over the CUDA backend's ops (a group of one: the n x n values go through gloo on
    the host): the same floats as fedagg.aggregate on the same CUDA rows, selections included."""
    import fedagg.distributed as fd

    n, d = 11, 4099
    X = on_gpu(fresh(n, d))
    f = f_for(rule, n)
    want, info_want = fedagg.aggregate(X, rule, f, return_info=True, nonfinite="exclude")
    got, info = fd.aggregate(X, rule, f, return_info=True, nonfinite="exclude")
    assert got.is_cuda and got.shape == (d,)
    if rule in ("geometric_median", "centered_clipping"):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)
    if info_want.selected is not None:
        assert np.array_equal(info.selected, info_want.selected)
