"""fedagg.privacy: Philox noise, the discrete Gaussian, accounting, adaptive clipping, DP aggregation."""

import math

import numpy as np
import pytest

import fedagg
from fedagg import _core, privacy
from fedagg.privacy import AdaptiveClip, CentralDP, LocalDP, accounting
from helpers import ALL_RULES, rule_kwargs

scipy_stats = pytest.importorskip("scipy.stats")
dp_accounting = pytest.importorskip("dp_accounting")

# ---------------------------------------------------------------- a plain reference Philox4x32-10
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox_ref(c, k):
    """Salmon et al. 2011, one word at a time in Python integers."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [c0, c1, c2, c3]


def philox_blocks(seed, blocks):
    """The reference, vectorized over block numbers with uint64 NumPy arithmetic."""
    b = np.asarray(blocks, dtype=np.uint64)
    c0, c1 = b & np.uint64(MASK), b >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & MASK), np.uint64(seed >> 32)
    m = np.uint64(MASK)
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c0, np.uint64(M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & m, p1 & m, ((p0 >> np.uint64(32)) ^ c3 ^ k1) & m, p0 & m
        k0, k1 = (k0 + np.uint64(W0)) & m, (k1 + np.uint64(W1)) & m
    return [w.astype(np.uint32) for w in (c0, c1, c2, c3)]


F = np.float32


def log_unit_ref(u):
    """The documented float32 log (Cephes logf), one rounded operation at a time."""
    b = u.view(np.uint32)
    e = ((b >> np.uint32(23)).astype(np.int32) - 127).astype(F)
    m = ((b & np.uint32(0x007FFFFF)) | np.uint32(0x3F800000)).view(F)
    big = m > F(1.41421356)
    m = np.where(big, m * F(0.5), m)
    e = np.where(big, e + F(1.0), e)
    x = m - F(1.0)
    z = x * x
    y = np.full_like(x, F(7.0376836292e-2))
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
              2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * x + F(c)
    y = y * x * z
    y = y + e * F(-2.12194440e-4)
    y = y - F(0.5) * z
    return (x + y) + e * F(0.693359375)


def sincos_ref(k):
    j = (k.astype(np.uint32) + np.uint32(1 << 21)) & np.uint32(0x00FFFFFF)
    q = j >> np.uint32(22)
    x = ((j & np.uint32(0x003FFFFF)).astype(np.int32) - (1 << 21)).astype(F) * F(3.7450702e-07)
    z = x * x
    sp = (F(-1.9515295891e-4) * z + F(8.3321608736e-3)) * z - F(1.6666654611e-1)
    sn = sp * z * x + x
    cp = (F(2.443315711809948e-5) * z - F(1.388731625493765e-3)) * z + F(4.166664568298827e-2)
    cs = cp * z * z - F(0.5) * z + F(1.0)
    s = np.select([q == 0, q == 1, q == 2], [sn, cs, -sn], -cs)
    c = np.select([q == 0, q == 1, q == 2], [cs, -sn, -cs], sn)
    return s, c


def normals_ref(seed, offset, d):
    """Normal numbers offset .. offset + d - 1 of stream `seed`, as documented in philox.hpp."""
    g = np.arange(offset, offset + d, dtype=np.uint64)
    blocks = np.unique(g // np.uint64(4))
    w = philox_blocks(seed, blocks)
    out = np.empty((blocks.size, 4), dtype=F)
    for a, b, col in ((w[0], w[1], 0), (w[2], w[3], 2)):
        u = a.astype(F) * F(2.0 ** -32) + F(2.0 ** -33)
        r = np.sqrt(F(-2.0) * log_unit_ref(u))
        s, c = sincos_ref(b >> np.uint32(8))
        out[:, col], out[:, col + 1] = r * c, r * s
    idx = (g // np.uint64(4) - blocks[0]).astype(np.int64)
    return out[idx, (g % np.uint64(4)).astype(np.int64)]


# ---------------------------------------------------------------- Philox and the Gaussian stream
def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10.
    kat = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
           ([MASK] * 4, [MASK] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
           ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for c, k, want in kat:
        assert philox_ref(c, k) == want
        assert list(_core.philox4x32_10(c, k)) == want
    rng = np.random.default_rng(0)
    for _ in range(50):
        c, k = [int(v) for v in rng.integers(0, 2**32, 4)], [int(v) for v in rng.integers(0, 2**32, 2)]
        assert list(_core.philox4x32_10(c, k)) == philox_ref(c, k)


@pytest.mark.parametrize("seed,offset,d", [(0, 0, 1), (1, 3, 7), (2**63 + 5, 1, 64), (7, 2, 1000),
                                           (123, 2**40 + 1, 5003), (99, 0, 200_000)])
@pytest.mark.parametrize("threads", [1, 2])
def test_gaussian_is_the_documented_stream_bit_for_bit(seed, offset, d, threads, threads_restored):
    fedagg.set_num_threads(threads)
    got = privacy.gaussian(d, 1.0, seed=seed, offset=offset)
    np.testing.assert_array_equal(got.view(np.uint32), normals_ref(seed, offset, d).view(np.uint32))


def test_gaussian_stream_is_the_same_on_every_instruction_set(isa):
    np.testing.assert_array_equal(privacy.gaussian(100_003, 1.0, seed=5, offset=1).view(np.uint32),
                                  normals_ref(5, 1, 100_003).view(np.uint32))


def test_gaussian_offsets_index_one_stream():
    whole = privacy.gaussian(10_000, 2.5, seed=11)
    for a, b in [(0, 1), (1, 6), (5, 4097), (333, 10_000)]:
        np.testing.assert_array_equal(privacy.gaussian(b - a, 2.5, seed=11, offset=a), whole[a:b])
    assert not np.array_equal(whole, privacy.gaussian(10_000, 2.5, seed=12))


def test_gaussian_statistics():
    x = privacy.gaussian(2_000_000, 1.0, seed=2026).astype(np.float64)
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(scipy_stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert abs(scipy_stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    assert scipy_stats.kstest(x, "norm").pvalue > 1e-3
    assert np.abs(x).max() <= 6.78  # Box-Muller from 32-bit words: |n| <= sqrt(66 ln 2)
    # pairs from one block are independent too (no correlation between the cos and sin halves)
    assert abs(np.corrcoef(x[0::2], x[1::2])[0, 1]) < 5 / math.sqrt(n / 2)


def test_add_gaussian_in_place_and_other_dtypes():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    want = x + privacy.gaussian(1001, 0.3, seed=5, offset=9)
    y = privacy.add_gaussian(x, 0.3, seed=5, offset=9)
    assert y is x
    np.testing.assert_array_equal(x, want)
    x64 = np.linspace(-1, 1, 1001)
    y64 = privacy.add_gaussian(x64, 0.3, seed=5, offset=9)
    assert y64.dtype == np.float64 and y64 is not x64
    np.testing.assert_allclose(y64, x64 + privacy.gaussian(1001, 0.3, seed=5, offset=9), rtol=0, atol=1e-7)
    torch = pytest.importorskip("torch")
    t = torch.zeros(3, 5)
    assert privacy.add_gaussian(t, 1.0, seed=1) is t
    np.testing.assert_array_equal(t.numpy().reshape(-1), privacy.gaussian(15, 1.0, seed=1))


def test_noise_argument_errors():
    with pytest.raises(ValueError, match="stddev"):
        privacy.gaussian(3, -1.0)
    with pytest.raises(ValueError, match="stddev"):
        privacy.gaussian(3, float("nan"))
    with pytest.raises(ValueError, match="seed"):
        privacy.gaussian(3, seed=-1)
    with pytest.raises(ValueError, match="offset"):
        privacy.gaussian(3, offset=2**63)
    with pytest.raises(ValueError, match="d must be"):
        privacy.gaussian(-2)
    with pytest.raises(TypeError, match="float32"):
        _core.gaussian_noise(np.zeros(3), 1.0, 0, 0, True)  # float64 out: no silent copy
    with pytest.raises(TypeError, match="writable"):
        ro = np.zeros(3, np.float32)
        ro.flags.writeable = False
        _core.gaussian_noise(ro, 1.0, 0, 0, True)
    with pytest.raises(TypeError, match="floating point"):
        privacy.add_gaussian(np.zeros(3, dtype=np.int32), 1.0)
    assert privacy.gaussian(0).size == 0


def test_seeds_come_from_the_os():
    seeds = {privacy.new_seed() for _ in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert not np.array_equal(privacy.gaussian(100), privacy.gaussian(100))


# ---------------------------------------------------------------- discrete Gaussian
def dg_pmf(sigma2, support):
    w = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma2))
    return w / w.sum()


@pytest.mark.parametrize("sigma2", [0.3, 1.0, 2.0, 10.3, 1000.0])
def test_discrete_gaussian_matches_its_pmf(sigma2):
    n = 200_000
    x = privacy.discrete_gaussian(n, sigma2, seed=42)
    p, q = privacy.rational_sigma2(sigma2)
    s2 = p / q
    half = int(8 * math.sqrt(s2)) + 2
    support = np.arange(-half, half + 1)
    assert np.abs(x).max() <= half
    pmf = dg_pmf(s2, support)
    counts = np.bincount(x + half, minlength=support.size)
    # chi-square over cells with expected count >= 5 (the rest pooled)
    exp = pmf * n
    big = exp >= 5
    obs_c = np.append(counts[big], counts[~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    if exp_c[-1] < 5:
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
        exp_c = exp_c * obs_c.sum() / exp_c.sum()
    assert scipy_stats.chisquare(obs_c, exp_c).pvalue > 1e-3
    # a KS distance against the exact CDF
    cdf = np.cumsum(pmf)
    emp = np.cumsum(counts) / n
    assert np.abs(emp - cdf).max() < 1.63 * 1.5 / math.sqrt(n)
    var_exact = float((pmf * support.astype(np.float64) ** 2).sum())
    assert abs(x.mean()) < 5 * math.sqrt(var_exact / n)
    assert abs(x.var() / var_exact - 1) < 5 * math.sqrt(2 / n)


def test_discrete_gaussian_is_reproducible_and_thread_independent(threads_restored):
    fedagg.set_num_threads(1)
    a = privacy.discrete_gaussian(20_000, 50.0, seed=3, offset=7)
    fedagg.set_num_threads(2)
    b = privacy.discrete_gaussian(20_000, 50.0, seed=3, offset=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(privacy.discrete_gaussian(100, 50.0, seed=3, offset=107), a[100:200])


def test_rational_sigma2_rounds_up_within_range():
    for s2 in [1e-9, 0.3, 1.0, 2.0 / 3.0, 12345.678, 2.0**38]:
        p, q = privacy.rational_sigma2(s2)
        assert 1 <= p < 2**40 and 1 <= q < 2**40 and q & (q - 1) == 0
        assert p / q >= s2 and (p - 1) / q < s2
    for bad in [0.0, -1.0, float("inf"), 2.0**40]:
        with pytest.raises(ValueError, match="sigma"):
            privacy.rational_sigma2(bad)
    with pytest.raises(ValueError, match="num, den"):
        _core.discrete_gaussian(np.zeros(2, np.int64), 2**41, 1, 0, 0, False)


def test_round_to_grid_is_unbiased():
    x = np.full(400_000, 0.3)
    r, ok = _core.round_to_grid(x, 0.25, 9)
    assert ok and set(np.unique(r)) == {1, 2}
    assert abs(r.mean() * 0.25 - 0.3) < 5 * 0.25 * 0.5 / math.sqrt(x.size)
    _, ok = _core.round_to_grid(np.array([1.0, np.nan]), 0.5, 1)
    assert not ok
    _, ok = _core.round_to_grid(np.array([1e30]), 1e-3, 1)
    assert not ok


# ---------------------------------------------------------------- accounting
def test_accountant_matches_dp_accounting_and_the_published_value():
    eps = accounting.epsilon(3.0, 0.1, 512, 1e-6)
    assert abs(eps - 3.77) < 0.01  # PLD, z = 3, q = 0.1, 512 steps, delta = 1e-6
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(3.0))
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event, 512)
    assert eps == acc.get_epsilon(1e-6)
    racc = dp_accounting.rdp.RdpAccountant()
    racc.compose(event, 512)
    assert accounting.epsilon(3.0, 0.1, 512, 1e-6, accountant="rdp") == racc.get_epsilon(1e-6)
    assert accounting.epsilon(1.0, 1.0, 0, 1e-5) == 0.0


def test_calibration_finds_the_smallest_noise():
    for target, delta, rounds, q in [(3.77, 1e-6, 512, 0.1), (1.0, 1e-5, 100, 1.0), (8.0, 1e-5, 1000, 0.01)]:
        z = accounting.calibrate(target, delta, rounds, q)
        assert accounting.epsilon(z, q, rounds, delta) <= target
        assert accounting.epsilon(z * 0.99, q, rounds, delta) > target
    assert abs(accounting.calibrate(3.77, 1e-6, 512, 0.1) - 3.0) < 0.01


def test_ledger_composes_heterogeneous_rounds():
    led = privacy.Ledger(delta=1e-5)
    for z, q in [(1.0, 0.1)] * 3 + [(2.0, 0.2)] * 2:
        led.add(z, q)
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), 2)
    assert led.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_accounting_argument_errors():
    with pytest.raises(ValueError, match="noise_multiplier"):
        accounting.epsilon(0.0, 0.1, 10, 1e-5)
    with pytest.raises(ValueError, match="sampling_rate"):
        accounting.epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        accounting.epsilon(1.0, 0.1, 10, 1.0)
    with pytest.raises(ValueError, match="rounds"):
        accounting.epsilon(1.0, 0.1, -1, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        accounting.epsilon(1.0, 0.1, 1, 1e-5, accountant="moments")
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate(0.0, 1e-5, 10)


# ---------------------------------------------------------------- adaptive clipping
def test_adaptive_clip_moves_the_right_way():
    a = AdaptiveClip(initial=1.0, target_quantile=0.5, learning_rate=0.2)
    a.step(unclipped=10, participants=100, count_noise=0.0)  # 90% clipped: too small
    assert a.clip_norm == pytest.approx(math.exp(0.2 * 0.4))
    b = AdaptiveClip(initial=1.0, target_quantile=0.5)
    b.step(unclipped=90, participants=100, count_noise=0.0)  # 10% clipped: too large
    assert b.clip_norm == pytest.approx(math.exp(-0.2 * 0.4))


@pytest.mark.parametrize("gamma", [0.3, 0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(gamma):
    rng = np.random.default_rng(8)
    a = AdaptiveClip(initial=0.01, target_quantile=gamma, learning_rate=0.2)
    m = 200
    for r in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=m)
        a.step(int(np.count_nonzero(norms <= a.clip_norm)), m, float(rng.standard_normal()))
    fresh = rng.lognormal(mean=0.0, sigma=0.5, size=200_000)
    assert abs(np.mean(fresh <= a.clip_norm) - gamma) < 0.05
    assert a.clip_norm == pytest.approx(np.quantile(fresh, gamma), rel=0.15)


def test_adaptive_noise_split():
    a = AdaptiveClip(count_stddev=5.0)
    zv = a.value_noise_multiplier(1.0, 100)
    assert zv ** -2 + (2 * 5.0) ** -2 == pytest.approx(1.0)  # the two queries together cost z = 1
    with pytest.raises(ValueError, match="count_stddev"):
        AdaptiveClip(count_stddev=0.4).value_noise_multiplier(1.0, 100)
    for bad in [dict(initial=0.0), dict(target_quantile=1.0), dict(learning_rate=-1.0), dict(count_stddev=0.0)]:
        with pytest.raises(ValueError):
            AdaptiveClip(**bad)


# ---------------------------------------------------------------- DP aggregation
def clipped(X, C):
    n = np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    return X.astype(np.float64) * np.minimum(1.0, C / np.maximum(n, 1e-300))


def test_dp_mean_is_the_fixed_denominator_estimator_plus_its_noise():
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((12, 5000)) * 0.01).astype(np.float32)  # norms near 0.7
    X[:4] *= 100  # these get clipped
    dp = CentralDP(clip_norm=1.0, noise_multiplier=0.8, expected_participants=16, seed=77)
    out, info = fedagg.aggregate(X, "mean", dp=dp, return_info=True)
    want = clipped(X, 1.0).sum(0) / 16 + privacy.gaussian(5000, 0.8 * 1.0 / 16, seed=77).astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    r = info.privacy
    assert r.sensitivity == pytest.approx(1.0 / 16) and r.noise_stddev == pytest.approx(0.05)
    assert info.clipped == 4 and r.participants == 12 and r.round == 0
    assert r.epsilon == pytest.approx(accounting.epsilon(0.8, 1.0, 1, 1e-5))
    assert "seed" not in r.as_dict()


def test_dp_weighted_mean_and_refusals():
    X = np.random.default_rng(2).standard_normal((5, 300)).astype(np.float32)
    w = np.array([1.0, 0.5, 0.25, 1.0, 0.0])
    dp = CentralDP(clip_norm=2.0, noise_multiplier=1.0, expected_participants=4.0, seed=3)
    out = fedagg.aggregate(X, "mean", weights=w, dp=dp)
    want = (w[:, None] * clipped(X, 2.0)).sum(0) / 4.0 + privacy.gaussian(300, 0.5, seed=3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weights in"):
        fedagg.aggregate(X, "mean", weights=w * 3, dp=dp)
    with pytest.raises(ValueError, match="expected_participants"):
        fedagg.aggregate(X, "mean", dp=CentralDP(clip_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="clip_norm"):
        fedagg.aggregate(X, "mean", dp=dp, clip_norm=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        CentralDP(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="mode"):
        CentralDP(clip_norm=1.0, noise_multiplier=1.0, mode="laplace")
    with pytest.raises(ValueError, match="power of two"):
        CentralDP(clip_norm=1.0, noise_multiplier=1.0, mode="discrete", grid_step=0.3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        CentralDP(clip_norm=1.0, noise_multiplier=float("nan"))
    agg = fedagg.Aggregator("mean", dp=dp)
    with pytest.raises(ValueError, match="weights must lie"):
        agg.add(X[0], weight=2.0)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_dp_composes_with_every_rule(rule):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((11, 400)).astype(np.float32) + 3.0
    f = 0 if rule in ("mean", "geometric_median", "centered_clipping") else 2
    kw = rule_kwargs(rule)
    dp = CentralDP(clip_norm=5.0, noise_multiplier=0.5, expected_participants=11, seed=6)
    out, info = fedagg.aggregate(X, rule, f, dp=dp, return_info=True, **kw)
    clean = fedagg.aggregate(X, rule, f, clip_norm=5.0, **kw).astype(np.float64)
    noise = privacy.gaussian(400, info.privacy.noise_stddev, seed=6).astype(np.float64)
    if rule == "mean":
        assert info.privacy.sensitivity == pytest.approx(5.0 / 11)
    else:  # the aggregate is clipped to C, sensitivity 2C
        assert info.privacy.sensitivity == pytest.approx(10.0)
        clean *= min(1.0, 5.0 / np.linalg.norm(clean))
    np.testing.assert_allclose(out, clean + noise, rtol=1e-5, atol=1e-5)
    # the streaming Aggregator gives the same release with a fresh mechanism of the same seed
    agg = fedagg.Aggregator(rule, f, dp=CentralDP(clip_norm=5.0, noise_multiplier=0.5, expected_participants=11,
                                                  seed=6), **kw)
    for x in X:
        agg.add(x)
    sout, sinfo = agg.result(return_info=True)
    np.testing.assert_allclose(sout, out, rtol=1e-5, atol=1e-5)
    assert sinfo.privacy.sensitivity == info.privacy.sensitivity


def test_dp_rounds_accumulate_epsilon_and_use_fresh_noise():
    X = np.random.default_rng(5).standard_normal((8, 100)).astype(np.float32)
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.2, expected_participants=8, sampling_rate=0.05, seed=1)
    outs = [fedagg.aggregate(X, "mean", dp=dp) for _ in range(3)]
    assert not np.allclose(outs[0], outs[1])
    assert [r.round for r in dp.records] == [0, 1, 2]
    assert dp.epsilon() == pytest.approx(accounting.epsilon(1.2, 0.05, 3, 1e-5))
    assert dp.records[0].epsilon < dp.records[2].epsilon


def test_dp_discrete_mode_releases_grid_multiples():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((9, 20_000)).astype(np.float32) * 0.01
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_participants=9, mode="discrete", seed=2)
    out, info = fedagg.aggregate(X, "mean", dp=dp, return_info=True)
    r = info.privacy
    assert r.mechanism == "discrete_gaussian" and math.frexp(r.grid_step)[0] == 0.5
    k = out.astype(np.float64) / r.grid_step
    np.testing.assert_array_equal(k, np.round(k))  # every value an integer multiple of the step
    delta_grid = r.sensitivity / r.grid_step + math.sqrt(20_000)
    assert r.noise_stddev >= 1.0 * delta_grid * r.grid_step  # sigma rounded up, never down
    assert r.noise_stddev == pytest.approx(delta_grid * r.grid_step, rel=1e-6)
    resid = out.astype(np.float64) - clipped(X, 1.0).sum(0) / 9
    assert abs(resid.std() / r.noise_stddev - 1) < 0.05
    assert scipy_stats.kstest(resid / r.noise_stddev, "norm").pvalue > 1e-4


def test_dp_adaptive_clipping_through_the_pipeline():
    rng = np.random.default_rng(7)
    dp = CentralDP(adaptive=AdaptiveClip(initial=1.0, target_quantile=0.5), noise_multiplier=1.0,
                   expected_participants=100, sampling_rate=0.01, accountant="rdp", seed=4)
    for _ in range(50):  # C needs about ln(7) / 0.1 = 20 rounds to climb from 1 to the median norm near 7
        X = (rng.standard_normal((100, 50)) * rng.lognormal(0, 0.3, (100, 1))).astype(np.float32)
        _, info = fedagg.aggregate(X, "median", dp=dp, return_info=True)
    norms = np.linalg.norm(rng.standard_normal((20_000, 50)) * rng.lognormal(0, 0.3, (20_000, 1)), axis=1)
    assert abs(np.mean(norms <= dp.clip_norm) - 0.5) < 0.1
    assert info.privacy.next_clip_norm == dp.clip_norm and info.privacy.unclipped_fraction is not None


def test_local_dp_clips_then_noises():
    x = np.full(1000, 1.0, dtype=np.float32)  # norm 31.6
    ldp = LocalDP(clip_norm=2.0, noise_multiplier=1.5, seed=8)
    y = ldp.privatize(x)
    want = x * (2.0 / math.sqrt(1000)) + privacy.gaussian(1000, 1.5 * 4.0, seed=8)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    ldp.privatize(x)
    assert ldp.epsilon() == pytest.approx(accounting.epsilon(1.5, 1.0, 2, 1e-5))


def test_dp_on_torch_tensors_follows_the_input():
    torch = pytest.importorskip("torch")
    X = torch.randn(6, 64)
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_participants=6, seed=1)
    out = fedagg.aggregate(X, "trimmed_mean", 1, dp=dp)
    assert isinstance(out, torch.Tensor) and out.shape == (64,)
    dp2 = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_participants=6, seed=1, mode="discrete")
    out2 = fedagg.aggregate(X.double(), "krum", 1, dp=dp2)
    assert isinstance(out2, torch.Tensor) and out2.dtype == torch.float64


def test_tiny_noise_is_refused_by_pld_in_bounded_memory_and_accounted_by_rdp():
    # PLD's grid grows like 1 / z^2: at z = 1e-3 it would need tens of GiB. A clear error instead.
    with pytest.raises(ValueError, match="accountant='rdp'"):
        privacy.CentralDP(clip_norm=1.0, noise_multiplier=1e-3, expected_participants=10)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        privacy.LocalDP(clip_norm=1.0, noise_multiplier=0.05)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        privacy.epsilon(1e-3, 1.0, 10, 1e-5)
    dp = privacy.CentralDP(clip_norm=1.0, noise_multiplier=1e-3, expected_participants=10, accountant="rdp", seed=1)
    out, info = fedagg.aggregate(np.ones((10, 5), np.float32), "mean", dp=dp, return_info=True)
    assert info.privacy.epsilon > 100 and np.isfinite(info.privacy.epsilon)
    assert privacy.epsilon(0.1, 1.0, 10, 1e-5) > privacy.epsilon(1.0, 1.0, 10, 1e-5)  # the floor itself works
