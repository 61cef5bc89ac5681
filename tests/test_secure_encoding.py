"""The distributed discrete Gaussian encoding against float64 references, its epsilon against
dp-accounting's Gaussian where the two must agree, and robust rules over secure bucket sums."""

import hashlib
import math

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("dp_accounting")

import fedagg  # noqa: E402
from fedagg import privacy  # noqa: E402
from fedagg.secure import Encoding, Params, buckets  # noqa: E402
from test_secure_protocol import Round, rid  # noqa: E402


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


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_robust_rule_over_secure_bucket_sums_under_attack(rule):
    # 48 participants in 8 buckets of 6, f = 2 Byzantine with huge updates: at most 2 buckets are
    # corrupted, so the rule over the 8 secure bucket means (f_buckets = 2) stays within the
    # honest bucket means (coordinate-wise rules: per coordinate; Krum: it picks an honest bucket).
    rng = np.random.default_rng(5)
    n, d, size, f = 48, 256, 6, 2
    X = rng.normal(0.0, 0.1, size=(n, d)) + 1.0
    byz = [3, 40]
    for i in byz:
        X[i] = 1e3
    seed = hashlib.sha256(b"ledger block hash").digest()
    groups = buckets.assign(list(range(n)), size, seed)
    enc = Encoding(clip=1e4, sigma=0.0, gamma=1e-4, n=size, d=d, seed=2)
    means, honest = [], []
    for b, members in enumerate(groups):
        p = Params(n=len(members), k=len(members) - 1, t=len(members) // 2 + 1, d=enc.padded)
        xs = {j: enc.encode(X[i], seed=1000 + i) for j, i in enumerate(members)}
        total, u3 = Round(p, tag=f"bucket {b}").run(xs)
        m = enc.decode(total, len(members))
        means.append(m)
        if not set(members) & set(byz):
            honest.append(m)
    H = np.array(honest)
    assert len(honest) >= len(groups) - f
    out = fedagg.aggregate(np.array(means, dtype=np.float32), rule, f)
    if rule == "krum":
        assert any(np.allclose(out, h, atol=1e-4) for h in H)
    else:
        tol = 1e-4
        assert np.all(out >= H.min(axis=0) - tol) and np.all(out <= H.max(axis=0) + tol)
    # and the result is near the honest mean (the attack moved it by at most the honest spread)
    assert np.abs(out - X[[i for i in range(n) if i not in byz]].mean(axis=0)).max() < 0.2
