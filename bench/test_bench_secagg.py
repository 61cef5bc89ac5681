"""pytest-benchmark suite of secure aggregation: the native AES-128-CTR masks against OpenSSL's
AES-128-CTR keystream (the `cryptography` package) plus a NumPy add, and one fedagg SecAgg+ round.

    FEDAGG_BENCH_D=10000000 python -m pytest bench/test_bench_secagg.py
    python -m pytest bench --benchmark-disable        # answers checked only

Size from FEDAGG_BENCH_D (default 1,000,000). Flower's SecAgg+ round needs its Simulation
Runtime (minutes): `fedagg bench --sections secagg` runs it in the same run as fedagg's.
"""

import hashlib
import os

import numpy as np
import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from fedagg.secure import apply_masks, bench  # noqa: E402

D = int(os.environ.get("FEDAGG_BENCH_D", "1000000"))


@pytest.mark.parametrize("impl", ["fedagg", "openssl+numpy"])
def test_mask_expand_and_add(benchmark, impl):
    benchmark.group = "AES-128-CTR mask expanded and added, uint32"
    key, x = hashlib.sha256(b"key").digest(), np.arange(D, dtype=np.uint32)
    y = x.copy()

    def fedagg_mask():
        y[:] = x
        apply_masks(y, [key], [1], 32)
        return y

    def openssl_mask():
        ks = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor().update(bytes(4 * D))
        return x + np.frombuffer(ks, dtype="<u4")  # uint32 wraps

    got = benchmark(fedagg_mask if impl == "fedagg" else openssl_mask)
    want = openssl_mask()
    np.testing.assert_array_equal(got, want)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = 4 * D / benchmark.stats.stats.median / 1e9


def test_secure_round(benchmark):
    benchmark.group = "SecAgg+ round, n = 16"
    d = min(D, 200_000)
    res = benchmark.pedantic(lambda: bench._fedagg_round(16, d, 2), rounds=1, iterations=1)
    # the masked vector: 4 bytes per coordinate (d padded by < 256); keys and shares: a few KB
    assert res["max_abs_error"] < 1e-3 and res["up_bytes_per_participant"] < 4 * (d + 256) + 8192


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_round_through_the_server(benchmark, secure):
    """One round through fedagg serve, n = 16 participant processes on the same cores: plain against
    secure (buckets of 8) in the same run."""
    pytest.importorskip("zmq")
    benchmark.group = "a round through the server, n = 16"
    d = min(D, 200_000)
    res = benchmark.pedantic(lambda: bench.serve_round(16, d, secure=secure), rounds=1, iterations=1)
    assert res["accepted"] == 16 and res["max_abs_error"] < 1e-6
    assert res["bytes_in"] <= 16 * 4 * (d + 256) + (16 * 8192 if secure else 0)
    if secure:
        assert res["buckets"] == 2 and list(res["phases_ended"]) == ["join", "advertise", "share", "upload", "unmask"]
    if benchmark.stats is not None:
        benchmark.extra_info.update(dedicated_s=res["dedicated_s"], server_cpu_s=res["server_cpu_s"])
