"""The distributed discrete Gaussian encoding against float64 references, its epsilon against
dp-accounting's Gaussian where the two must agree, and robust rules over secure bucket sums."""

import hashlib
import math

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("dp_accounting")

import fedagg  # noqa: E402
from fedagg import _core  # noqa: E402
from fedagg import privacy  # noqa: E402
from fedagg.secure import Encoding, Params, buckets  # noqa: E402
from test_secure_protocol import Round  # noqa: E402


def clipped(x, c):
    n = np.linalg.norm(x)
    return x * (c / n) if n > c else x


@pytest.mark.parametrize("d", [1, 5, 1000, 4099])
def test_noiseless_round_trip_is_within_the_grid(d):
    rng = np.random.default_rng(d)
    n = 7
    X = rng.normal(size=(n, d)) * np.array([0.1, 1, 10, 0.5, 3, 0.2, 1])[:, None]
    enc = Encoding(clip=5.0, sigma=0.0, gamma=1e-3, n=n, d=d, seed=11)
    total = np.zeros(enc.padded, dtype=np.uint32)
    for i in range(n):
        total += enc.encode(X[i], seed=100 + i)  # uint32 adds wrap: the ring sum
    got = enc.decode(total)
    want = np.mean([clipped(X[i], 5.0) for i in range(n)], axis=0)
    # each participant's rounding moves each rotated coordinate by < gamma; the mean by < gamma
    # per coordinate; rotating back keeps the L2 norm (float32 rotation: + relative 1e-6)
    err = np.linalg.norm(got - want)
    assert err <= enc.gamma * math.sqrt(enc.padded) + 1e-5 * np.linalg.norm(want) + 1e-6


def test_noisy_mean_is_within_the_noise_bound():
    rng = np.random.default_rng(1)
    n, d = 20, 2048
    X = rng.normal(size=(n, d)) * 0.05
    enc = Encoding(clip=1.0, sigma=0.01, gamma=1e-4, n=n, d=d, seed=3)
    total = np.zeros(enc.padded, dtype=np.uint32)
    for i in range(n):
        total += enc.encode(X[i], seed=7 * i + 1)
    got = enc.decode(total)
    want = np.mean([clipped(x, 1.0) for x in X], axis=0)
    # the sum's noise has variance n sigma^2 per coordinate: the mean's L2 error ~ sigma sqrt(d / n)
    expected = enc.sigma * math.sqrt(enc.padded / n)
    err = np.linalg.norm(got - want)
    assert 0.8 * expected < err < 1.2 * expected + enc.gamma * math.sqrt(enc.padded)


@pytest.mark.parametrize("bits", [32, 12])
def test_round_to_ring_is_round_to_grid_mod_the_ring(bits, threads_restored):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=70_001) * 50).astype(np.float32)
    x[:3] = [0.0, -0.0, 1e-30]
    q, ok = _core.round_to_grid(x.astype(np.float64), 0.01, 77, 5)
    assert ok
    for threads in (1, 3):
        fedagg.set_num_threads(threads)
        ring, norm2, ok = _core.round_to_ring(x, 0.01, 77, 5, bits)
        assert ok and ring.dtype == np.uint32
        np.testing.assert_array_equal(ring, (q % (1 << bits)).astype(np.uint32))
        assert norm2 == pytest.approx(float(np.sum(q.astype(np.float64) ** 2)), rel=1e-12)
    _, _, ok = _core.round_to_ring(np.array([np.inf], np.float32), 0.01, 1, 0, bits)
    assert not ok
    with pytest.raises(ValueError, match="bits"):
        _core.round_to_ring(x, 0.01, 1, 0, 33)


def test_clipping_and_rounded_norm_bound():
    enc = Encoding(clip=1.0, sigma=0.0, gamma=0.01, n=1, d=100, seed=0)
    x = np.full(100, 10.0)  # norm 100: clipped to 1
    q = enc.encode(x, seed=5).astype(np.int64)
    q[q >= 2**31] -= 2**32
    assert np.linalg.norm(q) <= enc.norm_bound
    assert abs(np.linalg.norm(enc.decode(enc.encode(x, seed=6))) - 1.0) < 0.05


def test_sums_that_leave_the_ring_are_bounded_and_reported():
    # a 12-bit ring and a fine grid: the bound says it wraps, and it does
    small = Encoding(clip=10.0, sigma=0.0, gamma=1e-3, n=4, d=64, bits=12, seed=1)
    assert small.wrap_probability() == 1.0
    safe = Encoding(clip=1.0, sigma=0.01, gamma=1e-4, n=100, d=2**16, bits=32)
    assert safe.wrap_probability() < 1e-6


def test_epsilon_matches_the_gaussian_where_tau_vanishes():
    # sigma / gamma large: the sum of discrete Gaussians is the Gaussian mechanism with
    # noise multiplier sqrt(n) sigma / sensitivity (Kairouz et al.); dp-accounting's RDP agrees.
    enc = Encoding(clip=1.0, sigma=2.0, gamma=1e-3, n=16, d=1024)
    assert enc.tau() < 1e-300
    z = math.sqrt(enc.n) * enc.sigma / (enc.norm_bound * enc.gamma)
    want = privacy.accounting.epsilon(z, 1.0, 5, 1e-5, accountant="rdp")
    assert enc.epsilon(1e-5, rounds=5) == pytest.approx(want, rel=0.02)


