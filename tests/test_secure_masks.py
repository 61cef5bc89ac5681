"""The native masks of secure aggregation (AES-128-CTR on the CPU's AES instructions), and the
Shamir sharing and neighbour graph they rest on, against NIST SP 800-38A and OpenSSL's AES-CTR
(through `cryptography`)."""

import numpy as np
import pytest

from fedagg import _core
from fedagg.secure import apply_masks, protocol, shamir
from fedagg.secure.graph import neighbours

ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
algorithms, modes, Cipher = ciphers.algorithms, ciphers.modes, ciphers.Cipher

needs_aes = pytest.mark.skipif(_core.secagg_prg_path() == "none", reason="this CPU has no AES instructions")


def keystream_words(key: bytes, d: int) -> np.ndarray:
    """OpenSSL's AES-128-CTR keystream under key[:16] from the counter block key[16:], as uint32 words."""
    enc = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor()
    return np.frombuffer(enc.update(bytes(4 * d)), dtype="<u4").astype(np.uint32)


def test_the_instruction_set_picks_the_aes_path(isa):
    path = _core.secagg_prg_path()
    assert path in ("vaes", "aesni", "armv8", "none")
    if isa == "base" and path != "none":  # a forced base table keeps to 128-bit instructions
        assert path in ("aesni", "armv8")


@needs_aes
def test_sp800_38a_f51_ctr_aes128(isa):
    # NIST SP 800-38A, F.5.1 CTR-AES128.Encrypt: the keystream is plaintext XOR ciphertext.
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
                          "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
    cipher = bytes.fromhex("874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"
                           "5ae4df3edbd5d35e5b4f09020db03eab" "1e031dda2fbe03d1792170a0f3009cee")
    want = bytes(p ^ c for p, c in zip(plain, cipher))
    y = np.zeros(16, dtype=np.uint32)
    _core.secagg_apply_masks(y, key + counter, [1], 32)
    assert y.astype("<u4").tobytes() == want


@needs_aes
@pytest.mark.parametrize("d", [1, 3, 4, 5, 31, 32, 33, 255, 4096 + 3, 100_003])
def test_mask_is_openssls_keystream(isa, d):
    rng = np.random.default_rng(d)
    key = rng.bytes(32)
    x = rng.integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32)
    ks = keystream_words(key, d)
    y = x.copy()
    _core.secagg_apply_masks(y, key, [1], 32)
    np.testing.assert_array_equal(y, ((x.astype(np.uint64) + ks) % 2**32).astype(np.uint32))
    _core.secagg_apply_masks(y, key, [-1], 32)
    np.testing.assert_array_equal(y, x)


@needs_aes
@pytest.mark.parametrize("counter", ["00" * 8 + "ff" * 7 + "f0", "ff" * 16, "12" * 8 + "ff" * 8])
def test_the_counter_carries_and_wraps_as_openssls(isa, counter):
    # the low 64 bits overflow inside the vector (carry into the high half) and at 2^128 (wrap to 0)
    key = np.random.default_rng(7).bytes(16) + bytes.fromhex(counter)
    d = 100_003
    y = np.zeros(d, np.uint32)
    _core.secagg_apply_masks(y, key, [1], 32)
    np.testing.assert_array_equal(y, keystream_words(key, d))


@pytest.mark.parametrize("bits", [1, 8, 20, 31, 32])
def test_several_masks_fused_mod_2_bits(isa, bits):
    rng = np.random.default_rng(bits)
    d, m = 50_001, 5
    keys = [rng.bytes(32) for _ in range(m)]
    signs = [1, -1, -1, 1, 1]
    x = rng.integers(0, 2**bits, d, dtype=np.uint64)
    want = x.astype(object)
    for k, s in zip(keys, signs):
        want = want + s * keystream_words(k, d).astype(object)
    want = np.array([int(v) % 2**bits for v in want], dtype=np.uint64)
    y = x.astype(np.uint32)
    apply_masks(y, keys, signs, bits)
    np.testing.assert_array_equal(y, want.astype(np.uint32))


@pytest.mark.parametrize("bits", [7, 32])
def test_without_aes_instructions_openssl_gives_the_same_masks(monkeypatch, bits):
    rng = np.random.default_rng(11)
    keys, signs = [rng.bytes(32) for _ in range(3)], [1, -1, 1]
    x = rng.integers(0, 2**32, 70_001, dtype=np.uint64).astype(np.uint32)
    want = x.copy()
    protocol._apply_masks_openssl(want, keys, signs, bits)
    if _core.secagg_prg_path() != "none":
        native = x.copy()
        apply_masks(native, keys, signs, bits)
        np.testing.assert_array_equal(native, want)
    monkeypatch.setattr(_core, "secagg_prg_path", lambda: "none")  # what a CPU without AES would report
    y = x.copy()
    apply_masks(y, keys, signs, bits)
    np.testing.assert_array_equal(y, want)
    ref = x.astype(object)
    for k, s in zip(keys, signs):
        ref = ref + s * keystream_words(k, x.size).astype(object)
    np.testing.assert_array_equal(y, np.array([int(v) % 2**bits for v in ref], dtype=np.uint64).astype(np.uint32))
    with pytest.raises(ValueError, match="32-byte key"):
        apply_masks(y, [bytes(16)], [1], 32)
    with pytest.raises(TypeError, match="uint32"):
        apply_masks(y.astype(np.int64), keys, signs, bits)


