"""pytest-benchmark of the ZeroMQ transport on loopback against a raw TCP socket.

    FEDAGG_BENCH_D=100000000 python -m pytest bench/test_bench_transport.py   # a 400 MB update
    python -m pytest bench --benchmark-disable                               # answers checked only

One update of FEDAGG_BENCH_D float32 (default 1,000,000) from a participant
process to the server, and the same bytes over a raw TCP socket.
"""

import os

import pytest

pytest.importorskip("zmq")

from fedagg.transport import bench  # noqa: E402

D = int(os.environ.get("FEDAGG_BENCH_D", "1000000"))


def _gbps(benchmark, nbytes):
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9


def test_raw_tcp(benchmark):
    benchmark.group = "one update over loopback"
    assert bench.raw_tcp_seconds(4 * D) > 0
    benchmark.pedantic(bench.raw_tcp_seconds, args=(4 * D,), rounds=3, iterations=1)
    _gbps(benchmark, 4 * D)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_fedagg_update(benchmark, curve):
    benchmark.group = "one update over loopback"
    r = bench._round(1, D, "mean", curve)
    assert r["accepted"] == 1
    benchmark.pedantic(lambda: bench._round(1, D, "mean", curve), rounds=3, iterations=1)
    _gbps(benchmark, 4 * D)