def test_epsilon_grows_when_the_noise_is_too_coarse():
    fine = Encoding(clip=1.0, sigma=0.5, gamma=1e-3, n=8, d=256)
    coarse = Encoding(clip=1.0, sigma=0.5, gamma=0.4, n=8, d=256)  # sigma / gamma ~ 1: tau matters
    assert coarse.tau() > 1e-6
    assert coarse.epsilon(1e-5) > fine.epsilon(1e-5)
    assert Encoding(clip=1.0, sigma=0.0, gamma=1e-3, n=8, d=256).epsilon(1e-5) == math.inf


@pytest.mark.parametrize("bad", [dict(clip=0), dict(gamma=-1), dict(sigma=-1), dict(n=0), dict(d=0),
                                 dict(bits=1), dict(bits=33), dict(beta=1.0)])
def test_encoding_refuses_bad_parameters(bad):
    kw = dict(clip=1.0, sigma=0.1, gamma=1e-3, n=4, d=16)
    kw.update(bad)
    with pytest.raises(ValueError):
        Encoding(**kw)


def test_encode_and_decode_refuse_bad_input():
    enc = Encoding(clip=1.0, sigma=0.1, gamma=1e-3, n=4, d=16)
    with pytest.raises(ValueError, match="coordinates"):
        enc.encode(np.zeros(15))
    with pytest.raises(ValueError, match="NaN"):
        enc.encode(np.full(16, np.nan))
    with pytest.raises(ValueError, match="uint32"):
        enc.decode(np.zeros(enc.padded, dtype=np.int64))


# ----------------------------------------------------------------------------------- buckets

def test_buckets_are_seeded_disjoint_and_cover_everyone():
    ids = list(range(103))
    b = buckets.assign(ids, 10, b"a seed of 16 bytes!")
    assert len(b) == 10 and sorted(i for x in b for i in x) == ids
    assert all(10 <= len(x) <= 11 for x in b)
    assert buckets.assign(ids, 10, b"a seed of 16 bytes!") == b
    assert buckets.assign(ids, 10, b"another seed, 16 bytes") != b
    assert buckets.assign(list(reversed(ids)), 10, b"a seed of 16 bytes!") == b  # the order given does not matter
    with pytest.raises(ValueError, match="distinct"):
        buckets.assign([1, 1, 2], 2, bytes(16))
    with pytest.raises(ValueError, match="size"):
        buckets.assign(ids, 1, bytes(16))
    with pytest.raises(ValueError, match="seed"):
        buckets.assign(ids, 10, b"short")
    with pytest.raises(ValueError, match="cannot fill"):
        buckets.assign(ids[:3], 10, bytes(16))


def _secure_bucket_means(X, size, seed):
    """Each bucket summed by a SecAgg+ round of encoded updates, decoded to its mean."""
    n, d = X.shape
    groups = buckets.assign(list(range(n)), size, seed)
    enc = Encoding(clip=1e4, sigma=0.0, gamma=1e-3, n=size + 1, d=d, seed=2)
    means = []
    for b, members in enumerate(groups):
        m = len(members)
        p = Params(n=m, k=m - 1, t=m // 2 + 1, d=enc.padded)
        xs = {j: enc.encode(X[i], seed=1000 + i) for j, i in enumerate(members)}
        total, u3 = Round(p, tag=f"bucket {b}").run(xs)
        assert u3 == set(range(m))
        means.append(enc.decode(total, m))
        # the secure mean is the plain mean of the clipped updates, to the grid
        want = np.mean([clipped(X[i].astype(np.float64), 1e4) for i in members], axis=0)
        assert np.abs(means[-1] - want).max() < 1e-2
    return groups, np.array(means)


@pytest.mark.parametrize("kind", ["random", "far_point", "one_side"])
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "geometric_median"])
def test_robust_rule_over_secure_bucket_sums_under_attack(rule, kind):
    # The attacks of the robustness suite (tests/test_properties.py), 48 participants, f = 2
    # Byzantine, 8 buckets of 6 drawn from a public seed: at most f buckets hold an attacker, so
    # the rule over the 8 secure bucket means with f_buckets = f keeps the guarantee it has over
    # plain updates, stated over the honest buckets' means.
    from test_properties import _attacked

    n, d, f = 48, 65, 2
    X, good, bad = _attacked(7 * len(kind) + len(rule), n, f, d, kind)
    groups, means = _secure_bucket_means(X, 6, hashlib.sha256(b"ledger block " + kind.encode()).digest())
    honest_b = [b for b, members in enumerate(groups) if not set(members) & set(bad.tolist())]
    assert len(honest_b) >= len(groups) - f
    H = means[honest_b]
    out = fedagg.aggregate(means.astype(np.float32), rule, f).astype(np.float64)
    if rule == "krum":
        assert any(np.allclose(out, h, atol=1e-5) for h in means[honest_b].astype(np.float32))
    elif rule == "geometric_median":
        mu = H.mean(axis=0)
        radius = np.linalg.norm(H - mu, axis=1).max()
        B = len(groups)
        assert np.linalg.norm(out - mu) <= 2.0 * (B - f) / (B - 2 * f) * radius + 1e-3
    else:
        tol = 1e-5
        assert np.all(out >= H.min(axis=0) - tol) and np.all(out <= H.max(axis=0) + tol)