@needs_aes
def test_masks_do_not_depend_on_threads(threads_restored):
    rng = np.random.default_rng(3)
    key = rng.bytes(32)
    x = rng.integers(0, 2**32, 1_000_003, dtype=np.uint64).astype(np.uint32)
    outs = []
    for t in (1, 2, 3):
        _core.set_num_threads(t)
        y = x.copy()
        apply_masks(y, [key], [1], 32)
        outs.append(y)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_no_masks_reduces_into_the_ring():
    y = np.array([0, 255, 256, 2**32 - 1], dtype=np.uint32)
    apply_masks(y, [], [], 8)
    np.testing.assert_array_equal(y, [0, 255, 0, 255])


@pytest.mark.parametrize("bad, err, match", [
    (dict(data=np.zeros(4, np.int32)), TypeError, "uint32"),
    (dict(data=np.zeros((2, 2), np.uint32)), TypeError, "1-D"),
    (dict(data=np.zeros(8, np.uint32)[::2]), TypeError, "contiguous"),
    (dict(seeds=bytes(31)), ValueError, "32 bytes per sign"),
    (dict(signs=[2]), ValueError, "signs"),
    (dict(bits=0), ValueError, "bits"),
    (dict(bits=33), ValueError, "bits"),
])
def test_bad_mask_calls_are_refused(bad, err, match):
    args = dict(data=np.zeros(4, np.uint32), seeds=bytes(32), signs=[1], bits=32)
    args.update(bad)
    with pytest.raises(err, match=match):
        _core.secagg_apply_masks(**args)


def test_read_only_data_is_refused():
    y = np.zeros(4, np.uint32)
    y.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        _core.secagg_apply_masks(y, bytes(32), [1], 32)


# ------------------------------------------------------------------------------------- Shamir

@pytest.mark.parametrize("t,k", [(1, 1), (2, 3), (3, 5), (7, 12), (20, 39)])
def test_any_t_shares_recover_the_secret(t, k):
    rng = np.random.default_rng(t * 100 + k)
    secret = rng.bytes(32)
    xs = [int(x) for x in rng.choice(np.arange(1, 1000), k, replace=False)]
    shares = shamir.split(secret, t, xs)
    assert set(shares) == set(xs)
    items = sorted(shares.items())
    for _ in range(20):  # random t-subsets
        sub = [items[int(i)] for i in rng.choice(k, t, replace=False)]
        assert shamir.combine(sub) == secret
    if k > t:  # more than t shares of one polynomial interpolate it too
        assert shamir.combine(list(shares.items())[: t + 1]) == secret


def test_fewer_than_t_shares_say_nothing_about_the_secret():
    # With t - 1 shares fixed, every candidate secret is consistent with them: for two different
    # secrets there are polynomials through the same t - 1 points (the shares are uniform given
    # the secret). Checked constructively: fix t - 1 share values, then for any secret the
    # interpolation through (0, secret) and those points exists and reproduces them.
    t = 4
    xs = [1, 2, 3]
    ys = [shamir.P - 5, 12345, 2**300]
    for secret in (bytes(32), b"\xff" * 32):
        pts = [(0, int.from_bytes(secret, "big"))] + list(zip(xs, ys))
        # the unique degree-3 polynomial through pts, evaluated at the share points, is ys
        for x, y in zip(xs, ys):
            val = 0
            for i, (xi, yi) in enumerate(pts):
                num = den = 1
                for j, (xj, _) in enumerate(pts):
                    if i != j:
                        num = num * (x - xj) % shamir.P
                        den = den * (xi - xj) % shamir.P
                val = (val + yi * num * pow(den, shamir.P - 2, shamir.P)) % shamir.P
            assert val == y
    assert len(xs) == t - 1


def test_shamir_refuses_bad_input():
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(ValueError, match="t <="):
        shamir.split(bytes(32), 3, [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), 2, [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), 1, [0])
    with pytest.raises(ValueError, match="distinct"):
        shamir.combine([(1, 5), (1, 6)])
    with pytest.raises(ValueError, match="share"):
        shamir.from_bytes(bytes(10))
    with pytest.raises(ValueError, match="below p"):
        shamir.from_bytes(b"\xff" * shamir.SHARE_BYTES)
    # shares of no 32-byte secret (a wrong share) are refused, not returned as garbage
    shares = sorted(shamir.split(bytes(32), 2, [1, 2]).items())
    bad = [(shares[0][0], (shares[0][1] + 2**400) % shamir.P), shares[1]]
    with pytest.raises(ValueError, match="32-byte secret"):
        shamir.combine(bad)


# -------------------------------------------------------------------------------------- graph

@pytest.mark.parametrize("n,k", [(3, 2), (10, 4), (50, 12), (101, 14), (8, 7)])
def test_graph_is_k_regular_symmetric_and_seeded(n, k):
    g = neighbours(n, k, b"seed")
    assert set(g) == set(range(n))
    for i, nb in g.items():
        assert len(nb) == k and i not in nb
        assert all(i in g[j] for j in nb)
    assert neighbours(n, k, b"seed") == g
    if k < n - 1:
        assert neighbours(n, k, b"other seed") != g


@pytest.mark.parametrize("n,k", [(1, 0), (10, 3), (10, 9 + 1), (10, 0), (5, 3)])
def test_graph_refuses_bad_shapes(n, k):
    with pytest.raises(ValueError):
        neighbours(n, k, b"")
