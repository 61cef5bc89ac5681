"""Sparsifying codecs: exactness, error feedback, unbiasedness, aggregation, hostile payloads."""

import json
import struct

import numpy as np
import pytest

from fedagg import compress
from fedagg.compress import Payload, PayloadError, RandK, TopK


def vec(d, seed):
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def wire(p):
    """Through the wire format and back (what the server sees)."""
    return Payload.from_frames([bytes(f) for f in p.to_frames()])


def topk_ref(x, k):
    """The k largest |x|, ties by lowest index, in index order (float64 reference)."""
    order = np.argsort(-np.abs(x.astype(np.float64)), kind="stable")[:k]
    return np.sort(order)


@pytest.mark.parametrize("d,k", [(1, 1), (7, 3), (1000, 10), (300_000, 3000), (300_000, 1), (70_000, 70_000)])
def test_topk_exact_selects_the_largest(d, k):
    x = vec(d, d + k)
    p = wire(TopK(k, error_feedback=False).encode(x))
    idx = topk_ref(x, k)
    np.testing.assert_array_equal(p.buffers["indices"], idx)
    np.testing.assert_array_equal(p.buffers["values"], x[idx])
    dense = np.zeros(d, np.float32)
    dense[idx] = x[idx]
    np.testing.assert_array_equal(compress.decode(p), dense)
    assert p.bits_per_coordinate == pytest.approx(64 * k / d + 8 * len(p.header()) / d)


def test_topk_ties_keep_lowest_indices():
    x = np.array([1, -2, 2, 0, -2, 2, 1], np.float32)
    p = TopK(2, error_feedback=False).encode(x)
    assert p.buffers["indices"].tolist() == [1, 2]
    big = np.zeros(400_000, np.float32)
    big[[5, 10, 399_999]] = 7.0
    assert TopK(2, error_feedback=False).encode(big).buffers["indices"].tolist() == [5, 10]


def test_topk_threshold_sends_about_k_and_only_large_values():
    x = vec(1_000_000, 3)
    k = 10_000
    p = TopK(k, method="threshold", error_feedback=False).encode(x)
    sent = p.buffers["indices"].size
    assert 0.8 * k <= sent <= 1.25 * k
    mask = np.zeros(x.size, bool)
    mask[p.buffers["indices"]] = True
    assert np.abs(x[mask]).min() >= np.abs(x[~mask]).max()


@pytest.mark.parametrize("codec", [TopK(50), TopK(ratio=0.01, method="threshold"), RandK(50)])
def test_error_feedback_carries_the_residual(codec):
    """Sum of what was sent plus what is still owed equals the sum of all updates."""
    d, rounds = 5000, 12
    state = codec.state(d)
    total_in = np.zeros(d)
    total_sent = np.zeros(d)
    for t in range(rounds):
        g = vec(d, 100 + t)
        total_in += g
        kw = {"seed": t} if isinstance(codec, RandK) else {}
        total_sent += compress.decode(wire(codec.encode(g, state, **kw)))
    np.testing.assert_allclose(total_sent + state.residual, total_in, rtol=0, atol=1e-4)
    # and what is owed stays bounded instead of growing with the rounds
    assert np.linalg.norm(state.residual) < 0.5 * np.linalg.norm(total_in) + 3 * np.sqrt(d)


def test_randk_indices_regenerate_from_the_seed():
    x = vec(10_000, 5)
    p = wire(RandK(100, error_feedback=False).encode(x, seed=1234))
    idx = RandK.indices(10_000, 100, 1234)
    assert "indices" not in p.buffers and p.buffers["values"].size == 100
    np.testing.assert_array_equal(p.buffers["values"], x[idx])
    assert len(set(idx.tolist())) == 100 and np.all(np.diff(idx.astype(np.int64)) > 0)


def test_randk_unbiased_statistically():
    d, k, trials = 40, 8, 6000
    x = vec(d, 9)
    codec = RandK(k, unbiased=True)
    acc = np.zeros(d)
    for s in range(trials):
        acc += compress.decode(codec.encode(x, seed=s))
    est = acc / trials
    sigma = np.abs(x) * np.sqrt((d / k - 1) / trials)
    assert np.all(np.abs(est - x) <= 5 * sigma + 1e-6)


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.0, 5.0]])
def test_compressed_mean_equals_decode_then_mean(weights):
    d = 20_000
    payloads = [TopK(ratio=0.02, error_feedback=False).encode(vec(d, i)) for i in range(2)]
    payloads += [RandK(300, error_feedback=False).encode(vec(d, 10 + i), seed=i) for i in range(2)]
    payloads = [wire(p) for p in payloads]
    dense = np.stack([compress.decode(p).astype(np.float64) for p in payloads])
    w = np.ones(4) if weights is None else np.asarray(weights)
    expected = (w[:, None] * dense).sum(0) / w.sum()
    np.testing.assert_allclose(compress.mean(payloads, weights), expected, rtol=1e-6, atol=1e-7)


def test_codec_argument_errors():
    with pytest.raises(ValueError, match="exactly one of k and ratio"):
        TopK().encode(vec(10, 0))
    with pytest.raises(ValueError, match="1 <= k <= d = 10"):
        TopK(11).encode(vec(10, 0))
    with pytest.raises(ValueError, match="method must be"):
        TopK(1, method="fast")
    x = vec(10, 0)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        TopK(2).encode(x)
    with pytest.raises(ValueError, match="state is for d = 5"):
        TopK(2).encode(vec(10, 0), compress.ErrorFeedback.zeros(5))
    with pytest.raises(ValueError, match="has d = 11"):
        compress.mean([TopK(2).encode(vec(10, 0)), TopK(2).encode(vec(11, 0))])


# ----------------------------------------------------------- hostile payloads
def frames_of(meta, buffers, magic=b"FAGP", version=1):
    body = json.dumps(meta).encode()
    return [struct.pack("<4sHI", magic, version, len(body)) + body] + buffers


GOOD_META = {"codec": "topk", "d": 10, "dtype": "float32", "params": {"k": 2},
             "buffers": [{"name": "indices", "dtype": "uint32", "count": 2},
                         {"name": "values", "dtype": "float32", "count": 2}]}
IDX = np.array([1, 7], np.uint32).tobytes()
VAL = np.array([0.5, -1.0], np.float32).tobytes()


def test_a_handmade_payload_parses():
    p = Payload.from_frames(frames_of(GOOD_META, [IDX, VAL]))
    assert compress.decode(p)[[1, 7]].tolist() == [0.5, -1.0]


def _meta(**change):
    m = json.loads(json.dumps(GOOD_META))
    m.update(change)
    return m


HOSTILE = {
    "empty": ([], "non-empty list"),
    "short header": ([b"FAG"], "truncated"),
    "bad magic": (frames_of(GOOD_META, [IDX, VAL], magic=b"XXXX"), "bad magic"),
    "future version": (frames_of(GOOD_META, [IDX, VAL], version=9), "version 9"),
    "not json": ([struct.pack("<4sHI", b"FAGP", 1, 3) + b"{]x", IDX, VAL], "not acceptable JSON"),
    "declared length lies": ([struct.pack("<4sHI", b"FAGP", 1, 999) + b"{}", IDX, VAL], "declared"),
    "missing field": (frames_of({"codec": "topk", "d": 10, "params": {}}, []), "exactly codec"),
    "float64 payload": (frames_of(_meta(dtype="float64"), [IDX, VAL]), "decoded dtype"),
    "unknown codec": (frames_of(_meta(codec="zip"), [IDX, VAL]), "unknown codec"),
    "huge d": (frames_of(_meta(d=2**50), [IDX, VAL]), "d must be"),
    "negative d": (frames_of(_meta(d=-1), [IDX, VAL]), "d must be"),
    "missing frame": (frames_of(GOOD_META, [IDX]), "declares 2 buffers"),
    "truncated buffer": (frames_of(GOOD_META, [IDX[:5], VAL]), "expected 8"),
    "oversized buffer": (frames_of(GOOD_META, [IDX + IDX, VAL]), "expected 8"),
    "bad dtype": (frames_of(_meta(buffers=[{"name": "indices", "dtype": "object", "count": 2},
                                           GOOD_META["buffers"][1]]), [IDX, VAL]), "not allowed"),
    "k too large": (frames_of(_meta(params={"k": 11}), [IDX, VAL]), "0 <= k <= d"),
    "k disagrees": (frames_of(_meta(params={"k": 1}), [IDX, VAL]), "expected 1 indices"),
    "index out of range": (frames_of(GOOD_META, [np.array([1, 10], np.uint32).tobytes(), VAL]), "out of range"),
    "unsorted": (frames_of(GOOD_META, [np.array([7, 1], np.uint32).tobytes(), VAL]), "strictly increasing"),
    "duplicate index": (frames_of(GOOD_META, [np.array([3, 3], np.uint32).tobytes(), VAL]), "strictly increasing"),
    "nan value": (frames_of(GOOD_META, [IDX, np.array([np.nan, 1], np.float32).tobytes()]), "finite"),
    "wrong buffers": (frames_of(_meta(buffers=[GOOD_META["buffers"][1], GOOD_META["buffers"][0]]), [VAL, IDX]),
                      "needs buffers"),
    "randk bad seed": (frames_of({"codec": "randk", "d": 10, "dtype": "float32",
                                  "params": {"k": 2, "seed": -5, "scale": 1.0},
                                  "buffers": [GOOD_META["buffers"][1]]}, [VAL]), "bad seed"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_payloads_raise_clear_errors(case):
    frames, message = HOSTILE[case]
    with pytest.raises(PayloadError, match=message):
        Payload.from_frames(frames)


def test_fuzzed_payloads_never_crash():
    """Random truncations and byte flips of valid payloads: a PayloadError, or a payload
    that decodes within bounds; nothing else, ever."""
    rng = np.random.default_rng(2024)
    from fedagg.compress import QSGD, Sign, Uniform

    seeds = [TopK(5, error_feedback=False).encode(vec(64, 1)),
             RandK(6, error_feedback=False).encode(vec(64, 2), seed=77),
             Uniform(2, bucket=16).encode(vec(64, 3), seed=5),
             QSGD(7, bucket=16).encode(vec(64, 4), seed=6),
             Sign(bucket=16).encode(vec(64, 5)),
             compress.Rotation(block=16).encode(vec(40, 6), seed=8),
             compress.Rotation(4, block=16).encode(vec(40, 7), seed=9),
             compress.PowerSGD(rank=1).encode({"w": vec(12, 9).reshape(4, 3), "b": vec(3, 10)})]
    accepted = rejected = 0
    for it in range(5000):
        frames = [bytearray(bytes(f)) for f in seeds[it % len(seeds)].to_frames()]
        f = int(rng.integers(len(frames)))
        action = rng.integers(3)
        if action == 0 and len(frames[f]) > 0:
            frames[f] = frames[f][: int(rng.integers(len(frames[f])))]
        elif action == 1 and len(frames[f]) > 0:
            for _ in range(int(rng.integers(1, 4))):
                frames[f][int(rng.integers(len(frames[f])))] = int(rng.integers(256))
        else:
            frames.pop(f) if len(frames) > 1 and rng.integers(2) else frames.append(bytearray(rng.bytes(8)))
        try:
            p = Payload.from_frames([bytes(x) for x in frames])
        except PayloadError:
            rejected += 1
            continue
        out = compress.decode(p)
        assert out.shape == (p.d,) and np.isfinite(out).all()
        accepted += 1
    assert rejected > 1500 and accepted > 0


@pytest.mark.parametrize("method", ["exact", "threshold"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_updates_are_refused_by_every_codec(method, bad):
    for d, pos in [(50, 7), (400_000, 123_457)]:
        x = vec(d, 1)
        x[pos] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            TopK(ratio=0.01, method=method).encode(x)
        with pytest.raises(ValueError, match="NaN or Inf"):
            RandK(3).encode(x)


# ---------------------------------------------------------------- quantizers
from fedagg.compress import QSGD, Sign, Uniform  # noqa: E402


def uniform_ref(x, bits, bucket):
    """Per-bucket (lo, step) in float64, the quantization grid of Uniform."""
    out = []
    for b in range(0, x.size, bucket):
        v = x[b:b + bucket].astype(np.float64)
        out.append((v.min(), (np.float32(v.max()) - np.float32(v.min())) / (2**bits - 1)))
    return out


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("d,bucket", [(1, 8), (13, 8), (5000, 512), (4099, 64)])
def test_uniform_roundtrip_within_one_step(bits, d, bucket):
    x = vec(d, bits * d)
    p = wire(Uniform(bits, bucket=bucket).encode(x, seed=3))
    y = compress.decode(p).astype(np.float64)
    for bi, (lo, step) in enumerate(uniform_ref(x, bits, bucket)):
        seg = slice(bi * bucket, (bi + 1) * bucket)
        assert np.all(np.abs(y[seg] - x[seg]) <= step * (1 + 1e-5) + 1e-6)
        grid = (y[seg] - lo) / step if step > 0 else np.zeros(y[seg].size)
        np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)  # decoded values sit on the grid
    assert p.bits_per_coordinate == pytest.approx(bits + 64 * (-(-d // bucket)) / d + 8 * len(p.header()) / d,
                                                  rel=0.02)


@pytest.mark.parametrize("codec", [Uniform(2, bucket=64), Uniform(8), QSGD(4, bucket=64)])
def test_quantizers_are_unbiased(codec):
    x = vec(256, 17)
    trials = 3000
    acc = np.zeros(x.size)
    sq = np.zeros(x.size)
    for s in range(trials):
        y = compress.decode(codec.encode(x, seed=s)).astype(np.float64)
        acc += y
        sq += (y - x) ** 2
    est = acc / trials
    sigma = np.sqrt(sq / trials / trials) + 1e-7
    assert np.all(np.abs(est - x) <= 6 * sigma)


def test_qsgd_variance_within_theory():
    """E||Q(x) - x||^2 <= min(bucket / s^2, sqrt(bucket) / s) ||x||^2 per bucket (Alistarh et al.)."""
    bucket, s = 256, 8
    x = vec(bucket * 4, 23)
    trials = 400
    err = 0.0
    for t in range(trials):
        y = compress.decode(QSGD(s, bucket=bucket).encode(x, seed=t)).astype(np.float64)
        err += np.sum((y - x) ** 2)
    bound = min(bucket / s**2, np.sqrt(bucket) / s) * np.sum(x.astype(np.float64) ** 2)
    assert err / trials <= bound


def test_seed_makes_encoding_reproducible():
    x = vec(3000, 4)
    a, b = Uniform(4).encode(x, seed=11), Uniform(4).encode(x, seed=11)
    assert all(np.array_equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    c = Uniform(4).encode(x, seed=12)
    assert not np.array_equal(a.buffers["codes"], c.buffers["codes"])


def test_sign_decodes_to_scaled_signs_and_votes():
    x = vec(1000, 8)
    p = wire(Sign(bucket=512, error_feedback=False).encode(x))
    y = compress.decode(p)
    for b in range(0, 1000, 512):
        seg = x[b:b + 512].astype(np.float64)
        np.testing.assert_allclose(y[b:b + 512], np.abs(seg).mean() * np.where(seg < 0, -1, 1), rtol=1e-6)
    xs = [vec(1000, 30 + i) for i in range(5)]
    ps = [wire(Sign(error_feedback=False).encode(v)) for v in xs]
    expected = np.sign(sum(np.where(v < 0, -1, 1) for v in xs))
    np.testing.assert_array_equal(compress.majority_vote(ps), expected)
    even = compress.majority_vote(ps[:2])
    assert set(np.unique(even)) <= {-1.0, 0.0, 1.0} and np.any(even == 0)
    with pytest.raises(ValueError, match="majority vote takes sign payloads"):
        compress.majority_vote([ps[0], Uniform(8).encode(xs[0])])


@pytest.mark.parametrize("codec", [Sign(), Uniform(2, error_feedback=True), QSGD(2, error_feedback=True)])
def test_quantizer_error_feedback_carries_the_residual(codec):
    d, rounds = 3000, 10
    state = codec.state(d)
    total_in, total_sent = np.zeros(d), np.zeros(d)
    for t in range(rounds):
        g = vec(d, 300 + t)
        total_in += g
        kw = {} if isinstance(codec, Sign) else {"seed": t}
        total_sent += compress.decode(wire(codec.encode(g, state, **kw)))
    np.testing.assert_allclose(total_sent + state.residual, total_in, rtol=0, atol=2e-4)


def test_mixed_codec_mean_equals_decode_then_mean():
    d = 5000
    ps = [wire(c.encode(vec(d, i), **kw)) for i, (c, kw) in enumerate([
        (Uniform(8), {"seed": 1}), (Uniform(2, bucket=64), {"seed": 2}), (QSGD(16), {"seed": 3}),
        (Sign(error_feedback=False), {}), (TopK(ratio=0.05, error_feedback=False), {})])]
    w = [1.0, 0.5, 2.0, 1.0, 3.0]
    dense = np.stack([compress.decode(p).astype(np.float64) for p in ps])
    expected = (np.asarray(w)[:, None] * dense).sum(0) / sum(w)
    np.testing.assert_allclose(compress.mean(ps, w), expected, rtol=1e-6, atol=1e-6)


def _uniform_frames(**change):
    p = Uniform(4, bucket=8).encode(vec(20, 1), seed=1)
    meta = json.loads(p.header()[10:])
    bufs = {k: v.copy() for k, v in p.buffers.items()}
    for k, v in change.items():
        if k in bufs:
            bufs[k] = v
        else:
            meta["params"][k] = v
    meta["buffers"] = [{"name": k, "dtype": v.dtype.name, "count": int(v.size)} for k, v in bufs.items()]
    return frames_of(meta, [v.tobytes() for v in bufs.values()])


@pytest.mark.parametrize("change,message", [
    ({"bits": 3}, "bad bits"), ({"bucket": 12}, "bad bucket"),
    ({"lo": np.zeros(2, np.float32)}, "expected 3 lo"),
    ({"step": np.array([1, -1, 1], np.float32)}, "steps must be >= 0"),
    ({"lo": np.array([np.nan, 0, 0], np.float32)}, "lo must be finite"),
    ({"codes": np.zeros(3, np.uint8)}, "codes have the wrong size"),
])
def test_hostile_quantized_payloads(change, message):
    with pytest.raises(PayloadError, match=message):
        Payload.from_frames(_uniform_frames(**change))


def test_hostile_qsgd_and_sign_payloads():
    q = QSGD(3, bucket=8).encode(vec(16, 2), seed=0)
    codes = q.buffers["codes"].copy()
    codes[0] = 9
    meta = json.loads(q.header()[10:])
    with pytest.raises(PayloadError, match="codes beyond s = 3"):
        Payload.from_frames(frames_of(meta, [q.buffers["norm"].tobytes(), codes.tobytes()]))
    sgn = Sign(bucket=8).encode(vec(16, 2))
    meta = json.loads(sgn.header()[10:])
    meta["d"] = 17
    with pytest.raises(PayloadError, match="expected 3 scales|signs have the wrong size"):
        Payload.from_frames(frames_of(meta, [sgn.buffers["scale"].tobytes(), sgn.buffers["signs"].tobytes()]))


@pytest.mark.parametrize("rule,f", [("median", 1), ("krum", 1), ("trimmed_mean", 1), ("mean", 0)])
def test_robust_rules_over_compressed_updates(rule, f):
    d = 3000
    ps = [wire(Uniform(8).encode(vec(d, 50 + i), seed=i)) for i in range(7)]
    dense = np.stack([compress.decode(p) for p in ps])
    import fedagg

    expected = fedagg.aggregate(dense, rule, f)
    buf = np.empty((7, d), np.float32)
    got = compress.aggregate(ps, rule, f, out=buf if rule != "mean" else None)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out must be"):
        compress.decode_into(ps, np.empty((6, d), np.float32))


# ------------------------------------------------------ rotation (DRIVE) codec
from fedagg.compress import Rotation  # noqa: E402


def test_rotation_vnmse_near_theory():
    """Unbiased 1-bit DRIVE: vNMSE -> pi/2 - 1 = 0.571 for large blocks (Vargaftik et al. 2021)."""
    x = vec(1 << 16, 7)
    errs = []
    for s in range(20):
        y = compress.decode(wire(Rotation(block=1 << 14).encode(x, seed=s))).astype(np.float64)
        errs.append(np.sum((y - x) ** 2) / np.sum(x.astype(np.float64) ** 2))
    assert 0.53 <= np.mean(errs) <= 0.61
    p = Rotation(block=1 << 14).encode(x, seed=0)
    assert p.bits_per_coordinate == pytest.approx(1 + 32 / (1 << 14) + 8 * len(p.header()) / x.size)


@pytest.mark.parametrize("bits", [1, 2])
def test_rotation_unbiased_over_seeds(bits):
    """Unbiased over the rotation (exactly so for a uniformly random rotation; the randomized
    Hadamard approximates one well at this block size, poorly for blocks of a few dozen)."""
    x = vec(1024, 12 + bits)
    trials = 1500
    acc, sq = np.zeros(x.size), np.zeros(x.size)
    for s in range(trials):
        y = compress.decode(Rotation(bits).encode(x, seed=s)).astype(np.float64)
        acc += y
        sq += (y - x) ** 2
    bias = acc / trials - x
    sigma = np.sqrt(sq / trials / trials)
    assert np.max(np.abs(bias) / sigma) < 6
    assert np.linalg.norm(bias) < 1.5 * np.linalg.norm(sigma)


def test_rotation_shared_seed_mean_equals_decode_then_mean():
    d = 10_000
    xs = [vec(d, 60 + i) for i in range(4)]
    ps = [wire(Rotation(block=4096).encode(x, seed=99)) for x in xs]
    ps.append(wire(Rotation(block=4096).encode(xs[0], seed=5)))  # another rotation
    dense = np.stack([compress.decode(p).astype(np.float64) for p in ps])
    np.testing.assert_allclose(compress.mean(ps), dense.mean(0), rtol=1e-5, atol=1e-5)


def test_rotation_error_feedback_and_bad_block():
    codec = Rotation(block=1024, error_feedback=True)
    state = codec.state(3000)
    total_in, total_sent = np.zeros(3000), np.zeros(3000)
    for t in range(6):
        g = vec(3000, 70 + t)
        total_in += g
        total_sent += compress.decode(codec.encode(g, state, seed=t))
    np.testing.assert_allclose(total_sent + state.residual, total_in, atol=2e-4)
    with pytest.raises(ValueError, match="power of two"):
        Rotation(block=1000)


# --------------------------------------------------------------- PowerSGD
from fedagg.compress import PowerSGD  # noqa: E402


def layers(seed, m=40, n=30, rank=None):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    if rank is not None:
        W = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
    return {"w": W.astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)}


def flat(ls):
    return np.concatenate([v.reshape(-1) for v in ls.values()])


def test_powersgd_is_exact_on_low_rank_layers():
    ls = layers(1, rank=2)
    p = wire(PowerSGD(rank=2, error_feedback=False).encode(ls))
    np.testing.assert_allclose(compress.decode(p), flat(ls), rtol=1e-4, atol=1e-4)
    assert p.nbytes < flat(ls).nbytes  # 40x2 + 30x2 + 30 floats instead of 40x30 + 30


def test_powersgd_warm_start_approaches_the_best_rank_r():
    ls = layers(2)
    W = ls["w"].astype(np.float64)
    s = np.linalg.svd(W, compute_uv=False)
    best = np.sqrt(np.sum(s[2:] ** 2))
    codec, state = PowerSGD(rank=2, error_feedback=False), PowerSGD(rank=2).state()
    errs = []
    for _ in range(8):  # the same matrix each round: power iteration on its top subspace
        y = compress.decode(codec.encode(ls, state))[: W.size].reshape(W.shape)
        errs.append(np.linalg.norm(y - W))
    assert errs[-1] <= errs[0] and errs[-1] <= 1.05 * best


def test_powersgd_error_feedback_carries_the_residual():
    codec, state = PowerSGD(rank=1), PowerSGD(rank=1).state()
    total_in, total_sent = 0.0, 0.0
    for t in range(6):
        ls = layers(10 + t)
        total_in = total_in + flat(ls).astype(np.float64)
        total_sent = total_sent + compress.decode(wire(codec.encode(ls, state))).astype(np.float64)
    owed = np.concatenate([state.residual["w"].reshape(-1), np.zeros(30)])
    np.testing.assert_allclose(total_sent + owed, total_in, atol=1e-3)


def test_powersgd_payload_checks():
    p = PowerSGD(rank=2).encode(layers(3))
    meta = json.loads(p.header()[10:])
    meta["params"]["layers"][0]["rank"] = 40
    with pytest.raises(PayloadError, match="does not fit shape"):
        Payload.from_frames(frames_of(meta, [b.tobytes() for b in p.buffers.values()]))
    meta = json.loads(p.header()[10:])
    meta["d"] = 5
    with pytest.raises(PayloadError, match="holds more than d = 5 values"):
        Payload.from_frames(frames_of(meta, [b.tobytes() for b in p.buffers.values()]))
    meta = json.loads(p.header()[10:])
    meta["params"]["layers"][0]["shape"] = [2**64, 1]  # would overflow an int64 product
    with pytest.raises(PayloadError, match="bad shape"):
        Payload.from_frames(frames_of(meta, [b.tobytes() for b in p.buffers.values()]))
    nested = struct.pack("<4sHI", b"FAGP", 1, 4000) + b"[" * 2000 + b"]" * 2000
    with pytest.raises(PayloadError, match="not acceptable JSON"):  # deep nesting: no RecursionError
        Payload.from_frames([nested])
    with pytest.raises(ValueError, match="repeated"):
        PowerSGD().encode([("a", np.ones((3, 3), np.float32)), ("a", np.ones(2, np.float32))])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec", [Uniform(8), Uniform(2, bucket=16), QSGD(5), Sign(), Rotation(block=64)])
def test_quantizers_refuse_nonfinite_updates(codec, bad):
    for d, pos in [(100, 0), (100, 57), (5000, 4999)]:
        x = vec(d, 3)
        x[pos] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.encode(x) if isinstance(codec, Sign) else codec.encode(x, seed=1)


def test_lloyd_max_levels_are_conditional_means():
    """Each level is the mean of N(0, 1) over its cell (Lloyd-Max optimality), to 4 digits."""
    import math

    from fedagg.compress.codecs import LLOYD_MAX, _levels

    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    for bits in LLOYD_MAX:
        lv = _levels(bits)
        edges = [-math.inf, *((lv[1:] + lv[:-1]) / 2), math.inf]
        for c, a, b in zip(lv, edges[:-1], edges[1:]):
            pa = 0.0 if a == -math.inf else pdf(a)
            pb = 0.0 if b == math.inf else pdf(b)
            assert (pa - pb) / (cdf(b) - cdf(a)) == pytest.approx(c, abs=2e-4)


@pytest.mark.parametrize("bits,lo,hi", [(1, 0.53, 0.61), (2, 0.10, 0.15), (4, 0.005, 0.015)])
def test_rotation_bits_shrink_the_error(bits, lo, hi):
    x = vec(1 << 15, 31)
    errs = [np.sum((compress.decode(wire(Rotation(bits, block=1 << 13).encode(x, seed=s))).astype(np.float64) - x)
                   ** 2) / np.sum(x.astype(np.float64) ** 2) for s in range(12)]
    assert lo <= np.mean(errs) <= hi


def test_results_follow_like():
    torch = pytest.importorskip("torch")
    ps = [compress.Uniform(8).encode(vec(100, s), seed=s) for s in range(3)]
    out = compress.mean(ps, like=torch.zeros(1))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), compress.mean(ps))
    rows = compress.decode_into(ps, torch.empty((3, 100)))
    np.testing.assert_array_equal(rows.numpy(), compress.decode_into(ps))
    with pytest.raises(TypeError, match="like must be"):
        compress.mean(ps, like=[1.0])
    with pytest.raises(ValueError, match="out must be"):
        compress.decode_into(ps, np.empty((3, 100), dtype=np.float64))
